"""qlr_linear(x, w, backend=...): y = x·Wᵀ for a QLRWeight W = scale · T_outᵀ (Q + L·R) T_in.

Backends register themselves in BACKENDS (name -> fn(x, w) for ONE matrix, x [..., n] -> [..., m]);
stacked weights (MoE experts, leading axis E on every array of w and on x) are handled here by
vmap, so a backend only ever sees a single matrix.

  "xla"    dequantize Q, L, R with jnp, then  x̃ = transform_in(x);
           y = x̃·Qᵀ + (x̃·Rᵀ)·Lᵀ;  y = transform_out(y)·scale   (float32 compute, output in x's dtype)
  "pallas" kernels/qlr_pallas.py: fused dequantize-in-the-matmul Pallas kernels (GEMV for <= 16
           rows, tiled GEMM above), low-rank term in the epilogue, Hadamard kernels from
           kernels/hadamard.py. Compiled (Triton lowering) on a GPU, interpret mode elsewhere.
  "triton" kernels/qlr_triton.py: the same kernel in Triton through jax-triton (GPU only).
  "auto"   kernels/select.py: measured table per (device, format, shape, rows); CPU -> "xla".

The backend is an argument (static under jit), never an environment variable: qlr_linear(x, w,
backend="pallas") forces one for a call; a QLRWeight carries its own (`backend` field, "auto" by
default; w.with_backend(name), or caldera_jax.linear.with_backend(params, name) for a whole
parameter tree), which caldera_jax.linear.apply passes here.

Gradients: qlr_linear has a custom VJP w.r.t. x (codes frozen): dx = dy·W computed by the
backend's transposed product (register_backend(..., transpose_fn)), i.e.
    dx = scale · fwht_out(fwht_in(dy, s_out) · (Q + L·R), s_in)
with Q, L, R applied as packed matrices (the low-rank term as two thin products; W, and for the
kernel backends Q itself, is never materialised). The cotangent of the weight is zero: its codes
are integers and its float leaves (scales, dense factors) are treated as frozen too; differentiate
QLRWeight.dequantize() if a weight gradient is wanted.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats import incoherence, packing
from caldera_jax.kernels import qlr_pallas, select

BACKENDS: dict[str, Callable] = {}
TRANSPOSES: dict[str, Callable] = {}


def register_backend(name: str, fn: Callable, transpose_fn: Callable | None = None) -> None:
    """fn(x [..., n], w: QLRWeight single matrix) -> [..., m] in x's dtype;
    transpose_fn(dy [..., m], w) -> dy·W [..., n] in dy's dtype (the VJP; default: the xla one)."""
    BACKENDS[name] = fn
    if transpose_fn is not None:
        TRANSPOSES[name] = transpose_fn


def choose_backend(x: jax.Array, w) -> str:
    """The backend "auto" resolves to (kernels/select.py: the measured table)."""
    return select.choose(x, w)


def _xla_product(v: jax.Array, q, a, b, s_in, s_out, scale) -> jax.Array:
    """v [..., k] -> scale · fwht_out(fwht_in(v, s_in)·(qᵀ + aᵀ·bᵀ), s_out) with q [o, k], a [r, k],
    b [o, r] dequantized f32 (a, b None: no low-rank term; signs None: no rotation), in v's dtype."""
    hi = jax.lax.Precision.HIGHEST
    u = v.astype(jnp.float32)
    if s_in is not None:
        u = incoherence.transform_in(u, s_in)
    y = jnp.einsum("...k,ok->...o", u, q, precision=hi)
    if a is not None:
        t = jnp.einsum("...k,rk->...r", u, a, precision=hi)
        y = y + jnp.einsum("...r,or->...o", t, b, precision=hi)
    if s_out is not None:
        y = incoherence.transform_out(y, s_out)
    return (y * scale).astype(v.dtype)


def _xla(x: jax.Array, w) -> jax.Array:
    """x [..., n] -> x·Wᵀ [..., m]: Q dequantized (the XLA path's usual cost), L·R as two thin
    products (R first)."""
    m, n = w.shape
    if x.shape[-1] != n:
        raise ValueError(f"qlr_linear: x has {x.shape[-1]} features, weight expects {n}")
    so, si = w.signs()
    lr = (None, None) if w.l is None else (packing.dequantize(w.r), packing.dequantize(w.l))
    return _xla_product(x, packing.dequantize(w.q), *lr, si, so, w.scale)


def _xla_transpose(dy: jax.Array, w) -> jax.Array:
    """dy [..., m] -> dy·W [..., n]: the same product with Q, L, R transposed and the two rotations
    swapped (L first)."""
    so, si = w.signs()
    lr = (None, None) if w.l is None else (packing.dequantize(w.l).T, packing.dequantize(w.r).T)
    return _xla_product(dy, packing.dequantize(w.q).T, *lr, so, si, w.scale)


# qlr_triton is imported when the triton backend is first used, not here: `import triton` is heavy
# and optional, and fixes its interpreter mode (TRITON_INTERPRET) for the whole process when it runs
# (no import cycle is involved: qlr_triton imports nothing above the kernels).
def _triton(x, w):
    from caldera_jax.kernels import qlr_triton
    return qlr_triton.qlr_forward(x, w)


def _triton_t(dy, w):
    from caldera_jax.kernels import qlr_triton
    return qlr_triton.qlr_transpose(dy, w)


register_backend("xla", _xla, _xla_transpose)
register_backend("pallas", qlr_pallas.qlr_forward, qlr_pallas.qlr_transpose)
register_backend("triton", _triton, _triton_t)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply(name: str, x: jax.Array, w) -> jax.Array:
    return BACKENDS[name](x, w)


def _apply_fwd(name, x, w):
    return BACKENDS[name](x, w), w


def _apply_bwd(name, w, dy):
    dx = TRANSPOSES.get(name, _xla_transpose)(dy, w)
    return dx, jax.tree_util.tree_map(_zero_cotangent, w)


_apply.defvjp(_apply_fwd, _apply_bwd)


@functools.partial(jax.jit, static_argnames="backend")
def qlr_linear(x: jax.Array, w, *, backend: str = "auto") -> jax.Array:
    """x [..., n] -> x·Wᵀ [..., m] (x in bf16/fp16/fp32; output in x's dtype).
    Stacked w (leading E): x [E, ..., n] -> [E, ..., m]. backend: "auto" (the measured table) or a
    name in BACKENDS, which is used as given (off a GPU "pallas" runs in interpret mode)."""
    if w.stacked:
        return jax.vmap(lambda xe, we: qlr_linear(xe, we, backend=backend))(x, w)
    name = choose_backend(x, w) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"qlr_linear: unknown backend {backend!r} (available: {sorted(BACKENDS)})")
    return _apply(name, x, w)
