"""Pallas kernels for y = x·Wᵀ with W = scale · T_outᵀ (Q + L·R) T_in, dequantizing in the matmul.

Consumes exactly the packed layout of caldera_jax/formats (every registered format: uniform
2/3/4/8-bit words, E8P 16-bit indices + residual stage, FP4 nibbles + e4m3 block scales, dense
factors) with no repacking; the per-format tile dequantizers are in kernels/dequant.py.

Pipeline of one forward call (rows = prod(x.shape[:-1])):

    x̃ = fwht(x, signs_in)                              kernels/hadamard.py (sign unpack fused)
    t = x̃ · Rᵀ                    [rows, r]            kernel A: the Q kernel on R, no epilogue
    ỹ = (x̃ · Qᵀ + t · Lᵀ) · scale [rows, m]            kernel B: Q tiles dequantized in the loop,
                                                        L tile + t in the epilogue, scale fused
    y = fwht(ỹ, signs_out, transposed)                 kernels/hadamard.py

Two variants of kernels A/B:
  GEMV (decode, rows <= 16): grid (m tiles of BN, S splits of the n loop). Each program dequantizes
      a [BN, BK] tile of W once per step and reuses it for every row ([rows, BN, BK] broadcast
      product + sum on the vector units: no 16-row padding for tensor cores; the tile shrinks as
      rows grow so the product stays ~8K elements, see gemv_tile). Split-K partial
      sums [S, rows, m] (f32) are summed by one small XLA reduce; the low-rank epilogue runs in
      split 0 only (lax.cond).
  GEMM (prefill, rows > 16): grid (m tiles of BN, row tiles of BM); loop over n in BK steps with a
      [BM, BN] f32 accumulator, dot(x tile, dequantized W tileᵀ) in the activation dtype
      (bf16/fp16 -> tensor cores; fp32 -> IEEE fp32), epilogue dot(t tile, L tileᵀ).

The transposed products (custom VJP: dx = dy·W) use the same tile dequantizer with the loop over m:
    u = fwht(dy, signs_out);  t2 = u·L;  z = (u·Q + t2·R)·scale;  dx = fwht(z, signs_in, transposed)

Edges: every load is masked (plgpu.load(..., mask, other=0)) and every dequantized tile is zeroed
outside [m, n], so nothing is padded on the host and no shape needs to be a multiple of a tile.
Scales: a [BN,1] slice when the group covers the tile, a [BN,BK/g] slice broadcast when groups are
powers of two inside the tile, a masked gather for any other group size.
Formats: kernels/dequant.py's TILE_DEQUANT[kernel id] dequantizes a tile (E8P's tables are extra
operands when a matrix needs them).

Where it runs: on CPU (and TPU) with interpret=True (how it is tested). On GPU the same kernels
lower through Pallas' Triton backend: `resolve_interpret` turns interpret off on a GPU and
`compiler_params` passes `jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)`,
which is what selects the Triton lowering in jax 0.10/0.11 (Mosaic GPU is the default otherwise).
We expect to use the Triton lowering: the kernels rely on masked loads/stores, pointer gathers
(table lookups) and free-form tile shapes that Mosaic GPU does not offer (it wants TMA-aligned
tiles, warpgroup layouts and no masked loads); a Mosaic version would be a rewrite, worth it only
if the Triton lowering misses the bandwidth goal at decode. All tile sizes are powers of two
(Triton requirement) and every dot has all dims >= 16.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from caldera_jax.formats.packing import PackedMatrix
from caldera_jax.kernels import hadamard
from caldera_jax.kernels.dequant import NEEDS_TABLES, MatSpec, Refs, deq_tile, e8p_tables, operands
from caldera_jax.kernels.lowering import compiler_params, resolve_interpret
from caldera_jax.kernels.tiling import pow2_at_least

F32 = jnp.float32


def _iota(n: int) -> jax.Array:
    return jax.lax.iota(jnp.int32, n)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (all powers of two; BK a multiple of 32 so 3-bit chunks never straddle a tile)."""
    gemv_max_rows: int = 16
    gemv_bn: int = 32          # rows of W per program (transposed: columns of W per program)
    gemv_bk: int = 128         # columns of W per loop step (transposed: rows of W per step)
    gemv_splits: int = 0       # split-K programs per tile; 0 = auto (enough programs to fill a GPU)
    gemv_bt: int = 64          # transposed GEMV: columns of W per program
    gemv_elems: int = 8192     # bound on rows x BN x BK of the [rows, BN, BK] product (registers)
    gemm_bm: int = 64          # activation rows per program
    gemm_bn: int = 64          # output columns per program
    gemm_bk: int = 64          # reduction step
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 264  # ~2 per SM on an H100/H200 (132 SMs)


DEFAULT_TILES = Tiles()


# ----------------------------------------------------------------------------- kernels

@dataclasses.dataclass(frozen=True)
class _Plan:
    transpose: bool      # False: out = x·Wᵀ (+ t·Fᵀ), W [m, n], x [rows, n], F [m, r]
                         # True:  out = u·W  (+ t·F ), W [m, n], u [rows, m], F [r, n]
    gemv: bool
    rows: int
    mat: MatSpec
    fac: MatSpec | None
    rank: int
    rp: int              # rank padded (power of two, multiple of the factor's chunk, >= 16)
    has_tabs: bool
    BO: int              # output tile (columns of out): forward m-tile, transposed n-tile
    BK: int              # reduction step: forward over n, transposed over m
    BM: int              # activation rows per program (GEMM)
    splits: int
    f32_dot: bool        # IEEE f32 dots (fp32 activations) or 16-bit operands
    cdt: object          # dot operand dtype


def _kernel(*refs, p: _Plan):
    it = iter(refs)
    x_ref = next(it)
    W = Refs(p.mat, it)
    tabs = (next(it), next(it)) if p.has_tabs else None
    if p.fac is not None:
        t_ref = next(it)
        Fr = Refs(p.fac, it)
    sc_ref = next(it)
    o_ref = next(it)
    s = p.mat
    red = s.m if p.transpose else s.n              # length of the reduction
    out_len = s.n if p.transpose else s.m
    nk = pl.cdiv(red, p.BK)
    i = pl.program_id(0)
    o0 = i * p.BO
    ocols = o0 + _iota(p.BO)
    omask = ocols < out_len
    hi = jax.lax.Precision.HIGHEST if p.f32_dot else None

    def w_tile(kk):
        # forward: rows of W = output columns, columns = reduction; transposed: the other way
        if p.transpose:
            return deq_tile(s, W, tabs, kk * p.BK, o0, p.BK, p.BO)        # [BK, BO]
        return deq_tile(s, W, tabs, o0, kk * p.BK, p.BO, p.BK)            # [BO, BK]

    def f_tile():
        if p.transpose:
            return deq_tile(p.fac, Fr, tabs, 0, o0, p.rp, p.BO)           # [rp, BO]
        return deq_tile(p.fac, Fr, tabs, o0, 0, p.BO, p.rp)               # [BO, rp]

    scale = sc_ref[0]
    if p.gemv:
        S = p.splits
        sp = pl.program_id(1)
        kps = pl.cdiv(nk, S)
        RP = p.BM                                 # rows padded to a power of two
        rr = _iota(RP)
        rm = rr < p.rows

        def contract(w, v):                       # w tile, v [RP, BK] -> [RP, BO]
            if p.transpose:                       # w [BK, BO]
                return jnp.sum(v[:, :, None] * w[None, :, :], axis=1)
            return jnp.sum(v[:, None, :] * w[None, :, :], axis=2)      # w [BO, BK]

        def body(kk, acc):
            w = w_tile(kk)
            kc = kk * p.BK + _iota(p.BK)
            v = plgpu.load(x_ref.at[pl.ds(0, RP), pl.ds(kk * p.BK, p.BK)],
                           mask=rm[:, None] & (kc < red)[None, :], other=0)
            return acc + contract(w, v.astype(F32))

        lo = sp * kps
        acc = jax.lax.fori_loop(lo, jnp.minimum(lo + kps, nk), body, jnp.zeros((RP, p.BO), F32))
        if p.fac is not None:
            def epilogue(acc):
                rc = _iota(p.rp)
                tt = plgpu.load(t_ref.at[pl.ds(0, RP), pl.ds(0, p.rp)],
                                mask=rm[:, None] & (rc < p.rank)[None, :], other=0)
                return acc + contract(f_tile(), tt.astype(F32))
            acc = jax.lax.cond(sp == 0, epilogue, lambda a: a, acc)
        plgpu.store(o_ref.at[sp, pl.ds(0, RP), pl.ds(o0, p.BO)], (acc * scale).astype(o_ref.dtype),
                    mask=rm[:, None] & omask[None, :])
        return

    # GEMM
    j = pl.program_id(1)
    q0 = j * p.BM
    xr = q0 + _iota(p.BM)
    xm = xr < p.rows

    def dot(a, b, contract_b):
        return jax.lax.dot_general(a.astype(p.cdt), b.astype(p.cdt), (((1,), (contract_b,)), ((), ())),
                                   precision=hi, preferred_element_type=F32)

    def body(kk, acc):
        w = w_tile(kk)
        kc = kk * p.BK + _iota(p.BK)
        xt = plgpu.load(x_ref.at[pl.ds(q0, p.BM), pl.ds(kk * p.BK, p.BK)],
                        mask=xm[:, None] & (kc < red)[None, :], other=0)
        return acc + dot(xt, w, 0 if p.transpose else 1)

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((p.BM, p.BO), F32))
    if p.fac is not None:
        rc = _iota(p.rp)
        tt = plgpu.load(t_ref.at[pl.ds(q0, p.BM), pl.ds(0, p.rp)],
                        mask=xm[:, None] & (rc < p.rank)[None, :], other=0)
        acc = acc + dot(tt, f_tile(), 0 if p.transpose else 1)
    plgpu.store(o_ref.at[pl.ds(q0, p.BM), pl.ds(o0, p.BO)], (acc * scale).astype(o_ref.dtype),
                mask=xm[:, None] & omask[None, :])


def gemv_tile(rp: int, transpose: bool, tiles: Tiles = DEFAULT_TILES) -> tuple[int, int]:
    """(BO, BK) of the GEMV kernels for rp (power-of-two) rows, keeping the [rp, BO, BK] product
    within tiles.gemv_elems (a ptxas check for sm_90 showed spills above ~8K fp32 elements per
    4-warp program). Forward: BO rows of W per program, BK >= 32 columns per step (3-bit chunks);
    transposed: BO >= 32 columns of W per program, BK rows per step."""
    E = tiles.gemv_elems
    if not transpose:
        BO = tiles.gemv_bn
        BK = max(32, min(tiles.gemv_bk, E // (rp * BO)))
        if rp * BO * BK > E:
            BO = max(16, E // (rp * BK))
        return BO, BK
    E //= 2                               # the column reduction keeps more live values (spills at 8K)
    BO = max(32, min(tiles.gemv_bt, E // (rp * 8)))
    BK = max(8, min(tiles.gemv_bn, E // (rp * BO)))
    return BO, BK


def _rank_pad(fac: MatSpec | None, transpose: bool, rank: int) -> int:
    if fac is None:
        return 16
    ch = fac.chunk if not transpose else 1      # forward: rank runs along F's columns
    return pow2_at_least(max(rank, 16), max(16, ch))


def matmul(x2: jax.Array, pm: PackedMatrix, *, transpose: bool = False,
           epi: tuple[jax.Array, PackedMatrix] | None = None, scale=None, out_dtype=F32,
           tiles: Tiles = DEFAULT_TILES, interpret: bool | None = None) -> jax.Array:
    """forward:    x2 [rows, n] -> (x2 · Wᵀ + t · Fᵀ) · scale  [rows, m]   (epi = (t [rows, r], F [m, r]))
    transpose:  x2 [rows, m] -> (x2 · W  + t · F ) · scale  [rows, n]   (epi = (t [rows, r], F [r, n]))
    with W = dequantize(pm) never materialised. f32 accumulation; 16-bit x2 feeds 16-bit dots."""
    s = MatSpec.of(pm)
    rows = x2.shape[0]
    red = s.m if transpose else s.n
    out_len = s.n if transpose else s.m
    if x2.shape[1] != red:
        raise ValueError(f"matmul: x has {x2.shape[1]} features, the matrix needs {red}")
    fac = None if epi is None else MatSpec.of(epi[1])
    rank = 0 if epi is None else epi[0].shape[1]
    gemv = rows <= tiles.gemv_max_rows
    if gemv:
        BM = pow2_at_least(rows, 1)       # all rows in one program, padded to a power of two
        BO, BK = gemv_tile(BM, transpose, tiles)
    else:
        BO, BK, BM = tiles.gemm_bn, tiles.gemm_bk, tiles.gemm_bm
        if transpose:
            BO = max(BO, 32)
    if transpose:
        assert BO % 32 == 0
    else:
        assert BK % 32 == 0
    n_out_tiles = pl.cdiv(out_len, BO)
    nk = pl.cdiv(red, BK)
    if gemv:
        S = tiles.gemv_splits or max(1, min(nk, -(-tiles.target_programs // n_out_tiles)))
        S = min(S, nk)
        S = pl.cdiv(nk, pl.cdiv(nk, S))    # no empty split
        grid = (n_out_tiles, S)
        out_shape = jax.ShapeDtypeStruct((S, rows, out_len), F32)
    else:
        S = 1
        grid = (n_out_tiles, pl.cdiv(rows, BM))
        out_shape = jax.ShapeDtypeStruct((rows, out_len), out_dtype)
    f32_dot = x2.dtype == F32
    plan = _Plan(transpose, gemv, rows, s, fac, rank, _rank_pad(fac, transpose, rank),
                 s.kernel in NEEDS_TABLES or (fac is not None and fac.kernel in NEEDS_TABLES), BO, BK, BM, S,
                 f32_dot, F32 if f32_dot else x2.dtype)
    args = [x2, *operands(pm)]
    if plan.has_tabs:
        ta, t1 = e8p_tables()
        args += [jnp.asarray(ta), jnp.asarray(t1)]
    if epi is not None:
        args += [epi[0], *operands(epi[1])]
    args.append(jnp.reshape(jnp.asarray(1.0 if scale is None else scale, F32), (1,)))
    interp = resolve_interpret(interpret)
    out = pl.pallas_call(functools.partial(_kernel, p=plan), out_shape=out_shape, grid=grid,
                         interpret=interp, name=f"qlr_{'gemv' if gemv else 'gemm'}{'_t' if transpose else ''}",
                         compiler_params=compiler_params(interp, tiles.num_warps, tiles.num_stages))(*args)
    if gemv:
        out = (out[0] if S == 1 else jnp.sum(out, axis=0)).astype(out_dtype)
    return out


# ----------------------------------------------------------------------------- the QLR linear

def qlr_forward(x: jax.Array, w, *, tiles: Tiles = DEFAULT_TILES, interpret: bool | None = None):
    """x [..., n] -> x·Wᵀ [..., m] in x's dtype, for one (unstacked) QLRWeight."""
    m, n = w.shape
    if x.shape[-1] != n:
        raise ValueError(f"qlr_linear: x has {x.shape[-1]} features, weight expects {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    gemv = rows <= tiles.gemv_max_rows
    act_dt = F32 if (gemv or x.dtype == F32) else x.dtype     # 16-bit operands for tensor cores
    hb = dict(backend="pallas", interpret=interpret)
    xt = hadamard.transform_in(x2, w.signs_in, out_dtype=act_dt, **hb) if w.signs_in is not None \
        else x2.astype(act_dt)
    epi = None
    if w.l is not None:
        t = matmul(xt, w.r, tiles=tiles, interpret=interpret)                       # [rows, r] f32
        epi = (t.astype(act_dt), w.l)
    out_dt = F32 if w.signs_out is not None else x.dtype
    y = matmul(xt, w.q, epi=epi, scale=w.scale, out_dtype=out_dt, tiles=tiles, interpret=interpret)
    if w.signs_out is not None:
        y = hadamard.transform_out(y, w.signs_out, out_dtype=x.dtype, **hb)
    return y.reshape(lead + (m,))


def qlr_transpose(dy: jax.Array, w, *, tiles: Tiles = DEFAULT_TILES, interpret: bool | None = None):
    """dy [..., m] -> dy·W [..., n] in dy's dtype (the VJP of qlr_forward w.r.t. x)."""
    m, n = w.shape
    lead = dy.shape[:-1]
    u = dy.reshape(-1, m)
    rows = u.shape[0]
    gemv = rows <= tiles.gemv_max_rows
    act_dt = F32 if (gemv or dy.dtype == F32) else dy.dtype
    hb = dict(backend="pallas", interpret=interpret)
    u = hadamard.transform_in(u, w.signs_out, out_dtype=act_dt, **hb) if w.signs_out is not None \
        else u.astype(act_dt)
    epi = None
    if w.l is not None:
        t2 = matmul(u, w.l, transpose=True, tiles=tiles, interpret=interpret)       # [rows, r]
        epi = (t2.astype(act_dt), w.r)
    out_dt = F32 if w.signs_in is not None else dy.dtype
    z = matmul(u, w.q, transpose=True, epi=epi, scale=w.scale, out_dtype=out_dt, tiles=tiles,
               interpret=interpret)
    if w.signs_in is not None:
        z = hadamard.transform_out(z, w.signs_in, out_dtype=dy.dtype, **hb)
    return z.reshape(lead + (n,))
