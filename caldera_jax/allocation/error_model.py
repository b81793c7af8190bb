"""Error model of the decomposition: predicted H-weighted relative error of matrix i at (bits, rank).

Parametric (the research notes' form, shared α, β, γ, δ; one scale s_i per matrix):

    E_i(b, r) = s_i · (α · 2^(−β·b) + γ · (r + 1)^(−δ))

fitted by least squares on log E (variable projection: for given (α, β, γ, δ) the best log s_i is
the mean residual of matrix i, so only the four shared parameters are optimised, scipy
least_squares from a few starts). The scales are normalised to geometric mean 1 (α, γ absorb it).
R² is reported on log E (the fitted quantity) and on E, overall and per projection type.

Fallback (`kind="interpolation"`, used when the parametric R² on log E < R2_FALLBACK): per matrix,
the measured errors themselves on the grid, bilinear in (b, log(r+1)) on log E between grid points.
Matrices not in the sweep (layers not swept) get, per projection type, the median scale
(parametric) or the median measured error per grid point (interpolation).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from caldera_jax.allocation.options import proj_of

R2_FALLBACK = 0.7
PARAMS = ("alpha", "beta", "gamma", "delta")


class ErrorModelError(ValueError):
    """Bad sweep data or model file; the message names the field or matrix."""


def curve(b, r, alpha: float, beta: float, gamma: float, delta: float):
    """α·2^(−β·b) + γ·(r+1)^(−δ) (numpy broadcasting; b in bits, r the rank)."""
    b, r = np.asarray(b, np.float64), np.asarray(r, np.float64)
    return alpha * np.exp2(-beta * b) + gamma * (r + 1.0) ** (-delta)


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(np.sum((y - np.mean(y)) ** 2))
    return float("nan") if ss == 0 else 1.0 - float(np.sum((y - pred) ** 2)) / ss


@dataclasses.dataclass(frozen=True)
class ErrorModel:
    """A fitted model. scales: {matrix name: s_i}; proj_scales: {projection: median s_i};
    table: {matrix: {(b, r): measured error}} (the interpolation data); proj_table likewise by
    projection type (medians); kind: which one `predict` uses."""
    alpha: float
    beta: float
    gamma: float
    delta: float
    scales: dict[str, float]
    proj_scales: dict[str, float]
    table: dict[str, dict[tuple[int, int], float]]
    proj_table: dict[str, dict[tuple[int, int], float]]
    kind: str = "parametric"                    # or "interpolation"
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)   # R², counts, residuals summary

    # -------------------------------------------------------------- prediction
    def predict(self, name: str, b: int, r: int) -> float:
        """Predicted relative error of `name` at b bits, rank r (> 0)."""
        if self.kind == "parametric":
            s = self.scales.get(name)
            if s is None:
                s = self.proj_scales.get(proj_of(name))
            if s is None:
                raise ErrorModelError(f"error model: no scale for {name} (projection {proj_of(name)!r} "
                                      f"not in the sweep: {sorted(self.proj_scales)})")
            return float(s * curve(b, r, self.alpha, self.beta, self.gamma, self.delta))
        t = self.table.get(name) or self.proj_table.get(proj_of(name))
        if t is None:
            raise ErrorModelError(f"error model: no data for {name} (projection {proj_of(name)!r} "
                                  f"not in the sweep: {sorted(self.proj_table)})")
        return interpolate(t, b, r, name)

    def grid(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(bits, ranks) of the sweep the model was fitted on."""
        pts = {k for t in self.table.values() for k in t}
        return tuple(sorted({b for b, _ in pts})), tuple(sorted({r for _, r in pts}))

    # -------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        enc = lambda t: {n: [[b, r, e] for (b, r), e in sorted(v.items())] for n, v in t.items()}  # noqa: E731
        return {"format": "caldera-jax-error-model/1", "kind": self.kind,
                "formula": "E_i(b, r) = s_i * (alpha * 2^(-beta*b) + gamma * (r+1)^(-delta))",
                **{p: getattr(self, p) for p in PARAMS}, "scales": self.scales,
                "proj_scales": self.proj_scales, "table": enc(self.table), "proj_table": enc(self.proj_table),
                "stats": self.stats}

    @classmethod
    def from_json(cls, d: Any, source: str = "<error model>") -> "ErrorModel":
        if not isinstance(d, dict) or d.get("format") != "caldera-jax-error-model/1":
            raise ErrorModelError(f"{source}: not an error model (no 'format': 'caldera-jax-error-model/1')")
        try:
            dec = lambda t: {n: {(int(b), int(r)): float(e) for b, r, e in v} for n, v in t.items()}  # noqa: E731
            m = cls(*(float(d[p]) for p in PARAMS), {k: float(v) for k, v in d["scales"].items()},
                    {k: float(v) for k, v in d["proj_scales"].items()}, dec(d["table"]), dec(d["proj_table"]),
                    str(d["kind"]), dict(d.get("stats", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ErrorModelError(f"{source}: malformed error model ({type(e).__name__}: {e})") from None
        if m.kind not in ("parametric", "interpolation"):
            raise ErrorModelError(f"{source}: kind={m.kind!r} must be 'parametric' or 'interpolation'")
        return m


def interpolate(table: dict[tuple[int, int], float], b: float, r: float, name: str = "") -> float:
    """Measured error at a grid point; between grid points bilinear on log E in (b, log(r+1))."""
    if (b, r) in table:
        return table[(b, r)]
    bs = sorted({k[0] for k in table})
    rs = sorted({k[1] for k in table})
    if not (bs[0] <= b <= bs[-1] and rs[0] <= r <= rs[-1]):
        raise ErrorModelError(f"error model: ({b} bits, rank {r}) of {name} is outside the swept grid "
                              f"bits {bs} x ranks {rs}")
    b0 = max(x for x in bs if x <= b)
    b1 = min(x for x in bs if x >= b)
    r0 = max(x for x in rs if x <= r)
    r1 = min(x for x in rs if x >= r)
    corners = [(b0, r0), (b0, r1), (b1, r0), (b1, r1)]
    if any(c not in table for c in corners):
        raise ErrorModelError(f"error model: {name} lacks grid points around ({b} bits, rank {r})")
    tb = 0.0 if b1 == b0 else (b - b0) / (b1 - b0)
    lr = lambda x: math.log(x + 1.0)  # noqa: E731
    tr = 0.0 if r1 == r0 else (lr(r) - lr(r0)) / (lr(r1) - lr(r0))
    v = {c: math.log(table[c]) for c in corners}
    return math.exp((1 - tb) * ((1 - tr) * v[(b0, r0)] + tr * v[(b0, r1)])
                    + tb * ((1 - tr) * v[(b1, r0)] + tr * v[(b1, r1)]))


# ------------------------------------------------------------------ fitting
def _profile(theta: np.ndarray, y: np.ndarray, b: np.ndarray, r: np.ndarray, idx: np.ndarray, n: int):
    """Residuals of log E with the per-matrix log s profiled out; returns (residuals, log s [n])."""
    la, beta, lg, delta = theta
    lf = np.log(curve(b, r, math.exp(la), beta, math.exp(lg), delta))
    d = y - lf
    ls = np.bincount(idx, d, minlength=n) / np.bincount(idx, minlength=n)
    return d - ls[idx], ls


def fit(names: Sequence[str], bits: Sequence[int], ranks: Sequence[int], errors: Sequence[float],
        *, r2_fallback: float = R2_FALLBACK, force_kind: str | None = None) -> ErrorModel:
    """Fits the model to observations (one per (matrix, bits, rank): names [N], bits [N], ranks [N],
    errors [N] relative errors > 0). kind: parametric when R²(log E) ≥ r2_fallback, else
    interpolation (force_kind overrides)."""
    from scipy.optimize import least_squares
    names = list(names)
    b = np.asarray(bits, np.float64)
    r = np.asarray(ranks, np.float64)
    e = np.asarray(errors, np.float64)
    if not (len(names) == len(b) == len(r) == len(e)) or len(e) == 0:
        raise ErrorModelError(f"fit: need equally long, non-empty observations (got {len(names)}, {len(b)}, "
                              f"{len(r)}, {len(e)})")
    bad = np.flatnonzero(~(np.isfinite(e) & (e > 0)))
    if len(bad):
        raise ErrorModelError(f"fit: error of {names[bad[0]]} at ({int(b[bad[0]])} bits, rank {int(r[bad[0]])}) "
                              f"is {e[bad[0]]!r}; errors must be finite and > 0 ({len(bad)} such)")
    uniq = sorted(set(names))
    pos = {n: i for i, n in enumerate(uniq)}
    idx = np.array([pos[n] for n in names])
    y = np.log(e)
    if len(set(zip(b.tolist(), r.tolist()))) < 3:
        raise ErrorModelError(f"fit: {len(set(zip(b.tolist(), r.tolist())))} distinct (bits, rank) points; "
                              "need at least 3 (e.g. bits=2,3,4 rank=0,64)")
    fun = lambda th: _profile(th, y, b, r, idx, len(uniq))[0]  # noqa: E731
    best = None
    for start in ([0.0, 1.0, -3.0, 0.5], [0.0, 2.0, -1.0, 1.0], [1.0, 0.5, -5.0, 0.2], [0.0, 1.0, 0.0, 2.0]):
        res = least_squares(fun, np.array(start), bounds=([-30, 0.0, -30, 0.0], [30, 20.0, 30, 10.0]),
                            x_scale=[1.0, 0.5, 1.0, 0.5], xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=5000)
        if best is None or res.cost < best.cost:
            best = res
    theta = best.x
    resid, ls = _profile(theta, y, b, r, idx, len(uniq))
    shift = float(np.mean(ls))                         # geometric mean of s_i -> 1
    alpha, gamma = math.exp(theta[0] + shift), math.exp(theta[2] + shift)
    beta, delta = float(theta[1]), float(theta[3])
    scales = {n: math.exp(ls[i] - shift) for n, i in pos.items()}
    pred_log = y - resid
    projs = np.array([proj_of(n) for n in names])
    by_proj = {p: {"r2_log": r2(y[projs == p], pred_log[projs == p]),
                   "r2": r2(e[projs == p], np.exp(pred_log[projs == p])),
                   "n": int(np.sum(projs == p))} for p in sorted(set(projs.tolist()))}
    stats = {"r2_log": r2(y, pred_log), "r2": r2(e, np.exp(pred_log)), "by_proj": by_proj,
             "n_observations": int(len(e)), "n_matrices": len(uniq),
             "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))),
             "max_abs_log_residual": float(np.max(np.abs(resid))), "r2_fallback": r2_fallback}
    table: dict[str, dict[tuple[int, int], float]] = {}
    for n, bb, rr, ee in zip(names, b, r, e):
        table.setdefault(n, {})[(int(bb), int(rr))] = float(ee)
    proj_scales, proj_table = {}, {}
    for p in sorted(set(projs.tolist())):
        mats = [n for n in uniq if proj_of(n) == p]
        proj_scales[p] = float(np.median([scales[n] for n in mats]))
        pts = sorted({k for n in mats for k in table[n]})
        proj_table[p] = {k: float(np.median([table[n][k] for n in mats if k in table[n]])) for k in pts}
    kind = force_kind or ("parametric" if stats["r2_log"] >= r2_fallback else "interpolation")
    stats["kind_reason"] = (f"forced {force_kind}" if force_kind else
                            f"R²(log E) = {stats['r2_log']:.3f} {'>=' if kind == 'parametric' else '<'} {r2_fallback}")
    return ErrorModel(alpha, beta, gamma, delta, scales, proj_scales, table, proj_table, kind, stats)


def residuals(model: ErrorModel) -> list[dict[str, Any]]:
    """Per observation of the fit: matrix, projection, bits, rank, measured, parametric prediction,
    log residual (for the residual plot)."""
    out = []
    for n, t in model.table.items():
        s = model.scales[n]
        for (bb, rr), ee in sorted(t.items()):
            p = s * float(curve(bb, rr, model.alpha, model.beta, model.gamma, model.delta))
            out.append({"name": n, "proj": proj_of(n), "bits": bb, "rank": rr, "error": ee,
                        "predicted": p, "log_residual": math.log(ee) - math.log(p)})
    return out
