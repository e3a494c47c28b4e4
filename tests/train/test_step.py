"""Train step: it learns (overfits a tiny batch), accumulation equals one big batch, optimizers' memory."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import default_config, set_shape
from mantis_jax.model.args import ModelArgs
from mantis_jax.train import state as st
from mantis_jax.train.step import cross_entropy_and_hits, make_eval_step, make_train_step, token_cross_entropy


def _config(**train):
    c = default_config()
    set_shape(c, d_model=32, n_layers=2, n_experts=4, top_k=2)
    c.model.vocab_size, c.model.n_heads, c.model.n_kv_heads, c.model.d_ff = 128, 4, 2, 64
    c.model.scan_layers = False  # 2 layers: quicker to compile unrolled (the layer scan is tested with the model)
    c.train.lr, c.train.warmup_steps, c.train.total_steps = 1e-2, 5, 100
    for k, v in train.items():
        c.train[k] = v
    return c


def _batch(B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 128, (B, T + 1)).astype(np.int32)
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((B, T), np.float32)}


def _init(config):
    args = ModelArgs.from_config(config)
    tx = st.make_optimizer(config)
    import flax.linen as nn

    # jitted: the eager init dispatches op by op (~13 s for this model on 2 cores, ~2 s compiled)
    state = jax.jit(lambda key: nn.unbox(st.init_state_fn(args, tx)(key)))(jax.random.key(0))
    return args, tx, state


def test_cross_entropy_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[0, 6, 3], [1, 1, 2]])
    ref = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_cross_entropy(logits, targets), ref, rtol=1e-5)



def test_cross_entropy_gradient_and_hits_match_references():
    logits = 10.0 * jax.random.normal(jax.random.key(1), (3, 5, 11))
    targets = jax.random.randint(jax.random.key(2), (3, 5), 0, 11)

    def ref_loss(x):
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(x), targets[..., None], -1))

    grad = jax.grad(lambda x: jnp.sum(cross_entropy_and_hits(x, targets)[0]))(logits)
    np.testing.assert_allclose(grad, jax.grad(ref_loss)(logits), rtol=1e-5, atol=1e-6)
    _, hits = cross_entropy_and_hits(logits, targets)
    np.testing.assert_array_equal(hits, jnp.argmax(logits, -1) == targets)  # no ties in random logits
    tied = jnp.array([[1.0, 3.0, 3.0]])  # a target tied for the max is a hit, a lower one is not
    assert cross_entropy_and_hits(tied, jnp.array([2]))[1].tolist() == [True]
    assert cross_entropy_and_hits(tied, jnp.array([0]))[1].tolist() == [False]

def test_overfits_a_tiny_batch():
    config = _config()
    args, tx, state = _init(config)
    step = jax.jit(make_train_step(args, tx, st.lr_schedule(config)), donate_argnums=0)
    batch = _batch()
    losses = []
    for i in range(60):
        state, m = step(state, batch, jax.random.key(i))
        losses.append(float(m["ce"]))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert int(state.step) == 60
    ev = jax.jit(make_eval_step(args))(state.params, batch)
    assert float(ev["accuracy"]) > 0.9


def test_grad_accumulation_equals_one_big_batch():
    """Accumulated over 2 micro-batches holding 32 and 8 weighted tokens, the gradient is the one-big-batch gradient
    (SGD with lr 1 makes the update the gradient itself); an all-ones mask too. One scan holds every micro-batch's
    forward and backward. lb_loss is off: a load-balancing loss is per micro-batch by design (z-loss is a token mean
    over equal-size micro-batches, so it adds up exactly)."""
    import optax

    config = _config()
    config.moe.lb_loss_weight = 0.0
    args, _, state = _init(config)
    sgd = optax.sgd(1.0)
    state = state.replace(opt_state=sgd.init(state.params))
    schedule = st.lr_schedule(config)
    one_step = jax.jit(make_train_step(args, sgd, schedule, 1))
    acc_step = jax.jit(make_train_step(args, sgd, schedule, 2))
    ones = _batch(B=4)
    # Micro-batch i takes rows i, i + 2: micro-batch 0 = rows 0, 2 (32 tokens), micro-batch 1 = rows 1, 3 (8 tokens).
    unequal = dict(ones, loss_mask=np.stack([np.ones(16), np.arange(16) < 4] * 2).astype(np.float32))
    unequal["loss_mask"][0, 5] = 3.0  # a weight > 1 (answer tokens) counts as 3 tokens
    grad = lambda new: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, new.params)  # noqa
    for batch, tokens in ((unequal, 40), (ones, 64)):
        one, m1 = one_step(state, batch, jax.random.key(0))
        acc, m2 = acc_step(state, batch, jax.random.key(0))
        g1, g2 = grad(one), grad(acc)
        scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
        chex.assert_trees_all_close(g2, g1, atol=1e-5 * scale, rtol=1e-4)
        for key in ("loss", "ce", "accuracy", "grad_norm"):
            np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
        assert float(m2["tokens"]) == float(m1["tokens"]) == tokens
    top = [e.primitive.name for e in jax.make_jaxpr(make_train_step(args, sgd, schedule, 2))(
        state, ones, jax.random.key(0)).eqns]
    assert top.count("scan") == 1 and "dot_general" not in top, top  # no micro-batch traced outside the scan


def test_answer_weights_change_the_loss_not_the_reported_ce():
    config = _config()
    args, tx, state = _init(config)
    step = jax.jit(make_train_step(args, tx, st.lr_schedule(config)))
    batch = _batch()
    weighted = dict(batch, loss_mask=batch["loss_mask"] * np.where(np.arange(16) % 4 == 0, 5.0, 1.0))
    _, m1 = step(state, batch, jax.random.key(0))
    _, m2 = step(state, weighted, jax.random.key(0))
    np.testing.assert_allclose(m1["ce"], m2["ce"], rtol=1e-6)
    assert abs(float(m1["loss"]) - float(m2["loss"])) > 1e-4


@pytest.mark.parametrize("optimizer, max_bytes", [("adamw", 8.01), ("adamw_bf16", 4.01), ("adafactor", 3.99)])
def test_optimizers_learn_and_report_memory(optimizer, max_bytes):
    config = _config(optimizer=optimizer)
    args, tx, state = _init(config)
    assert st.bytes_per_param(state) <= max_bytes
    step = jax.jit(make_train_step(args, tx, st.lr_schedule(config)))
    batch = _batch()
    first = None
    for i in range(15):
        state, m = step(state, batch, jax.random.key(i))
        first = first if first is not None else float(m["ce"])
    assert float(m["ce"]) < first
