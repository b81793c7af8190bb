"""The QLR kernel in Triton: same algorithm and same packed layout as qlr_pallas.py, written
directly in Triton and called from JAX through jax-triton's `triton_call` on a GPU.

    out = (x · Wᵀ + t · Fᵀ) · scale        forward     W = Q [m, n] or R [r, n], F = L [m, r]
    out = (u · W  + t · F ) · scale        TRANS=1     (the VJP: dx = dy·W), F = R [r, n]

One @triton.jit kernel, specialised by constexprs:
  GEMV=1 (rows <= 16): grid (output tiles, split-K programs); the dequantized [BO, BK] tile is reused
      for every row through a [rows, BO, BK] broadcast product; the epilogue (t·Fᵀ) runs in split 0.
  GEMV=0 (prefill): grid (output tiles, row tiles); tl.dot on a [BR, BK] x [BK, BO] pair per step,
      bf16/fp16 operands when the activations are 16-bit (tensor cores), IEEE fp32 otherwise.
Dequantization is pointer arithmetic on the packed arrays (one branch per format kernel id, see
kernels/dequant.py for the Pallas side): element (i, k) of a b-bit uniform matrix
reads word k // (32/b) and shifts by (k % (32/b))·b (the 3-bit layout reads its low-2-bit word and
its high-bit word of the 32-column chunk); scales at column k // g (any group size); E8P reads the
16-bit index of vector k // 8, gathers coordinate k % 8 of the 256x8 pattern table (coordinate 0
pre-signed by the pattern's parity) and applies sign bit (k % 8) or the popcount parity of bits
7..1 and the ±1/4 shift; the residual stage (3 bits: E8-1bit table, 4 bits: E8P again) is added
divided by its gain; FP4 reads nibble k % 2 of byte k // 2 and e4m3 byte k // 16 and decodes both
from their bit fields, times the tensor scale. Codes are read through signed views (uint32 -> int32, uint16 -> int16) and
masked back (& 0xFFFF), so the same kernel runs on jax arrays (unsigned) and on torch tensors.

Where it runs:
  * GPU: `qlr_forward` / `qlr_transpose` through jax_triton.triton_call (jax-triton 0.3.1 with
    triton 3.6 on the GPU image). On an H200 (2026-12-04) it runs in bench.qlr_linear; its test
    needs a process without TRITON_INTERPRET (tests/test_kernels.py starts one), not yet rerun there.
  * CPU: the raw kernel runs in Triton's interpreter (TRITON_INTERPRET=1, torch CPU tensors):
    `run_interpreted` below, used by tests/test_kernels.py. One deviation: triton 3.6's
    interpreter keeps bfloat16 as raw uint16 and its tl.dot does np.matmul on those bits
    (interpreter.py: create_dot converts only fp8 operands), so bf16 dots are wrong there; the
    interpreted run sets DOT_F32=1 (operands upcast to fp32 before tl.dot). The GPU path keeps 16-bit
    dot operands. Everything else (unpacking, tables, masks, split-K, epilogue) is the same code.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats import e8p
from caldera_jax.formats.packing import ARRAY_SLOTS, PackedMatrix
from caldera_jax.kernels.dequant import MatSpec, e8p_tables
from caldera_jax.kernels.qlr_pallas import DEFAULT_TILES, Tiles, gemv_tile
from caldera_jax.kernels.tiling import pow2_at_least

try:
    import triton
    import triton.language as tl
except ImportError:          # the kernel body below needs triton; the JAX side only reports why not
    triton = None



def available() -> tuple[bool, str]:
    if triton is None:
        return False, "triton is not installed"
    if jax.default_backend() != "gpu":
        return False, (f"the triton backend runs through jax-triton on a GPU; this is "
                       f"{jax.default_backend()} (the kernel body is checked with Triton's interpreter "
                       f"in tests/test_kernels.py)")
    if importlib.util.find_spec("jax_triton") is None:
        return False, "jax-triton is not installed (GPU image: pip install jax-triton==0.3.1)"
    return True, ""


# ----------------------------------------------------------------------------- the kernel

if triton is not None:

    @triton.jit
    def _e8p_val(c, j, tab):
        """c int32 [BR, BK] (16-bit index of each element's vector), j [BK] coordinate in vector."""
        a = tl.load(tab + (c >> 8) * 8 + j[None, :])
        bit = (c >> j[None, :]) & 1
        v = (c >> 1) & 127
        v = v - ((v >> 1) & 0x55)
        v = (v & 0x33) + ((v >> 2) & 0x33)
        v = (v + (v >> 4)) & 0x0F
        neg = tl.where(j[None, :] == 0, v & 1, bit)
        sh = tl.where((c & 1) == 1, 0.25, -0.25)
        return tl.where(neg == 1, -a, a) + sh

    @triton.jit
    def _deq(codes, codes2, scales, zeros, tscale, tab_abs, tab_1b, rows, cols,
             M, N, S_C, S_C2, S_S, KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
             HAS_Z: tl.constexpr, GAIN3: tl.constexpr, GAIN4: tl.constexpr):
        """Dequantized W[rows, cols] f32 [len(rows), len(cols)], zero outside [M, N]. KIND is the
        format's kernel id (formats registry): 0 uniform, 1 e8p, 2 dense, 3 fp4."""
        rmask = rows < M
        valid = rmask[:, None] & (cols < N)[None, :]
        rbase = rows[:, None].to(tl.int64)
        if KIND == 2:
            w = tl.load(codes + rbase * S_C + cols[None, :], mask=valid, other=0).to(tl.float32)
        elif KIND == 0:
            if BITS == 3:
                ch = cols // 32
                k = cols % 32
                wl = tl.load(codes + rbase * S_C + (3 * ch + (k >= 16).to(tl.int32))[None, :],
                             mask=valid, other=0).to(tl.int32, bitcast=True)
                wh = tl.load(codes + rbase * S_C + (3 * ch + 2)[None, :], mask=valid,
                             other=0).to(tl.int32, bitcast=True)
                c = ((wl >> (2 * (k % 16))[None, :]) & 3) | (((wh >> k[None, :]) & 1) << 2)
            else:
                KP: tl.constexpr = 32 // BITS
                wd = tl.load(codes + rbase * S_C + (cols // KP)[None, :], mask=valid,
                             other=0).to(tl.int32, bitcast=True)
                c = (wd >> ((cols % KP) * BITS)[None, :]) & ((1 << BITS) - 1)
            c = c.to(tl.float32)
            g = cols // GROUP
            s = tl.load(scales + rbase * S_S + g[None, :], mask=valid, other=0).to(tl.float32)
            if HAS_Z:
                z = tl.load(zeros + rbase * S_S + g[None, :], mask=valid, other=0).to(tl.float32)
                w = s * c + z
            else:
                w = s * (c - ((1 << BITS) - 1) / 2)
        elif KIND == 3:
            c = tl.load(codes + rbase * S_C + (cols // 2)[None, :], mask=valid, other=0).to(tl.int32) & 0xFF
            c = (c >> (4 * (cols % 2))[None, :]) & 15
            e = (c >> 1) & 3
            mb = (c & 1).to(tl.float32)
            mag = tl.where(e == 0, 0.5 * mb, tl.where(e == 1, 1.0, tl.where(e == 2, 2.0, 4.0)) * (1.0 + 0.5 * mb))
            val = tl.where(c >= 8, -mag, mag)
            b = tl.load(scales + rbase * S_S + (cols // 16)[None, :], mask=valid, other=0).to(tl.int32) & 0xFF
            se = (b >> 3) & 15
            sm = (b & 7).to(tl.float32)
            pw = ((se + 120) << 23).to(tl.float32, bitcast=True)
            sv = tl.where(se == 0, sm * 0.001953125, (1.0 + sm * 0.125) * pw)
            sv = tl.where(((b >> 7) & 1) == 1, -sv, sv) * tl.load(tscale)
            w = sv * val
        else:
            v = cols // 8
            j = cols % 8
            c = tl.load(codes + rbase * S_C + v[None, :], mask=valid, other=0).to(tl.int32) & 0xFFFF
            val = _e8p_val(c, j, tab_abs)
            if BITS == 3:
                c2 = tl.load(codes2 + rbase * S_C2 + v[None, :], mask=valid, other=0).to(tl.int32) & 0xFF
                val += tl.load(tab_1b + c2 * 8 + j[None, :]) * (1.0 / GAIN3)
            if BITS == 4:
                c2 = tl.load(codes2 + rbase * S_C2 + v[None, :], mask=valid, other=0).to(tl.int32) & 0xFFFF
                val += _e8p_val(c2, j, tab_abs) * (1.0 / GAIN4)
            s = tl.load(scales + rbase * S_S, mask=rmask[:, None], other=0).to(tl.float32)
            w = val * s
        return tl.where(valid, w, 0.0)

    @triton.jit
    def _epilogue(acc, t_ptr, f_codes, f_codes2, f_scales, f_zeros, f_tscale, tab_abs, tab_1b, xrows, xm, ocols,
                  RANK, F_M, F_N, F_SC, F_SC2, F_SS, F_KIND: tl.constexpr, F_BITS: tl.constexpr,
                  F_GROUP: tl.constexpr, F_Z: tl.constexpr, TRANS: tl.constexpr, GEMV: tl.constexpr,
                  RP: tl.constexpr, DOT_F32: tl.constexpr, GAIN3: tl.constexpr, GAIN4: tl.constexpr):
        """acc + t · Fᵀ (forward, F = L [m, r]) or acc + t · F (TRANS, F = R [r, n])."""
        rc = tl.arange(0, RP)
        tv = tl.load(t_ptr + xrows[:, None].to(tl.int64) * RANK + rc[None, :],
                     mask=xm[:, None] & (rc < RANK)[None, :], other=0)
        if TRANS:
            f = _deq(f_codes, f_codes2, f_scales, f_zeros, f_tscale, tab_abs, tab_1b, rc, ocols,
                     F_M, F_N, F_SC, F_SC2, F_SS, F_KIND, F_BITS, F_GROUP, F_Z, GAIN3, GAIN4)
        else:
            f = tl.trans(_deq(f_codes, f_codes2, f_scales, f_zeros, f_tscale, tab_abs, tab_1b, ocols, rc,
                              F_M, F_N, F_SC, F_SC2, F_SS, F_KIND, F_BITS, F_GROUP, F_Z,
                              GAIN3, GAIN4))                                              # [RP, BO]
        if GEMV:
            acc += tl.sum(tv.to(tl.float32)[:, :, None] * f[None, :, :], axis=1)
        elif DOT_F32:
            acc += tl.dot(tv.to(tl.float32), f, input_precision="ieee")
        else:
            acc += tl.dot(tv, f.to(tv.dtype))
        return acc

    @triton.jit
    def qlr_kernel(x_ptr, q_codes, q_codes2, q_scales, q_zeros, q_tscale, tab_abs, tab_1b,
                   t_ptr, f_codes, f_codes2, f_scales, f_zeros, f_tscale, scale_ptr, out_ptr,
                   ROWS: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
                   Q_SC: tl.constexpr, Q_SC2: tl.constexpr, Q_SS: tl.constexpr,
                   Q_KIND: tl.constexpr, Q_BITS: tl.constexpr, Q_GROUP: tl.constexpr, Q_Z: tl.constexpr,
                   HAS_F: tl.constexpr, RANK: tl.constexpr, F_M: tl.constexpr, F_N: tl.constexpr,
                   F_SC: tl.constexpr, F_SC2: tl.constexpr, F_SS: tl.constexpr,
                   F_KIND: tl.constexpr, F_BITS: tl.constexpr, F_GROUP: tl.constexpr, F_Z: tl.constexpr,
                   TRANS: tl.constexpr, GEMV: tl.constexpr, BR: tl.constexpr, BO: tl.constexpr,
                   BK: tl.constexpr, RP: tl.constexpr, KPS: tl.constexpr, DOT_F32: tl.constexpr,
                   GAIN3: tl.constexpr, GAIN4: tl.constexpr):
        RED: tl.constexpr = M if TRANS else N
        OUT: tl.constexpr = N if TRANS else M
        pid0 = tl.program_id(0)
        pid1 = tl.program_id(1)
        ocols = pid0 * BO + tl.arange(0, BO)
        omask = ocols < OUT
        kr = tl.arange(0, BK)
        scale = tl.load(scale_ptr)
        if GEMV:
            rr = tl.arange(0, BR)
            xrows = rr
            lo = pid1 * KPS
        else:
            xrows = pid1 * BR + tl.arange(0, BR)
            lo = pid1 * 0
        xm = xrows < ROWS
        acc = tl.zeros((BR, BO), dtype=tl.float32)
        for it in range(0, KPS):                    # GEMV: this split's steps; GEMM: all
            kc = (lo + it) * BK + kr
            if TRANS:
                w = _deq(q_codes, q_codes2, q_scales, q_zeros, q_tscale, tab_abs, tab_1b, kc, ocols, M, N,
                         Q_SC, Q_SC2, Q_SS, Q_KIND, Q_BITS, Q_GROUP, Q_Z, GAIN3, GAIN4)      # [BK, BO]
            else:
                w = tl.trans(_deq(q_codes, q_codes2, q_scales, q_zeros, q_tscale, tab_abs, tab_1b, ocols, kc,
                                  M, N, Q_SC, Q_SC2, Q_SS, Q_KIND, Q_BITS, Q_GROUP, Q_Z, GAIN3,
                                  GAIN4))                                                     # [BK, BO]
            xv = tl.load(x_ptr + xrows[:, None].to(tl.int64) * RED + kc[None, :],
                         mask=xm[:, None] & (kc < RED)[None, :], other=0)
            if GEMV:
                acc += tl.sum(xv.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
            elif DOT_F32:
                acc += tl.dot(xv.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(xv, w.to(xv.dtype))
        if HAS_F:
            if GEMV:
                if pid1 == 0:                       # split-K: the epilogue belongs to split 0
                    acc = _epilogue(acc, t_ptr, f_codes, f_codes2, f_scales, f_zeros, f_tscale, tab_abs, tab_1b,
                                    xrows, xm, ocols, RANK, F_M, F_N, F_SC, F_SC2, F_SS, F_KIND,
                                    F_BITS, F_GROUP, F_Z, TRANS, GEMV, RP, DOT_F32, GAIN3, GAIN4)
            else:
                acc = _epilogue(acc, t_ptr, f_codes, f_codes2, f_scales, f_zeros, f_tscale, tab_abs, tab_1b,
                                xrows, xm, ocols, RANK, F_M, F_N, F_SC, F_SC2, F_SS, F_KIND,
                                F_BITS, F_GROUP, F_Z, TRANS, GEMV, RP, DOT_F32, GAIN3, GAIN4)
        acc = acc * scale
        obase = out_ptr
        if GEMV:
            obase += pid1 * (ROWS * OUT)                # partial sums [splits, rows, out]
        tl.store(obase + xrows[:, None].to(tl.int64) * OUT + ocols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=xm[:, None] & omask[None, :])


# ----------------------------------------------------------------------------- launch plan

@dataclasses.dataclass(frozen=True)
class Launch:
    grid: tuple[int, int]
    splits: int
    out_shape: tuple[int, ...]
    constexprs: dict


def _mat_consts(prefix: str, s: MatSpec, pm: PackedMatrix) -> dict:
    return {f"{prefix}_SC": pm.codes.shape[-1],
            f"{prefix}_SC2": 0 if pm.codes2 is None else pm.codes2.shape[-1],
            f"{prefix}_SS": 0 if pm.scales is None else pm.scales.shape[-1],
            f"{prefix}_KIND": s.kernel, f"{prefix}_BITS": s.bits,
            f"{prefix}_GROUP": max(s.group, 1), f"{prefix}_Z": int(s.has_zeros)}


def plan(rows: int, pm: PackedMatrix, *, transpose: bool = False, epi=None,
         tiles: Tiles = DEFAULT_TILES, dot_f32: bool = True) -> Launch:
    s = MatSpec.of(pm)
    red, out_len = (s.m, s.n) if transpose else (s.n, s.m)
    gemv = rows <= tiles.gemv_max_rows
    if gemv:
        BR = pow2_at_least(rows, 1)
        BO, BK = gemv_tile(BR, transpose, tiles)
        n_out = math.ceil(out_len / BO)
        nk = math.ceil(red / BK)
        S = tiles.gemv_splits or max(1, min(nk, math.ceil(tiles.target_programs / n_out)))
        kps = math.ceil(nk / min(S, nk))
        S = math.ceil(nk / kps)
        grid, out_shape = (n_out, S), (S, rows, out_len)
    else:
        BR, BO, BK = tiles.gemm_bm, tiles.gemm_bn, tiles.gemm_bk
        kps, S = math.ceil(red / BK), 1
        grid, out_shape = (math.ceil(out_len / BO), math.ceil(rows / BR)), (rows, out_len)
    c = dict(ROWS=rows, M=s.m, N=s.n, **_mat_consts("Q", s, pm), TRANS=int(transpose), GEMV=int(gemv),
             BR=BR, BO=BO, BK=BK, KPS=kps, DOT_F32=int(dot_f32),
             GAIN3=float(e8p.RVQ3_GAIN), GAIN4=float(e8p.RVQ4_GAIN))
    if epi is not None:
        fs = MatSpec.of(epi[1])
        rank = epi[0].shape[1]
        c.update(HAS_F=1, RANK=rank, F_M=fs.m, F_N=fs.n, RP=pow2_at_least(rank, 16), **_mat_consts("F", fs, epi[1]))
    else:
        c.update(HAS_F=0, RANK=1, F_M=1, F_N=1, RP=16, F_SC=1, F_SC2=0, F_SS=0, F_KIND=2, F_BITS=16,
                 F_GROUP=1, F_Z=0)
    return Launch(grid, S, out_shape, c)


def mat_arrays(pm: PackedMatrix | None, dummy):
    """One matrix's kernel pointer arguments: every PackedMatrix slot (ARRAY_SLOTS order), `dummy`
    for an absent one."""
    if pm is None:
        return [dummy] * len(ARRAY_SLOTS)
    return [dummy if getattr(pm, k) is None else getattr(pm, k) for k in ARRAY_SLOTS]


# ----------------------------------------------------------------------------- JAX (GPU) path

def matmul(x2: jax.Array, pm: PackedMatrix, *, transpose: bool = False, epi=None, scale=None,
           out_dtype=jnp.float32, tiles: Tiles = DEFAULT_TILES) -> jax.Array:
    """As qlr_pallas.matmul, through jax_triton.triton_call (GPU only)."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"triton backend unavailable: {why}")
    import jax_triton as jt
    rows = x2.shape[0]
    f32 = x2.dtype == jnp.float32
    L = plan(rows, pm, transpose=transpose, epi=epi, tiles=tiles, dot_f32=f32)
    dummy = jnp.zeros((1,), jnp.float32)
    ta, t1 = (jnp.asarray(t) for t in e8p_tables())
    t = dummy if epi is None else epi[0]
    args = [x2, *mat_arrays(pm, dummy), ta, t1, t, *mat_arrays(None if epi is None else epi[1], dummy),
            jnp.reshape(jnp.asarray(1.0 if scale is None else scale, jnp.float32), (1,))]
    gemv = L.constexprs["GEMV"]
    out = jt.triton_call(*args, kernel=qlr_kernel,
                         out_shape=jax.ShapeDtypeStruct(L.out_shape, jnp.float32 if gemv else out_dtype),
                         grid=L.grid, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                         **L.constexprs)
    if gemv:
        out = (out[0] if L.splits == 1 else jnp.sum(out, axis=0)).astype(out_dtype)
    return out


def _pipeline(x, w, transpose, tiles, hadamard_backend, mm=None):
    """fwht_in -> low-rank pass -> main pass (epilogue) -> fwht_out; mm is the matmul used
    (matmul on GPU, the interpreter in tests)."""
    mm = matmul if mm is None else mm
    from caldera_jax.kernels import hadamard
    m, n = w.shape
    d_in, d_out = (m, n) if transpose else (n, m)
    s_pre, s_post = (w.signs_out, w.signs_in) if transpose else (w.signs_in, w.signs_out)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    gemv = x2.shape[0] <= tiles.gemv_max_rows
    act = jnp.float32 if (gemv or x.dtype == jnp.float32) else x.dtype
    xt = hadamard.transform_in(x2, s_pre, out_dtype=act, backend=hadamard_backend) \
        if s_pre is not None else x2.astype(act)
    epi = None
    if w.l is not None:
        t = mm(xt, w.l if transpose else w.r, transpose=transpose, tiles=tiles)
        epi = (t.astype(act), w.r if transpose else w.l)
    y = mm(xt, w.q, transpose=transpose, epi=epi, scale=w.scale,
               out_dtype=jnp.float32 if s_post is not None else x.dtype, tiles=tiles)
    if s_post is not None:
        y = hadamard.transform_out(y, s_post, out_dtype=x.dtype, backend=hadamard_backend)
    return y.reshape(lead + (d_out,))


def qlr_forward(x, w, *, tiles: Tiles = DEFAULT_TILES, hadamard_backend: str = "xla"):
    """x [..., n] -> x·Wᵀ [..., m] (one matrix), Triton kernels for every matmul."""
    return _pipeline(x, w, False, tiles, hadamard_backend)


def qlr_transpose(dy, w, *, tiles: Tiles = DEFAULT_TILES, hadamard_backend: str = "xla"):
    """dy [..., m] -> dy·W [..., n] (the VJP w.r.t. x)."""
    return _pipeline(dy, w, True, tiles, hadamard_backend)


# ----------------------------------------------------------------------------- CPU interpreter

def run_interpreted(x2: np.ndarray, pm: PackedMatrix, *, transpose: bool = False, epi=None,
                    scale: float | None = None, tiles: Tiles = DEFAULT_TILES) -> np.ndarray:
    """Runs qlr_kernel in Triton's interpreter on torch CPU tensors (set TRITON_INTERPRET=1 before
    triton is imported). x2: numpy [rows, d_in] in float32 / float16 / ml_dtypes.bfloat16.
    Returns the kernel's output as float32 numpy. Same launch plan as the GPU path."""
    import torch
    if triton is None:
        raise RuntimeError("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("run_interpreted needs TRITON_INTERPRET=1 set before triton is imported")

    def T(a):
        a = np.array(a, copy=True)
        if a.dtype == np.uint32:
            a = a.view(np.int32)
        elif a.dtype == np.uint16:
            a = a.view(np.int16)
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(a))

    rows = x2.shape[0]
    L = plan(rows, pm, transpose=transpose, epi=epi, tiles=tiles, dot_f32=True)
    dummy = torch.zeros(1)
    mats = lambda p: [T(a) if a is not dummy else dummy for a in mat_arrays(p, dummy)]
    ta, t1 = e8p_tables()
    fmats = mats(None) if epi is None else mats(epi[1])
    t = dummy if epi is None else T(epi[0])
    out = torch.full(L.out_shape, float("nan"), dtype=torch.float32)     # poisoned: all must be written
    qlr_kernel[L.grid](T(x2), *mats(pm), torch.from_numpy(ta), torch.from_numpy(t1), t, *fmats,
                       torch.tensor([1.0 if scale is None else float(scale)], dtype=torch.float32),
                       out, **L.constexprs)
    out = out.numpy()
    return out.sum(0) if L.constexprs["GEMV"] else out


def _interpreted_mm(x2, pm, *, transpose=False, epi=None, scale=None, out_dtype=jnp.float32,
                    tiles: Tiles = DEFAULT_TILES):
    e = None if epi is None else (np.asarray(epi[0]), epi[1])
    y = run_interpreted(np.asarray(x2), pm, transpose=transpose, epi=e,
                        scale=None if scale is None else float(scale), tiles=tiles)
    return jnp.asarray(y).astype(out_dtype)


def interpreted_forward(x, w, *, tiles: Tiles = DEFAULT_TILES):
    """qlr_forward with every Triton matmul run by the interpreter (CPU tests; not jittable)."""
    return _pipeline(x, w, False, tiles, "xla", mm=_interpreted_mm)


def interpreted_transpose(dy, w, *, tiles: Tiles = DEFAULT_TILES):
    return _pipeline(dy, w, True, tiles, "xla", mm=_interpreted_mm)
