"""Calibration Hessians: checks, regularisation and the factorisations the decomposition uses.

H = Σ xᵀx over the calibration activations of a linear's input ([n, n], n = in_features). The
decomposition works with

    H_reg = H / mean(diag H) + sigma_reg · I        (float32)

so that sigma_reg is a *relative* ridge (the research notes: too small a ridge gave condition
numbers ~1e12 and broken results). Everything here is pure and jittable except `check_hessian`,
which inspects values on the host (float64 numpy) and raises `HessianError` with a clear message;
run it before jit (decompose does, with the matrix's sigma_reg as `ridge`).

PSD tolerance (issue 10): a Σ xᵀx rounded to float32 is PSD only up to ~eps32 · ‖H‖, which is
large relative to mean(diag H) when outlier channels dominate H (Qwen2.5-Coder-1.5B layer 1
down_proj: λmax = 3369 · mean diag, and 8192 tokens < 8960 features leave a 768-dim null space).
The smallest eigenvalue of H / mean(diag H) is therefore judged against the ridge decompose adds:
below -PSD_RIDGE_FRACTION · sigma_reg (5% of it) H is refused, anything the ridge dominates is
accepted; never stricter than H's own float32 rounding (`psd_tolerance`).

Factorisations run in float32 inside jit (x64 is off on the CPU and GPU images). `robust_cholesky`
(what decompose uses) factors once and, only when a pivot broke down (NaN: e.g. sigma_reg=0 on a
rank-deficient H), retries with a growing diagonal jitter, reporting the jitter it needed; the
retry loop adds ~0.5 s of XLA compile on CPU. `checked_cholesky` is the plain factorisation with
a failure flag (jitter NaN) for callers that prefer to handle it themselves.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class HessianError(ValueError):
    """A calibration Hessian that cannot be used (shape, NaN/Inf, asymmetric, not PSD, all zero)."""


# ----------------------------------------------------------------------------------------------
# host-side checks (eager, float64)
# ----------------------------------------------------------------------------------------------
def check_weight(w, where: str = "W") -> tuple[int, int]:
    """Checks a weight [m, n] (finite, 2-D, not all zero); returns its shape."""
    shape = tuple(np.shape(w))
    if len(shape) != 2:
        raise HessianError(f"{where}: weight must be 2-D [m, n], got shape {shape}")
    if min(shape) < 1:
        raise HessianError(f"{where}: weight has an empty dimension: {shape}")
    a = np.asarray(jax.device_get(w), dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise HessianError(f"{where}: weight has {int(bad.sum())} NaN/Inf value(s) (first at [{r}, {c}])")
    if not np.any(a):
        raise HessianError(f"{where}: weight is all zeros")
    return shape  # type: ignore[return-value]


PSD_RIDGE_FRACTION = 0.05   # an eigenvalue below -this · ridge is an error (the ridge would not dominate it)
PSD_TOL_NO_RIDGE = 1e-4     # the tolerance when no ridge is given (or sigma_reg = 0)
_EPS32 = float(np.finfo(np.float32).eps)


def psd_tolerance(h, ridge: float | None = None, *, fraction: float = PSD_RIDGE_FRACTION,
                  no_ridge_tol: float = PSD_TOL_NO_RIDGE) -> float:
    """How negative the smallest eigenvalue of H / mean(diag H) may be before H is refused.

    With the relative ridge `ridge` (sigma_reg) that decompose adds to H / mean(diag H): fraction ·
    ridge (default 5%: H_reg's smallest eigenvalue stays >= 0.95 · ridge, so the ridge still
    dominates). Without a ridge (None or 0): no_ridge_tol. Never below the float32 representation
    limit of H: rounding every entry of an exactly PSD H to float32 moves its eigenvalues by up to
    ‖ΔH‖₂ <= (eps32 / 2) ‖H‖_F, which is large relative to mean(diag H) when a few outlier input
    channels dominate H (Qwen2: one channel ~1000 x the mean diagonal), so the floor is
    eps32 · ‖H‖_F / mean(diag H)."""
    a = np.asarray(h, dtype=np.float64)
    md = float(np.mean(np.diag(a)))
    floor = _EPS32 * float(np.linalg.norm(a)) / md if md > 0 else 0.0
    tol = fraction * ridge if ridge else no_ridge_tol
    return max(tol, floor)


def check_hessian(h, n: int | None = None, where: str = "H", *, sym_tol: float = 1e-3,
                  ridge: float | None = None, psd_fraction: float = PSD_RIDGE_FRACTION,
                  psd_tol: float = PSD_TOL_NO_RIDGE) -> None:
    """Raises HessianError unless h is a finite, square, symmetric, PSD-ish [n, n] matrix with a
    positive diagonal mean.

    sym_tol: max |H - Hᵀ| / max |H| allowed (float32 accumulation noise is ~1e-7).
    PSD: the smallest eigenvalue of H / mean(diag H) may be down to -psd_tolerance(h, ridge):
    psd_fraction · ridge when decompose will add the relative ridge `ridge` (sigma_reg) — anything
    the ridge dominates is harmless — else psd_tol; never stricter than H's float32 rounding.
    The PSD check is a float64 Cholesky of H / mean(diag) + tol·I (no eigendecomposition unless
    it fails, to report the eigenvalue).
    """
    shape = tuple(np.shape(h))
    if len(shape) != 2 or shape[0] != shape[1]:
        raise HessianError(f"{where}: Hessian must be square [n, n], got shape {shape}")
    if n is not None and shape[0] != n:
        raise HessianError(f"{where}: Hessian is {shape[0]}x{shape[1]} but the weight has n = {n} "
                           f"input columns (H must be [n, n] over the linear's inputs)")
    a = np.asarray(jax.device_get(h), dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise HessianError(f"{where}: Hessian has {int(bad.sum())} NaN/Inf value(s) (first at [{r}, {c}])")
    del bad
    d = np.diag(a)
    mean_d = float(d.mean())
    if not mean_d > 0:
        raise HessianError(f"{where}: Hessian has mean diagonal {mean_d:g} <= 0 (all-zero or empty "
                           f"calibration? H = Σ xᵀx must have a positive diagonal)")
    tol = psd_tolerance(a, ridge, fraction=psd_fraction, no_ridge_tol=psd_tol)
    if (d < -tol * mean_d).any():
        i = int(np.argmin(d))
        raise HessianError(f"{where}: Hessian has a negative diagonal entry H[{i},{i}] = {d[i]:g}: not PSD")
    amax = float(np.abs(a).max())
    s = a.T - a
    asym = float(np.abs(s).max()) / amax
    if asym > sym_tol:
        raise HessianError(f"{where}: Hessian is not symmetric (max |H - Hᵀ| / max |H| = {asym:.3g} "
                           f"> {sym_tol:g})")
    np.add(a, a.T, out=s)                       # s = (H + Hᵀ) / (2 mean diag) + tol·I, in place
    s *= 0.5 / mean_d
    s[np.diag_indices_from(s)] += tol
    del a
    try:
        np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        s[np.diag_indices_from(s)] -= tol
        lam = float(np.linalg.eigvalsh(s)[0])
        why = (f"{psd_fraction:g} x the ridge sigma_reg = {ridge:g}, which would not dominate it"
               if ridge else "no ridge")
        raise HessianError(f"{where}: Hessian is not positive semi-definite (smallest eigenvalue of "
                           f"H / mean(diag H) is {lam:.3g} < -{tol:.3g} = -{why}; H = Σ xᵀx cannot "
                           f"be that indefinite: corrupted or not a calibration Hessian?)") from None


# ----------------------------------------------------------------------------------------------
# jittable parts
# ----------------------------------------------------------------------------------------------
def normalize(h: jax.Array) -> jax.Array:
    """Symmetrised H / mean(diag H), float32."""
    h = jnp.asarray(h, jnp.float32)
    h = 0.5 * (h + h.T)
    return h / jnp.mean(jnp.diag(h))


def regularize(h: jax.Array, sigma_reg: float) -> jax.Array:
    """H / mean(diag H) + sigma_reg · I (float32, symmetrised)."""
    hn = normalize(h)
    return hn + sigma_reg * jnp.eye(hn.shape[0], dtype=hn.dtype)


def pad_hessian(h: jax.Array, n_pad: int, fill: float = 1e-2) -> jax.Array:
    """Pads H [n, n] to [n + n_pad, n + n_pad] with `fill`·I on the new diagonal and no coupling:
    padded (dropped) columns placed last cannot feed error back into the real ones."""
    if n_pad == 0:
        return h
    n = h.shape[0]
    out = jnp.zeros((n + n_pad, n + n_pad), h.dtype).at[:n, :n].set(h)
    return out.at[jnp.arange(n, n + n_pad), jnp.arange(n, n + n_pad)].set(fill)


def robust_cholesky(h: jax.Array, max_tries: int = 8) -> tuple[jax.Array, jax.Array]:
    """Lower Cholesky factor of symmetric h (float32), retrying with jitter 1e-6, 1e-5, …
    (× mean diag) until finite. Returns (L, jitter_used)."""
    h = jnp.asarray(h, jnp.float32)
    n = h.shape[0]
    eye = jnp.eye(n, dtype=h.dtype)
    md = jnp.mean(jnp.diag(h))

    def attempt(j):
        return jnp.linalg.cholesky(h + (j * md) * eye)

    l0 = attempt(jnp.float32(0.0))

    def cond(s):
        l, j, k = s
        return jnp.logical_and(~jnp.all(jnp.isfinite(l)), k < max_tries)

    def body(s):
        _, j, k = s
        j = jnp.where(j == 0, jnp.float32(1e-6), j * 10.0)
        return attempt(j), j, k + 1

    l, j, _ = jax.lax.while_loop(cond, body, (l0, jnp.float32(0.0), jnp.int32(0)))
    return l, j


def checked_cholesky(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain float32 Cholesky; returns (L, jitter) with jitter = 0 if L is finite, else NaN (the
    caller retries with robust_cholesky: see decompose). Much cheaper to compile than the retry
    loop, which is only built when a factorisation actually failed."""
    l = jnp.linalg.cholesky(jnp.asarray(h, jnp.float32))
    return l, jnp.where(jnp.all(jnp.isfinite(l)), jnp.float32(0.0), jnp.float32(jnp.nan))


def upper_cholesky(h: jax.Array, robust: bool = False) -> tuple[jax.Array, jax.Array]:
    """Upper-triangular C with h = C Cᵀ (the 'reverse' Cholesky LDLQ needs: column k of Cᵀ only
    involves columns ≥ k). Computed as J·chol(J h J)·J with J the reversal. Returns (C, jitter):
    robust=False: jitter 0, or NaN when the float32 factorisation failed; robust=True: the jitter
    (× mean diag) robust_cholesky needed."""
    l, j = (robust_cholesky if robust else checked_cholesky)(h[::-1, ::-1])
    return l[::-1, ::-1], j


def sqrt_and_inv_sqrt(h: jax.Array, floor: float = 1e-8) -> tuple[jax.Array, jax.Array]:
    """Symmetric H^{1/2} and H^{-1/2} from an eigendecomposition (eigenvalues floored at
    floor·max eigenvalue)."""
    lam, v = jnp.linalg.eigh(jnp.asarray(h, jnp.float32))
    lam = jnp.maximum(lam, floor * jnp.max(lam))
    s = jnp.sqrt(lam)
    return (v * s) @ v.T, (v / s) @ v.T


def weighted_sq_error(e: jax.Array, h: jax.Array) -> jax.Array:
    """tr(E H Eᵀ) for E [m, n], H [n, n]."""
    return jnp.sum((e @ h) * e)
