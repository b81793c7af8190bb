"""Dequantization inside the kernels: the packed matrix as a kernel sees it (MatSpec, static) and
the Pallas tile dequantizer of every packed format, keyed by the format's kernel id (the registry
entry's `kernel_id`, formats/base.py):

    TILE_DEQUANT[kernel_id](s, R, tabs, r0, k0, BR, BK, rows, cols, rmask, valid) -> f32 [BR, BK]

i.e. W[r0:r0+BR, k0:k0+BK] dequantized, zero outside [m, n]; BK (the column tile) is a multiple
of 32 and k0 a multiple of BK. A new format adds its routine here (and its branch in the Triton
kernel, qlr_triton.py); qlr_pallas.py itself names no format.

E8P: the 256x8 pattern table of e8p.abs_grid() (coordinate 0 pre-multiplied by (-1)^parity, so the
first sign is the popcount parity of bits 7..1) and e8p.e8_1bit_grid() are gathered from a small
table operand (NEEDS_TABLES); sign bits and the ±1/4 shift are bit operations.
FP4: nibbles unpacked with shifts, e2m1 and e4m3 decoded arithmetically from their bit fields
(formats/fp4.py), no table.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from caldera_jax.formats import e8p, packing
from caldera_jax.formats.packing import PackedMatrix

F32 = jnp.float32
UNIFORM, E8P, DENSE, FP4 = 0, 1, packing.DENSE_KERNEL_ID, 3      # the registry's kernel ids
NEEDS_TABLES = frozenset({E8P})


def _iota(n: int) -> jax.Array:
    return jax.lax.iota(jnp.int32, n)


# ----------------------------------------------------------------------------- matrix specs

@dataclasses.dataclass(frozen=True)
class MatSpec:
    """Static description of one PackedMatrix as the kernels see it."""
    kind: str
    kernel: int           # the format's kernel id (TILE_DEQUANT key, Triton's KIND)
    bits: int
    group: int
    symmetric: bool
    m: int
    n: int
    n_words: int          # codes.shape[-1]
    n_groups: int         # scales.shape[-1] (0: none)
    slots: tuple[str, ...]  # the PackedMatrix slots present, in packing.ARRAY_SLOTS order
    chunk: int            # columns per independently addressable unit of the codes

    @classmethod
    def of(cls, pm: PackedMatrix) -> "MatSpec":
        f = pm.fmt
        if pm.codes.ndim != 2:
            raise ValueError("kernels see one matrix at a time (stacked weights are vmapped)")
        return cls(f.kind, packing.kernel_id(f), f.bits, f.group_size, f.symmetric, f.shape[0], f.shape[1],
                   pm.codes.shape[-1], 0 if pm.scales is None else pm.scales.shape[-1],
                   tuple(pm.arrays()), packing.code_chunk(f))

    @property
    def has_codes2(self) -> bool:
        return "codes2" in self.slots

    @property
    def has_scales(self) -> bool:
        return "scales" in self.slots

    @property
    def has_zeros(self) -> bool:
        return "zeros" in self.slots

    @property
    def n_arrays(self) -> int:
        return len(self.slots)


def operands(pm: PackedMatrix) -> list[jax.Array]:
    """The kernel operands of one matrix: its arrays in slot order."""
    return list(pm.arrays().values())


@functools.lru_cache(maxsize=None)
def e8p_tables() -> tuple[np.ndarray, np.ndarray]:
    """(abs table [2048] with coordinate 0 times (-1)^parity, E8-1bit table [2048]) float32,
    read from e8p.py's constructions."""
    a = e8p.abs_grid().astype(np.float32).copy()
    a[:, 0] *= 1.0 - 2.0 * e8p.abs_parity().astype(np.float32)
    return a.reshape(-1), e8p.e8_1bit_grid().astype(np.float32).reshape(-1)


# ----------------------------------------------------------------------------- tile dequantizer

class Refs:
    """The refs of one matrix, taken in slot order from the kernel's ref list (absent slots None)."""

    def __init__(self, spec: MatSpec, it):
        for k in packing.ARRAY_SLOTS:
            setattr(self, k, next(it) if k in spec.slots else None)


def _bcast_rows(rows: jax.Array, ncols: int) -> jax.Array:
    return jnp.broadcast_to(rows[:, None], (rows.shape[0], ncols))


def _uniform_codes(s: MatSpec, ref, r0, rows, rmask, k0, BR, BK):
    """int32 codes [BR, BK] of columns k0..k0+BK (k0 a multiple of BK, BK of 32)."""
    b = s.bits
    if b != 3:
        K = 32 // b
        BW = BK // K
        wc = k0 // K + _iota(BW)
        words = plgpu.load(ref.at[pl.ds(r0, BR), pl.ds(k0 // K, BW)],
                           mask=rmask[:, None] & (wc < s.n_words)[None, :], other=0)
        words = words.astype(jnp.uint32)
        sh = (_iota(K) * b).astype(jnp.uint32)
        c = (words[:, :, None] >> sh[None, None, :]) & jnp.uint32(2 ** b - 1)
        return c.reshape(BR, BK).astype(jnp.int32)
    C = BK // 32
    ch = k0 // 32 + _iota(C)
    msk = rmask[:, None] & (ch < s.n_words // 3)[None, :]
    R2 = _bcast_rows(rows, C)
    base = jnp.broadcast_to((3 * ch)[None, :], (BR, C))
    w0, w1, w2 = (plgpu.load(ref.at[R2, base + j], mask=msk, other=0).astype(jnp.uint32)
                  for j in range(3))
    k = _iota(32)
    wlo = jnp.where((k < 16)[None, None, :], w0[:, :, None], w1[:, :, None])     # [BR, C, 32]
    lo = (wlo >> (2 * (k % 16)).astype(jnp.uint32)[None, None, :]) & jnp.uint32(3)
    hi = (w2[:, :, None] >> k.astype(jnp.uint32)[None, None, :]) & jnp.uint32(1)
    return (lo | (hi << 2)).reshape(BR, BK).astype(jnp.int32)


def _group_tile(s: MatSpec, ref, r0, rows, rmask, k0, cols, BR, BK):
    """f32 [BR, BK]: the per-(row, group) parameter of every element of the tile."""
    g, G = s.group, s.n_groups
    if g % BK == 0:                                     # the tile lies inside one group
        v = plgpu.load(ref.at[pl.ds(r0, BR), pl.ds(k0 // g, 1)], mask=rmask[:, None], other=0)
        return jnp.broadcast_to(v.astype(F32), (BR, BK))
    if BK % g == 0 and g & (g - 1) == 0:               # whole power-of-two groups in the tile
        NG = BK // g
        gi = k0 // g + _iota(NG)
        v = plgpu.load(ref.at[pl.ds(r0, BR), pl.ds(k0 // g, NG)],
                       mask=rmask[:, None] & (gi < G)[None, :], other=0).astype(F32)
        return jnp.broadcast_to(v[:, :, None], (BR, NG, g)).reshape(BR, BK)
    gi = jnp.minimum(cols // g, G - 1)                 # any other group size: masked gather
    return plgpu.load(ref.at[_bcast_rows(rows, BK), jnp.broadcast_to(gi[None, :], (BR, BK))],
                      mask=jnp.broadcast_to(rmask[:, None], (BR, BK)), other=0).astype(F32)


def _popcount7(v: jax.Array) -> jax.Array:
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


def _e8p_decode(c: jax.Array, tab_ref) -> jax.Array:
    """int32 E8P indices [BR, V] -> codewords [BR, V, 8] f32 (e8p.decode, via the table)."""
    j = _iota(8)
    idx = (c >> 8)[:, :, None] * 8 + j[None, None, :]
    a = plgpu.load(tab_ref.at[idx])
    bit = (c[:, :, None] >> j[None, None, :]) & 1
    neg0 = _popcount7((c >> 1) & 127) & 1
    neg = jnp.where((j == 0)[None, None, :], neg0[:, :, None], bit)
    shift = jnp.where((c & 1) == 1, 0.25, -0.25).astype(F32)
    return jnp.where(neg == 1, -a, a) + shift[:, :, None]


def _dense_tile(s: MatSpec, R: Refs, tabs, r0, k0, BR, BK, rows, cols, rmask, valid):
    w = plgpu.load(R.codes.at[pl.ds(r0, BR), pl.ds(k0, BK)], mask=valid, other=0)
    return w.astype(F32)


def _uniform_tile(s: MatSpec, R: Refs, tabs, r0, k0, BR, BK, rows, cols, rmask, valid):
    c = _uniform_codes(s, R.codes, r0, rows, rmask, k0, BR, BK).astype(F32)
    sc = _group_tile(s, R.scales, r0, rows, rmask, k0, cols, BR, BK)
    if s.has_zeros:
        w = sc * c + _group_tile(s, R.zeros, r0, rows, rmask, k0, cols, BR, BK)
    else:
        w = sc * (c - (2 ** s.bits - 1) / 2)
    return jnp.where(valid, w, 0.0)


def _e8p_tile(s: MatSpec, R: Refs, tabs, r0, k0, BR, BK, rows, cols, rmask, valid):
    V = BK // 8
    vc = k0 // 8 + _iota(V)
    vm = rmask[:, None] & (vc < s.n_words)[None, :]
    c = plgpu.load(R.codes.at[pl.ds(r0, BR), pl.ds(k0 // 8, V)], mask=vm, other=0).astype(jnp.int32)
    tab_abs, tab_1bit = tabs
    val = _e8p_decode(c, tab_abs)
    if s.has_codes2:
        c2 = plgpu.load(R.codes2.at[pl.ds(r0, BR), pl.ds(k0 // 8, V)], mask=vm,
                        other=0).astype(jnp.int32)
        if s.bits == 3:
            j = _iota(8)
            val = val + plgpu.load(tab_1bit.at[c2[:, :, None] * 8 + j[None, None, :]]) * (1.0 / e8p.RVQ3_GAIN)
        else:
            val = val + _e8p_decode(c2, tab_abs) * (1.0 / e8p.RVQ4_GAIN)
    sc = plgpu.load(R.scales.at[pl.ds(r0, BR), pl.ds(0, 1)], mask=rmask[:, None], other=0).astype(F32)
    return jnp.where(valid, val.reshape(BR, BK) * sc, 0.0)


def _fp4_tile(s: MatSpec, R: Refs, tabs, r0, k0, BR, BK, rows, cols, rmask, valid):
    """formats/fp4.py: code byte j holds columns 2j (low nibble) and 2j+1; one e4m3 byte per 16
    columns; value = (tensor_scale · e4m3) · e2m1."""
    BW, NG = BK // 2, BK // 16
    wc = k0 // 2 + _iota(BW)
    by = plgpu.load(R.codes.at[pl.ds(r0, BR), pl.ds(k0 // 2, BW)],
                    mask=rmask[:, None] & (wc < s.n_words)[None, :], other=0).astype(jnp.int32)
    c = ((by[:, :, None] >> (_iota(2) * 4)[None, None, :]) & 15).reshape(BR, BK)
    e = (c >> 1) & 3
    mb = (c & 1).astype(F32)
    mag = jnp.where(e == 0, 0.5 * mb, jnp.where(e == 1, 1.0, jnp.where(e == 2, 2.0, 4.0)) * (1.0 + 0.5 * mb))
    val = jnp.where(c >= 8, -mag, mag)
    gi = k0 // 16 + _iota(NG)
    b = plgpu.load(R.scales.at[pl.ds(r0, BR), pl.ds(k0 // 16, NG)],
                   mask=rmask[:, None] & (gi < s.n_groups)[None, :], other=0).astype(jnp.int32)
    se = (b >> 3) & 15
    sm = (b & 7).astype(F32)
    pow2 = jax.lax.bitcast_convert_type((se + 120) << 23, F32)          # 2^(e-7) for e >= 1
    sv = jnp.where(se == 0, sm * (2.0 ** -9), (1.0 + sm * 0.125) * pow2)
    sv = jnp.where((b >> 7) & 1 == 1, -sv, sv) * R.tensor_scale[0]
    sv = jnp.broadcast_to(sv[:, :, None], (BR, NG, 16)).reshape(BR, BK)
    return jnp.where(valid, sv * val, 0.0)


TILE_DEQUANT = {DENSE: _dense_tile, UNIFORM: _uniform_tile, E8P: _e8p_tile, FP4: _fp4_tile}


def deq_tile(s: MatSpec, R: Refs, tabs, r0, k0, BR: int, BK: int) -> jax.Array:
    """Dequantized W[r0:r0+BR, k0:k0+BK] as f32, zero outside the matrix."""
    rows = r0 + _iota(BR)
    cols = k0 + _iota(BK)
    rmask = rows < s.m
    valid = rmask[:, None] & (cols < s.n)[None, :]
    if s.kernel not in TILE_DEQUANT:
        raise NotImplementedError(f"no Pallas tile dequantizer for the {s.kind} format (kernel id {s.kernel})")
    return TILE_DEQUANT[s.kernel](s, R, tabs, r0, k0, BR, BK, rows, cols, rmask, valid)


