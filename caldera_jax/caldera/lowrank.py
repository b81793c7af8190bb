"""The LR step of CALDERA: a rank-r L·R fitted to A = W − Q in the H-weighted norm.

1. Closed form. min_{rank ≤ r} ||(A − L R) H^{1/2}||_F: for any factor S with H = S Sᵀ, take
   B = A S and B's SVD U Σ Vᵀ; the minimiser is B_r S⁻¹ (B_r = truncated SVD), since
   ||E S||_F² = tr(E H Eᵀ) for every such S. decompose passes the upper Cholesky factor it already
   has for LDLQ (S = C, S⁻¹ by a triangular solve: ~10x cheaper than an eigendecomposition);
   hessian.sqrt_and_inv_sqrt gives the symmetric square root instead. Balanced factors:
       L = U_r Σ_r^{1/2}   [m, r],     R = Σ_r^{1/2} V_rᵀ S⁻¹   [r, n].
   With H = I this is exactly the truncated SVD of A. For large matrices with a small rank the SVD
   is randomized (subspace iteration with re-orthonormalised power steps; `svd_method_for`).

2. LPLR (when L or R is quantized, b_l / b_r < 16): `lplr_iters` rounds of alternating least
   squares with quantized factors, keeping the best pair:
       R_q = quant_R(R)                  LDLQ of R's columns with H (blocks of up to 16 columns:
                                         measured as good as scalar LDLQ here, 16x fewer loop steps;
                                         clearly better than nearest rounding). R's rows are
                                         weighted by LᵀL ≈ Σ_r (diagonal) after the SVD
       L   = A H R_qᵀ (R_q H R_qᵀ)⁻¹      exact H-weighted least squares for L given R_q
       L_q = quant_L(L)                  nearest rounding: the sub-problem's Hessian R_q H R_qᵀ ≈ Σ_r
                                         is near-diagonal, so LDLQ measured no better here
       err = tr((A − L_q R_q) H (A − L_q R_q)ᵀ)   (via A H, no [m, n] residual per round)
       R   = (L_qᵀ L_q)⁻¹ L_qᵀ A         exact least squares for R given L_q (H cancels)
   The best (L_q, R_q) over the rounds is kept, and also compared with L = R = 0 (stored as
   all-zero codes with zero scales), so the LR step never makes the current error worse.
   bf16 factors (bits 16) are rounded to bf16 instead; with both bf16 there is no LPLR.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from caldera_jax.caldera import hessian as hs
from caldera_jax.caldera import ldlq
from caldera_jax.formats import quant as qb


class LRResult(NamedTuple):
    l_hat: jax.Array        # [m, r] dequantized L (float32)
    r_hat: jax.Array        # [r, n] dequantized R
    l_store: Any            # QuantizedMatrix (quantized L) or bf16 array [m, r]
    r_store: Any            # QuantizedMatrix or bf16 array [r, n]
    err: jax.Array          # tr((A − L R) H (A − L R)ᵀ)


# ----------------------------------------------------------------------------------------------
# closed form
# ----------------------------------------------------------------------------------------------
def randomized_svd(b: jax.Array, rank: int, key: jax.Array, oversample: int | None = None,
                   power_iters: int = 2):
    """Rank-`rank` SVD of b [m, n] by subspace iteration. Returns (U [m,r], S [r], Vt [r,n])."""
    m, n = b.shape
    p = oversample if oversample is not None else max(8, rank // 2)
    k = min(rank + p, m, n)
    omega = jax.random.normal(key, (n, k), b.dtype)
    qm, _ = jnp.linalg.qr(b @ omega)
    for _ in range(power_iters):
        z, _ = jnp.linalg.qr(b.T @ qm)
        qm, _ = jnp.linalg.qr(b @ z)
    u_s, s, vt = jnp.linalg.svd(qm.T @ b, full_matrices=False)
    return (qm @ u_s)[:, :rank], s[:rank], vt[:rank]


def svd_method_for(shape: tuple[int, int], rank: int, method: str = "auto") -> str:
    """'exact' or 'randomized' (auto: randomized only when min(m, n) > 512 and rank ≤ min/8)."""
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd method must be 'auto', 'exact' or 'randomized', got {method!r}")
    if method != "auto":
        return method
    k = min(shape)
    return "randomized" if (k > 512 and rank <= k // 8) else "exact"


def weighted_lowrank(a: jax.Array, hsqrt: jax.Array, hinvsqrt: jax.Array, rank: int,
                     method: str = "exact", key: jax.Array | None = None):
    """Closed-form rank-r minimiser of ||(A − L R) H^{1/2}||_F. hsqrt: any S with H = S Sᵀ (the
    symmetric root, or the upper Cholesky factor), hinvsqrt = S⁻¹. Returns balanced (L, R)."""
    b = a @ hsqrt
    if method == "randomized":
        if key is None:
            key = jax.random.PRNGKey(0)
        u, s, vt = randomized_svd(b, rank, key)
    else:
        u, s, vt = jnp.linalg.svd(b, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    rs = jnp.sqrt(s)
    return u * rs[None, :], (rs[:, None] * vt) @ hinvsqrt


# ----------------------------------------------------------------------------------------------
# factor quantizers
# ----------------------------------------------------------------------------------------------
def _bf16(x):
    xb = x.astype(jnp.bfloat16)
    return xb.astype(jnp.float32), xb


def _ridge(hm: jax.Array, rel: float = 1e-5) -> jax.Array:
    k = hm.shape[0]
    md = jnp.mean(jnp.diag(hm))
    return hm + (rel * md + 1e-20) * jnp.eye(k, dtype=hm.dtype)


def r_block(n: int) -> int:
    """LDLQ block width for R [r, n]: the largest of 16, 8, 4, 2, 1 dividing n."""
    return next(g for g in (16, 8, 4, 2, 1) if n % g == 0)


def factors_for_r(h: jax.Array, chol=None) -> ldlq.LDLFactors:
    """LDL factors of H for quantizing R (block r_block(n)); chol: a precomputed upper_cholesky."""
    return ldlq.ldl_factors(h, r_block(h.shape[0]), chol=chol)


def quant_r(r: jax.Array, spec: qb.QuantSpec | None, fac_r: ldlq.LDLFactors | None):
    """R [r, n] -> (R̂, stored). LDLQ over R's columns with H (fac_r from factors_for_r(H))."""
    if spec is None:
        return _bf16(r)
    qm, rh = ldlq.ldlq_quantize(r, fac_r, spec)
    return rh, qm


def quant_l(l: jax.Array, spec: qb.QuantSpec | None):
    """L [m, r] -> (L̂, stored), nearest rounding (see the module docstring)."""
    if spec is None:
        return _bf16(l)
    qm, lh = ldlq.nearest_quantize(l, spec)
    return lh, qm


def zeros_like_store(store):
    """An all-zero factor in the same storage (codes 0, scales 0, zeros 0 → dequantizes to 0)."""
    return jax.tree.map(jnp.zeros_like, store)


# ----------------------------------------------------------------------------------------------
# the LR step
# ----------------------------------------------------------------------------------------------
def lr_step(a: jax.Array, h: jax.Array, hsqrt: jax.Array, hinvsqrt: jax.Array, *, rank: int,
            spec_l: qb.QuantSpec | None, spec_r: qb.QuantSpec | None,
            fac_r: ldlq.LDLFactors | None, lplr_iters: int, svd_method: str = "exact",
            key: jax.Array | None = None, prev: LRResult | None = None) -> LRResult:
    """Fits L R to a [m, n] (= W − Q) in the H-norm; quantizes the factors (LPLR); see module doc.

    prev: the current factors (their `err` is ignored and recomputed for this `a`); when given they
    are a candidate too, so the step never increases the error for this Q."""
    a = jnp.asarray(a, jnp.float32)
    l0, r0 = weighted_lowrank(a, hsqrt, hinvsqrt, rank, svd_method, key)
    ah = a @ h
    base = jnp.sum(ah * a)                                    # error of L = R = 0

    def err_of(lh, rhh, rh):                                  # rhh = R H Rᵀ
        ahr = ah @ rh.T                                       # A H Rᵀ  [m, r]
        return base - 2.0 * jnp.sum(ahr * lh) + jnp.sum((lh.T @ lh) * rhh)

    def finish(res):
        if prev is not None:
            p = prev._replace(err=err_of(prev.l_hat, prev.r_hat @ h @ prev.r_hat.T, prev.r_hat))
            keep = p.err < res.err
            res = jax.tree.map(lambda x, y: jnp.where(keep, x, y), p, res)
        return _keep_or_zero(res, base)

    if spec_l is None and spec_r is None:                     # bf16 factors, no LPLR
        lh, ls = _bf16(l0)
        rh, rs = _bf16(r0)
        rhh = rh @ h @ rh.T
        err = err_of(lh, rhh, rh)
        return finish(LRResult(lh, rh, ls, rs, err))

    def one_round(r_cont, l_direct):
        rh, rs = quant_r(r_cont, spec_r, fac_r)
        rhm = rh @ h                                          # [r, n]
        hl = rhm @ rh.T                                       # R_q H R_qᵀ
        if l_direct is None:
            ahr = ah @ rh.T
            l = jnp.linalg.solve(_ridge(hl), ahr.T).T         # A H R_qᵀ (R_q H R_qᵀ)⁻¹
        else:
            l = l_direct
        lh, ls = quant_l(l, spec_l)
        err = err_of(lh, hl, rh)
        return LRResult(lh, rh, ls, rs, err)

    if lplr_iters <= 0:                                       # quantize the SVD factors directly
        return finish(one_round(r0, l0))

    def body(i, carry):
        best, lq = carry
        # round 0 starts from the SVD's R; later rounds refit R to the last quantized L
        r_cont = jax.lax.cond(i == 0, lambda: r0,
                              lambda: jnp.linalg.solve(_ridge(lq.T @ lq), lq.T @ a))
        new = one_round(r_cont, None)
        better = new.err < best.err
        best = jax.tree.map(lambda x, y: jnp.where(better, x, y), new, best)
        return best, new.l_hat

    init = _zeros_of(lambda: one_round(r0, None))
    init = init._replace(err=jnp.float32(jnp.inf))
    best, _ = jax.lax.fori_loop(0, lplr_iters, body, (init, jnp.zeros_like(l0)))
    return finish(best)


def _zeros_of(fn):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn))


def _keep_or_zero(res: LRResult, base_err: jax.Array) -> LRResult:
    """res, or L = R = 0 if that is better (never makes the error worse)."""
    zero = LRResult(jnp.zeros_like(res.l_hat), jnp.zeros_like(res.r_hat),
                    zeros_like_store(res.l_store), zeros_like_store(res.r_store), base_err)
    better = res.err <= base_err
    return jax.tree.map(lambda x, y: jnp.where(better, x, y), res, zero)


def weighted_error(a: jax.Array, h: jax.Array) -> jax.Array:
    return hs.weighted_sq_error(a, h)
