"""What a compression job reports: per-layer rows, totals, the printed table, the error plot.

Inputs are the per-matrix records the pipeline writes (name, layer, shape, params, protected,
bits_per_param, rel_fro, rel_h, corr, ...).
"""
from __future__ import annotations

import math
import os
from typing import Any

from matplotlib.figure import Figure

from caldera_jax.params import param_shapes

PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _proj(name: str) -> str:
    return name.rsplit(".", 2)[-2]


def layer_summary_line(i: int, recs: dict[str, dict], seconds: float) -> str:
    comp = [r for r in recs.values() if not r["protected"]]
    worst = max(recs.values(), key=lambda r: r["rel_h"])
    par = sum(r["params"] for r in recs.values())
    bits = sum(r["params"] * r["bits_per_param"] for r in recs.values()) / par
    return (f"layer {i:3d}: {len(recs)} matrices ({len(recs) - len(comp)} protected)  "
            f"rel-fro {sum(r['rel_fro'] for r in recs.values()) / len(recs):.4f}  "
            f"H-err {sum(r['rel_h'] for r in recs.values()) / len(recs):.4f} "
            f"(worst {_proj(worst['name'])} {worst['rel_h']:.4f})  {bits:.2f} bits/param  {seconds:.1f}s")


def layer_rows(matrices: dict[str, dict], cfg) -> list[dict[str, Any]]:
    rows = []
    for i in range(cfg.num_hidden_layers):
        recs = [r for r in matrices.values() if r["layer"] == i]
        par = sum(r["params"] for r in recs)
        row = {"layer": i, "params": par,
               "bits_per_param": sum(r["params"] * r["bits_per_param"] for r in recs) / par,
               "rel_fro_mean": sum(r["rel_fro"] for r in recs) / len(recs),
               "rel_h_mean": sum(r["rel_h"] for r in recs) / len(recs),
               "corr_min": min(r["corr"] for r in recs), "protected": sum(r["protected"] for r in recs)}
        for r in recs:
            row[f"rel_h:{_proj(r['name'])}"] = r["rel_h"]
            row[f"rel_fro:{_proj(r['name'])}"] = r["rel_fro"]
        rows.append(row)
    return rows


def totals(matrices: dict[str, dict], cfg, out: str) -> dict[str, Any]:
    comp = [r for r in matrices.values()]
    par = sum(r["params"] for r in comp)
    all_params = sum(math.prod(s) for s in param_shapes(cfg).values())
    files = 0
    for root, _, fs in os.walk(out):
        if "report" in os.path.relpath(root, out).split(os.sep):
            continue
        files += sum(os.path.getsize(os.path.join(root, f)) for f in fs if f.endswith(".safetensors"))
    return {"matrices": len(comp), "protected": sum(r["protected"] for r in comp),
            "linear_params": par,
            "linear_bits_per_param": sum(r["params"] * r["bits_per_param"] for r in comp) / par,
            "rel_fro_mean": sum(r["rel_fro"] for r in comp) / len(comp),
            "rel_h_mean": sum(r["rel_h"] for r in comp) / len(comp),
            "corr_min": min(r["corr"] for r in comp),
            "model_params": all_params, "weight_file_bytes": files,
            "model_bits_per_param": 8 * files / all_params}


def format_table(rows: list[dict], summary: dict) -> str:
    """The per-layer H-weighted error table and the totals line, as printed by the CLI."""
    projs = [p for p in PROJ_ORDER if any(f"rel_h:{p}" in r for r in rows)]
    head = ["layer"] + [p.removesuffix("_proj") for p in projs] + ["mean", "corr_min", "bits"]
    lines = ["H-weighted relative error sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)) by layer and projection",
             "  ".join(f"{h:>7}" for h in head)]
    for r in rows:
        cells = [f"{r['layer']:>7d}"] + [f"{r.get(f'rel_h:{p}', float('nan')):7.4f}" for p in projs]
        cells += [f"{r['rel_h_mean']:7.4f}", f"{r['corr_min']:7.4f}", f"{r['bits_per_param']:7.3f}"]
        lines.append("  ".join(cells) + ("  (protected: %d)" % r["protected"] if r["protected"] else ""))
    s = summary
    lines.append(f"all: {s['matrices']} matrices ({s['protected']} protected)  mean rel-fro "
                 f"{s['rel_fro_mean']:.4f}  mean H-err {s['rel_h_mean']:.4f}  min corr {s['corr_min']:.4f}  "
                 f"linears {s['linear_bits_per_param']:.3f} bits/param  whole model "
                 f"{s['model_bits_per_param']:.3f} bits/param ({s['weight_file_bytes'] / 1e6:.1f} MB of weights)")
    return "\n".join(lines)


def plot_errors(rows: list[dict], path: str) -> None:
    """PNG of the H-weighted and Frobenius errors by layer, one line per projection (a
    matplotlib Figure without pyplot: no global backend is switched)."""
    projs = [p for p in PROJ_ORDER if any(f"rel_h:{p}" in r for r in rows)]
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, 2)
    for ax, metric, title in ((axes[0], "rel_h", "H-weighted relative error"),
                              (axes[1], "rel_fro", "relative Frobenius error")):
        for p in projs:
            ax.plot([r["layer"] for r in rows], [r.get(f"{metric}:{p}", float("nan")) for r in rows],
                    marker="o", ms=3, label=p)
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
