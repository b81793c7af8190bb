"""Calibration Hessians: checks, regularisation and the factorisations the decomposition uses.

H = Σ xᵀx over the calibration activations of a linear's input ([n, n], n = in_features). The
decomposition works with

    H_reg = H / mean(diag H) + sigma_reg · I        (float32)

so that sigma_reg is a *relative* ridge (the research notes: too small a ridge gave condition
numbers ~1e12 and broken results). Everything here is pure and jittable except `check_hessian`,
which inspects values on the host (float64 numpy) and raises `HessianError` with a clear message;
run it before jit (decompose does).

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


def check_hessian(h, n: int | None = None, where: str = "H", *, sym_tol: float = 1e-3,
                  psd_tol: float = 1e-4) -> None:
    """Raises HessianError unless h is a finite, square, symmetric, PSD-ish [n, n] matrix with a
    positive diagonal mean.

    sym_tol: max |H - Hᵀ| / max |H| allowed (float32 accumulation noise is ~1e-7).
    psd_tol: the smallest eigenvalue may be down to -psd_tol · mean(diag H) (roundoff of Σ xᵀx).
    The PSD check is a float64 Cholesky of H + psd_tol·mean(diag)·I (cheap: no eigendecomposition).
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
    d = np.diag(a)
    mean_d = float(d.mean())
    if not mean_d > 0:
        raise HessianError(f"{where}: Hessian has mean diagonal {mean_d:g} <= 0 (all-zero or empty "
                           f"calibration? H = Σ xᵀx must have a positive diagonal)")
    if (d < -psd_tol * mean_d).any():
        i = int(np.argmin(d))
        raise HessianError(f"{where}: Hessian has a negative diagonal entry H[{i},{i}] = {d[i]:g}: not PSD")
    amax = float(np.abs(a).max())
    asym = float(np.abs(a - a.T).max()) / amax
    if asym > sym_tol:
        raise HessianError(f"{where}: Hessian is not symmetric (max |H - Hᵀ| / max |H| = {asym:.3g} "
                           f"> {sym_tol:g})")
    s = 0.5 * (a + a.T) / mean_d
    try:
        np.linalg.cholesky(s + psd_tol * np.eye(shape[0]))
    except np.linalg.LinAlgError:
        lam = float(np.linalg.eigvalsh(s)[0])
        raise HessianError(f"{where}: Hessian is not positive semi-definite (smallest eigenvalue of "
                           f"H / mean(diag H) is {lam:.3g} < -{psd_tol:g})") from None


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


# ----------------------------------------------------------------------------------------------
# LAPACK threading (XLA:CPU linalg custom calls)
# ----------------------------------------------------------------------------------------------
def limit_lapack_threads(n: int | None = None) -> list[str]:
    """Caps the OpenBLAS threads behind XLA:CPU's LAPACK calls (jaxlib -> scipy's OpenBLAS).

    Measured here (2 cores): inside a jitted program, XLA runs its thunks on its own thread pool
    while OpenBLAS's worker threads spin-wait; Cholesky / QR / SVD calls then took 0.5-1 s each
    instead of ~5 ms, making one 1024x1024 decomposition 18 s instead of 0.75 s (same result).
    One OpenBLAS thread removes the contention. n defaults to $CALDERA_LAPACK_THREADS or 1.
    Idempotent; returns the libraries it set (empty when none was found, e.g. no scipy)."""
    import ctypes
    import glob
    import os
    if n is None:
        n = int(os.environ.get("CALDERA_LAPACK_THREADS", "1"))
    done = []
    try:
        import scipy
    except ImportError:            # pragma: no cover
        return done
    libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:            # pragma: no cover
            continue
        for sym in ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                    "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(path)
                break
    return done


limit_lapack_threads()         # at import: every CALDERA module imports this one
