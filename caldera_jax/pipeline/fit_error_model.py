"""Fitting the error model to a sweep as a library call: read sweep.jsonl, fit, write the model,
a fit report and a residual plot.

    rep = run(FitJob(sweep="runs/sweep/sweep.jsonl", out="runs/fit"))
    # out/error_model.json (caldera_jax.allocation.error_model.ErrorModel.to_json), out/fit.json
    # (R² overall and per projection, parameters, residuals), out/residuals.png
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from caldera_jax.allocation import error_model as em
from caldera_jax.pipeline.error_sweep import SweepError, read_records, write_json_atomic
from caldera_jax.pipeline.report import PROJ_ORDER

MODEL_FILE = "error_model.json"


@dataclasses.dataclass(frozen=True)
class FitJob:
    sweep: str                        # sweep.jsonl (or the sweep directory)
    out: str                          # output directory
    r2_fallback: float = em.R2_FALLBACK
    force_kind: str | None = None     # "parametric" | "interpolation" | None (decided by R²)


def load_observations(path: str) -> tuple[list[str], list[int], list[int], list[float]]:
    if os.path.isdir(path):
        path = os.path.join(path, "sweep.jsonl")
    if not os.path.isfile(path):
        raise SweepError(f"{path}: sweep file not found")
    recs = read_records(path)
    if not recs:
        raise SweepError(f"{path}: no experiments in the sweep file")
    try:
        return ([r["name"] for r in recs], [int(r["b_q"]) for r in recs], [int(r["rank"]) for r in recs],
                [float(r["rel_h"]) for r in recs])
    except (KeyError, TypeError, ValueError) as e:
        raise SweepError(f"{path}: a line lacks name / b_q / rank / rel_h ({type(e).__name__}: {e})") from None


def plot_residuals(model: em.ErrorModel, path: str) -> None:
    """Left: measured vs predicted (log-log) by projection; right: log residual by bits and rank."""
    res = em.residuals(model)
    fig = Figure(figsize=(12, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    projs = [p for p in PROJ_ORDER if any(r["proj"] == p for r in res)] + sorted(
        {r["proj"] for r in res} - set(PROJ_ORDER))
    for p in projs:
        rr = [r for r in res if r["proj"] == p]
        ax1.scatter([r["predicted"] for r in rr], [r["error"] for r in rr], s=10, label=p, alpha=0.7)
    lo = min(min(r["error"], r["predicted"]) for r in res)
    hi = max(max(r["error"], r["predicted"]) for r in res)
    ax1.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("predicted (parametric)")
    ax1.set_ylabel("measured rel. H-weighted error")
    st = model.stats
    ax1.set_title(f"R²(log E) {st['r2_log']:.3f}, R²(E) {st['r2']:.3f}; used: {model.kind}")
    ax1.legend(fontsize=7, ncol=2)
    ranks = sorted({r["rank"] for r in res})
    for b in sorted({r["bits"] for r in res}):
        ys = [np.mean([r["log_residual"] for r in res if r["bits"] == b and r["rank"] == k]) for k in ranks]
        ax2.plot(range(len(ranks)), ys, marker="o", label=f"{b} bits")
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set_xticks(range(len(ranks)), [str(k) for k in ranks])
    ax2.set_xlabel("rank")
    ax2.set_ylabel("mean log(measured / predicted)")
    ax2.set_title("residual by bits and rank")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    os.replace(tmp, path)


def run(job: FitJob) -> dict[str, Any]:
    """Fits and writes; returns the fit report."""
    names, bits, ranks, errors = load_observations(job.sweep)
    model = em.fit(names, bits, ranks, errors, r2_fallback=job.r2_fallback, force_kind=job.force_kind)
    os.makedirs(job.out, exist_ok=True)
    write_json_atomic(os.path.join(job.out, MODEL_FILE), model.to_json())
    rep = {"sweep": os.path.abspath(job.sweep), "kind": model.kind,
           "params": {p: getattr(model, p) for p in em.PARAMS}, **model.stats,
           "grid": {"bits": list(model.grid()[0]), "ranks": list(model.grid()[1])},
           "residuals": em.residuals(model)}
    write_json_atomic(os.path.join(job.out, "fit.json"), rep)
    plot_residuals(model, os.path.join(job.out, "residuals.png"))
    return rep
