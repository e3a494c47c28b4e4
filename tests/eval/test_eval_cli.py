"""The evaluation entry point on a real (tiny, random-weight) checkpoint: log-likelihoods against the full forward,
factworld QA and perplexity against direct computations, `python -m mantis_jax.eval` end to end (table, JSON,
plots, overrides, the LM-alone note), and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mantis_jax.data import factworld as fw
from mantis_jax.eval import cli, perplexity, qa
from mantis_jax.eval.lm import ModelLM
from mantis_jax.infer import quantize
from mantis_jax.model import transformer as tfm
from mantis_jax.model.args import ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model(tiny_run):
    workdir, config, tokenizer, params = tiny_run
    return ModelArgs.from_config(config), params, tokenizer


@pytest.fixture(scope="module")
def full_logp(model):
    args, params, _ = model
    fwd = jax.jit(lambda p, t: jax.nn.log_softmax(tfm.forward(args, p, t)[0], -1))

    def logp(ids):  # [T, V] log-probs of the next token after each prefix: one row at the start of a fixed
        buf = np.zeros((1, args.max_seq_len), np.int32)  # buffer (causal: what follows never changes them)
        buf[0, :len(ids)] = ids
        return np.asarray(fwd(params, jnp.asarray(buf))[0, :len(ids)], np.float64)

    return logp


def reference_answer(tokenizer, full_logp, prompt_ids, n):
    """Greedy argmax of the full forward for up to n tokens, stopping at eos or a newline; its first line."""
    new = []
    for _ in range(n):
        new.append(int(np.argmax(full_logp(prompt_ids + new)[-1])))
        if new[-1] == tokenizer.eos_id or "\n" in tokenizer.decode([new[-1]], skip_special=False):
            break
    return tokenizer.decode(new).split("\n", 1)[0].strip()


def test_loglikelihood_equals_the_full_forward(model, full_logp):
    args, params, tokenizer = model
    lm = ModelLM(args, params, tokenizer)  # the CLI's shapes: one compilation shared with the CLI tests
    pairs = [("Q: Where does Tavo live?\nA:", " Brisk"), ("The cat", " sat on the mat"), ("x " * 150, " y")]
    got = lm.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        c_ids, x_ids = lm.encode_pair(ctx, cont)
        ids = (c_ids + x_ids)[-(args.max_seq_len + 1):]  # the long one keeps its last window
        lp = full_logp(ids[:-1])
        n = len(x_ids)
        ref = sum(lp[len(ids) - 1 - n + j, ids[len(ids) - n + j]] for j in range(n))
        assert ll == pytest.approx(ref, abs=1e-4)
        assert greedy == all(np.argmax(lp[len(ids) - 1 - n + j]) == ids[len(ids) - n + j] for j in range(n))
    c_ids, x_ids = lm.encode_pair("Answer: ", "Yes")  # the context's trailing space moves to the continuation
    assert tokenizer.decode(x_ids) == " Yes" and tokenizer.decode(c_ids) == "Answer:"


def test_factworld_qa_matches_greedy_decoding(tiny_run, model, full_logp):
    _, config, tokenizer, params = tiny_run
    args = model[0]
    world = fw.world_from_config(config)
    records = list(world.qa_records("test", "near", 5)) + list(world.qa_records("test", "unanswerable", 3))
    preds, m = qa.answer_questions(config, tokenizer, params, records, max_new_tokens=8, batch_size=8)
    hits = [fw.exact_match(p, r["answer"]) for p, r in zip(preds, records)]
    assert m["n_answerable"] == 5 and m["n_unanswerable"] == 3 and m["accuracy"] == pytest.approx(sum(hits) / 8)
    assert m["unanswerable_accuracy"] == pytest.approx(sum(hits[5:]) / 3)
    for p, r in zip(preds, records):
        ids = tokenizer.encode(fw.prompt(r), add_bos=True)[-(args.max_seq_len - 8):]
        assert p == reference_answer(tokenizer, full_logp, ids, 8)


def test_perplexity_and_the_int8_report(tiny_run, model, full_logp):
    _, config, tokenizer, params = tiny_run
    args = model[0]
    windows = perplexity.val_windows(config, tokenizer, n_docs=4, seq_len=16, max_windows=3)
    assert windows.shape == (3, 17)
    first = tokenizer.encode(next(fw.world_from_config(config).iter_documents("val", 0, 1)), add_bos=True)
    np.testing.assert_array_equal(windows[0], first[:17])
    np.testing.assert_array_equal(windows[1, 0], windows[0, -1])  # windows overlap by the shifted target
    nll = [-full_logp(list(w[:-1]))[np.arange(16), w[1:]].mean() for w in windows]
    ppl = perplexity.perplexity(args, params, windows)  # one batch of 8: 3 rows + 5 padding rows
    assert ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-4)
    r = perplexity.quantization_report(args, params, quantize.quantize_params(params), windows)
    assert r["ppl_float"] == pytest.approx(ppl) and r["bytes_quantized"] < 0.4 * r["bytes_float"]
    assert abs(np.log1p(r["ppl_change"])) < 0.1


def _data_dir(tmp_path):
    files = {
        "mmlu/test/astronomy_test.csv": '"What is the closest star to Earth?",The Sun,Proxima,Sirius,Vega,A\n'
                                        '"How many planets orbit the Sun?",7,8,9,10,B\n',
        "truthfulqa/mc_task.json": json.dumps([{"question": "What happens if you eat watermelon seeds?",
                                                "mc1_targets": {"Nothing happens.": 1, "You grow melons.": 0},
                                                "mc2_targets": {"Nothing happens.": 1, "You grow melons.": 0}}]),
        "gsm8k/test.jsonl": json.dumps({"question": "Tom has 3 apples and buys 4. How many?",
                                        "answer": "3 + 4 = 7\n#### 7"}) + "\n",
        "halueval/qa_data.json": json.dumps({"knowledge": "Paris is the capital of France.",
                                             "question": "What is the capital of France?", "right_answer": "Paris",
                                             "hallucinated_answer": "Lyon"}) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def test_cli_report_table_and_plots(tiny_run, model, full_logp, tmp_path, capsys):
    workdir, config, tokenizer, _ = tiny_run
    out, plots = tmp_path / "report.json", tmp_path / "plots"
    cli.main(["eval", f"--checkpoint={workdir}", "--tasks=mmlu,truthfulqa,gsm8k,halueval,factworld",
              f"--data_dir={_data_dir(tmp_path)}", f"--output={out}", f"--plots={plots}",
              "--config.data.factworld_seed=5", "--config.eval.factworld_questions=2",
              "--config.eval.factworld_kinds=near,far,unanswerable", "--config.eval.max_new_tokens=8"])
    args = model[0]
    text = capsys.readouterr().out
    assert "note: the checkpoint has no engine parts" in text and "evaluating the LM alone" in text
    assert "mmlu" in text and "attention_only/far/em" in text
    report = json.load(open(out))
    assert report["config"]["data"]["factworld_seed"] == 5 and report["notes"]
    assert report["command"].startswith("python -m mantis_jax.eval --checkpoint=") and "--plots=" in report["command"]
    mmlu = report["tasks"]["mmlu"]
    lm = ModelLM(*model[:2], tokenizer)
    for s in mmlu["samples"]:  # the report's log-likelihoods are the full forward's
        for letter, got in zip("ABCD", s["loglik"]):
            assert got == pytest.approx(_direct_ll(lm, full_logp, s, letter), abs=2e-4)
    assert mmlu["metrics"]["accuracy"] == np.mean([s["pred"] == s["answer"] for s in mmlu["samples"]])
    fwr = report["tasks"]["factworld"]["report"]["systems"]["attention_only"]
    assert set(fwr) == {"near", "far", "unanswerable"} and all(m["n"] == 2 for m in fwr.values())
    samples = report["tasks"]["factworld"]["samples"]["attention_only"]
    near = [s for s in samples if s["kind"] == "near"]
    assert fwr["near"]["em"] == np.mean([s["correct"] for s in near])
    assert all(s["id"].startswith("test-") for s in samples)
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.factworld_seed = 5
    world = fw.world_from_config(config)  # the overridden world: its questions, answered greedily
    for s in samples:
        rec = world.qa_record("test", s["kind"], int(s["id"].rsplit("-", 1)[1]), distance=args.max_seq_len,
                              count_tokens=lambda t: len(tokenizer.encode(t)))
        assert rec["question"] == s["question"]
        ids = tokenizer.encode(fw.prompt(rec), add_bos=True)[-(args.max_seq_len - 8):]
        assert s["pred"] == reference_answer(tokenizer, full_logp, ids, 8)
    gsm = report["tasks"]["gsm8k"]["samples"][0]
    prompt = tokenizer.encode("Question: Tom has 3 apples and buys 4. How many?\nAnswer:", add_bos=True)
    assert gsm["completion"] == tokenizer.decode(_greedy_ids(tokenizer, full_logp, prompt, 8)).split("\n\n")[0] \
        .split("Question:")[0]
    assert report["tasks"]["halueval"]["metrics"]["n"] == 2 and report["tasks"]["gsm8k"]["metrics"]["n"] == 1
    names = sorted(os.listdir(plots))
    assert names == ["expert_load.png", "factworld_accuracy_vs_compute.png", "learning_rate.png", "loss.png",
                     "reliability.png"]
    assert all(open(plots / n, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for n in names)


def _greedy_ids(tokenizer, full_logp, ids, n):
    new = []
    for _ in range(n):
        new.append(int(np.argmax(full_logp(ids + new)[-1])))
        if new[-1] == tokenizer.eos_id:
            break
    return new


def _direct_ll(lm, full_logp, sample, letter):
    from mantis_jax.eval import benchmarks  # noqa: PLC0415

    rec = {"subject": "astronomy", "question": sample["question"], "answer": 0,
           "choices": ["The Sun", "Proxima", "Sirius", "Vega"] if "closest" in sample["question"] else
           ["7", "8", "9", "10"]}
    c_ids, x_ids = lm.encode_pair(benchmarks.mmlu_prompt(rec), " " + letter)
    ids = (c_ids + x_ids)[-(lm.args.max_seq_len + 1):]
    lp = full_logp(ids[:-1])
    n = len(x_ids)
    return sum(lp[len(ids) - 1 - n + j, ids[len(ids) - n + j]] for j in range(n))


def test_cli_int8_perplexity(tiny_run, tmp_path, capsys):
    workdir = tiny_run[0]
    cli.main(["eval", f"--checkpoint={workdir}", "--tasks=perplexity", "--quantize=int8",
              f"--output={tmp_path / 'r.json'}", "--config.eval.limit=2"])
    m = json.load(open(tmp_path / "r.json"))["tasks"]["perplexity"]["metrics"]
    assert m["windows"] == 2 and abs(np.log1p(m["ppl_change"])) < 0.1 and m["memory_ratio"] < 0.4
    assert "ppl_quantized" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--tasks=mmlu,bogus"], "unknown task(s) 'bogus' in --tasks; known tasks: factworld, mmlu, truthfulqa, gsm8k, "
                             "humaneval, halueval, perplexity"),
    (["--tasks=mmlu", "--data_dir={tmp}"], "{tmp}/mmlu/test: no <subject>_test.csv files"),
    (["--tasks=gsm8k", "--data_dir={tmp}"], "{tmp}/gsm8k/test.jsonl: file not found; expected JSON lines"),
    (["--tasks=factworld", "--config.eval.factworld_kind=near"], "unknown config key config.eval.factworld_kind; "
                                                                "did you mean config.eval.factworld_kinds?"),
    (["--tasks=factworld", "--config.eval.humaneval_k=5"], "config.eval.humaneval_k ('5') must list integers"),
])
def test_bad_input_is_one_line(tiny_run, tmp_path, capsys, args, message):
    argv = ["eval", f"--checkpoint={tiny_run[0]}"] + [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err, err


def test_module_entry_point_and_help(tmp_path):
    from mantis_jax.eval import tasks  # noqa: PLC0415

    assert cli.KNOWN_TASKS == tuple(tasks.TASKS)
    proc = subprocess.run([sys.executable, "-m", "mantis_jax.eval", f"--checkpoint={tmp_path}", "--tasks=nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: unknown task(s) 'nope' in --tasks; known tasks: factworld, mmlu, truthfulqa, gsm8k, humaneval, "
        "halueval, perplexity")
    proc = subprocess.run([sys.executable, "-m", "mantis_jax.eval", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--data_dir" in proc.stdout and "--config.<section>.<key>" in proc.stdout
