"""Quantizer API shared by LDLQ, the low-rank factors, packing and the kernels.

    spec = QuantSpec.for_q(budget)            # or QuantSpec("uniform", 4, group_size=64, symmetric=False)
    spec.block                                # columns LDLQ processes together: uniform 1, e8p 8, fp4 1
    params = fit(w, spec)                     # scales (and zeros / tensor scale) only; no rounding
    w_hat_blk, codes_blk = round_block(w[:, c:c+b], params, c, spec)   # nearest rounding of b columns
    qm = assemble([codes_blk, ...], params, spec, (m, n))               # LDLQ's blocks -> QuantizedMatrix
    qm = quantize(w, spec); w_hat = dequantize(qm)                      # fit + nearest rounding
    e8p: n is padded to a multiple of 8 (padded_n); LDLQ on a padded w must feed zeros (or anything,
    they are dropped) for columns >= n. Scales are already rounded to their stored precision by
    fit, so pack/unpack (packing.py) is lossless. Everything is pure, jittable and vmappable (experts).

Every function dispatches on spec.kind through the registry (base.get); the kinds, their allowed
bits and their code conventions live in their own modules (uniform.py, e8p.py, fp4.py):
  uniform  codes [m, n] in [0, 2^b); scales/zeros [m, ceil(n / group_size)]
  e8p      codes [m, ceil(n/8), stages]; scales [m, 1]; zeros None
  fp4      codes [m, n] in [0, 16) (e2m1 bits); scales [m, ceil(n/16)] (e4m3 values); zeros None;
           tensor_scale [] float32
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from caldera_jax.formats.base import Quantizer, ceil_div, get, kinds


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one matrix is quantized (hashable: usable as a jit static argument)."""
    kind: str = "uniform"       # a registered kind: formats.registry.KINDS
    bits: int = 4
    group_size: int = 64        # uniform: consecutive input columns sharing a scale (e8p: 8, fp4: 16)
    symmetric: bool = True      # uniform only: absmax midrise grid, or min/max grid with zero

    def __post_init__(self):
        if self.kind not in kinds():
            raise ValueError(f"QuantSpec.kind={self.kind!r} is not one of {kinds()}")
        q = get(self.kind)
        if self.bits not in q.bits:
            raise ValueError(f"QuantSpec.bits={self.bits} not supported by {self.kind} (allowed {q.bits})")
        if self.group_size < 1:
            raise ValueError(f"QuantSpec.group_size={self.group_size} must be >= 1")
        for k, v in q.normalize(self).items():      # fields the kind fixes (e8p, fp4)
            object.__setattr__(self, k, v)

    @property
    def quantizer(self) -> Quantizer:
        return get(self.kind)

    @property
    def block(self) -> int:
        """Columns that must be rounded together (LDLQ block width)."""
        return get(self.kind).block

    @property
    def stages(self) -> int:
        """Code entries per vector: e8p 1 (2 bits) or 2 (3, 4 bits: residual stage); else 1."""
        return 1 if get(self.kind).code_ndim == 2 or self.bits == 2 else 2

    @classmethod
    def for_q(cls, budget: Any) -> "QuantSpec":
        """The Q quantizer of a MatrixBudget."""
        return cls(kind=budget.quantizer, bits=budget.b_q, group_size=budget.group_size,
                   symmetric=budget.symmetric)

    @classmethod
    def for_factors(cls, budget: Any, which: str = "l") -> "QuantSpec | None":
        """The quantizer of L (which="l", bits b_l) or R ("r", b_r): the budget's factor_quantizer
        (uniform by default, groups of factor_group_size; e8p: blocks of 8); None when the factor is
        bf16 (bits 16). Groups run along each factor's own input dimension (L: rank, R: n)."""
        if which not in ("l", "r"):
            raise ValueError(f"which must be 'l' or 'r', got {which!r}")
        bits = budget.b_l if which == "l" else budget.b_r
        if bits == 16:
            return None
        return cls(kind=getattr(budget, "factor_quantizer", "uniform"), bits=bits,
                   group_size=budget.factor_group_size, symmetric=budget.symmetric)


def padded_n(n: int, spec: QuantSpec) -> int:
    """Columns the codes cover: n rounded up to spec.block."""
    return ceil_div(n, spec.block) * spec.block


def n_groups(n: int, spec: QuantSpec) -> int:
    return ceil_div(n, spec.group_size)


def pad_cols(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Zero-pads the last axis of w to padded_n (no-op when n is a multiple of spec.block)."""
    n = w.shape[-1]
    p = padded_n(n, spec) - n
    if p == 0:
        return w
    return jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, p)])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Scales of a fitted quantizer. uniform: scales/zeros [m, groups]; e8p: scales [m, 1];
    fp4: scales [m, groups] and tensor_scale []. Values are float32 holding exactly what packing
    stores (float16 / e4m3 representable)."""
    scales: jax.Array
    zeros: jax.Array | None
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    tensor_scale: jax.Array | None = None


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
    tensor_scale: jax.Array | None = None

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    @property
    def params(self) -> QuantParams:
        return QuantParams(self.scales, self.zeros, self.spec, self.shape, self.tensor_scale)


# The public functions are jitted (spec static) so that eager callers compile once per shape instead
# of dispatching op by op; inside an outer jit / vmap they inline as usual.

@functools.partial(jax.jit, static_argnums=1)
def fit(w: jax.Array, spec: QuantSpec) -> QuantParams:
    """Scales (and zeros) for w [m, n] f32; no rounding of w."""
    return get(spec.kind).fit(jnp.asarray(w, jnp.float32), spec)


@functools.partial(jax.jit, static_argnums=3)
def round_block(w_block: jax.Array, params: QuantParams, col0, spec: QuantSpec):
    """Nearest-grid rounding of columns col0 .. col0+b-1 (b = w_block.shape[1], a multiple of
    spec.block; col0 a python or traced int, a multiple of spec.block) with their groups' scales.
    Returns (w_hat_block [m, b] f32, codes_block): scalar kinds codes [m, b]; e8p [m, b/8, stages]."""
    return get(spec.kind).round_block(jnp.asarray(w_block, jnp.float32), params, col0, spec)


def assemble(codes_blocks: Sequence[jax.Array] | jax.Array, params: QuantParams, spec: QuantSpec,
             shape: tuple[int, int]) -> QuantizedMatrix:
    """Builds the QuantizedMatrix from LDLQ's codes: a list of blocks in column order, a stacked
    array [n_blocks, m, b(, ...)] (e.g. a lax.scan output), or the full codes array. Codes beyond
    the matrix's columns (padding) are dropped."""
    m, n = shape
    q = get(spec.kind)
    if isinstance(codes_blocks, (list, tuple)):
        codes = jnp.concatenate([jnp.asarray(c) for c in codes_blocks], axis=1)
    else:
        codes = jnp.asarray(codes_blocks)
        if codes.ndim == q.code_ndim + 1:      # [n_blocks, m, b, ...] -> [m, n_blocks*b, ...]
            codes = jnp.moveaxis(codes, 0, 1)
            codes = codes.reshape((codes.shape[0], -1) + codes.shape[3:])
    ncols = padded_n(n, spec) // q.vector
    if codes.shape[1] < ncols:
        raise ValueError(f"assemble: codes cover {codes.shape[1]} column(s)/vector(s), need {ncols}")
    codes = codes[:, :ncols].astype(jnp.int32)
    return QuantizedMatrix(codes, params.scales, params.zeros, spec, (m, n), params.tensor_scale)


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
    return get(qm.spec.kind).dequantize(qm)


def ldlq_params(params: QuantParams):
    """The per-row parameter pytree LDLQ threads through its loops (leading axis m)."""
    return get(params.spec.kind).ldlq_params(params)


def ldlq_round(block: jax.Array, col0, prm, spec: QuantSpec, n: int):
    """LDLQ's rounding of one block [rows, g] with per-row parameters prm (from ldlq_params)."""
    return get(spec.kind).ldlq_round(block, col0, prm, spec, n)
