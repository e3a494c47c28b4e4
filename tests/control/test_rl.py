"""Stage 3: PPO through `train_rl.train` learns a retrieval-only reward and resumes exactly; the controller's gates
change what the engine runs (a never-verify policy makes no critic call); the CLI on a tiny engine."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape, validate
from mantis_jax.control import controller as ctl
from mantis_jax.control import critic as critic_lib
from mantis_jax.control import __main__ as control_cli
from mantis_jax.control import episodes, reward, store, train_rl
from mantis_jax.engine.core import Engine
from mantis_jax.engine.policy import FixedPolicy, StateSummary
from mantis_jax.model.summary import flops_per_token
from mantis_jax.train.checkpoint import load_for_inference


class Synthetic:
    """Episodes without an engine: the state is random per index, the outcome neutral; the policy still decides."""

    def __init__(self, d_model):
        self.d_model = d_model

    def run(self, index, policy):
        x = np.random.default_rng(index).normal(size=self.d_model + 6).astype(np.float32)
        summary = StateSummary(pooled=x[:self.d_model], entropy=x[-6], context_fill=x[-5], episodic_fill=x[-4],
                               semantic_fill=x[-3], best_score=x[-2], exit_confidence=x[-1])
        decisions = policy.decide(summary)
        return episodes.Episode(reward.Outcome(False, False, None, 1.0, 1.0), decisions, {})


def _config(updates):
    c = default_config()
    set_shape(c, d_model=8, n_layers=2, n_experts=1, top_k=1)
    c.controller.update(d_hidden=16, depth=1, episodes=16, minibatches=2, updates=updates, save_every=5, lr=3e-2,
                        entropy_coef=0.0)
    c.logging.progress = False
    return validate(c)


def retrieval_only(ep):
    return float(ep.decisions.semantic)


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("rl"))
    return w, train_rl.train(_config(15), w, Synthetic(8), reward_fn=retrieval_only)


def test_ppo_learns_to_always_retrieve(retrieval_run):
    w, summary = retrieval_run
    hist = summary["history"]
    assert hist[0]["rate_semantic"] < 0.8 and hist[-1]["rate_semantic"] > 0.9
    policy = ctl.Controller.from_workdir(w)  # deterministic at inference
    for i in range(1000, 1016):
        d = Synthetic(8).run(i, policy).decisions
        assert d.semantic and d.probs["semantic"] > 0.9
    assert store.steps(w)[-1] == 15
    rows = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
    assert len(rows) == 15 and {"reward", "policy_loss", "value_loss", "entropy", "episodes_per_s"} <= set(rows[0])


def test_resume_is_exact(retrieval_run, tmp_path):
    full = train_rl.train(_config(2), str(tmp_path / "a"), Synthetic(8), reward_fn=retrieval_only)
    train_rl.train(_config(1), str(tmp_path / "b"), Synthetic(8), reward_fn=retrieval_only)
    resumed = train_rl.train(_config(2), str(tmp_path / "b"), Synthetic(8), reward_fn=retrieval_only)
    assert len(resumed["history"]) == 1
    assert resumed["history"][0]["reward"] == full["history"][1]["reward"] == retrieval_run[1]["history"][1]["reward"]
    assert resumed["history"][0]["policy_loss"] == full["history"][1]["policy_loss"]
    for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_controller_names_the_command(tmp_path):
    with pytest.raises(store.ControlCheckpointError, match="python -m mantis_jax.control.train_rl"):
        ctl.Controller.from_workdir(str(tmp_path))


class Counting:
    """A real critic that counts its calls."""

    def __init__(self, critic):
        self.critic, self.calls, self.threshold = critic, 0, critic.threshold

    def score(self, *a):
        self.calls += 1
        return self.critic.score(*a)

    def flops(self, *a):
        self.flops_args = a
        return self.critic.flops(*a)


def _gated(spec, verify: bool):
    """A controller whose verify gate is certain (its logit is ±50 for every state)."""
    params = ctl.init(spec, jax.random.key(0))
    gates = dict(params["gates"])
    gates["kernel"] = jnp.zeros_like(gates["kernel"])
    gates["bias"] = jnp.array([0.0, 0.0, 50.0 if verify else -50.0])
    return ctl.Controller(spec, dict(params, gates=gates))


@pytest.fixture(scope="module")
def engine_env(lm, critic_runs):
    config, tokenizer, params = lm
    config = store.control_config(config, [])
    critic = Counting(critic_lib.Critic.from_workdir(critic_runs[0], lm=lm))
    engine = Engine(config, params, tokenizer, critic=critic)
    return episodes.EngineEpisodes(engine, "train", distance=32), config, critic


def test_never_verify_makes_no_critic_call(engine_env):
    env, config, critic = engine_env
    spec = ctl.ControllerSpec.from_config(config)
    ep = env.run(0, _gated(spec, verify=False))
    tr = ep.info["trace"]
    assert not ep.decisions.verify and critic.calls == 0
    assert tr.critic_score is None and tr.flops["critic"] == 0.0 and ep.outcome.confidence is None
    ep2 = env.run(0, _gated(spec, verify=True))
    tr2 = ep2.info["trace"]
    assert critic.calls == 1 and tr2.critic_score is not None
    # the call's FLOPs: a forward over its input padded to the next multiple of 64 tokens (at most the window)
    evidence = [tr2.prompt.rsplit("\nQ:", 1)[0].strip()]
    ids, _ = critic_lib.encode(critic.critic.tokenizer, tr2.question, tr2.candidate, evidence, critic.critic.window)
    length = min(critic.critic.window, -(-len(ids) // 64) * 64)
    by_hand = flops_per_token(critic.critic.args, length, training=False)["active"] * length
    assert tr2.flops["critic"] == pytest.approx(by_hand) and tr2.flops_total > tr.flops_total
    assert ep2.outcome.latency > ep.outcome.latency and ep2.outcome.compute > ep.outcome.compute
    assert tr.flops_full == tr2.flops_full >= tr2.flops_total  # the full path has a critic call either way
    assert tr.flops_full - tr.flops_total == pytest.approx(tr2.flops_full - tr2.flops_total + tr2.flops["critic"])
    assert ep2.outcome.confidence == pytest.approx(tr2.critic_score)
    fixed = env.run(1, FixedPolicy(retrieve="never", verify=False))
    assert fixed.info["trace"].retrieved == [] and critic.calls == 1


def test_cli_runs_ppo_on_the_engine(lm_workdir, critic_runs, engine_env, tmp_path):
    """Episodes 0 and 1 (near, far), as above: the engine's jitted steps are already compiled for them."""
    w = str(tmp_path / "rl")
    argv = [f"--checkpoint={lm_workdir}", f"--critic={critic_runs[0]}", f"--workdir={w}",
            "--config.controller.episodes=2", "--config.controller.minibatches=1", "--config.controller.updates=1",
            "--config.controller.distance=32", "--config.controller.d_hidden=16"]
    summary = train_rl.main(argv)
    assert summary["updates"] == 1 and store.steps(w) == [1]
    assert summary["episodes_per_s"] > 0 and -1.0 <= summary["history"][0]["reward"] <= 1.5
    meta = store.read_json(w, store.CONTROLLER_COMMAND)[2]
    assert meta["critic"] == os.path.abspath(critic_runs[0])
    # the user's entry point: `python -m mantis_jax.control` answers like the engine built by hand with the same
    # critic and controller, and its trace shows each gate's decision and probability
    context = tmp_path / "story.txt"
    context.write_text("Bo is 54 years old. Bo lives in Brisk. The road to the mill was cold.")
    out = io.StringIO()
    control_cli.main([f"--checkpoint={lm_workdir}", f"--critic={critic_runs[0]}", f"--controller={w}",
                      f"--context_file={context}", "--question=How old is Bo?", "--json"], out=out)
    got = json.loads(out.getvalue())
    config, tokenizer, params = load_for_inference(lm_workdir)
    engine = Engine(store.control_config(config, []), params, tokenizer, policy=ctl.Controller.from_workdir(w),
                    critic=critic_lib.Critic.from_workdir(critic_runs[0]))
    engine.read(context.read_text())
    ref = engine.answer("How old is Bo?")
    assert got["text"] == ref.text and got["trace"]["candidate"] == ref.trace.candidate
    dec = got["trace"]["decisions"]
    assert {k: dec[k] for k in ("episodic", "semantic", "verify", "exit_threshold")} == {
        k: ref.trace.decisions[k] for k in ("episodic", "semantic", "verify", "exit_threshold")}
    assert set(dec["probs"]) >= {"episodic", "semantic", "verify"}
    assert dec["probs"] == pytest.approx(ref.trace.decisions["probs"], rel=1e-5)
    if dec["verify"]:
        assert got["trace"]["critic_score"] == pytest.approx(ref.trace.critic_score, rel=1e-4)


def test_control_cli_refuses_a_critic_of_another_lm(lm_workdir, critic_runs, tmp_path, capsys):
    lm_config = load_for_inference(lm_workdir)[0]
    other = store.read_json(critic_runs[0], store.CRITIC_COMMAND)[1]
    other.model.d_model = lm_config.model.d_model * 2
    with pytest.raises(store.ControlCheckpointError, match=r"model.d_model 64 vs 32.*train_critic --checkpoint=L"):
        control_cli.check_same_lm("critic", "C", other, lm_config, "python -m mantis_jax.control.train_critic "
                                  "--checkpoint=L --workdir=NEW_DIR")
    control_cli.check_same_lm("critic", "C", store.read_json(critic_runs[0], store.CRITIC_COMMAND)[1], lm_config, "")
    with pytest.raises(SystemExit) as e:  # a controller folder that holds none: one line naming the command
        control_cli.main([f"--checkpoint={lm_workdir}", f"--controller={tmp_path}", "--question=How old is Bo?"])
    assert e.value.code == 2 and "python -m mantis_jax.control.train_rl" in capsys.readouterr().err


def test_cli_without_critic_names_the_command(lm_workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_rl.main([f"--checkpoint={lm_workdir}", f"--workdir={tmp_path}"])
    assert e.value.code == 2
    assert "python -m mantis_jax.control.train_critic" in capsys.readouterr().err
