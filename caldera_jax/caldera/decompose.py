"""CALDERA decomposition of one weight matrix (or a stack, or many over a device mesh): W ≈ Q + L·R.

    qlr, metrics = decompose(w [m, n], h [n, n], budget)             # one matrix, jit (budget static)
    qlr, metrics = decompose_stack(ws [E, m, n], hs [E, n, n], budget)  # vmap over experts
    results = decompose_many([(w, h), ...], budget, mesh=None)        # spread over a mesh's devices
    decompose_q_only(w, h, budget)                                    # the rank-0 baseline
    decompose(..., mode="nearest")                                    # no LDLQ (nearest rounding)

The algorithm (all inside one jit):
  1. Checks on the host (shape, NaN/Inf, symmetric/PSD H, rank ≤ min(m, n)): clear errors first.
  2. H_reg = H / mean(diag H) + sigma_reg·I; W_s = W / rms(W) (the global `scale`, kept).
  3. Optional incoherence (random signs + Walsh-Hadamard on both sides; H rotated consistently).
  4. `iters` outer iterations, each an LR step and a Q step in `budget.order` (lr_first: LR, Q):
       LR step: lowrank.lr_step on W_s − Q (closed form + LPLR with quantized factors).
       Q step : LDLQ of W_s − L·R with H's block LDL factor (+ requant_sweeps sweeps);
                with hessian_downdate, LDLQ uses H − H Rᵀ(R H Rᵀ)⁻¹ R H (+ridge), the error
                metric left after L is refitted for the current R, and L is then refitted (kept
                only if it lowers the error).
     After every step the objective sqrt(tr(E H_reg Eᵀ) / tr(W_s H_reg W_sᵀ)) is recorded and the
     best (Q, L, R) so far is kept (jnp.where over the whole state pytree; the all-zero start state,
     error 1, is a valid candidate, so the result is never worse than W ≈ 0).
  5. Metrics on the original weights: relative Frobenius error, H-weighted relative error (raw H,
     normalised, no ridge), the objective with the ridge, correlation of reconstructed vs original
     weights, bits per parameter (codes + fp16 scales/zeros + factors), error history, best step.
Rank 0 = Q only: a single Q step (iterations cannot change it).

One upper Cholesky factor C of H_reg (float32, hessian.robust_cholesky: a NaN pivot is retried
with growing jitter inside the jit, reported as metrics["chol_jitter"]; nothing waits on the host,
so calls on different devices run concurrently) serves LDLQ for Q, LDLQ for R and, as the square root S = C in the LR step's
closed form, the weighted SVD. vmap / shard_map results equal the per-matrix ones up to float
reassociation in batched matmuls (Q only: identical codes; with LR: can flip a few roundings).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from caldera_jax.caldera import hessian as hs
from caldera_jax.caldera import ldlq
from caldera_jax.caldera import lowrank
from caldera_jax.caldera.spec import MatrixBudget
from caldera_jax.formats import incoherence as inc
from caldera_jax.formats import quant as qb
from caldera_jax.formats.qlr_weight import QLRWeight

MODES = ("ldlq", "nearest")


class DecomposeError(ValueError):
    """Bad input to decompose (the message says which)."""


class Parts(NamedTuple):
    """What the jitted core returns (a pytree; stacked along a leading axis for stacks)."""
    q: qb.QuantizedMatrix        # Q in the (rotated, scaled) working space
    l: Any                       # QuantizedMatrix [m, r] or bf16 [m, r]  (None-free: rank 0 → [m, 0])
    r: Any                       # QuantizedMatrix [r, n] or bf16 [r, n]
    scale: jax.Array             # [] global scale: W ≈ scale · rotation⁻¹(Q + L R)
    signs_in: jax.Array          # [n] ±1 (all +1 without incoherence)
    signs_out: jax.Array         # [m] ±1


# ----------------------------------------------------------------------------------------------
# incoherence adapter (Q's incoherence.py)
# ----------------------------------------------------------------------------------------------
def _rotate(w, h_list, key, incoherent: bool):
    """-> (w_rot, [h_rot...], signs_in [n], signs_out [m]) with incoherence.py's conventions."""
    m, n = w.shape
    if not incoherent:
        return w, h_list, jnp.ones((n,), jnp.float32), jnp.ones((m,), jnp.float32)
    s_out, s_in = inc.make_signs(key, (m, n))
    return (inc.rotate(w, s_out, s_in), [inc.rotate_hessian(h, s_in) for h in h_list], s_in, s_out)


def _unrotate(w_rot, signs_in, signs_out, incoherent: bool):
    if not incoherent:
        return w_rot
    return inc.unrotate(w_rot, signs_out, signs_in)


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def named_errors(matrix: str, layer: int | None = None):
    """Puts the matrix (and its layer) in front of any ValueError raised inside (DecomposeError,
    HessianError, BudgetError, ...; same type): `model.layers.1.mlp.down_proj (layer 1): decompose:
    H: ...`. What a whole-model job wraps each decompose / decompose_many call in."""
    prefix = matrix.removesuffix(".weight") + ("" if layer is None else f" (layer {layer})")
    try:
        yield
    except ValueError as e:
        msg = str(e)
        if msg.startswith(prefix):
            raise
        try:
            named = type(e)(f"{prefix}: {msg}")
        except Exception:          # an exception type that wants other arguments
            named = DecomposeError(f"{prefix}: {msg}")
        raise named.with_traceback(e.__traceback__) from None


def check_inputs(w, h, budget: MatrixBudget, where: str = "decompose") -> tuple[int, int]:
    """Host-side validation; raises DecomposeError / BudgetError / HessianError naming the problem."""
    if not isinstance(budget, MatrixBudget):
        raise DecomposeError(f"{where}: budget must be a MatrixBudget, got {type(budget).__name__}")
    m, n = hs.check_weight(w, where=f"{where}: W")
    # PSD within a fraction of the ridge decompose adds (sigma_reg · mean diag): anything the
    # ridge dominates is float32 rounding of Σ xᵀx, not an error
    hs.check_hessian(h, n, where=f"{where}: H", ridge=budget.sigma_reg)
    budget.validate((m, n), where=where)
    if budget.incoherence:
        for side, k in (("m (output rows)", m), ("n (input columns)", n)):
            if not inc.is_supported(k):
                raise DecomposeError(
                    f"{where}: incoherence=True but {side} = {k} has no Hadamard transform (sizes "
                    f"2^k or 2^k·K, K in {inc.BASES}); set incoherence=False for this matrix")
    return m, n


@functools.lru_cache(maxsize=None)
def bits_per_param(budget: MatrixBudget, shape: tuple[int, int]) -> float:
    """Stored bits per weight of the compressed matrix, exactly as QLRWeight.bits_per_param counts
    them (packed codes + fp16 scales/zeros + packed or bf16 factors + fp32 scale + packed signs),
    from shapes only (jax.eval_shape; nothing is computed)."""
    m, n = shape
    r = budget.rank
    spec_q = qb.QuantSpec.for_q(budget)
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    q = jax.eval_shape(lambda x: qb.quantize(x, spec_q), sds(m, n))
    facs = []
    for which, shp in (("l", (m, r)), ("r", (r, n))):
        spec = qb.QuantSpec.for_factors(budget, which) if r else None
        facs.append(jax.ShapeDtypeStruct(shp, jnp.bfloat16) if spec is None
                    else jax.eval_shape(lambda x, s=spec: qb.quantize(x, s), sds(*shp)))
    parts = Parts(q, facs[0], facs[1], sds(), sds(n), sds(m))
    qlr = jax.eval_shape(lambda p: to_qlr(p, budget, shape), parts)
    return float(qlr.bits_per_param())


# ----------------------------------------------------------------------------------------------
# the core (one matrix; pure, jittable, vmappable)
# ----------------------------------------------------------------------------------------------
class _State(NamedTuple):
    q_hat: jax.Array
    q: Any
    l_hat: jax.Array
    r_hat: jax.Array
    l: Any
    r: Any


def _zeros_of(fn, *shapes):
    out = jax.eval_shape(fn, *[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)


def _downdated(h: jax.Array, r_hat: jax.Array, sigma: float) -> jax.Array:
    """H − H Rᵀ (R H Rᵀ)⁻¹ R H, made definite again with a relative ridge (H itself while R = 0)."""
    rh = r_hat @ h                                             # [r, n]
    g = rh @ r_hat.T
    g = g + (1e-5 * jnp.maximum(jnp.mean(jnp.diag(g)), 1e-30)) * jnp.eye(g.shape[0], dtype=g.dtype)
    hd = h - rh.T @ jnp.linalg.solve(g, rh)
    hd = 0.5 * (hd + hd.T)
    hd = hd + (max(sigma, 1e-3) * jnp.mean(jnp.diag(h))) * jnp.eye(h.shape[0], dtype=h.dtype)
    return jnp.where(jnp.any(r_hat != 0), hd, h)


def _core(w, h, key, *, budget: MatrixBudget, mode: str, svd_method: str, robust: bool = True):
    m, n = w.shape
    r = budget.rank
    spec_q = qb.QuantSpec.for_q(budget)
    spec_l = qb.QuantSpec.for_factors(budget, "l") if r else None
    spec_r = qb.QuantSpec.for_factors(budget, "r") if r else None
    method = lowrank.svd_method_for((m, n), r, svd_method) if r else "exact"

    w = jnp.asarray(w, jnp.float32)
    scale = jnp.sqrt(jnp.mean(w * w))
    ws = w / scale
    h_n = hs.normalize(h)
    h_reg = h_n + budget.sigma_reg * jnp.eye(n, dtype=jnp.float32)
    k_inc, k_svd = jax.random.split(key)
    ws, (h_reg,), s_in, s_out = _rotate(ws, [h_reg], k_inc, budget.incoherence)

    denom = hs.weighted_sq_error(ws, h_reg)
    chol = hs.upper_cholesky(h_reg, robust)                   # H_reg = C Cᵀ, shared by LDLQ and LR
    jitter = chol[1]
    fac_q = ldlq.factors_for(h_reg, spec_q, chol=chol) if mode == "ldlq" else None
    if r:
        c_inv = jax.scipy.linalg.solve_triangular(chol[0], jnp.eye(n, dtype=jnp.float32), lower=False)
        fac_r = (None if spec_r is None else lowrank.factors_for_r(h_reg, chol) if spec_r.kind == "uniform"
                 else ldlq.factors_for(h_reg, spec_r, chol=chol))      # a lattice R: blocks of 8, padded

    def rel(st):
        e = ws - st.q_hat - st.l_hat @ st.r_hat
        return jnp.sqrt(jnp.maximum(hs.weighted_sq_error(e, h_reg), 0.0) / denom)

    def q_step(st, it):
        target = ws - st.l_hat @ st.r_hat
        if mode == "nearest":
            qm, qh = ldlq.nearest_quantize(target, spec_q)
        elif budget.hessian_downdate and r:
            # not in the first outer iteration: with lr_first that R comes from W alone (Q = 0),
            # and downdating by it measured clearly worse than no downdate (bench matrix, 2-3 bit)
            r_dd = jnp.where(it > 0, st.r_hat, 0.0)
            fac = ldlq.factors_for(_downdated(h_reg, r_dd, budget.sigma_reg), spec_q, robust=robust)
            qm, qh = ldlq.ldlq_quantize(target, fac, spec_q, budget.requant_sweeps)
        else:
            qm, qh = ldlq.ldlq_quantize(target, fac_q, spec_q, budget.requant_sweeps)
        st = st._replace(q_hat=qh, q=qm)
        if mode == "ldlq" and budget.hessian_downdate and r:
            st = _refit_l(st)
        return st

    def _refit_l(st):
        rh = st.r_hat
        hl = rh @ h_reg @ rh.T
        a = ws - st.q_hat
        ridge = (1e-5 * jnp.maximum(jnp.mean(jnp.diag(hl)), 1e-30)) * jnp.eye(r, dtype=hl.dtype)
        l = jnp.linalg.solve(hl + ridge, (a @ h_reg @ rh.T).T).T
        lh, ls = lowrank.quant_l(l, spec_l)
        new = st._replace(l_hat=lh, l=ls)
        better = rel(new) < rel(st)
        return jax.tree.map(lambda x, y: jnp.where(better, x, y), new, st)

    def lr_step(st, it):
        res = lowrank.lr_step(ws - st.q_hat, h_reg, chol[0], c_inv, rank=r, spec_l=spec_l, spec_r=spec_r,
                              fac_r=fac_r, lplr_iters=budget.lplr_iters, svd_method=method,
                              key=jax.random.fold_in(k_svd, it))
        return st._replace(l_hat=res.l_hat, r_hat=res.r_hat, l=res.l_store, r=res.r_store)

    q0 = _zeros_of(lambda x: ldlq.nearest_quantize(x, spec_q)[0], (m, n))
    if r:
        l0 = _zeros_of(lambda x: lowrank.quant_l(x, spec_l)[1], (m, r))
        r0 = _zeros_of(lambda x: lowrank._bf16(x)[1] if spec_r is None else qb.quantize(x, spec_r), (r, n))
    else:
        l0 = jnp.zeros((m, 0), jnp.bfloat16)
        r0 = jnp.zeros((0, n), jnp.bfloat16)
    st0 = _State(jnp.zeros((m, n), jnp.float32), q0, jnp.zeros((m, r), jnp.float32),
                 jnp.zeros((r, n), jnp.float32), l0, r0)

    if r == 0:
        st = q_step(st0, 0)
        best, best_err = st, rel(st)
        hist = best_err[None]
        best_step = jnp.int32(0)
    else:
        steps = (lr_step, q_step) if budget.order == "lr_first" else (q_step, lr_step)
        n_steps = 2 * budget.iters

        def body(i, carry):
            st, best, best_err, best_step, hist = carry
            for j, step in enumerate(steps):
                st = step(st, i)
                e = rel(st)
                k = 2 * i + j
                hist = hist.at[k].set(e)
                better = e < best_err
                best = jax.tree.map(lambda x, y: jnp.where(better, x, y), st, best)
                best_err = jnp.where(better, e, best_err)
                best_step = jnp.where(better, k, best_step)
            return st, best, best_err, best_step, hist

        init = (st0, st0, jnp.float32(1.0), jnp.int32(-1), jnp.zeros((n_steps,), jnp.float32))
        _, best, best_err, best_step, hist = jax.lax.fori_loop(0, budget.iters, body, init)

    # --- metrics in the original space ---
    w_hat_s = _unrotate(best.q_hat + best.l_hat @ best.r_hat, s_in, s_out, budget.incoherence)
    w_hat = w_hat_s * scale
    e = w - w_hat
    rel_fro = jnp.linalg.norm(e) / jnp.linalg.norm(w)
    rel_h = jnp.sqrt(jnp.maximum(hs.weighted_sq_error(e, h_n), 0.0) / hs.weighted_sq_error(w, h_n))
    wc = w - jnp.mean(w)
    whc = w_hat - jnp.mean(w_hat)
    corr = jnp.sum(wc * whc) / jnp.sqrt(jnp.sum(wc * wc) * jnp.sum(whc * whc))
    metrics = dict(rel_fro=rel_fro, rel_err_h=rel_h, rel_err_h_reg=best_err, corr=corr,
                   history=hist, best_step=best_step, chol_jitter=jitter)
    parts = Parts(q=best.q, l=best.l, r=best.r, scale=scale, signs_in=s_in, signs_out=s_out)
    return parts, metrics


@functools.partial(jax.jit, static_argnames=("budget", "mode", "svd_method", "robust"))
def _core_jit(w, h, key, *, budget, mode, svd_method, robust=True):
    return _core(w, h, key, budget=budget, mode=mode, svd_method=svd_method, robust=robust)


@functools.partial(jax.jit, static_argnames=("budget", "mode", "svd_method", "robust"))
def _core_stack_jit(ws, hs_, keys, *, budget, mode, svd_method, robust=True):
    f = functools.partial(_core, budget=budget, mode=mode, svd_method=svd_method, robust=robust)
    return jax.vmap(f)(ws, hs_, keys)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _key(key, budget: MatrixBudget):
    if key is None:
        return jax.random.PRNGKey(budget.seed)
    if isinstance(key, (int, np.integer)):
        return jax.random.PRNGKey(int(key))
    return key


def _check_mode(mode: str, svd_method: str):
    if mode not in MODES:
        raise DecomposeError(f"decompose: mode={mode!r} must be one of {MODES}")
    if svd_method not in ("auto", "exact", "randomized"):
        raise DecomposeError(f"decompose: svd_method={svd_method!r} must be auto|exact|randomized")


def to_qlr(parts: Parts, budget: MatrixBudget, shape: tuple[int, int]):
    """Builds the QLRWeight (Q's compressed-matrix object) from the core's parts."""
    return QLRWeight.from_parts(parts.q, parts.l if budget.rank else None,
                                parts.r if budget.rank else None, parts.scale,
                                parts.signs_in if budget.incoherence else None,
                                parts.signs_out if budget.incoherence else None)


def metrics_to_host(metrics: dict) -> dict:
    """Metrics as plain Python floats / ints / lists (JSON-ready)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else (int(a) if a.dtype.kind in "iu" else float(a))
    return out


def _finish(parts, metrics, budget, shape, return_parts):
    metrics = dict(metrics)
    metrics["bits_per_param"] = bits_per_param(budget, shape)
    if return_parts:
        return parts, metrics
    return to_qlr(parts, budget, shape), metrics


def decompose(w, h, budget: MatrixBudget, key=None, *, mode: str = "ldlq", svd_method: str = "auto",
              return_parts: bool = False):
    """CALDERA decomposition of one matrix w [m, n] against H [n, n].

    Returns (QLRWeight, metrics) — metrics: rel_fro, rel_err_h, rel_err_h_reg, corr, history
    [2·iters] (objective after every step; [1] for rank 0), best_step, chol_jitter (jax scalars /
    arrays) and bits_per_param (float). return_parts=True gives the raw `Parts` instead of the
    QLRWeight. mode="nearest" replaces LDLQ by nearest rounding (baseline)."""
    _check_mode(mode, svd_method)
    shape = check_inputs(w, h, budget)
    args = (jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), _key(key, budget))
    parts, metrics = _core_jit(*args, budget=budget, mode=mode, svd_method=svd_method)
    return _finish(parts, metrics, budget, shape, return_parts)


def decompose_q_only(w, h, budget: MatrixBudget, key=None, **kw):
    """The Q-only baseline (rank 0, same quantizer and settings)."""
    return decompose(w, h, budget.replace(rank=0), key, **kw)


def _stack_keys(key, budget, e):
    k = _key(key, budget)
    if k.ndim == 1 and k.shape[0] == 2 and e is not None:       # one key for every matrix
        return jnp.broadcast_to(k, (e, 2))
    return k


def decompose_stack(ws, hs_, budget: MatrixBudget, key=None, *, mode: str = "ldlq",
                    svd_method: str = "auto", return_parts: bool = False):
    """vmap of decompose over a stack: ws [E, m, n], hs [E, n, n]. key: one key (shared: every
    matrix gets what decompose(w_i, h_i, budget, key) gives) or keys [E, 2].
    Returns (stacked QLRWeight or Parts with a leading E axis, metrics with a leading E axis)."""
    _check_mode(mode, svd_method)
    if np.ndim(ws) != 3 or np.ndim(hs_) != 3 or np.shape(ws)[0] != np.shape(hs_)[0]:
        raise DecomposeError(f"decompose_stack: need ws [E, m, n] and hs [E, n, n], got "
                             f"{np.shape(ws)} and {np.shape(hs_)}")
    e = np.shape(ws)[0]
    for i in range(e):
        shape = check_inputs(ws[i], hs_[i], budget, where=f"decompose_stack[{i}]")
    args = (jnp.asarray(ws, jnp.float32), jnp.asarray(hs_, jnp.float32), _stack_keys(key, budget, e))
    parts, metrics = _core_stack_jit(*args, budget=budget, mode=mode, svd_method=svd_method)
    return _finish(parts, metrics, budget, shape, return_parts)


def unstack(tree, i: int):
    """Item i of a stacked result (Parts / QLRWeight / metrics)."""
    return jax.tree.map(lambda x: x[i] if hasattr(x, "ndim") and x.ndim > 0 else x, tree)


def _flat_mesh(mesh: Mesh | None) -> tuple[Mesh, tuple[str, ...]]:
    if mesh is None:
        devs = jax.devices()
        mesh = jax.make_mesh((len(devs),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    return mesh, tuple(mesh.axis_names)


@functools.lru_cache(maxsize=None)
def _sharded_fn(mesh: Mesh, axes: tuple[str, ...], budget: MatrixBudget, mode: str, svd_method: str,
                robust: bool = True):
    f = functools.partial(_core, budget=budget, mode=mode, svd_method=svd_method, robust=robust)
    spec = P(axes)
    sm = jax.shard_map(jax.vmap(f), mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)
    shard = NamedSharding(mesh, spec)
    return jax.jit(sm, in_shardings=(shard, shard, shard), out_shardings=shard), shard


def decompose_many(items: Sequence[tuple[Any, Any]], budget: MatrixBudget | Sequence[MatrixBudget],
                   mesh: Mesh | None = None, key=None, *, mode: str = "ldlq",
                   svd_method: str = "auto", return_parts: bool = False):
    """Independent decompositions spread over every device of `mesh` (default: all devices).

    items: [(w_i, h_i), ...]; budget: one for all, or one per item. Matrices with the same shape
    and budget are stacked, padded to a multiple of the device count and run as one shard_map'd
    vmap (each device decomposes its slice; no communication). Returns [(QLRWeight | Parts,
    metrics), ...] in input order; identical to decompose(w_i, h_i, budget_i, key) per item."""
    _check_mode(mode, svd_method)
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * len(items)
    if len(budgets) != len(items):
        raise DecomposeError(f"decompose_many: {len(budgets)} budgets for {len(items)} matrices")
    shapes = [check_inputs(w, h, b, where=f"decompose_many[{i}]")
              for i, ((w, h), b) in enumerate(zip(items, budgets))]
    mesh, axes = _flat_mesh(mesh)
    ndev = math.prod(mesh.shape[a] for a in axes)
    k = _key(key, budgets[0]) if key is not None else None
    groups: dict[tuple, list[int]] = {}
    for i, (s, b) in enumerate(zip(shapes, budgets)):
        groups.setdefault((s, b), []).append(i)
    out: list[Any] = [None] * len(items)
    for (shape, b), idx in groups.items():
        fn, shard = _sharded_fn(mesh, axes, b, mode, svd_method)
        e = len(idx)
        e_pad = -(-e // ndev) * ndev
        pad = idx + [idx[-1]] * (e_pad - e)
        ws = np.stack([np.asarray(items[i][0], np.float32) for i in pad])
        hs_ = np.stack([np.asarray(items[i][1], np.float32) for i in pad])
        kk = jnp.broadcast_to(k if k is not None else jax.random.PRNGKey(b.seed), (e_pad, 2))
        ws, hs_, kk = (jax.device_put(x, shard) for x in (ws, hs_, kk))
        parts, metrics = fn(ws, hs_, kk)
        parts, metrics = jax.device_get((parts, metrics))
        for j, i in enumerate(idx):
            p_i, m_i = unstack((parts, metrics), j)
            out[i] = _finish(jax.tree.map(jnp.asarray, p_i), m_i, b, shape, return_parts)
    return out
