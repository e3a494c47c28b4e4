"""What the Pallas kernels share: which lowering a platform gets, and block-size arithmetic.

A kernel call names an `impl`: "reference" (the jnp code beside the kernel) or "pallas". With "pallas" the
platform picks the lowering: Triton on GPU, Mosaic on TPU (kernels that have a TPU form), and on CPU the jnp
reference unless `interpret=True` asks for the kernel body run by the Pallas interpreter (how tests check it).
"""

from __future__ import annotations

import jax

IMPLS = ("reference", "pallas")


def check_impl(impl: str, what: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl={impl!r} is unknown; use one of {', '.join(IMPLS)} "
                         "(config.moe.router_impl)")


def lowering(impl: str, interpret: bool, *, tpu_kernel: bool) -> str:
    """Returns "reference", "interpret", "triton" or "mosaic" for this call on the default backend."""
    if impl == "reference":
        return "reference"
    if interpret:
        return "interpret"
    platform = jax.default_backend()
    if platform == "gpu":
        return "triton"
    if platform == "tpu" and tpu_kernel:
        return "mosaic"
    return "reference"  # CPU (and TPU for gather kernels, where XLA's own gather is the fast path)


def compiler_params(mode: str, num_warps: int = 4):
    """Triton needs its CompilerParams to be chosen over Mosaic GPU; other modes take the defaults."""
    if mode == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)
    return None


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n and is <= cap (a column block that tiles n exactly)."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b
