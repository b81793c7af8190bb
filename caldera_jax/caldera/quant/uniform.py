"""Groupwise uniform scalar quantizer (2/3/4/8 bits), symmetric (midrise absmax) or asymmetric.

symmetric:  value = s * (code - (2^b - 1)/2),  s = absmax(group) / ((2^b - 1)/2)
asymmetric: value = s * code + z,              z = min(group), s = (max - min) / (2^b - 1)
s and z are rounded to float16 (the stored precision) before any code is chosen, so the packed
matrix dequantizes to exactly what LDLQ saw. Group j covers columns [j*g, (j+1)*g); the last group
may be partial (its statistics use only its real columns).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.caldera.quant.base import QuantParams, QuantSpec, QuantizedMatrix, n_groups

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


def theoretical_bits(spec: QuantSpec, scale_bits: int = 16) -> float:
    """Bits per weight of codes + fp16 scales (+ zeros), ignoring partial-group padding."""
    return spec.bits + scale_bits * (1 if spec.symmetric else 2) / spec.group_size
