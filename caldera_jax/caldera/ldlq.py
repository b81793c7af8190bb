"""LDLQ: quantization with error feedback through the block LDL factor of H (QuIP / QuIP#).

Problem: given W [m, n] (rows = outputs, columns = inputs) and H [n, n] PSD, choose Ŵ on the
quantizer's grid to make tr((W − Ŵ) H (W − Ŵ)ᵀ) small.

Block LDL. Write H = U D Uᵀ with U block-unit-*upper*-triangular (g×g identity blocks on the
diagonal, g = spec.block: 1 for the uniform scalar quantizer, 8 for E8P) and D block diagonal. With
E = W − Ŵ, tr(E H Eᵀ) = Σ_k tr(Z_k D_k Z_kᵀ), Z_k = E_k + Σ_{j<k} E_j U_jk (E_k: the k-th block of
g columns). LDLQ picks, block by block in column order,

    Ŵ_k = round(W_k + Σ_{j<k} E_j U_jk)                 (error feedback from earlier blocks)

so Z_k is just block k's rounding error. U comes from the upper Cholesky factor C (H = C Cᵀ,
computed as a reversed lower Cholesky): U = C · blockdiag(C_kk)⁻¹, D_k = C_kk C_kkᵀ.

Implementation (jit, no Python loops over columns): a lax.fori_loop over *super-blocks* of B
columns (B a multiple of g, ≤ 128), each running an inner lax.fori_loop over its B/g blocks. The
feedback from earlier super-blocks is applied lazily, once per super-block, as one [m, B] × [B, n]
GEMM (GPTQ's "lazy batch" trick); inside a super-block only an [m, B] × [B, g] product per block.

Re-quantization sweeps (`sweeps` > 0): block coordinate descent on the true objective. For block k
with all others fixed, the exact minimiser is t_k = Ŵ_k + (E H)_k H_kk⁻¹; the block is re-rounded
at t_k and each row keeps the new value only if (Ŵ_k − t_k) H_kk (Ŵ_k − t_k)ᵀ decreases, so a sweep
never increases tr(E H Eᵀ) (for the scalar quantizer nearest rounding of t_k is the exact block
optimum). E H is maintained incrementally with the same lazy super-block updates. Rows are
independent problems, so each sweep only revisits the rows the previous sweep changed (compacted
into chunks; see greedy_sweeps): 10 sweeps cost about 4-6 full sweeps.

Quantizer scales are fitted once per call (`fit` on the target W) and stay fixed through the
feedback and sweeps (as QuIP# / GPTQ with static groups). The returned Ŵ is exactly
dequantize(QuantizedMatrix). Blocks are rounded by the quantizer's own LDLQ rounding from the format
registry (formats.quant.ldlq_params / ldlq_round: per-row parameters, e.g. E8P's faster exact
nearest-codeword search), so LDLQ knows no quantizer by name.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from caldera_jax.caldera import hessian as hs
from caldera_jax.formats import quant as qb

RoundFn = Callable[..., tuple[jax.Array, jax.Array]]   # (block, col0, prm) -> (ŵ, codes)


class LDLFactors(NamedTuple):
    """Everything LDLQ and the sweeps need for one H (a pytree; vmappable).

    Block width g and super-block width B are read from the shapes (static under jit)."""
    u_in: jax.Array      # [nS, B, B]  U − I inside each super-block (block strictly upper)
    u_cross: jax.Array   # [n, n]      U − I with the B×B super-diagonal blocks zeroed
    h: jax.Array         # [n, n]      H itself (sweeps, error)
    h_in: jax.Array      # [nS, B, B]  H's super-diagonal blocks
    hkk_inv: jax.Array   # [n/g, g, g] inverses of H's g×g diagonal blocks
    jitter: jax.Array    # []          Cholesky jitter that was needed (× mean diag H); 0 normally

    @property
    def block(self) -> int:
        return self.hkk_inv.shape[-1]

    @property
    def super_block(self) -> int:
        return self.u_in.shape[-1]

    @property
    def n(self) -> int:
        return self.h.shape[-1]


def choose_super_block(n: int, g: int, target: int = 128) -> int:
    """Largest multiple of g dividing n that is ≤ max(target, g)."""
    if n % g:
        raise ValueError(f"LDLQ: n={n} is not a multiple of the block width {g}")
    nb = n // g
    best = 1
    for d in range(1, nb + 1):
        if nb % d == 0 and d * g <= max(target, g):
            best = d
    return best * g


def _diag_blocks(a: jax.Array, b: int) -> jax.Array:
    """[n, n] -> [n/b, b, b] diagonal blocks."""
    n = a.shape[0]
    k = n // b
    ar = a.reshape(k, b, k, b)
    idx = jnp.arange(k)
    return ar[idx, :, idx, :]


def _blockdiag_mask(n: int, b: int, dtype=jnp.float32) -> jax.Array:
    i = jnp.arange(n) // b
    return (i[:, None] == i[None, :]).astype(dtype)


# The g x g block inverses are unrolled elementwise jnp (g = 8), not batched LAPACK: on XLA:CPU a
# batched triangular solve / LU runs its batch through a ParallelBatchMap on the intra-op pool,
# and two decompositions dispatched concurrently (one per fake device, 2 cores) each held one
# pool thread waiting for sub-tasks queued behind the other: a deadlock (seen with gdb on
# Qwen2.5-Coder-1.5B, n = 8960, in lapack_strsm_ffi).
def _upper_inverse(u: jax.Array) -> jax.Array:
    """Inverse of upper-triangular u [..., g, g] by back substitution (rows from the bottom)."""
    g = u.shape[-1]
    eye = jnp.eye(g, dtype=u.dtype)
    rows: list = [None] * g
    for i in reversed(range(g)):
        r = jnp.broadcast_to(eye[i], u.shape[:-2] + (g,))
        if i < g - 1:
            r = r - jnp.einsum("...k,...kj->...j", u[..., i, i + 1:], jnp.stack(rows[i + 1:], axis=-2))
        rows[i] = r / u[..., i, i][..., None]
    return jnp.stack(rows, axis=-2)


def _spd_inverse(a: jax.Array) -> jax.Array:
    """Inverse of symmetric positive-definite a [..., g, g]: Gauss-Jordan without pivoting (the
    pivots of an SPD matrix are positive)."""
    g = a.shape[-1]
    m = jnp.concatenate([a, jnp.broadcast_to(jnp.eye(g, dtype=a.dtype), a.shape)], axis=-1)
    for i in range(g):
        pivot_row = m[..., i, :] / m[..., i, i][..., None]                    # [..., 2g]
        col = m[..., :, i]                                                     # [..., g]
        m = m - col[..., :, None] * pivot_row[..., None, :]
        m = m.at[..., i, :].set(pivot_row)
    return m[..., g:]


def ldl_factors(h: jax.Array, block: int, super_block: int | None = None,
                robust: bool = False, chol: tuple[jax.Array, jax.Array] | None = None) -> LDLFactors:
    """Block LDL pieces of a (regularised, float32) H [n, n] for LDLQ with block width `block`.
    robust: retry the Cholesky with growing jitter; otherwise `jitter` is NaN if it failed.
    chol: (C, jitter) from hessian.upper_cholesky(h) when the caller already has it."""
    h = jnp.asarray(h, jnp.float32)
    n = h.shape[0]
    g = int(block)
    sb = choose_super_block(n, g) if super_block is None else int(super_block)
    if sb % g or n % sb:
        raise ValueError(f"LDLQ: super block {sb} must be a multiple of {g} dividing n={n}")
    c, jitter = hs.upper_cholesky(h, robust) if chol is None else chol
    nb = n // g
    if g == 1:                                                         # scalar: no block inverses
        u = c / jnp.diag(c)[None, :]
        hkk_inv = (1.0 / jnp.diag(h))[:, None, None]
    else:
        ckk_inv = _upper_inverse(_diag_blocks(c, g))                  # [nb, g, g]
        u = jnp.einsum("ikb,kbc->ikc", c.reshape(n, nb, g), ckk_inv).reshape(n, n)
        hkk_inv = _spd_inverse(_diag_blocks(h, g))
    u_off = u * (1.0 - _blockdiag_mask(n, g, h.dtype))                 # drop the identity blocks
    u_in = _diag_blocks(u_off, sb)
    u_cross = u_off * (1.0 - _blockdiag_mask(n, sb, h.dtype))
    return LDLFactors(u_in=u_in, u_cross=u_cross, h=h, h_in=_diag_blocks(h, sb), hkk_inv=hkk_inv,
                      jitter=jitter)


def _codes_buffer(round_fn: RoundFn, prm, m: int, g: int, nb: int):
    """Zero codes buffer [nb, *codes_block_shape] with the round function's code dtype."""
    out = jax.eval_shape(round_fn, jax.ShapeDtypeStruct((m, g), jnp.float32),
                         jax.ShapeDtypeStruct((), jnp.int32), prm)
    cs = out[1]
    return jnp.zeros((nb,) + tuple(cs.shape), cs.dtype)


def ldlq_pass(w: jax.Array, fac: LDLFactors, round_fn: RoundFn, prm=None):
    """One LDLQ pass. w [m, n] (n = fac.n).
    round_fn(block [m, g], col0, prm) -> (ŵ_block [m, g], codes_block [m, ...]); prm: a pytree of
    per-row quantizer parameters (leading axis m), passed through.
    Returns (ŵ [m, n], codes [n/g, m, ...])."""
    m, n = w.shape
    g, sb = fac.block, fac.super_block
    n_super, nb_in = n // sb, sb // g
    codes0 = _codes_buffer(round_fn, prm, m, g, n // g)

    def super_body(s, carry):
        fb, w_hat, codes = carry
        c0 = s * sb
        w_s = jax.lax.dynamic_slice_in_dim(w, c0, sb, axis=1)
        x_s = w_s + jax.lax.dynamic_slice_in_dim(fb, c0, sb, axis=1)
        u_s = fac.u_in[s]

        def inner(b, c):
            e_s, wh_s, codes = c
            col = b * g
            ucol = jax.lax.dynamic_slice_in_dim(u_s, col, g, axis=1)          # [sb, g]
            target = jax.lax.dynamic_slice_in_dim(x_s, col, g, axis=1) + e_s @ ucol
            q, cd = round_fn(target, c0 + col, prm)
            e_blk = jax.lax.dynamic_slice_in_dim(w_s, col, g, axis=1) - q
            e_s = jax.lax.dynamic_update_slice_in_dim(e_s, e_blk, col, axis=1)
            wh_s = jax.lax.dynamic_update_slice_in_dim(wh_s, q, col, axis=1)
            codes = codes.at[s * nb_in + b].set(cd)
            return e_s, wh_s, codes

        z = jnp.zeros((m, sb), w.dtype)
        e_s, wh_s, codes = jax.lax.fori_loop(0, nb_in, inner, (z, z, codes))
        fb = fb + e_s @ jax.lax.dynamic_slice_in_dim(fac.u_cross, c0, sb, axis=0)
        w_hat = jax.lax.dynamic_update_slice_in_dim(w_hat, wh_s, c0, axis=1)
        return fb, w_hat, codes

    z = jnp.zeros_like(w)
    _, w_hat, codes = jax.lax.fori_loop(0, n_super, super_body, (z, z, codes0))
    return w_hat, codes


def _one_sweep(w, w_hat, codes, fac: LDLFactors, round_fn: RoundFn, prm):
    """One block-coordinate-descent sweep over all column blocks for the rows of w (any number).
    codes [nb, rows, ...]. Returns (ŵ, codes)."""
    m, n = w.shape
    g, sb = fac.block, fac.super_block
    n_super, nb_in = n // sb, sb // g
    h = fac.h

    def row_loss(x, t, hkk):                       # (x − t) Hkk (x − t)ᵀ per row
        d = x - t
        return jnp.sum((d @ hkk) * d, axis=1)

    gmat = (w - w_hat) @ h                         # E H, exact at the start of the sweep

    def super_body(s, carry):
        gmat, w_hat, codes = carry
        c0 = s * sb
        g_s = jax.lax.dynamic_slice_in_dim(gmat, c0, sb, axis=1)
        wh_s0 = jax.lax.dynamic_slice_in_dim(w_hat, c0, sb, axis=1)
        h_s = fac.h_in[s]

        def inner(b, c):
            de_s, wh_s, codes = c
            col = b * g
            hcol = jax.lax.dynamic_slice_in_dim(h_s, col, g, axis=1)        # [sb, g]
            gk = jax.lax.dynamic_slice_in_dim(g_s, col, g, axis=1) + de_s @ hcol   # (E H)_k now
            old = jax.lax.dynamic_slice_in_dim(wh_s, col, g, axis=1)
            t = old + gk @ fac.hkk_inv[(c0 + col) // g]                   # block optimum
            q, cd = round_fn(t, c0 + col, prm)
            hkk = jax.lax.dynamic_slice(h_s, (col, col), (g, g))
            accept = row_loss(q, t, hkk) < row_loss(old, t, hkk)
            q = jnp.where(accept[:, None], q, old)
            idx = s * nb_in + b
            cd = jnp.where(accept.reshape((m,) + (1,) * (cd.ndim - 1)), cd, codes[idx])
            codes = codes.at[idx].set(cd)
            de_s = jax.lax.dynamic_update_slice_in_dim(de_s, old - q, col, axis=1)
            wh_s = jax.lax.dynamic_update_slice_in_dim(wh_s, q, col, axis=1)
            return de_s, wh_s, codes

        de0 = jnp.zeros((m, sb), w.dtype)
        de_s, wh_s, codes = jax.lax.fori_loop(0, nb_in, inner, (de0, wh_s0, codes))
        gmat = gmat + de_s @ jax.lax.dynamic_slice_in_dim(h, c0, sb, axis=0)
        w_hat = jax.lax.dynamic_update_slice_in_dim(w_hat, wh_s, c0, axis=1)
        return gmat, w_hat, codes

    _, w_hat, codes = jax.lax.fori_loop(0, n_super, super_body, (gmat, w_hat, codes))
    return w_hat, codes


def greedy_sweeps(w: jax.Array, w_hat: jax.Array, codes: jax.Array, fac: LDLFactors,
                  round_fn: RoundFn, sweeps: int, prm=None, row_chunk: int = 128):
    """`sweeps` passes of block coordinate descent on tr((W−Ŵ) H (W−Ŵ)ᵀ), never increasing it.

    The objective is a sum of independent per-row problems (e_i H e_iᵀ), and a sweep is a
    deterministic function of a row's own state, so a row that a sweep leaves unchanged is at a
    fixed point and stays there. Each sweep therefore only visits the rows still *active*: they
    are compacted to the front (stable argsort) and processed in chunks of `row_chunk` rows by a
    while loop whose trip count is the number of active chunks. Same result as sweeping every row
    `sweeps` times, at the cost of the rows that still move (typically 100%, 95%, 80%, 55%, 35%,
    …). Returns (ŵ, codes)."""
    if sweeps <= 0:
        return w_hat, codes
    m, n = w.shape
    c = min(row_chunk, m)
    m_pad = -(-m // c) * c
    pad = m_pad - m

    def padrows(x, axis=0, fill=0):
        if pad == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        return jnp.pad(x, widths, constant_values=fill)

    wp, whp = padrows(w), padrows(w_hat)
    cp = padrows(codes, axis=1)
    prm_p = jax.tree.map(lambda x: padrows(x, fill=1), prm)      # dummy rows: scale 1, never active
    active0 = jnp.arange(m_pad) < m

    def sweep(_, carry):
        whp, cp, active = carry
        order = jnp.argsort(~active, stable=True).astype(jnp.int32)   # active rows first
        n_chunks = (jnp.sum(active) + c - 1) // c

        def chunk(j, carry):
            whp, cp, act_new = carry
            rows = jax.lax.dynamic_slice_in_dim(order, j * c, c)
            wh_c = whp[rows]
            wh_new, cd_new = _one_sweep(wp[rows], wh_c, cp[:, rows], fac, round_fn,
                                        jax.tree.map(lambda x: x[rows], prm_p))
            changed = jnp.any(wh_new != wh_c, axis=1)
            return (whp.at[rows].set(wh_new), cp.at[:, rows].set(cd_new),
                    act_new.at[rows].set(changed))

        return jax.lax.fori_loop(0, n_chunks, chunk, (whp, cp, jnp.zeros_like(active)))

    whp, cp, _ = jax.lax.fori_loop(0, sweeps, sweep, (whp, cp, active0))
    return whp[:m], cp[:, :m]


# ----------------------------------------------------------------------------------------------
# with the project's quantizers
# ----------------------------------------------------------------------------------------------
def pad_for(spec: qb.QuantSpec, n: int) -> int:
    """Columns LDLQ works on for this quantizer (n rounded up to spec.block)."""
    return qb.padded_n(n, spec)


def factors_for(h: jax.Array, spec: qb.QuantSpec, super_block: int | None = None,
                robust: bool = False, chol: tuple[jax.Array, jax.Array] | None = None) -> LDLFactors:
    """LDL factors of a regularised H [n, n] for quantizing with `spec` (pads H when the
    quantizer pads the columns: E8P and n % 8 ≠ 0). chol: upper_cholesky(h), reused if given."""
    n = h.shape[0]
    p = pad_for(spec, n) - n
    hp = hs.pad_hessian(h, p, PAD_FILL)
    if chol is not None and p:
        c, j = chol                             # the padded block is diagonal: extend C directly
        chol = (hs.pad_hessian(c, p, PAD_FILL ** 0.5), j)
    return ldl_factors(hp, spec.block, super_block, robust, chol)


PAD_FILL = 1e-2      # H's diagonal on E8P padding columns (they are dropped; no coupling)


def ldlq_quantize(w: jax.Array, fac: LDLFactors, spec: qb.QuantSpec, sweeps: int = 0,
                  params: qb.QuantParams | None = None):
    """LDLQ (+ `sweeps` re-quantization sweeps) of w [m, n] with the project quantizer `spec`.

    fac: from factors_for(H, spec). Returns (QuantizedMatrix, ŵ [m, n] float32) with
    ŵ == dequantize(QuantizedMatrix)."""
    w = jnp.asarray(w, jnp.float32)
    m, n = w.shape
    if params is None:
        params = qb.fit(w, spec)
    wp = qb.pad_cols(w, spec)
    if wp.shape[1] != fac.n:
        raise ValueError(f"LDLQ: factors are for n={fac.n}, the (padded) weight has {wp.shape[1]} columns")
    round_fn = functools.partial(qb.ldlq_round, spec=spec, n=n)
    prm = qb.ldlq_params(params)
    w_hat, codes = ldlq_pass(wp, fac, round_fn, prm)
    w_hat, codes = greedy_sweeps(wp, w_hat, codes, fac, round_fn, sweeps, prm)
    qm = qb.assemble(codes, params, spec, (m, n))
    return qm, w_hat[:, :n]


def nearest_quantize(w: jax.Array, spec: qb.QuantSpec):
    """Nearest rounding (no error feedback): (QuantizedMatrix, ŵ)."""
    qm = qb.quantize(jnp.asarray(w, jnp.float32), spec)
    return qm, qb.dequantize(qm)
