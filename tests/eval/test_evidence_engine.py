"""factworld's evidence report with the engine: each record is answered on an engine with empty memory (equal to
a fresh engine per record), FLOPs come from the trace, the critic's verdict turns answers into "unknown", and
the report's figures follow from its samples."""

import math

import ml_collections
import pytest

from mantis_jax.data import factworld as fw
from mantis_jax.engine.core import Engine
from mantis_jax.engine.policy import FixedPolicy
from mantis_jax.eval import cli, evidence
from mantis_jax.eval.lm import ModelLM
from mantis_jax.model.args import ModelArgs


class LengthCritic:
    """P(supported) from the answer's length: deterministic, and below the threshold for short answers."""

    threshold = 0.5

    def score(self, question, answer, evidence):
        return min(1.0, len(answer) / 8)


@pytest.fixture(scope="module")
def setup(tiny_run):
    _, config, tokenizer, params = tiny_run
    config = ml_collections.ConfigDict(config.to_dict())
    config.engine.window_tokens, config.engine.max_new_tokens = 40, 8
    lm = ModelLM(ModelArgs.from_config(config), params, tokenizer)
    world = fw.world_from_config(config)
    count = lambda t: len(tokenizer.encode(t))  # noqa: E731
    records = {k: list(world.qa_records("test", k, 1, distance=64, count_tokens=count))
               for k in ("near", "cross_session")}
    return config, tokenizer, params, lm, records


def test_engine_system_equals_a_fresh_engine_per_record(setup):
    config, tokenizer, params, lm, by_kind = setup
    shared = Engine(config, params, tokenizer, critic=LengthCritic())
    systems = {"engine": evidence.engine_system(shared, FixedPolicy("always", 1.0, False), lm),
               "engine+critic": evidence.engine_system(shared, FixedPolicy("always", 1.0, True), lm)}
    rep = evidence.report(systems, by_kind)
    refs = []
    for r in [r for rs in by_kind.values() for r in rs]:  # a fresh engine per record, verifying
        fresh = Engine(config, params, tokenizer, policy=FixedPolicy("always", 1.0, True), critic=LengthCritic())
        for i, text in enumerate(r["sessions"] or [r["context"]]):
            fresh.read(text, session=f"s{i}")
        refs.append(fresh.answer(r["question"]))
        fresh.close()
    assert any(len(r["sessions"]) == 2 for rs in by_kind.values() for r in rs)
    for name, verify in (("engine", False), ("engine+critic", True)):
        samples = rep["samples"][name]
        for s, a in zip(samples, refs):
            assert s["flops"] == pytest.approx(a.trace.flops_total)  # the critic here reports no FLOPs
            if verify:
                score = LengthCritic().score("", a.trace.candidate, [])
                assert s["pred"] == a.text and (a.text == "unknown") == (score < 0.5)
                assert s["confidence"] == pytest.approx(score if score >= 0.5 else 1 - score)
            else:
                assert s["pred"] == a.trace.candidate
                ll = lm.loglikelihood([(a.trace.prompt, " " + a.trace.candidate)])[0][0] if a.trace.candidate else 0
                assert s["confidence"] == pytest.approx(math.exp(ll) if a.trace.candidate else 0.0)
        for kind, m in rep["systems"][name].items():
            mine = [s for s in samples if s["kind"] == kind]
            assert m["em"] == pytest.approx(sum(s["correct"] for s in mine) / len(mine))
            wrong_answers = [not s["correct"] and fw.normalize_answer(s["pred"]) != "unknown" for s in mine]
            assert m["hallucination_rate"] == pytest.approx(sum(wrong_answers) / len(mine))
    shared.close()


@pytest.mark.parametrize("args, message", [
    (["--controller={tmp}"], "--controller needs --critic"),
    (["--stage2={tmp}"], "holds no Stage-2 encoder weights; train them with"),
    (["--critic={tmp}"], "holds no trained weights; train them with: python -m mantis_jax.control.train_critic"),
])
def test_bad_engine_parts_are_one_line(tiny_run, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", f"--checkpoint={tiny_run[0]}", "--tasks=factworld"]
                 + [a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
