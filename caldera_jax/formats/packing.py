"""The packed storage of a compressed matrix: PackedFormat / PackedMatrix and the generic
pack / unpack / dequantize / accounting, dispatching to each kind's own layout.

Used by QLRWeight (inference), the compressed checkpoint (safetensors: every array is a
uint8 / uint16 / uint32 / float16 / bfloat16 / float32 array; nothing needs an int4 or float8
dtype) and the kernels. All arrays are row-major; a matrix is [m = out_features, n = in_features];
codes run along the input dimension n, so a row of W is a contiguous run of words. A stack of
matrices (MoE experts) adds a leading axis E to every array; the format (static) stays the
per-matrix one.

    ┌──────────── PackedMatrix (pytree) ──────────────────┐
    │ codes         the kind's codes  [(E,) m, words]     │
    │ codes2        None | second stage (e8p 3/4 bits)    │
    │ scales        None | per-group / per-row scales     │
    │ zeros         None | per-group zero points          │
    │ tensor_scale  None | float32 [(E,) 1] (fp4)         │
    │ fmt           PackedFormat (static): kind, bits,    │
    │               group_size, symmetric, shape (m, n)   │
    └─────────────────────────────────────────────────────┘

The layout of each kind is documented in its module (uniform.py, e8p.py, fp4.py) and declared by
its `array_specs(fmt)` (dtype and shape of every slot), which the checkpoint loader checks against.
DENSE (L or R kept at 16 bits, or any unquantized factor): codes = the matrix itself, bfloat16
(or float16/float32) [m, n]; no other slot. Incoherence signs: bitpack.pack_signs.

nbytes(pm) counts every array and bits_per_param = 8*nbytes/(m*n).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats import quant
from caldera_jax.formats.base import get, kinds
from caldera_jax.formats.bitpack import (  # noqa: F401  (the layout helpers, part of this API)
    n_words, pack_codes, pack_signs, unpack_codes, unpack_signs, words_layout)
from caldera_jax.formats.quant import QuantizedMatrix, QuantSpec

DENSE = "dense"
DENSE_KERNEL_ID = 2
ARRAY_SLOTS = ("codes", "codes2", "scales", "zeros", "tensor_scale")


def format_kinds() -> tuple[str, ...]:
    """Every kind a PackedFormat may have: the registered quantizers and dense."""
    return kinds() + (DENSE,)


@dataclasses.dataclass(frozen=True)
class PackedFormat:
    kind: str                      # a registered quantizer kind, or "dense"
    bits: int                      # the quantizer's bits (dense: 16 or 32)
    group_size: int = 0            # uniform: columns per scale; e8p: 8; fp4: 16; dense: 0
    symmetric: bool = True         # uniform only
    shape: tuple[int, int] = (0, 0)

    @property
    def spec(self) -> QuantSpec:
        if self.kind == DENSE:
            raise ValueError("a dense PackedMatrix has no QuantSpec")
        return QuantSpec(self.kind, self.bits, self.group_size, self.symmetric)

    def to_json(self) -> dict:
        return dict(kind=self.kind, bits=self.bits, group_size=self.group_size,
                    symmetric=self.symmetric, shape=list(self.shape))

    @classmethod
    def from_json(cls, d: dict) -> "PackedFormat":
        return cls(d["kind"], int(d["bits"]), int(d["group_size"]), bool(d["symmetric"]),
                   tuple(int(v) for v in d["shape"]))

    @classmethod
    def of(cls, spec: QuantSpec, shape: tuple[int, int]) -> "PackedFormat":
        return cls(spec.kind, spec.bits, spec.group_size, spec.symmetric, tuple(shape))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    codes: jax.Array
    codes2: jax.Array | None
    scales: jax.Array | None
    zeros: jax.Array | None
    fmt: PackedFormat = dataclasses.field(metadata=dict(static=True))
    tensor_scale: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.fmt.shape

    def arrays(self) -> dict[str, jax.Array]:
        """The stored arrays by name (None ones left out), in ARRAY_SLOTS order; for checkpoints
        and kernels."""
        return {k: getattr(self, k) for k in ARRAY_SLOTS if getattr(self, k) is not None}

    @classmethod
    def from_arrays(cls, fmt: PackedFormat, arrays: dict) -> "PackedMatrix":
        return cls(arrays["codes"], arrays.get("codes2"), arrays.get("scales"), arrays.get("zeros"), fmt,
                   arrays.get("tensor_scale"))

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def nbytes(self) -> int:
        return nbytes(self)

    def bits_per_param(self) -> float:
        return bits_per_param(self)


# ---------------------------------------------------------------- pack / unpack

@jax.jit
def pack(qm: QuantizedMatrix) -> PackedMatrix:
    """Lossless (fit already rounds scales to their stored precision). Works on stacked matrices."""
    return get(qm.spec.kind).pack(qm)


def pack_dense(w: jax.Array, dtype=jnp.bfloat16) -> PackedMatrix:
    """A factor kept unquantized (b_l / b_r = 16): stored as is in `dtype`."""
    w = jnp.asarray(w).astype(dtype)
    fmt = PackedFormat(DENSE, 8 * jnp.dtype(dtype).itemsize, 0, True, tuple(w.shape[-2:]))
    return PackedMatrix(w, None, None, None, fmt)


@jax.jit
def unpack(pm: PackedMatrix) -> QuantizedMatrix:
    if pm.fmt.kind == DENSE:
        raise ValueError("unpack: a dense PackedMatrix holds no codes; use dequantize()")
    return get(pm.fmt.kind).unpack(pm)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(pm: PackedMatrix, dtype=jnp.float32) -> jax.Array:
    """[..., m, n] in dtype, for every kind (dense included)."""
    if pm.fmt.kind == DENSE:
        return pm.codes.astype(dtype)
    return quant.dequantize(unpack(pm)).astype(dtype)


# ---------------------------------------------------------------- what a format stores

def array_specs(fmt: PackedFormat) -> dict[str, tuple[frozenset, tuple[int, ...]] | None]:
    """slot -> None (absent) or (allowed dtype names, per-matrix shape), for every slot."""
    m, n = fmt.shape
    if fmt.kind == DENSE:
        d = {"codes": (frozenset({"bfloat16", "float16"} if fmt.bits == 16 else {"float32"}), (m, n))}
    else:
        d = get(fmt.kind).array_specs(fmt)
    return {k: d.get(k) for k in ARRAY_SLOTS}


def valid_format(fmt: PackedFormat) -> bool:
    """The fields name a format some kind defines (kind registered, bits allowed, group >= 1)."""
    if fmt.kind == DENSE:
        return fmt.bits in (16, 32)
    if fmt.kind not in kinds() or fmt.bits not in get(fmt.kind).bits or fmt.group_size < 1:
        return False
    try:
        return fmt.spec.group_size == fmt.group_size and fmt.spec.symmetric == fmt.symmetric
    except ValueError:
        return False


def kernel_id(fmt: PackedFormat) -> int:
    """The integer the kernels dispatch on (Triton's KIND constexpr, the Pallas tile dequantizer)."""
    return DENSE_KERNEL_ID if fmt.kind == DENSE else get(fmt.kind).kernel_id


def code_chunk(fmt: PackedFormat) -> int:
    """Columns per independently addressable unit of the packed codes (dense: 1)."""
    return 1 if fmt.kind == DENSE else get(fmt.kind).code_chunk(fmt)


def format_key(fmt: PackedFormat) -> str:
    """Short name: "e8p2", "u3g128", "u4g64a" (a: asymmetric), "fp4", "bf16", "f32"."""
    if fmt.kind == DENSE:
        return f"bf{fmt.bits}" if fmt.bits == 16 else f"f{fmt.bits}"
    return get(fmt.kind).format_key(fmt)


def parse_key(s: str, shape: tuple[int, int] = (0, 0)) -> PackedFormat:
    """Inverse of format_key ("bf16", "f16", "f32": dense)."""
    if s in ("bf16", "f16", "f32"):
        return PackedFormat(DENSE, 32 if s == "f32" else 16, 0, True, tuple(shape))
    for kind in kinds():
        d = get(kind).parse_key(s)
        if d is not None:
            return PackedFormat(shape=tuple(shape), **d)
    raise ValueError(f"unknown format {s!r} (e8p2/3/4, u<bits>g<group>[a], fp4, bf16, f16, f32)")


def random_packed(rng: np.random.Generator, fmt: PackedFormat, magnitude: float = 1.0,
                  dense_dtype=None) -> PackedMatrix:
    """A PackedMatrix of format fmt with random codes (every bit pattern a valid code); values are
    O(magnitude). For kernel tests and benchmarks."""
    m, n = fmt.shape
    if fmt.kind == DENSE:
        dt = dense_dtype or (jnp.float32 if fmt.bits == 32 else jnp.bfloat16)
        return pack_dense(jnp.asarray(magnitude * rng.standard_normal((m, n)), jnp.float32), dt)
    return get(fmt.kind).random_packed(rng, fmt, magnitude)


# ---------------------------------------------------------------- accounting

def nbytes(pm: PackedMatrix) -> int:
    return int(sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in pm.arrays().values()))


def n_matrices(pm: PackedMatrix) -> int:
    """1, or E for a stack of matrices."""
    return int(np.prod(pm.codes.shape[:-2])) if pm.codes.ndim > 2 else 1


def bits_per_param(pm: PackedMatrix) -> float:
    m, n = pm.fmt.shape
    return 8.0 * nbytes(pm) / (n_matrices(pm) * m * n)


def theoretical_bits_per_param(fmt: PackedFormat) -> float:
    """Bits per weight of the format for a matrix whose n is a multiple of every chunk and group."""
    if fmt.kind == DENSE:
        return float(fmt.bits)
    return float(get(fmt.kind).theoretical_bits(fmt))
