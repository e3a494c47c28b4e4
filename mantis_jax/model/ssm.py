"""Selective state-space model (Mamba-1) in pure JAX: the scan, its three implementations, and the block.

The recurrence, per channel d of the inner width and state slot n:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t        (h: [B, Di, N])
    y_t = C_t · h_t + D x_t

`selective_scan` evaluates it three ways, chosen by `config.memory.episodic.scan_impl`:
- `sequential`: `lax.scan` over time; the reference.
- `associative`: `lax.associative_scan` over the whole sequence; materialises [B, T, Di, N] several times.
- `chunked`: `lax.associative_scan` inside chunks of `chunk_size` tokens, the boundary state carried across chunks
  by `lax.scan`, with a hand-written backward pass (custom_vjp) that keeps only the chunk-boundary states and
  recomputes each chunk, then runs the reverse recurrence as a reverse associative scan. No [B, T, Di, N] tensor
  exists: only [B, L, Di, N] inside a chunk and one state per chunk boundary. On CPU it beats `sequential` in
  time with 1/3 of its memory and 1/9 of `associative`'s (docs/perf/ssm.md).
All three agree in outputs and gradients (tests/model/test_ssm.py). The scan runs in float32 whatever the dtype.

`MambaBlock` is one residual layer: RMSNorm → in_proj (x, gate z) → depthwise causal conv1d → SiLU → x_proj
(Δ, B, C) → dt_proj + softplus → scan → D skip → y·SiLU(z) → out_proj → + residual. Data enters as hidden
states [B, T, D] plus an optional `SSMCache` (conv window + SSM state) and leaves as [B, T, D] plus the cache
after the last valid token, so a long stream can be fed in pieces; `step` advances one token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from mantis_jax.config import default_config, resolve_dtype
from mantis_jax.model.args import DTYPES
from mantis_jax.model.layers import RMSNorm, constrain, logical_param

SCAN_IMPLS = ("sequential", "associative", "chunked")
CHUNK_SIZE = default_config().memory.episodic.chunk_size  # one source of truth: the config's default


# ----------------------------------------------------------------------------------------------------------------
# The scan.


def _combine(left, right):
    """Composes h ↦ a·h + b maps: `left` first, then `right`."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _discretize(x_btd, delta_btd, a_dn, b_btn):
    """exp(Δ A) and Δ B x, both [B, T, Di, N]."""
    decay_btdn = jnp.exp(delta_btd[..., None] * a_dn)
    drive_btdn = (delta_btd * x_btd)[..., None] * b_btn[:, :, None, :]
    return decay_btdn, drive_btdn


def _scan_sequential(x_btd, delta_btd, a_dn, b_btn, c_btn, h0_bdn):
    def step(h_bdn, inputs):
        x_bd, delta_bd, b_bn, c_bn = inputs
        decay_bdn = jnp.exp(delta_bd[..., None] * a_dn)
        h_bdn = decay_bdn * h_bdn + (delta_bd * x_bd)[..., None] * b_bn[:, None, :]
        return h_bdn, jnp.einsum("bdn,bn->bd", h_bdn, c_bn)

    time_major = lambda z: jnp.swapaxes(z, 0, 1)
    h_bdn, y_tbd = lax.scan(step, h0_bdn, (time_major(x_btd), time_major(delta_btd), time_major(b_btn),
                                           time_major(c_btn)))
    return time_major(y_tbd), h_bdn


def _chunk_states(h0_bdn, x_btd, delta_btd, a_dn, b_btn):
    """States h_t for every t of one chunk [B, L, Di, N], and the decays exp(Δ A)."""
    decay, drive = _discretize(x_btd, delta_btd, a_dn, b_btn)
    drive = drive.at[:, 0].add(decay[:, 0] * h0_bdn)  # fold the incoming state into the first step
    _, h_bldn = lax.associative_scan(_combine, (decay, drive), axis=1)
    return decay, h_bldn


def _scan_associative(x_btd, delta_btd, a_dn, b_btn, c_btn, h0_bdn):
    _, h_btdn = _chunk_states(h0_bdn, x_btd, delta_btd, a_dn, b_btn)
    return jnp.einsum("btdn,btn->btd", h_btdn, c_btn), h_btdn[:, -1]


def _to_chunks(z, chunk):
    """[B, T, ...] → [T/L, B, L, ...] (T already a multiple of L)."""
    b, t = z.shape[:2]
    return jnp.swapaxes(z.reshape(b, t // chunk, chunk, *z.shape[2:]), 0, 1)


def _from_chunks(z):
    """[T/L, B, L, ...] → [B, T, ...]."""
    z = jnp.swapaxes(z, 0, 1)
    return z.reshape(z.shape[0], z.shape[1] * z.shape[2], *z.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan_chunked(x_btd, delta_btd, a_dn, b_btn, c_btn, h0_bdn, chunk):
    return _chunked_fwd(x_btd, delta_btd, a_dn, b_btn, c_btn, h0_bdn, chunk)[0]


def _chunked_fwd(x_btd, delta_btd, a_dn, b_btn, c_btn, h0_bdn, chunk):
    def body(h_bdn, inputs):
        x, delta, b, c = inputs
        _, h_bldn = _chunk_states(h_bdn, x, delta, a_dn, b)
        return h_bldn[:, -1], (jnp.einsum("bldn,bln->bld", h_bldn, c), h_bdn)

    chunks = tuple(_to_chunks(z, chunk) for z in (x_btd, delta_btd, b_btn, c_btn))
    h_last, (y_cbld, h_start_cbdn) = lax.scan(body, h0_bdn, chunks)
    # Residuals: the inputs (already alive) and one state per chunk boundary, [T/L, B, Di, N].
    return (_from_chunks(y_cbld), h_last), (chunks, a_dn, h_start_cbdn)


def _chunked_bwd(chunk, residuals, cotangents):
    (x_c, delta_c, b_c, c_c), a_dn, h_start_cbdn = residuals
    dy_btd, dh_last_bdn = cotangents

    def body(carry, inputs):
        g_bdn, da_dn = carry  # g: gradient reaching this chunk's last state from later chunks
        h0, x, delta, b, c, dy = inputs
        decay, h_bldn = _chunk_states(h0, x, delta, a_dn, b)
        # dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) dL/dh_{t+1}: the same linear recurrence, run backwards.
        u_bldn = dy[..., None] * c[:, :, None, :]
        u_bldn = u_bldn.at[:, -1].add(g_bdn)
        next_decay = jnp.concatenate([decay[:, 1:], jnp.ones_like(decay[:, :1])], axis=1)
        _, gh_bldn = lax.associative_scan(_combine, (next_decay, u_bldn), axis=1, reverse=True)
        h_prev = jnp.concatenate([h0[:, None], h_bldn[:, :-1]], axis=1)
        dlog_bldn = gh_bldn * h_prev * decay  # dL/d(Δ A)
        g_drive_bld = jnp.einsum("bldn,bln->bld", gh_bldn, b)  # dL/d(Δ x)
        d_delta = jnp.einsum("bldn,dn->bld", dlog_bldn, a_dn) + g_drive_bld * x
        dx = g_drive_bld * delta
        db = jnp.einsum("bldn,bld->bln", gh_bldn, delta * x)
        dc = jnp.einsum("bld,bldn->bln", dy, h_bldn)
        da_dn = da_dn + jnp.einsum("bldn,bld->dn", dlog_bldn, delta)
        return (decay[:, 0] * gh_bldn[:, 0], da_dn), (dx, d_delta, db, dc)

    (dh0, da_dn), (dx, d_delta, db, dc) = lax.scan(
        body, (dh_last_bdn, jnp.zeros_like(a_dn)),
        (h_start_cbdn, x_c, delta_c, b_c, c_c, _to_chunks(dy_btd, chunk)), reverse=True)
    return (_from_chunks(dx), _from_chunks(d_delta), da_dn, _from_chunks(db), _from_chunks(dc), dh0)


_scan_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def selective_scan(x_btd: jax.Array, delta_btd: jax.Array, a_dn: jax.Array, b_btn: jax.Array, c_btn: jax.Array,
                   h0_bdn: jax.Array | None = None, *, impl: str = "chunked",
                   chunk_size: int = CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """y_t = C_t · h_t with h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t; returns (y [B, T, Di], h_T [B, Di, N]).

    x, Δ: [B, T, Di]; A: [Di, N] (negative); B, C: [B, T, N]; h0: [B, Di, N] (zeros if None). Computed in
    float32; y comes back in x's dtype. A step with Δ = 0 leaves the state unchanged (how padding is skipped).
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"scan impl {impl!r} is not one of {', '.join(SCAN_IMPLS)}; "
                         "set --config.memory.episodic.scan_impl")
    bsz, t, d_inner = x_btd.shape
    n = a_dn.shape[-1]
    if delta_btd.shape != x_btd.shape or a_dn.shape != (d_inner, n) or b_btn.shape != (bsz, t, n) \
            or c_btn.shape != (bsz, t, n):
        raise ValueError(f"selective_scan shapes disagree: x {x_btd.shape}, delta {delta_btd.shape}, "
                         f"A {a_dn.shape}, B {b_btn.shape}, C {c_btn.shape}; expected x = delta = [B, T, Di], "
                         "A = [Di, N], B = C = [B, T, N]")
    f32 = lambda z: z.astype(jnp.float32)
    h0_bdn = jnp.zeros((bsz, d_inner, n), jnp.float32) if h0_bdn is None else f32(h0_bdn)
    args = (f32(x_btd), f32(delta_btd), f32(a_dn), f32(b_btn), f32(c_btn), h0_bdn)
    if impl == "sequential":
        y, h = _scan_sequential(*args)
    elif impl == "associative":
        y, h = _scan_associative(*args)
    else:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size ({chunk_size}) must be > 0; set --config.memory.episodic.chunk_size")
        pad = -t % chunk_size
        if pad:  # Δ = 0 on the padding: decay 1, drive 0, so the state passes through unchanged.
            padded = lambda z: jnp.pad(z, ((0, 0), (0, pad)) + ((0, 0),) * (z.ndim - 2))
            args = tuple(padded(z) for z in args[:2]) + (args[2],) + tuple(padded(z) for z in args[3:5]) \
                + (h0_bdn,)
        y, h = _scan_chunked(*args, chunk_size)
        y = y[:, :t]
    return y.astype(x_btd.dtype), h


# ----------------------------------------------------------------------------------------------------------------
# The block.


@flax.struct.dataclass
class SSMCache:
    """Recurrent state of one block: the last d_conv-1 conv inputs and the SSM state."""

    conv_bkd: jax.Array  # [B, d_conv-1, Di]
    ssm_bdn: jax.Array  # [B, Di, N], float32


@dataclasses.dataclass(frozen=True)
class SSMArgs:
    """Static, hashable hyper-parameters of the SSM (from `config.memory.episodic`)."""

    d_model: int = 256
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    n_layers: int = 2
    dt_rank: int = 0  # 0 = ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    scan_impl: str = "chunked"
    chunk_size: int = CHUNK_SIZE
    norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "SSMArgs":
        ep, m = config.memory.episodic, config.model
        return cls(d_model=ep.d_model, d_state=ep.d_state, d_conv=ep.d_conv, expand=ep.expand,
                   n_layers=ep.n_layers, dt_rank=ep.dt_rank, dt_min=ep.dt_min, dt_max=ep.dt_max,
                   scan_impl=ep.scan_impl, chunk_size=ep.chunk_size, norm_eps=m.norm_eps,
                   dtype=resolve_dtype(m.dtype), param_dtype=m.param_dtype)

    def replace(self, **changes) -> "SSMArgs":
        return dataclasses.replace(self, **changes)


def init_cache(args: SSMArgs, batch: int) -> SSMCache:
    """All-zero recurrent state: what a block holds before its first token."""
    return SSMCache(conv_bkd=jnp.zeros((batch, args.d_conv - 1, args.d_inner), DTYPES[args.dtype]),
                    ssm_bdn=jnp.zeros((batch, args.d_inner, args.d_state), jnp.float32))


def _dt_bias_init(dt_min: float, dt_max: float):
    """Bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's dt initialisation)."""
    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), 1e-4)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus
    return init


def _a_log_init(key, shape, dtype=jnp.float32):
    """A = -[1, 2, ..., N] for every channel (S4D-real)."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


class MambaBlock(nn.Module):
    """One residual Mamba-1 layer; see the module docstring."""

    args: SSMArgs

    def setup(self):
        a = self.args
        pdt = DTYPES[a.param_dtype]
        self.norm = RMSNorm(eps=a.norm_eps, dtype=DTYPES[a.dtype], param_dtype=pdt)
        dense = lambda name, shape, axes, init: logical_param(self, name, init, shape, axes, pdt)
        lecun = nn.initializers.lecun_normal()
        self.in_proj = dense("in_proj", (a.d_model, 2 * a.d_inner), ("embed", "ssm_inner"), lecun)
        self.conv_w = dense("conv_w", (a.d_conv, a.d_inner), ("ssm_conv", "ssm_inner"),
                            nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0, out_axis=1))
        self.conv_b = dense("conv_b", (a.d_inner,), ("ssm_inner",), nn.initializers.zeros)
        self.x_proj = dense("x_proj", (a.d_inner, a.rank + 2 * a.d_state), ("ssm_inner", None), lecun)
        std = a.rank ** -0.5
        self.dt_w = dense("dt_proj", (a.rank, a.d_inner), ("ssm_rank", "ssm_inner"),
                          lambda k, s, d: jax.random.uniform(k, s, d, -std, std))
        self.dt_b = dense("dt_bias", (a.d_inner,), ("ssm_inner",), _dt_bias_init(a.dt_min, a.dt_max))
        self.a_log = dense("A_log", (a.d_inner, a.d_state), ("ssm_inner", "ssm_state"), _a_log_init)
        self.d_skip = dense("D", (a.d_inner,), ("ssm_inner",), nn.initializers.ones)
        self.out_proj = dense("out_proj", (a.d_inner, a.d_model), ("ssm_inner", "embed"), lecun)

    def _project(self, x_btd):
        """Norm + in_proj: the conv input and the gate, each [B, T, Di]."""
        dt = DTYPES[self.args.dtype]
        xz = jnp.einsum("btd,de->bte", self.norm(x_btd), self.in_proj.astype(dt))
        xin, z = jnp.split(xz, 2, axis=-1)
        return constrain(xin, ("batch", "length", "ssm_inner")), constrain(z, ("batch", "length", "ssm_inner"))

    def _ssm_inputs(self, u_btd):
        """Δ [B, T, Di], B and C [B, T, N] from the conv output."""
        a = self.args
        dt = DTYPES[a.dtype]
        dbc = jnp.einsum("bte,ef->btf", u_btd, self.x_proj.astype(dt))
        dt_low, b_btn, c_btn = jnp.split(dbc, [a.rank, a.rank + a.d_state], axis=-1)
        delta = jnp.einsum("btr,re->bte", dt_low, self.dt_w.astype(dt)).astype(jnp.float32)
        delta = jax.nn.softplus(delta + self.dt_b.astype(jnp.float32))
        return constrain(delta, ("batch", "length", "ssm_inner")), b_btn, c_btn

    def _output(self, x_btd, y_btd, u_btd, z_btd):
        dt = DTYPES[self.args.dtype]
        y = (y_btd + u_btd.astype(jnp.float32) * self.d_skip.astype(jnp.float32)).astype(dt)
        y = y * nn.silu(z_btd)
        out = jnp.einsum("bte,ed->btd", y, self.out_proj.astype(dt))
        return constrain(x_btd + out.astype(x_btd.dtype), ("batch", "length", "embed"))

    def __call__(self, x_btd: jax.Array, cache: SSMCache | None = None,
                 lengths_b: jax.Array | None = None) -> tuple[jax.Array, SSMCache]:
        """Full-sequence call. `cache`: state before x (zeros if None). `lengths_b`: valid tokens per row (the rest
        is right padding, skipped by the state); the returned cache is the state after the last valid token."""
        a = self.args
        bsz, t, _ = x_btd.shape
        cache = init_cache(a, bsz) if cache is None else cache
        xin, z = self._project(x_btd)
        # Causal depthwise conv over [previous d_conv-1 inputs, x]: sum of d_conv shifted slices.
        xpad = jnp.concatenate([cache.conv_bkd.astype(xin.dtype), xin], axis=1)  # [B, K-1+T, Di]
        w = self.conv_w.astype(xin.dtype)
        u = sum(xpad[:, k:k + t] * w[k] for k in range(a.d_conv)) + self.conv_b.astype(xin.dtype)
        u = nn.silu(u)
        delta, b_btn, c_btn = self._ssm_inputs(u)
        if lengths_b is None:
            conv_next = xpad[:, t:]
        else:
            valid_bt = jnp.arange(t)[None, :] < lengths_b[:, None]
            delta = jnp.where(valid_bt[..., None], delta, 0.0)
            # The last d_conv-1 valid inputs sit at xpad[length : length + K-1].
            idx_bk = lengths_b[:, None] + jnp.arange(a.d_conv - 1)[None, :]
            conv_next = jnp.take_along_axis(xpad, idx_bk[..., None], axis=1)
        a_dn = -jnp.exp(self.a_log.astype(jnp.float32))
        y, h = selective_scan(u, delta, a_dn, b_btn, c_btn, cache.ssm_bdn, impl=a.scan_impl,
                              chunk_size=a.chunk_size)
        out = self._output(x_btd, y, u, z)
        return out, SSMCache(conv_bkd=conv_next.astype(cache.conv_bkd.dtype), ssm_bdn=h)

    def step(self, x_bd: jax.Array, cache: SSMCache) -> tuple[jax.Array, SSMCache]:
        """One token [B, D] → ([B, D], next cache); equals the full call run one token at a time."""
        a = self.args
        xin, z = self._project(x_bd[:, None])
        window_bkd = jnp.concatenate([cache.conv_bkd.astype(xin.dtype), xin], axis=1)  # [B, K, Di]
        u = jnp.einsum("bke,ke->be", window_bkd, self.conv_w.astype(xin.dtype)) + self.conv_b.astype(xin.dtype)
        u = nn.silu(u)[:, None]
        delta, b_btn, c_btn = self._ssm_inputs(u)
        a_dn = -jnp.exp(self.a_log.astype(jnp.float32))
        decay_bdn = jnp.exp(delta[:, 0, :, None] * a_dn)
        drive_bdn = (delta[:, 0] * u[:, 0].astype(jnp.float32))[..., None] * b_btn[:, 0, None, :]
        h = decay_bdn * cache.ssm_bdn + drive_bdn.astype(jnp.float32)
        y = jnp.einsum("bdn,bn->bd", h, c_btn[:, 0].astype(jnp.float32))[:, None]
        out = self._output(x_bd[:, None], y, u, z)[:, 0]
        return out, SSMCache(conv_bkd=window_bkd[:, 1:].astype(cache.conv_bkd.dtype), ssm_bdn=h)


class MambaStack(nn.Module):
    """`args.n_layers` Mamba blocks and a final RMSNorm; caches are tuples, one per layer."""

    args: SSMArgs

    def setup(self):
        self.blocks = [MambaBlock(self.args, name=f"layer_{i}") for i in range(self.args.n_layers)]
        self.final_norm = RMSNorm(eps=self.args.norm_eps, dtype=DTYPES[self.args.dtype],
                                  param_dtype=DTYPES[self.args.param_dtype])

    def __call__(self, x_btd: jax.Array, caches: tuple[SSMCache, ...] | None = None,
                 lengths_b: jax.Array | None = None) -> tuple[jax.Array, tuple[SSMCache, ...]]:
        caches = caches if caches is not None else (None,) * len(self.blocks)
        new = []
        for block, cache in zip(self.blocks, caches):
            x_btd, c = block(x_btd, cache, lengths_b)
            new.append(c)
        return self.final_norm(x_btd), tuple(new)

    def step(self, x_bd: jax.Array, caches: tuple[SSMCache, ...]) -> tuple[jax.Array, tuple[SSMCache, ...]]:
        new = []
        for block, cache in zip(self.blocks, caches):
            x_bd, c = block.step(x_bd, cache)
            new.append(c)
        return self.final_norm(x_bd), tuple(new)


def init_caches(args: SSMArgs, batch: int) -> tuple[SSMCache, ...]:
    return tuple(init_cache(args, batch) for _ in range(args.n_layers))

