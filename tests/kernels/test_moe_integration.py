"""The Pallas router and permute kernels inside the model: whole-model outputs and gradients are equal with
router_impl = reference and the kernels (run by the Pallas interpreter on CPU)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mantis_jax.config import ConfigError, default_config, validate
from mantis_jax.model import moe
from mantis_jax.model.args import ModelArgs
from mantis_jax.model.transformer import MantisLM

ARGS = ModelArgs(vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=48, max_seq_len=16,
                 n_experts=4, top_k=2, moe_impl="ragged", gmm_impl="padded", init_std=0.2)


def _unbox(tree):
    return jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, tree, is_leaf=lambda p: hasattr(p, "unbox"))


@pytest.fixture(scope="module")
def model_inputs():
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, ARGS.vocab_size)
    params = _unbox(jax.jit(MantisLM(ARGS).init)(jax.random.key(1), tokens)["params"])
    bias_le = jax.random.normal(jax.random.key(2), (ARGS.n_layers, ARGS.n_experts)) * 0.5
    return tokens, params, bias_le


def _model_grads(router_impl, tokens, params, bias_le):
    model = MantisLM(ARGS.replace(router_impl=router_impl))

    def loss(p, bias):
        logits, aux = model.apply({"params": p}, tokens, expert_bias_le=bias)
        nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
        return nll + aux["moe_loss"], (logits, aux)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, bias_le)


@pytest.mark.slow
def test_whole_model_equal_with_either_router(model_inputs):
    (loss_ref, (logits_ref, aux_ref)), grads_ref = _model_grads("reference", *model_inputs)
    (loss, (logits, aux)), grads = _model_grads("pallas_interpret", *model_inputs)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    np.testing.assert_array_equal(aux["expert_load"], aux_ref["expert_load"])
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-6)
    # The gradient reaches the router and the controller's expert bias through the kernel's custom_vjp.
    assert float(jnp.max(jnp.abs(grads[1]))) > 0
    assert float(jnp.max(jnp.abs(grads[0]["layers"]["moe"]["router"]))) > 0


@pytest.mark.slow
def test_capacity_backend_with_kernel_router():
    """The kernel router feeds the capacity backend too (which uses only its weights and ids)."""
    impl = "capacity"
    x = jax.random.normal(jax.random.key(3), (2, 9, 16))
    layer = lambda r: moe.MoEFeedForward(4, 2, 24, init_std=0.3, impl=impl, router_impl=r)  # noqa: E731
    params = _unbox(jax.jit(layer("reference").init)(jax.random.key(4), x)["params"])

    def run(router_impl):
        def loss(p):
            y, aux = layer(router_impl).apply({"params": p}, x)
            return jnp.sum(jnp.sin(y)) + aux["lb_loss"], y

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, y_ref), g_ref = run("reference")
    (_, y), g = run("pallas_interpret")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_config_rejects_unknown_impls():
    c = default_config()
    c.moe.router_impl = "triton"
    with pytest.raises(ConfigError, match="moe.router_impl"):
        validate(c)
    c = default_config()
    c.moe.gmm_impl = "cutlass"
    with pytest.raises(ConfigError, match="moe.gmm_impl"):
        validate(c)
    with pytest.raises(ValueError, match="router_impl"):
        jax.eval_shape(moe.MoEFeedForward(4, 2, 8, 0.1, router_impl="fast").init, jax.random.key(0),
                       jnp.zeros((1, 3, 8)))
