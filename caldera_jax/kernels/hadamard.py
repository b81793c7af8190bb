"""Fast Walsh–Hadamard transform for the incoherence rotation of a QLR linear's input and output.

The math (the Hadamard matrices, the factorisation n = K·2^k, T(s) = H_n·diag(s)/sqrt(n)) is
caldera_jax/formats/incoherence.py's; this module only applies it, fused with what surrounds it:

    fwht(x, pre_bits, post_bits, transpose, scale)
        = ((x * s_pre) @ H_nᵀ) / sqrt(n) * s_post * scale          (transpose=False)
        = ((x * s_pre) @ H_n ) / sqrt(n) * s_post * scale          (transpose=True)
    with s_pre / s_post read straight from the packed sign bits (bitpack.pack_signs: bit k of byte
    j set <=> coordinate 8j+k is -1), so one pass does unpack-signs + flip + transform + normalise
    + scale. The two uses:

    transform_in(x, bits)            = x · T(s)ᵀ   = fwht(x, pre=bits)                  (x̃)
    transform_out(y, bits, scale)    = y · T(s)·c  = fwht(y, post=bits, transpose, c)   (y)

Backends
  "xla"     incoherence.hadamard_transform (Kronecker factors as small dense matmuls) with the sign
            unpacking, flips and scale in the same jit (XLA fuses the elementwise parts).
  "pallas"  one Pallas kernel. A row of n = a·b values is viewed as a matrix X [a, b] (row-major),
            and since H_n = H_A ⊗ H_B (H_A = H_K ⊗ Sylvester(P/b), H_B = Sylvester(b), b = min(P,
            128)), x @ H_nᵀ = vec(H_A · X · H_Bᵀ): two small dense matmuls per row, O(n·(a+b)).
            Dimensions are zero-padded to powers of two >= 16 (Triton needs power-of-two tensors
            and tl.dot needs >= 16). a <= 64 (n <= 4096): one kernel, each program owns ROWS rows
            and loops over them. Larger a (n = 11008 = 172·64, 14336 = 224·64): two kernels over a
            grid (rows, a/64): Z = X·H_Bᵀ, then Y = H_A·Z with H_A streamed in 64x64 blocks. Loads are
            masked gathers, so no host-side padding of x. On CPU it runs with interpret=True (dots
            at HIGHEST); on a GPU the dots use 3xTF32 (fp32-accurate since H is exact in tf32).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from caldera_jax.formats import incoherence
from caldera_jax.formats.bitpack import unpack_signs
from caldera_jax.kernels.lowering import compiler_params, resolve_interpret
from caldera_jax.kernels.tiling import pow2_at_least

MAX_B = 64           # inner (Sylvester) factor size of the two-factor split
ROWS = 8             # rows per program of the one-pass Pallas kernel
MAX_A = 64           # outer factor (padded) above which the two-pass kernels are used


@functools.lru_cache(maxsize=None)
def split(n: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """n = a·b and the ±1 factors (H_A [a, a], H_B [b, b]) with H_n = H_A ⊗ H_B, built from
    incoherence's constructions (base_matrix, hadamard_matrix of powers of two)."""
    K, P = incoherence.factor(n)
    b = min(P, MAX_B)
    a = n // b
    HB = incoherence.hadamard_matrix(b).astype(np.float32)            # Sylvester (K = 1)
    HA = incoherence.hadamard_matrix(P // b).astype(np.float32)
    if K > 1:
        HA = np.kron(incoherence.base_matrix(K).astype(np.float32), HA)
    return a, b, HA, HB


def _signs_from_bits(bits: jax.Array | None, n: int) -> jax.Array | None:
    return None if bits is None else unpack_signs(bits, n)


# ----------------------------------------------------------------------------- xla

def _fwht_xla(x, pre_bits, post_bits, transpose, scale, out_dtype):
    n = x.shape[-1]
    ct = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    y = x.astype(ct)
    s = _signs_from_bits(pre_bits, n)
    if s is not None:
        y = y * s.astype(ct)
    y = incoherence.hadamard_transform(y, transpose=transpose)
    s = _signs_from_bits(post_bits, n)
    if s is not None:
        y = y * s.astype(ct)
    if scale is not None:
        y = y * jnp.asarray(scale, ct)
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------- pallas

def _sign_tile(bits_ref, off, msk):
    """±1 f32 for flat coordinates `off` from packed sign bytes (1 where masked out)."""
    byte = plgpu.load(bits_ref.at[off >> 3], mask=msk, other=0).astype(jnp.int32)
    bit = (byte >> (off & 7)) & 1
    return (1 - 2 * bit).astype(jnp.float32)


def _fwht_kernel(*refs, n, a, b, ap, bp, rows, transpose, has_pre, has_post, has_scale, br, prec):
    it = iter(refs)
    x_ref, ha_ref, hb_ref = next(it), next(it), next(it)
    pre_ref = next(it) if has_pre else None
    post_ref = next(it) if has_post else None
    sc_ref = next(it) if has_scale else None
    o_ref = next(it)
    pid = pl.program_id(0)
    ia = jax.lax.broadcasted_iota(jnp.int32, (ap, bp), 0)
    ib = jax.lax.broadcasted_iota(jnp.int32, (ap, bp), 1)
    off = ia * b + ib
    inside = (ia < a) & (ib < b)
    HA = ha_ref[...]
    HB = hb_ref[...]
    hi = prec
    sc = 1.0 / np.sqrt(n)
    s_pre = _sign_tile(pre_ref, off, inside) if has_pre else None
    s_post = _sign_tile(post_ref, off, inside) if has_post else None
    if has_scale:
        sc = sc * sc_ref[0]

    def body(r, carry):
        row = pid * br + r
        msk = inside & (row < rows)
        rr = jnp.full((ap, bp), row, jnp.int32)
        X = plgpu.load(x_ref.at[rr, off], mask=msk, other=0).astype(jnp.float32)
        if has_pre:
            X = X * s_pre
        if not transpose:   # H_A X H_Bᵀ
            Y = jax.lax.dot_general(HA, X, (((1,), (0,)), ((), ())), precision=hi,
                                    preferred_element_type=jnp.float32)
            Y = jax.lax.dot_general(Y, HB, (((1,), (1,)), ((), ())), precision=hi,
                                    preferred_element_type=jnp.float32)
        else:               # H_Aᵀ X H_B
            Y = jax.lax.dot_general(HA, X, (((0,), (0,)), ((), ())), precision=hi,
                                    preferred_element_type=jnp.float32)
            Y = jax.lax.dot_general(Y, HB, (((1,), (0,)), ((), ())), precision=hi,
                                    preferred_element_type=jnp.float32)
        Y = Y * sc
        if has_post:
            Y = Y * s_post
        plgpu.store(o_ref.at[rr, off], Y.astype(o_ref.dtype), mask=msk)
        return carry

    jax.lax.fori_loop(0, br, body, 0)


def _fwht_inner_kernel(*refs, n, a, b, bp, BA, transpose, has_pre, prec):
    """Two-pass path, pass 1: Z = (X ∘ s_pre) · H_Bᵀ (H_B) for BA rows of X [a, b] of one vector."""
    it = iter(refs)
    x_ref, hb_ref = next(it), next(it)
    pre_ref = next(it) if has_pre else None
    z_ref = next(it)
    r, i = pl.program_id(0), pl.program_id(1)
    ia = i * BA + jax.lax.broadcasted_iota(jnp.int32, (BA, bp), 0)
    ib = jax.lax.broadcasted_iota(jnp.int32, (BA, bp), 1)
    off = ia * b + ib
    msk = (ia < a) & (ib < b)
    rr = jnp.full((BA, bp), r, jnp.int32)
    X = plgpu.load(x_ref.at[rr, off], mask=msk, other=0).astype(jnp.float32)
    if has_pre:
        X = X * _sign_tile(pre_ref, off, msk)
    Z = jax.lax.dot_general(X, hb_ref[...], (((1,), (0 if transpose else 1,)), ((), ())),
                            precision=prec, preferred_element_type=jnp.float32)
    plgpu.store(z_ref.at[rr, off], Z, mask=msk)


def _fwht_outer_kernel(*refs, n, a, b, ap, bp, BA, transpose, has_post, has_scale, prec):
    """Pass 2: Y[i-block] = Σ_j H_A[i, j] · Z[j-block] (H_Aᵀ when transposed), then scale, s_post."""
    it = iter(refs)
    z_ref, ha_ref = next(it), next(it)
    post_ref = next(it) if has_post else None
    sc_ref = next(it) if has_scale else None
    o_ref = next(it)
    r, i = pl.program_id(0), pl.program_id(1)
    ib = jax.lax.broadcasted_iota(jnp.int32, (BA, bp), 1)
    rows_blk = jax.lax.broadcasted_iota(jnp.int32, (BA, bp), 0)
    rr = jnp.full((BA, bp), r, jnp.int32)

    def body(j, acc):
        ja = j * BA + rows_blk
        Zj = plgpu.load(z_ref.at[rr, ja * b + ib], mask=(ja < a) & (ib < b), other=0)
        if transpose:      # H_A[j-block, i-block]ᵀ
            H = ha_ref[pl.ds(j * BA, BA), pl.ds(i * BA, BA)]
            dn = (((0,), (0,)), ((), ()))
        else:
            H = ha_ref[pl.ds(i * BA, BA), pl.ds(j * BA, BA)]
            dn = (((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(H, Zj, dn, precision=prec, preferred_element_type=jnp.float32)

    Y = jax.lax.fori_loop(0, ap // BA, body, jnp.zeros((BA, bp), jnp.float32))
    sc = 1.0 / np.sqrt(n)
    if has_scale:
        sc = sc * sc_ref[0]
    ia = i * BA + rows_blk
    off = ia * b + ib
    msk = (ia < a) & (ib < b)
    Y = Y * sc
    if has_post:
        Y = Y * _sign_tile(post_ref, off, msk)
    plgpu.store(o_ref.at[rr, off], Y.astype(o_ref.dtype), mask=msk)


def _fwht_pallas(x, pre_bits, post_bits, transpose, scale, out_dtype, interpret):
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    a, b, HA, HB = split(n)
    ap, bp = pow2_at_least(a, 16), pow2_at_least(b, 16)
    HAp = np.zeros((ap, ap), np.float32); HAp[:a, :a] = HA
    HBp = np.zeros((bp, bp), np.float32); HBp[:b, :b] = HB
    interp = resolve_interpret(interpret)
    # H is ±1 (exact in tf32): 3xTF32 on the GPU's tensor cores is fp32-accurate, where an IEEE fp32
    # dot lowers to FMAs (ptxas for sm_90: 8-9 KB of spills per program); CPU interpret: HIGHEST
    prec = jax.lax.Precision.HIGHEST if interp else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    cp = compiler_params(interp, num_warps=4, num_stages=1)
    has_pre, has_post, has_scale = pre_bits is not None, post_bits is not None, scale is not None
    sc_arg = [jnp.reshape(jnp.asarray(scale, jnp.float32), (1,))] if has_scale else []
    if ap > MAX_A:
        # two passes, grid (rows, a-blocks): H_A is streamed in [BA, BA] blocks (a 256x256 H_A in
        # one program needs 256 KB of shared memory on sm_90, more than it has), and one vector's
        # transform is spread over ap/BA programs (decode: more SMs busy)
        BA = MAX_A
        grid = (rows, ap // BA)
        z = pl.pallas_call(
            functools.partial(_fwht_inner_kernel, n=n, a=a, b=b, bp=bp, BA=BA, transpose=transpose,
                              has_pre=has_pre, prec=prec),
            out_shape=jax.ShapeDtypeStruct((rows, n), jnp.float32), grid=grid, interpret=interp,
            compiler_params=cp, name="fwht_inner")(x2, jnp.asarray(HBp), *([pre_bits] if has_pre else []))
        y = pl.pallas_call(
            functools.partial(_fwht_outer_kernel, n=n, a=a, b=b, ap=ap, bp=bp, BA=BA,
                              transpose=transpose, has_post=has_post, has_scale=has_scale, prec=prec),
            out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype), grid=grid, interpret=interp,
            compiler_params=cp, name="fwht_outer")(z, jnp.asarray(HAp), *([post_bits] if has_post else []),
                                                   *sc_arg)
        return y.reshape(lead + (n,))
    br = min(ROWS, rows) if rows else 1
    args = [x2, jnp.asarray(HAp), jnp.asarray(HBp)]
    if has_pre:
        args.append(pre_bits)
    if has_post:
        args.append(post_bits)
    args += sc_arg
    kern = functools.partial(_fwht_kernel, n=n, a=a, b=b, ap=ap, bp=bp, rows=rows,
                             transpose=transpose, has_pre=has_pre, has_post=has_post,
                             has_scale=has_scale, br=br, prec=prec)
    y = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype),
                       grid=(pl.cdiv(rows, br),), interpret=interp, compiler_params=cp,
                       name="fwht")(*args)
    return y.reshape(lead + (n,))


# ----------------------------------------------------------------------------- API

def fwht(x: jax.Array, *, pre_bits: jax.Array | None = None, post_bits: jax.Array | None = None,
         transpose: bool = False, scale=None, out_dtype=None, backend: str = "xla",
         interpret: bool | None = None) -> jax.Array:
    """See the module docstring. x [..., n]; pre_bits / post_bits: packed signs uint8
    [ceil(n/8)] or None; scale: scalar or None; out_dtype defaults to x's dtype."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if backend == "xla":
        return _fwht_xla(x, pre_bits, post_bits, transpose, scale, out_dtype)
    if backend == "pallas":
        return _fwht_pallas(x, pre_bits, post_bits, transpose, scale, out_dtype, interpret)
    raise ValueError(f"fwht: unknown backend {backend!r} (xla, pallas)")


def transform_in(x: jax.Array, sign_bits: jax.Array, **kw) -> jax.Array:
    """x̃ = x · T(s)ᵀ (incoherence.transform_in with packed signs)."""
    return fwht(x, pre_bits=sign_bits, **kw)


def transform_out(y: jax.Array, sign_bits: jax.Array, scale=None, **kw) -> jax.Array:
    """y · T(s) · scale (incoherence.transform_out with packed signs, scale fused)."""
    return fwht(y, post_bits=sign_bits, transpose=True, scale=scale, **kw)
