"""Groupwise uniform scalar quantizer (2/3/4/8 bits), symmetric (midrise absmax) or asymmetric.

symmetric:  value = s * (code - (2^b - 1)/2),  s = absmax(group) / ((2^b - 1)/2)
asymmetric: value = s * code + z,              z = min(group), s = (max - min) / (2^b - 1)
s and z are rounded to float16 (the stored precision) before any code is chosen, so the packed
matrix dequantizes to exactly what LDLQ saw. Group j covers columns [j*g, (j+1)*g); the last group
may be partial (its statistics use only its real columns). LDLQ block 1 (scalar rounding).

Packed (b in {2, 3, 4, 8}; bitpack.py's word layout):
    codes : uint32 [m, n_words(n, b)]   b = 4, one row:  word 0 holds columns 7..0 in bits 31..0
                                        (column k in bits 4k..4k+3), word 1 columns 15..8, ...
                                        b = 3: 32 columns in 3 words, bit-plane split (exactly 3
                                        bits per weight; see bitpack.py)
    scales: float16 [m, ceil(n/g)]
    zeros : float16 [m, ceil(n/g)] or None (symmetric)
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats import bitpack
from caldera_jax.formats.base import Quantizer, ceil_div
from caldera_jax.formats.packing import PackedFormat, PackedMatrix
from caldera_jax.formats.quant import QuantParams, QuantSpec, QuantizedMatrix, round_block as _round_block_jit

KIND = "uniform"
BITS = (2, 3, 4, 8)
F16_TINY = float(np.finfo(np.float16).smallest_subnormal)   # 2^-24: floor of a stored scale


def to_f16(x: jax.Array) -> jax.Array:
    """Rounds to the nearest float16 value (kept as float32)."""
    return x.astype(jnp.float16).astype(jnp.float32)


def _grouped(w: jax.Array, g: int, fill: float) -> jax.Array:
    m, n = w.shape
    G = -(-n // g)
    w = jnp.pad(w, ((0, 0), (0, G * g - n)), constant_values=fill)
    return w.reshape(m, G, g)


def fit(w: jax.Array, spec: QuantSpec) -> QuantParams:
    m, n = w.shape
    g, levels = spec.group_size, 2 ** spec.bits - 1
    if spec.symmetric:
        amax = jnp.max(jnp.abs(_grouped(w, g, 0.0)), axis=-1)
        s = to_f16(jnp.maximum(amax / (levels / 2), F16_TINY))
        return QuantParams(jnp.maximum(s, F16_TINY), None, spec, (m, n))
    lo = jnp.min(_grouped(w, g, jnp.inf), axis=-1)
    hi = jnp.max(_grouped(w, g, -jnp.inf), axis=-1)
    z = to_f16(lo)
    s = to_f16(jnp.maximum((hi - z) / levels, F16_TINY))
    return QuantParams(jnp.maximum(s, F16_TINY), z, spec, (m, n))


def _col_params(params: QuantParams, cols: jax.Array, spec: QuantSpec):
    gi = cols // spec.group_size
    gi = jnp.minimum(gi, params.scales.shape[-1] - 1)   # columns past n (padding) reuse the last group
    s = jnp.take(params.scales, gi, axis=-1)
    z = None if params.zeros is None else jnp.take(params.zeros, gi, axis=-1)
    return s, z


def _round(w, s, z, spec: QuantSpec):
    levels = 2 ** spec.bits - 1
    if z is None:
        c = jnp.clip(jnp.round(w / s + levels / 2), 0, levels)
        return s * (c - levels / 2), c.astype(jnp.int32)
    c = jnp.clip(jnp.round((w - z) / s), 0, levels)
    return s * c + z, c.astype(jnp.int32)


def round_block(w_block: jax.Array, params: QuantParams, col0, spec: QuantSpec):
    b = w_block.shape[1]
    cols = col0 + jnp.arange(b)
    s, z = _col_params(params, cols, spec)
    return _round(w_block, s, z, spec)


def dequantize(qm: QuantizedMatrix) -> jax.Array:
    """[..., m, n] f32 (any leading stack axes)."""
    spec = qm.spec
    n = qm.shape[1]
    s, z = _col_params(qm.params, jnp.arange(n), spec)
    levels = 2 ** spec.bits - 1
    c = qm.codes.astype(jnp.float32)
    if z is None:
        return s * (c - levels / 2)
    return s * c + z


def theoretical_bits(spec_or_fmt, scale_bits: int = 16) -> float:
    """Bits per weight of codes + fp16 scales (+ zeros), ignoring partial-group padding."""
    return spec_or_fmt.bits + scale_bits * (1 if spec_or_fmt.symmetric else 2) / spec_or_fmt.group_size


# ---------------------------------------------------------------- LDLQ

def ldlq_params(params: QuantParams):
    return (params.scales, params.zeros)


def ldlq_round(block, col0, prm, spec: QuantSpec, n: int):
    """round_block with per-row parameters prm = (scales [rows, G], zeros [rows, G] | None)."""
    scales, zeros = prm
    params = QuantParams(scales, zeros, spec, (block.shape[0], n))
    return _round_block_jit(block, params, col0, spec)


# ---------------------------------------------------------------- packing

def pack(qm: QuantizedMatrix) -> PackedMatrix:
    spec = qm.spec
    zeros = None if qm.zeros is None else qm.zeros.astype(jnp.float16)
    return PackedMatrix(bitpack.pack_codes(qm.codes, spec.bits), None, qm.scales.astype(jnp.float16), zeros,
                        PackedFormat.of(spec, qm.shape))


def unpack(pm: PackedMatrix) -> QuantizedMatrix:
    fmt = pm.fmt
    zeros = None if pm.zeros is None else pm.zeros.astype(jnp.float32)
    return QuantizedMatrix(bitpack.unpack_codes(pm.codes, fmt.bits, fmt.shape[1]), pm.scales.astype(jnp.float32),
                           zeros, fmt.spec, fmt.shape)


def array_specs(fmt: PackedFormat) -> dict:
    m, n = fmt.shape
    G = ceil_div(n, fmt.group_size)
    return {"codes": (frozenset({"uint32"}), (m, bitpack.n_words(n, fmt.bits))),
            "scales": (frozenset({"float16"}), (m, G)),
            "zeros": None if fmt.symmetric else (frozenset({"float16"}), (m, G))}


def code_chunk(fmt) -> int:
    return 32 if fmt.bits == 3 else 32 // fmt.bits


def format_key(fmt) -> str:
    return f"u{fmt.bits}g{fmt.group_size}{'' if fmt.symmetric else 'a'}"


def parse_key(s: str) -> dict | None:
    mt = re.fullmatch(r"u([2348])g(\d+)(a?)", s)
    if not mt:
        return None
    return dict(kind=KIND, bits=int(mt.group(1)), group_size=int(mt.group(2)), symmetric=not mt.group(3))


def random_packed(rng: np.random.Generator, fmt: PackedFormat, magnitude: float = 1.0) -> PackedMatrix:
    """Random words (every bit pattern is a valid code) and O(magnitude) fp16 scales / zeros."""
    m, n = fmt.shape
    bits, g, sym = fmt.bits, fmt.group_size, fmt.symmetric
    nw = bitpack.n_words(n, bits)
    codes = rng.integers(0, 2 ** 32, (m, nw), dtype=np.uint64).astype(np.uint32)
    G = -(-n // g)
    half = (2 ** bits - 1) / 2
    scales = (magnitude / half * rng.uniform(0.5, 1.5, (m, G))).astype(np.float16)
    zeros = None if sym else (-magnitude * rng.uniform(0.5, 1.5, (m, G))).astype(np.float16)
    return PackedMatrix(jnp.asarray(codes), None, jnp.asarray(scales),
                        None if zeros is None else jnp.asarray(zeros), fmt)


QUANTIZER = Quantizer(
    kind=KIND, bits=BITS, block=1, vector=1, code_ndim=2, kernel_id=0,
    normalize=lambda spec: {},
    fit=fit, round_block=round_block, dequantize=dequantize,
    ldlq_params=ldlq_params, ldlq_round=ldlq_round,
    pack=pack, unpack=unpack, array_specs=array_specs, theoretical_bits=theoretical_bits,
    code_chunk=code_chunk, format_key=format_key, parse_key=parse_key, random_packed=random_packed)
