"""The critic: its loss falls on a tiny separable set; inputs are truncated to its window with padding masked;
`python -m mantis_jax.control.train_critic` trains, checkpoints and resumes exactly on a tiny LM; metrics."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config
from mantis_jax.control import critic as critic_lib
from mantis_jax.control import critic_data, store, train_critic
from mantis_jax.data import factworld as fw
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.summary import flops_per_token

def test_loss_falls_on_a_tiny_separable_set():
    """Labels are the sign of one feature direction: the head must drive the loss well down."""
    config = default_config()
    config.model.d_model = 8
    config.critic.update(d_hidden=16, lr=1e-2)
    rng = np.random.default_rng(0)
    feats = {"h_answer": rng.normal(size=(32, 8)).astype(np.float32),
             "h_prompt": rng.normal(size=(32, 8)).astype(np.float32),
             "lm": rng.normal(size=(32, 4)).astype(np.float32),
             "ground": rng.random(size=(32, 2)).astype(np.float32)}
    labels = jnp.asarray((feats["h_answer"][:, 0] - feats["h_prompt"][:, 1] > 0).astype(np.float32))
    feats = jax.tree.map(jnp.asarray, feats)
    state = train_critic.init_state(config, jax.random.key(0))
    losses = []
    for _ in range(60):
        state, loss = train_critic.train_step(16, 1e-2, 1e-4, state, feats, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.25 * losses[0]
    probs = critic_lib.head_probs(16, state["params"], feats)
    assert float(jnp.mean((probs > 0.5) == (labels > 0.5))) == 1.0


def test_encode_truncates_to_the_window_and_keeps_the_answer(lm):
    _, tokenizer, _ = lm
    evidence = ["Zatav lives in Brisk. " * 40]
    ids, n_ans = critic_lib.encode(tokenizer, "Where does Zatav live?", "Brisk", evidence, 48)
    assert len(ids) == 48 and n_ans == len(tokenizer.encode(" Brisk", add_bos=False))
    assert tokenizer.decode(ids).endswith("Q: Where does Zatav live?\nA: Brisk")
    short, n = critic_lib.encode(tokenizer, "Where does Zatav live?", "Brisk", ["Zatav lives in Brisk."], 48)
    tokens, mask, answer = critic_lib.batch_arrays([(short, n), (ids, n_ans)], 48, tokenizer.pad_id)
    assert mask[0].sum() == len(short) and answer[0].sum() == n and answer[0, len(short) - 1] == 1
    assert tokenizer.decode(tokens[0][answer[0] > 0].tolist()).strip() == "Brisk"


def test_features_ignore_padding(lm):
    """An example's features do not depend on the pad tokens after it or on the other rows of its batch."""
    config, tokenizer, params = lm
    args = ModelArgs.from_config(config)
    enc = [critic_lib.encode(tokenizer, "How old is Bo?", "54", ["Bo is 54 years old."], 64),
           critic_lib.encode(tokenizer, "Where does Al live?", "Brisk", ["Al lives in Brisk. Al owns a kite."], 64)]
    one = critic_lib.features(args, params, *map(jnp.asarray, critic_lib.batch_arrays(enc[:1], 64, 0)))
    tokens, mask, answer = critic_lib.batch_arrays(enc, 64, tokenizer.pad_id)
    tokens[0, mask[0] == 0] = 7  # other pad ids: nothing real may see them
    two = critic_lib.features(args, params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(answer))
    for k in one:
        np.testing.assert_allclose(np.asarray(one[k])[0], np.asarray(two[k])[0], rtol=1e-4, atol=1e-5)


def test_metrics_against_direct_definitions():
    probs, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert critic_lib.auroc(probs, labels) == pytest.approx(0.75)  # pairs (pos > neg): 0.35>0.1, 0.8>both
    # one per bin: 0.1 (label 0) -> 0.1, 0.35 (1) -> 0.65, 0.4 (0) -> 0.4, 0.8 (1) -> 0.2, each with weight 1/4
    expect = 0.25 * (0.1 + 0.65 + 0.4 + 0.2)
    assert critic_lib.ece([0.3, 0.35, 0.9], [0, 1, 1]) == pytest.approx(2 / 3 * abs(0.5 - 0.325) + 1 / 3 * 0.1)
    assert critic_lib.ece(probs, labels) == pytest.approx(expect)


def test_platt_fit_recovers_a_known_scaling_and_is_stationary():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 20000)
    y = rng.random(20000) < 1.0 / (1.0 + np.exp(-(0.5 * z - 0.3)))  # labels drawn from sigmoid(0.5 z - 0.3)
    a, b = critic_lib.fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.04) and b == pytest.approx(-0.3, abs=0.05)
    # the objective's gradient (mean BCE + 1e-4 ((a - 1)^2 + b^2)) vanishes at the fit, by hand
    p = 1.0 / (1.0 + np.exp(-(a * z + b)))
    assert np.mean((p - y) * z) + 2e-4 * (a - 1) == pytest.approx(0.0, abs=1e-9)
    assert np.mean(p - y) + 2e-4 * b == pytest.approx(0.0, abs=1e-9)
    # separable labels: the penalty keeps the fit finite; an already calibrated logit keeps a ~ 1, b ~ 0
    assert np.isfinite(critic_lib.fit_platt([-2.0, -1.0, 1.0, 2.0], [0, 0, 1, 1])).all()
    y2 = rng.random(20000) < 1.0 / (1.0 + np.exp(-z))
    np.testing.assert_allclose(critic_lib.fit_platt(z, y2), (1.0, 0.0), atol=0.06)


def test_abstain_threshold_minimises_hallucination_within_the_accuracy_budget():
    # P(supported), right?, answerable?, already "unknown"? (the last one: "unknown" to an unanswerable question)
    probs = [0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.95]
    correct = [1, 1, 0, 1, 0, 0, 1]
    answerable = [1, 1, 1, 1, 0, 1, 0]
    abstained = [0, 0, 0, 0, 0, 0, 1]
    rows = (probs, correct, answerable, abstained)
    # by hand: accept all: right 0, 1, 3, 6 and hallucinated 2, 4, 5; at 0.4, 5 is refused (still wrong) and 4 is
    # refused (right: its question is unanswerable); at 0.8 also 2 (wrong) and 3 (right, now wrong) are refused
    assert critic_lib.abstain_outcomes(*rows, 0.0) == pytest.approx((4 / 7, 3 / 7))
    assert critic_lib.abstain_outcomes(*rows, 0.4) == pytest.approx((5 / 7, 1 / 7))
    assert critic_lib.abstain_outcomes(*rows, 0.8) == pytest.approx((4 / 7, 0.0))
    assert critic_lib.abstain_outcomes(*rows, 0.9) == pytest.approx((3 / 7, 0.0))
    assert critic_lib.abstain_threshold(*rows, max_loss=0.1) == pytest.approx(0.8)  # no hallucination, acc kept
    assert critic_lib.abstain_threshold(*rows, max_loss=0.5) == pytest.approx(0.8)  # 0.9 too, but less accurate
    # a wrong answer above two right ones: refusing it costs 2 of 3 right answers
    rows = ([0.9, 0.6, 0.5, 0.4], [1, 0, 1, 1], [1, 1, 1, 1], None)
    assert critic_lib.abstain_threshold(*rows, max_loss=0.1) == pytest.approx(0.0)  # nothing can be refused
    assert critic_lib.abstain_threshold(*rows, max_loss=0.7) == pytest.approx(0.9)  # 1/4 >= 0.3 * 3/4
    # against a brute force over every threshold on random answers
    rng = np.random.default_rng(1)
    p, c, ans, ab = rng.random(60), rng.random(60) < 0.5, rng.random(60) < 0.7, rng.random(60) < 0.1
    t = critic_lib.abstain_threshold(p, c, ans, ab, max_loss=0.1)
    base = critic_lib.abstain_outcomes(p, c, ans, ab, 0.0)[0]
    grid = [critic_lib.abstain_outcomes(p, c, ans, ab, u) for u in np.r_[0.0, np.sort(p), 1.01]]
    best = min(h for a, h in grid if a >= 0.9 * base - 1e-12)
    acc, hall = critic_lib.abstain_outcomes(p, c, ans, ab, t)
    assert hall == pytest.approx(best) and acc >= 0.9 * base - 1e-12


def test_grounding_by_hand():
    q, ev = "Where does Tavo live?", ["Tavo lives in Brisk. Mira lives in", "Corvel!\nMira owns a kite."]
    g = lambda a, e=ev: critic_lib.grounding(q, a, e).tolist()  # noqa: E731
    assert g("Brisk") == [1.0, 1.0]  # stated beside the asked name
    assert g("corvel") == [1.0, 0.0]  # stated (case-insensitive), about another entity: the spans join
    assert g("Dunholt") == [0.0, 0.0] and g("unknown") == [0.0, 0.0] and g("") == [0.0, 0.0]
    assert g("a kite") == [1.0, 0.0] and g("kite owns") == [0.0, 0.0]  # a contiguous run of the answer's words
    assert g("Bris") == [0.0, 0.0]  # whole words only
    # two names in the question: the share of them in the best sentence that states the answer
    two = critic_lib.grounding("Is Tavo Mira's friend?", "yes", ["Tavo said yes.", "Tavo and Mira: yes."])
    assert two.tolist() == [1.0, 1.0]
    assert critic_lib.grounding("Is Tavo Mira's friend?", "yes", ["Tavo said yes."]).tolist() == [1.0, 0.5]
    items = [(q, "Brisk", ev), (q, "Corvel", ev)]
    np.testing.assert_array_equal(critic_lib.grounding_batch(items), [[1, 1], [1, 0]])
    np.testing.assert_array_equal(critic_lib.grounding_batch(items, enabled=False), np.zeros((2, 2)))
    assert critic_lib.grounding_batch([]).shape == (0, 2)


def test_a_cache_without_texts_is_one_error(critic_runs, lm_workdir, tmp_path, capsys):
    raw = np.load(os.path.join(critic_runs[0], "critic_data.npz"))
    np.savez(tmp_path / "critic_data.npz", **{k: raw[k] for k in raw.files if not k.endswith(
        ("/question", "/answer", "/evidence"))})
    with pytest.raises(SystemExit) as e:
        train_critic.main([f"--checkpoint={lm_workdir}", f"--workdir={tmp_path}", "--config.critic.steps=2"])
    assert e.value.code != 0 and "holds no texts" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["critic_data.npz"]  # nothing else written, the cache kept


def test_stage2_without_an_encoder_is_one_error(lm_workdir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_critic.main([f"--checkpoint={lm_workdir}", f"--workdir={tmp_path / 'c'}",
                           f"--stage2={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds no Stage-2 encoder weights" in err and "mantis_jax.memory.train" in err
    assert not (tmp_path / "c").exists()


def test_examples_cover_every_kind():
    ex = critic_data.examples(fw.World(0, 60), "train", 64, answer_fn=lambda recs: ["Brisk"] * len(recs))
    kinds = {e["kind"] for e in ex}
    assert kinds >= {"supported", "wrong_value", "unanswerable", "evidence_removed", "own"}
    assert 0.35 < np.mean([e["label"] for e in ex]) < 0.65
    for e in ex:
        if e["kind"] == "evidence_removed":
            assert e["label"] == 0 and e["answer"] in fw.VOCABS.get("age", ()) + tuple(fw.TOWNS) + tuple(
                fw.JOBS) + tuple(fw.PETS) + tuple(fw.COLOURS) + tuple(fw.OBJECTS) or e["answer"]
        if e["kind"] in ("wrong_value", "unanswerable"):
            assert e["label"] == 0


def test_cli_trains_checkpoints_and_resumes_exactly(critic_runs, lm_workdir):
    a, b, full, first, resumed = critic_runs
    assert np.mean(full["train_losses"][-5:]) < np.mean(full["train_losses"][:5])
    assert store.steps(a) == [10, 20] and store.steps(b) == [10, 20]
    assert first["step"] == 10 and len(resumed["train_losses"]) == 10
    np.testing.assert_allclose(resumed["train_losses"], full["train_losses"][10:], rtol=1e-6)
    sa = store.restore_state(a, store.abstract(train_critic.init_state(_config(a), jax.random.key(0))), 20)
    sb = store.restore_state(b, store.abstract(train_critic.init_state(_config(b), jax.random.key(0))), 20)
    for x, y in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    test = full["test"]
    assert 0.0 <= test["ece"] <= 1.0 and 0.0 <= test["auroc"] <= 1.0 and 0.0 <= full["threshold"] <= 1.0
    # the engine's own answers are among the examples; calibration and threshold are refitted from val by hand
    raw = np.load(os.path.join(a, "critic_data.npz"))
    assert len(raw["train/engine/correct"]) == 4 and len(raw["val/engine/correct"]) == 2
    assert test["engine_answers"] == 2
    config = _config(a)

    def logits(prefix):
        feats = {k: jnp.asarray(raw[f"{prefix}/{k}"]) for k in ("h_answer", "h_prompt", "lm")}
        # the cache keeps the texts; the text features are recomputed from them, one example at a time here
        texts = zip(*(raw[f"{prefix}/{k}"] for k in ("question", "answer", "evidence")))
        feats["ground"] = jnp.asarray(np.stack([critic_lib.grounding(q, a, [ev]) for q, a, ev in texts]))
        return np.asarray(critic_lib.head_logits(config.critic.d_hidden, sa["params"], feats), np.float64)

    cal = critic_lib.fit_platt(logits("val"), raw["val/labels"])
    np.testing.assert_allclose(full["calibration"], cal, rtol=1e-6)
    probs = 1.0 / (1.0 + np.exp(-(cal[0] * logits("val/engine") + cal[1])))
    assert full["threshold"] == pytest.approx(critic_lib.abstain_threshold(
        probs, raw["val/engine/correct"], raw["val/engine/answerable"], raw["val/engine/abstained"], 0.1))
    rows = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert {r["split"] for r in rows} >= {"critic_val", "critic_test"}
    assert os.path.isdir(os.path.join(a, "tensorboard"))


def _config(workdir):
    return store.read_json(workdir, store.CRITIC_COMMAND)[1]


def test_critic_scores_like_the_batched_features(critic_runs, lm):
    a = critic_runs[0]
    critic = critic_lib.Critic.from_workdir(a, lm=lm)
    q, ans, ev = "How old is Bo?", "54", ["Bo is 54 years old. Bo lives in Brisk."]
    config, tokenizer, params = lm
    feats = train_critic.lm_features(ModelArgs.from_config(config), params, tokenizer,
                                     [{"question": q, "answer": ans, "evidence": ev}], critic.window)
    expect = float(critic_lib.head_probs(critic.d_hidden, critic.head_params, jax.tree.map(jnp.asarray, feats),
                                         critic.calibration)[0])
    assert critic.calibration == pytest.approx(tuple(critic_runs[2]["calibration"])) != (1.0, 0.0)
    assert critic.score(q, ans, ev) == pytest.approx(expect, rel=1e-4)
    assert critic.threshold == pytest.approx(critic_runs[2]["threshold"]) and critic.flops() > 0


def test_a_call_is_padded_to_its_bucket_not_the_window(critic_runs, lm):
    """The engine's critic pads a call to the next multiple of 64 tokens: the score does not depend on it (a short
    input alone = beside a long one) and the FLOPs are those of the bucket, by hand."""
    critic = dataclasses.replace(critic_lib.Critic.from_workdir(critic_runs[0], lm=lm), window=128)
    short = ("How old is Bo?", "54", ["Bo is 54 years old."])
    long = ("Where does Al live?", "Brisk", ["Al lives in Brisk. Al owns a kite. " * 8])
    n_short = len(critic_lib.encode(critic.tokenizer, *short, 128)[0])
    n_long = len(critic_lib.encode(critic.tokenizer, *long, 128)[0])
    assert n_short <= 64 < n_long <= 128
    alone, both = critic.score_many([short]), critic.score_many([short, long])
    np.testing.assert_allclose(alone[0], both[0], rtol=1e-4)
    fpt = lambda n: flops_per_token(critic.args, n, training=False)["active"] * n  # noqa: E731
    assert critic.flops(*short) == pytest.approx(fpt(64)) and critic.flops(*long) == pytest.approx(fpt(128))
    assert critic.flops() == pytest.approx(fpt(128))  # no text: the whole window
    assert [critic_lib.bucket_length(n, 128) for n in (1, 64, 65, 128, 300)] == [64, 64, 128, 128, 128]


def test_missing_critic_names_the_command(tmp_path):
    with pytest.raises(store.ControlCheckpointError, match="python -m mantis_jax.control.train_critic"):
        critic_lib.Critic.from_workdir(str(tmp_path))
