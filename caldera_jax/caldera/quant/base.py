"""Quantizer API shared by LDLQ, the low-rank factors, packing and the kernels.

    spec = QuantSpec.for_q(budget)            # or QuantSpec("uniform", 4, group_size=64, symmetric=False)
    spec.block                                # columns LDLQ processes together: uniform 1, e8p 8
    params = fit(w, spec)                     # scales (and zeros) only, from w [m, n] f32; no rounding
    w_hat_blk, codes_blk = round_block(w[:, c:c+b], params, c, spec)   # nearest rounding of b columns
    qm = assemble([codes_blk, ...], params, spec, (m, n))               # LDLQ's blocks -> QuantizedMatrix
    qm = quantize(w, spec); w_hat = dequantize(qm)                      # fit + nearest rounding
    e8p: n is padded to a multiple of 8 (padded_n); LDLQ on a padded w must feed zeros (or anything,
    they are dropped) for columns >= n. Scales are already rounded to float16 by fit, so
    pack/unpack (packing.py) is lossless. Everything is pure, jittable and vmappable (experts).

Code conventions (unpacked, int32):
  uniform  codes [m, n] in [0, 2^b);  value = scale*(code - (2^b-1)/2)     (symmetric, midrise)
                                      value = scale*code + zero            (asymmetric; `zeros` is
                                      the value of code 0, in weight units, per (row, group))
           scales/zeros [m, ceil(n / group_size)]; group j covers columns [j*g, (j+1)*g).
  e8p      codes [m, ceil(n/8), stages]; value(8 weights) = scale_row * sum_s stage_scale[s] *
           codebook_s[code_s]  (see e8p.py); scales [m, 1]; zeros None.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

KINDS = ("uniform", "e8p")
UNIFORM_BITS = (2, 3, 4, 8)
E8P_BITS = (2, 3, 4)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized (hashable: usable as a jit static argument)."""
    kind: str = "uniform"       # "uniform" | "e8p"
    bits: int = 4
    group_size: int = 64        # uniform only: consecutive input columns sharing a scale (e8p: 8)
    symmetric: bool = True      # uniform only: absmax midrise grid, or min/max grid with zero

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"QuantSpec.kind={self.kind!r} is not one of {KINDS}")
        allowed = UNIFORM_BITS if self.kind == "uniform" else E8P_BITS
        if self.bits not in allowed:
            raise ValueError(f"QuantSpec.bits={self.bits} not supported by {self.kind} (allowed {allowed})")
        if self.group_size < 1:
            raise ValueError(f"QuantSpec.group_size={self.group_size} must be >= 1")
        if self.kind == "e8p":     # e8p has one scale per row: normalise the unused fields
            object.__setattr__(self, "group_size", 8)
            object.__setattr__(self, "symmetric", True)

    @property
    def block(self) -> int:
        """Columns that must be rounded together (LDLQ block width)."""
        return 1 if self.kind == "uniform" else 8

    @property
    def stages(self) -> int:
        """e8p: number of residual stages (2 bits: 1, 3 and 4 bits: 2); uniform: 1."""
        return 1 if (self.kind == "uniform" or self.bits == 2) else 2

    @classmethod
    def for_q(cls, budget: Any) -> "QuantSpec":
        """The Q quantizer of a MatrixBudget."""
        return cls(kind=budget.quantizer, bits=budget.b_q, group_size=budget.group_size,
                   symmetric=budget.symmetric)

    @classmethod
    def for_factors(cls, budget: Any, which: str = "l") -> "QuantSpec | None":
        """Uniform quantizer of L (which="l", bits b_l) or R ("r", b_r); None when the factor is bf16
        (bits 16). Groups run along each factor's own input dimension (L: rank, R: n)."""
        if which not in ("l", "r"):
            raise ValueError(f"which must be 'l' or 'r', got {which!r}")
        bits = budget.b_l if which == "l" else budget.b_r
        if bits == 16:
            return None
        return cls(kind="uniform", bits=bits, group_size=budget.factor_group_size,
                   symmetric=budget.symmetric)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def padded_n(n: int, spec: QuantSpec) -> int:
    """Columns the codes cover: n rounded up to spec.block."""
    return _ceil_div(n, spec.block) * spec.block


def n_groups(n: int, spec: QuantSpec) -> int:
    return _ceil_div(n, spec.group_size)


def pad_cols(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Zero-pads the last axis of w to padded_n (no-op for uniform)."""
    n = w.shape[-1]
    p = padded_n(n, spec) - n
    if p == 0:
        return w
    return jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, p)])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Scales of a fitted quantizer. uniform: scales/zeros [m, groups]; e8p: scales [m, 1], zeros None.
    Values are float32 holding float16-representable numbers (what packing stores)."""
    scales: jax.Array
    zeros: jax.Array | None
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """Unpacked quantized matrix; see the module docstring for the code conventions.
    With a leading stack axis on every array (experts), `shape` stays the per-matrix (m, n)."""
    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    @property
    def params(self) -> QuantParams:
        return QuantParams(self.scales, self.zeros, self.spec, self.shape)


def _impl(spec: QuantSpec):
    if spec.kind == "uniform":
        from caldera_jax.caldera.quant import uniform
        return uniform
    from caldera_jax.caldera.quant import e8p
    return e8p


# The public functions are jitted (spec static) so that eager callers compile once per shape instead
# of dispatching op by op; inside an outer jit / vmap they inline as usual.

@functools.partial(jax.jit, static_argnums=1)
def fit(w: jax.Array, spec: QuantSpec) -> QuantParams:
    """Scales (and zeros) for w [m, n] f32; no rounding of w."""
    return _impl(spec).fit(jnp.asarray(w, jnp.float32), spec)


@functools.partial(jax.jit, static_argnums=3)
def round_block(w_block: jax.Array, params: QuantParams, col0, spec: QuantSpec):
    """Nearest-grid rounding of columns col0 .. col0+b-1 (b = w_block.shape[1], a multiple of
    spec.block; col0 a python or traced int, a multiple of spec.block) with their groups' scales.
    Returns (w_hat_block [m, b] f32, codes_block): uniform codes [m, b]; e8p [m, b/8, stages]."""
    return _impl(spec).round_block(jnp.asarray(w_block, jnp.float32), params, col0, spec)


def assemble(codes_blocks: Sequence[jax.Array] | jax.Array, params: QuantParams, spec: QuantSpec,
             shape: tuple[int, int]) -> QuantizedMatrix:
    """Builds the QuantizedMatrix from LDLQ's codes: a list of blocks in column order, a stacked
    array [n_blocks, m, b(, ...)] (e.g. a lax.scan output), or the full codes array. Codes beyond
    the matrix's columns (padding) are dropped."""
    m, n = shape
    if isinstance(codes_blocks, (list, tuple)):
        codes = jnp.concatenate([jnp.asarray(c) for c in codes_blocks], axis=1)
    else:
        codes = jnp.asarray(codes_blocks)
        full_ndim = 2 if spec.kind == "uniform" else 3
        if codes.ndim == full_ndim + 1:        # [n_blocks, m, b, ...] -> [m, n_blocks*b, ...]
            codes = jnp.moveaxis(codes, 0, 1)
            codes = codes.reshape((codes.shape[0], -1) + codes.shape[3:])
    ncols = n if spec.kind == "uniform" else padded_n(n, spec) // 8
    if codes.shape[1] < ncols:
        raise ValueError(f"assemble: codes cover {codes.shape[1]} column(s)/vector(s), need {ncols}")
    codes = codes[:, :ncols].astype(jnp.int32)
    return QuantizedMatrix(codes, params.scales, params.zeros, spec, (m, n))


@functools.partial(jax.jit, static_argnums=1)
def quantize(w: jax.Array, spec: QuantSpec) -> QuantizedMatrix:
    """fit + nearest rounding of every column."""
    w = jnp.asarray(w, jnp.float32)
    params = fit(w, spec)
    wp = pad_cols(w, spec)
    _, codes = round_block(wp, params, 0, spec)
    return assemble(codes, params, spec, w.shape)


@jax.jit
def dequantize(qm: QuantizedMatrix) -> jax.Array:
    """[m, n] float32 (vmappable over a leading stack axis)."""
    return _impl(qm.spec).dequantize(qm)
