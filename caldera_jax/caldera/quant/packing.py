"""The packed storage layout of a compressed matrix: the ONE module that defines it.

Used by QLRWeight (inference), the compressed checkpoint (safetensors: every array below is a
uint8 / uint16 / uint32 / float16 / bfloat16 array; nothing needs an int4 dtype) and the kernels.
All arrays are row-major; a matrix is [m = out_features, n = in_features]; codes run along the
input dimension n, so a row of W is a contiguous run of words. A stack of matrices (MoE experts)
adds a leading axis E to every array; the format (static) stays the per-matrix one.

UNIFORM, b in {2, 4, 8}: K = 32/b codes per uint32 word, code k of a word in bits [b*k, b*k+b)
(the first column in the least significant bits). codes: uint32 [m, ceil(n/K)].

    b = 4, one row:   word 0                                      word 1
    column:           7    6    5    4    3    2    1    0        15 ...                 8
    bits:           31..28 27..24 ...                  3..0       (same)

UNIFORM, b = 3: chunks of 32 columns in 3 words, bit-plane split (no code straddles a word; a
kernel unpacks with the same shifts and masks as for 2 bits, plus one bit):
    word 3c+0 : low 2 bits of columns 32c+0  .. 32c+15  (2-bit layout: column 32c+k at bits 2k..2k+1)
    word 3c+1 : low 2 bits of columns 32c+16 .. 32c+31
    word 3c+2 : high bit   of columns 32c+0  .. 32c+31  (column 32c+k at bit k)
    code = lo | (hi << 2);  codes: uint32 [m, 3*ceil(n/32)]  -> exactly 3 bits per weight

  Columns beyond n in the last word/chunk are code 0 (ignored).
  scales: float16 [m, ceil(n/g)] (group j = columns [j*g, (j+1)*g))
  zeros : float16 [m, ceil(n/g)] or None (symmetric)
    symmetric : w = scale * (code - (2^b - 1)/2)
    asymmetric: w = scale * code + zero          (zero = value of code 0, in weight units)

E8P (b = 2, 3, 4): one 16-bit index per 8 consecutive columns (columns padded to a multiple of 8
with zeros):
    codes : uint16 [m, ceil(n/8)]           E8P index (e8p.py: bits 15..8 pattern of the 256x8 table
                                            e8p.abs_grid(), bits 7..1 signs of coords 1..7, bit 0
                                            shift +-1/4; sign of coord 0 from parity)
    codes2: None                   (2 bits)
            uint8  [m, ceil(n/8)]  (3 bits) index into e8p.e8_1bit_grid() (256x8 table)
            uint16 [m, ceil(n/8)]  (4 bits) second E8P index
    scales: float16 [m, 1]                  w[8 cols] = scale * (cb1[codes] + cb2[codes2] / gain)
  The codebooks are not stored per matrix: e8p.abs_grid() / e8p.e8_1bit_grid() are 8 KiB
  constant tables (a checkpoint may store them once).

DENSE (L or R kept at 16 bits, or any unquantized factor): codes = the matrix itself, bfloat16
(or float16/float32) [m, n]; scales/zeros None.

INCOHERENCE SIGNS: pack_signs(±1 [..., n]) -> uint8 [..., ceil(n/8)], bit k of byte j set <=>
sign of coordinate 8j+k is -1.

    ┌──────────── PackedMatrix (pytree) ─────────────┐
    │ codes   uint32 | uint16 | bf16   [(E,) m, words]│
    │ codes2  None | uint8 | uint16    [(E,) m, n/8]  │
    │ scales  None | float16           [(E,) m, G|1]  │
    │ zeros   None | float16           [(E,) m, G]    │
    │ fmt     PackedFormat (static): kind, bits,      │
    │         group_size, symmetric, shape (m, n)     │
    └─────────────────────────────────────────────────┘

nbytes(pm) counts every array (codes, codes2, scales, zeros) and bits_per_param = 8*nbytes/(m*n).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.caldera.quant.base import QuantSpec, QuantizedMatrix, _ceil_div

KINDS = ("uniform", "e8p", "dense")


@dataclasses.dataclass(frozen=True)
class PackedFormat:
    kind: str                      # "uniform" | "e8p" | "dense"
    bits: int                      # 2/3/4/8 (dense: 16 or 32)
    group_size: int = 0            # uniform: columns per scale; e8p: 8; dense: 0
    symmetric: bool = True         # uniform only
    shape: tuple[int, int] = (0, 0)

    @property
    def spec(self) -> QuantSpec:
        if self.kind == "dense":
            raise ValueError("a dense PackedMatrix has no QuantSpec")
        return QuantSpec(self.kind, self.bits, self.group_size, self.symmetric)

    def to_json(self) -> dict:
        return dict(kind=self.kind, bits=self.bits, group_size=self.group_size,
                    symmetric=self.symmetric, shape=list(self.shape))

    @classmethod
    def from_json(cls, d: dict) -> "PackedFormat":
        return cls(d["kind"], int(d["bits"]), int(d["group_size"]), bool(d["symmetric"]),
                   tuple(int(v) for v in d["shape"]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    codes: jax.Array
    codes2: jax.Array | None
    scales: jax.Array | None
    zeros: jax.Array | None
    fmt: PackedFormat = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return self.fmt.shape

    def arrays(self) -> dict[str, jax.Array]:
        """The stored arrays by name (None ones left out); for checkpoints."""
        d = dict(codes=self.codes, codes2=self.codes2, scales=self.scales, zeros=self.zeros)
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_arrays(cls, fmt: PackedFormat, arrays: dict) -> "PackedMatrix":
        return cls(arrays["codes"], arrays.get("codes2"), arrays.get("scales"), arrays.get("zeros"), fmt)

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def nbytes(self) -> int:
        return nbytes(self)

    def bits_per_param(self) -> float:
        return bits_per_param(self)


# ---------------------------------------------------------------- uniform code words

def words_layout(bits: int) -> tuple[int, int]:
    """(codes per chunk K, uint32 words per chunk W) of the uniform layout."""
    if bits == 3:
        return 32, 3
    if bits in (2, 4, 8):
        return 32 // bits, 1
    raise ValueError(f"no uniform packed layout for {bits} bits")


def n_words(n: int, bits: int) -> int:
    K, W = words_layout(bits)
    return W * _ceil_div(n, K)


def _pack_plain(c: jax.Array, bits: int) -> jax.Array:
    """c uint32 [..., nc*K] -> [..., nc] words, K = 32/bits codes per word."""
    K = 32 // bits
    c = c.reshape(c.shape[:-1] + (-1, K))
    w = c[..., 0]
    for k in range(1, K):
        w = w | (c[..., k] << (bits * k))
    return w


def _unpack_plain(w: jax.Array, bits: int) -> jax.Array:
    K = 32 // bits
    sh = (jnp.arange(K, dtype=jnp.uint32) * bits)
    c = (w[..., None] >> sh) & jnp.uint32(2 ** bits - 1)
    return c.reshape(c.shape[:-2] + (-1,))


@functools.partial(jax.jit, static_argnames="bits")
def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Uniform codes [..., n] (ints in [0, 2^bits)) -> uint32 words [..., n_words(n, bits)]."""
    n = codes.shape[-1]
    K, W = words_layout(bits)
    nc = _ceil_div(n, K)
    c = codes.astype(jnp.uint32)
    c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, nc * K - n)])
    if bits != 3:
        return _pack_plain(c, bits)
    c = c.reshape(c.shape[:-1] + (nc, 32))
    lo = _pack_plain(c & jnp.uint32(3), 2)                 # [..., nc, 2]
    hi = _pack_plain(c >> 2, 1)                            # [..., nc, 1]
    return jnp.concatenate([lo, hi], axis=-1).reshape(c.shape[:-2] + (3 * nc,))


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack_codes(words: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of pack_codes: uint32 [..., n_words] -> int32 codes [..., n]."""
    if bits != 3:
        c = _unpack_plain(words.astype(jnp.uint32), bits)
    else:
        w = words.astype(jnp.uint32).reshape(words.shape[:-1] + (-1, 3))
        lo = _unpack_plain(w[..., 0:2], 2)                # [..., nc, 32]
        hi = _unpack_plain(w[..., 2:3], 1)                # [..., nc, 32]
        c = (lo | (hi << 2)).reshape(w.shape[:-2] + (-1,))
    return c[..., :n].astype(jnp.int32)


# ---------------------------------------------------------------- signs

@jax.jit
def pack_signs(signs: jax.Array) -> jax.Array:
    """±1 [..., n] -> uint8 [..., ceil(n/8)], bit k of byte j set <=> coordinate 8j+k is negative."""
    n = signs.shape[-1]
    neg = (jnp.asarray(signs) < 0).astype(jnp.uint8)
    neg = jnp.pad(neg, [(0, 0)] * (neg.ndim - 1) + [(0, _ceil_div(n, 8) * 8 - n)])
    neg = neg.reshape(neg.shape[:-1] + (-1, 8))
    out = neg[..., 0]
    for k in range(1, 8):
        out = out | (neg[..., k] << k)
    return out.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def unpack_signs(bits: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
    """uint8 [..., ceil(n/8)] -> ±1 [..., n] in dtype."""
    b = (bits.astype(jnp.int32)[..., None] >> jnp.arange(8, dtype=jnp.int32)) & 1
    b = b.reshape(b.shape[:-2] + (-1,))[..., :n]
    return (1 - 2 * b).astype(dtype)


# ---------------------------------------------------------------- pack / unpack

@jax.jit
def pack(qm: QuantizedMatrix) -> PackedMatrix:
    """Lossless (scales from fit are float16-representable). Works on stacked matrices too."""
    spec, (m, n) = qm.spec, qm.shape
    fmt = PackedFormat(spec.kind, spec.bits, spec.group_size, spec.symmetric, (m, n))
    scales = qm.scales.astype(jnp.float16)
    if spec.kind == "uniform":
        zeros = None if qm.zeros is None else qm.zeros.astype(jnp.float16)
        return PackedMatrix(pack_codes(qm.codes, spec.bits), None, scales, zeros, fmt)
    codes = qm.codes[..., 0].astype(jnp.uint16)
    codes2 = None
    if spec.bits == 3:
        codes2 = qm.codes[..., 1].astype(jnp.uint8)
    elif spec.bits == 4:
        codes2 = qm.codes[..., 1].astype(jnp.uint16)
    return PackedMatrix(codes, codes2, scales, None, fmt)


def pack_dense(w: jax.Array, dtype=jnp.bfloat16) -> PackedMatrix:
    """A factor kept unquantized (b_l / b_r = 16): stored as is in `dtype`."""
    w = jnp.asarray(w).astype(dtype)
    fmt = PackedFormat("dense", 8 * jnp.dtype(dtype).itemsize, 0, True, tuple(w.shape[-2:]))
    return PackedMatrix(w, None, None, None, fmt)


@jax.jit
def unpack(pm: PackedMatrix) -> QuantizedMatrix:
    fmt = pm.fmt
    if fmt.kind == "dense":
        raise ValueError("unpack: a dense PackedMatrix holds no codes; use dequantize()")
    spec, (m, n) = fmt.spec, fmt.shape
    scales = pm.scales.astype(jnp.float32)
    if fmt.kind == "uniform":
        zeros = None if pm.zeros is None else pm.zeros.astype(jnp.float32)
        return QuantizedMatrix(unpack_codes(pm.codes, fmt.bits, n), scales, zeros, spec, (m, n))
    codes = [pm.codes.astype(jnp.int32)]
    if pm.codes2 is not None:
        codes.append(pm.codes2.astype(jnp.int32))
    return QuantizedMatrix(jnp.stack(codes, axis=-1), scales, None, spec, (m, n))


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(pm: PackedMatrix, dtype=jnp.float32) -> jax.Array:
    """[..., m, n] in dtype, for every kind (dense included)."""
    if pm.fmt.kind == "dense":
        return pm.codes.astype(dtype)
    from caldera_jax.caldera.quant.base import dequantize as deq
    return deq(unpack(pm)).astype(dtype)


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
    m, n = fmt.shape
    if fmt.kind == "dense":
        return float(fmt.bits)
    if fmt.kind == "uniform":
        return fmt.bits + 16.0 * (1 if fmt.symmetric else 2) / fmt.group_size
    return fmt.bits + 16.0 / n          # codes + one fp16 scale per row
