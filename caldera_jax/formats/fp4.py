"""Block-scaled FP4 (NVFP4-like): e2m1 values, an e4m3 scale per 16 input columns, a float32
per-tensor scale. 4 bits only; LDLQ block 1 (scalar rounding, error feedback per column).

    w[r, c] ≈ tensor_scale · s[r, c // 16] · e2m1(code[r, c])

  e2m1 (4-bit code): bit 3 sign, bits 2..1 exponent e, bit 0 mantissa m (bias 1):
      e = 0: m · 0.5 (subnormal: 0, 0.5);  e > 0: 2^(e-1) · (1 + m/2)
      -> magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6} for codes 0..7, negated for codes 8..15
  s: float8 e4m3fn (bit 7 sign, bits 6..3 exponent e, bits 2..0 mantissa m, bias 7, no infinities):
      e = 0: m/8 · 2^-6 (subnormal);  e > 0: (1 + m/8) · 2^(e-7);  max 448 (0x7E); 0x7F is NaN
  tensor_scale: float32, max|W| / (6 · 448), so the largest block scale is ~448.

fit: tensor_scale = max(max|W| / (6·448), float32 tiny); s = e4m3(clip(max|block| / (6·tensor_scale),
2^-9, 448)) rounded to nearest even (2^-9 = the smallest e4m3 subnormal, so no scale is 0 and an
all-zero block rounds to code 0). Rounding: x = w / (tensor_scale·s), nearest e2m1 magnitude (ties
to the smaller), sign of x (code 0 for zero). Every function forms the effective scale
tensor_scale·s in float32 first and multiplies it by the e2m1 value, so LDLQ's ŵ, dequantize and
the packed matrix agree bit for bit.

Packed:
    codes       : uint8   [m, ceil(n/2)]    column 2j in the low nibble, 2j+1 in the high nibble
                                             (a last odd column's high nibble is 0)
    scales      : uint8   [m, ceil(n/16)]   the e4m3 bit patterns (raw bytes: not every
                                             safetensors reader knows float8)
    tensor_scale: float32 [1]
  bits per weight: 4 + 8/16 + 32/(m·n) = 4.5 (+ the tensor scale).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats.base import Quantizer, ceil_div
from caldera_jax.formats.packing import PackedFormat, PackedMatrix
from caldera_jax.formats.quant import QuantParams, QuantSpec, QuantizedMatrix

KIND = "fp4"
BITS = (4,)
GROUP = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = 2.0 ** -9                       # smallest positive e4m3 (subnormal)
F32_TINY = float(np.finfo(np.float32).tiny)
# e2m1 codes 0..15 -> value (the definition above, evaluated once)
E2M1 = np.array([(-1.0 if c & 8 else 1.0) * (((c >> 1) & 3 == 0) * 0.5 * (c & 1)
                                              + ((c >> 1) & 3 > 0) * 2.0 ** (((c >> 1) & 3) - 1) * (1 + 0.5 * (c & 1)))
                 for c in range(16)], np.float32)
_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)   # decision points between consecutive magnitudes


def to_e4m3(x: jax.Array) -> jax.Array:
    """Rounds to the nearest float8 e4m3fn value (kept as float32); x in [0, 448]."""
    return x.astype(jnp.float8_e4m3fn).astype(jnp.float32)


def fit(w: jax.Array, spec: QuantSpec) -> QuantParams:
    m, n = w.shape
    G = ceil_div(n, GROUP)
    ts = jnp.maximum(jnp.max(jnp.abs(w)) / (E2M1_MAX * E4M3_MAX), F32_TINY)
    a = jnp.abs(jnp.pad(w, ((0, 0), (0, G * GROUP - n)))).reshape(m, G, GROUP)
    s = to_e4m3(jnp.clip(jnp.max(a, axis=-1) / (E2M1_MAX * ts), E4M3_TINY, E4M3_MAX))
    return QuantParams(s, None, spec, (m, n), ts.astype(jnp.float32))


def _effective(scales: jax.Array, tensor_scale: jax.Array) -> jax.Array:
    """tensor_scale · s per (row, group), float32 ([..., m, G]; tensor_scale [...])."""
    return scales * jnp.asarray(tensor_scale, jnp.float32)[..., None, None]


def _cols(eff: jax.Array, cols: jax.Array) -> jax.Array:
    gi = jnp.minimum(cols // GROUP, eff.shape[-1] - 1)
    return jnp.take(eff, gi, axis=-1)


def _round(w: jax.Array, eff: jax.Array):
    x = w / eff
    a = jnp.abs(x)
    idx = sum((a > t).astype(jnp.int32) for t in _MIDS)
    code = jnp.where((x < 0) & (idx > 0), idx + 8, idx)
    return eff * jnp.asarray(E2M1)[code], code.astype(jnp.int32)


def round_block(w_block: jax.Array, params: QuantParams, col0, spec: QuantSpec):
    cols = col0 + jnp.arange(w_block.shape[1])
    return _round(w_block, _cols(_effective(params.scales, params.tensor_scale), cols))


def dequantize(qm: QuantizedMatrix) -> jax.Array:
    """[..., m, n] f32 (any leading stack axes)."""
    eff = _cols(_effective(qm.scales, qm.tensor_scale), jnp.arange(qm.shape[1]))
    return eff * jnp.asarray(E2M1)[qm.codes]


def ldlq_params(params: QuantParams):
    return (_effective(params.scales, params.tensor_scale),)


def ldlq_round(block: jax.Array, col0, prm, spec: QuantSpec, n: int):
    (eff,) = prm
    return _round(block, _cols(eff, col0 + jnp.arange(block.shape[1])))


# ---------------------------------------------------------------- packing

def pack(qm: QuantizedMatrix) -> PackedMatrix:
    c = qm.codes.astype(jnp.uint8)
    n = c.shape[-1]
    c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, n % 2)])
    codes = c[..., 0::2] | (c[..., 1::2] << 4)
    scales = jax.lax.bitcast_convert_type(qm.scales.astype(jnp.float8_e4m3fn), jnp.uint8)
    return PackedMatrix(codes, None, scales, None, PackedFormat.of(qm.spec, qm.shape),
                        jnp.asarray(qm.tensor_scale, jnp.float32)[..., None])


def unpack(pm: PackedMatrix) -> QuantizedMatrix:
    b = pm.codes.astype(jnp.int32)
    c = jnp.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[:-1] + (-1,))[..., :pm.fmt.shape[1]]
    s = jax.lax.bitcast_convert_type(pm.scales.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)
    return QuantizedMatrix(c, s, None, pm.fmt.spec, pm.fmt.shape, pm.tensor_scale[..., 0].astype(jnp.float32))


def array_specs(fmt: PackedFormat) -> dict:
    m, n = fmt.shape
    return {"codes": (frozenset({"uint8"}), (m, ceil_div(n, 2))),
            "scales": (frozenset({"uint8"}), (m, ceil_div(n, GROUP))),
            "tensor_scale": (frozenset({"float32"}), (1,))}


def theoretical_bits(fmt) -> float:
    m, n = fmt.shape
    return 4.0 + 8.0 / GROUP + 32.0 / (m * n)


def random_packed(rng: np.random.Generator, fmt: PackedFormat, magnitude: float = 1.0) -> PackedMatrix:
    """Random code bytes (every nibble a value) and positive e4m3 scales: exponent field 0
    (subnormals) or 5..9 (0.25 .. 3.75), never the NaN pattern; tensor scale magnitude / 4."""
    m, n = fmt.shape
    codes = rng.integers(0, 256, (m, ceil_div(n, 2))).astype(np.uint8)
    G = ceil_div(n, GROUP)
    e = rng.choice(np.array([0, 5, 6, 7, 8, 9]), (m, G))
    scales = ((e << 3) | rng.integers(0, 8, (m, G))).astype(np.uint8)
    return PackedMatrix(jnp.asarray(codes), None, jnp.asarray(scales), None, fmt,
                        jnp.asarray([magnitude / 4.0], jnp.float32))


QUANTIZER = Quantizer(
    kind=KIND, bits=BITS, block=1, vector=1, code_ndim=2, kernel_id=3,
    normalize=lambda spec: {"group_size": GROUP, "symmetric": True},
    fit=fit, round_block=round_block, dequantize=dequantize,
    ldlq_params=ldlq_params, ldlq_round=ldlq_round,
    pack=pack, unpack=unpack, array_specs=array_specs, theoretical_bits=theoretical_bits,
    code_chunk=lambda fmt: 2, format_key=lambda fmt: "fp4",
    parse_key=lambda s: dict(kind=KIND, bits=4, group_size=GROUP, symmetric=True) if s == "fp4" else None,
    random_packed=random_packed)
