"""Issue 15's study: sensitivity-guided allocation against uniform budgets at equal memory.

    python -m bench.allocation_study [--model smollm2-135m-instruct|ASSET|DIR] [--work DIR]
        [--bits 2,3,4] [--ranks 0,32,64,128] [--points u-b2r32,u-b3r0,u-b4r0,hand-b3r0-protect]
        [--ppl-tokens 8192] [--downstream arc_easy,piqa] [--downstream-limit 500]
        [--out bench/results/allocation_<name>.json]

Steps, each an experiments CLI in a child process (each resumable; a step whose output is complete
is skipped, so rerunning the same command continues where a killed run stopped):
 1. `experiments.sensitivity` at the probe (2-bit Q, rank 0): KL per matrix on held-out text.
 2. `experiments.error_sweep` over the grid (--bits x --ranks) for every matrix.
 3. `experiments.fit_error_model`: the shared-exponent error model and its R².
 4. for every point: its config (the base config with b_q and rank replaced; "hand" = the research
    notes' hand-picked tiers: 3-bit Q, rank 0, the last two layers protected in bf16), a whole-model
    `experiments.compress` with perplexity; then `experiments.allocate` at exactly that checkpoint's
    measured bits/param (sensitivity-weighted), and `experiments.compress` of the allocated config.
 5. downstream (`--downstream`, default none): `experiments.eval` of the uncompressed model and
    of every checkpoint, first --downstream-limit documents of each task (work/eval/<name>/).
 6. a table, JSON and a PNG of perplexity (and mean downstream accuracy) against bits/param
    (uniform, allocated, hand-picked), plus the per-layer sensitivity profile (is it U-shaped?).

Base config: configs/smollm2_default.yaml (E8P Q, uniform 4-bit factors, Q first; one outer
iteration) for every model unless --config. Every figure is read from the jobs' own reports.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import yaml

POINTS = {                                   # name -> (base-config overrides, protect the last N layers)
    "u-b2r32": ({"b_q": 2, "rank": 32}, 0),
    "u-b2r64": ({"b_q": 2, "rank": 64}, 0),
    "u-b3r0": ({"b_q": 3, "rank": 0}, 0),
    "u-b3r32": ({"b_q": 3, "rank": 32}, 0),
    "u-b4r0": ({"b_q": 4, "rank": 0}, 0),
    "hand-b3r0-protect": ({"b_q": 3, "rank": 0}, 2),
}
DEFAULT_POINTS = "u-b2r32,u-b3r0,u-b4r0,hand-b3r0-protect"


def _run(cmd: list[str], log: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def point_config(base: str, name: str, num_layers: int, path: str) -> str:
    """Writes the base config with the point's overrides (and protected last layers) to path."""
    over, protect_last = POINTS[name]
    with open(base) as f:
        d = yaml.safe_load(f)
    d["defaults"].update(over)
    if protect_last:
        d["protect"] = [f"model.layers.{i}.*" for i in range(num_layers - protect_last, num_layers)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"# {name}: {base} with {over}" + (f", last {protect_last} layers in bf16" if protect_last else "")
                + "\n" + yaml.safe_dump(d, sort_keys=False))
    os.replace(tmp, path)
    return path


def compress_row(ckpt: str) -> dict:
    rep = json.load(open(os.path.join(ckpt, "report", "report.json")))
    s, p = rep["summary"], rep.get("perplexity", {})
    return {"bits": s["linear_bits_per_param"], "rel_h": s.get("rel_h_mean"), "ppl": p["after"]["ppl"],
            "ppl_base": p["before"]["ppl"], "ppl_tokens": p["after"]["tokens"], "seconds": rep["wall_seconds"]}


def plot(rows: list[dict], base_ppl: float, sens: dict, title: str, path: str,
         base_acc: float | None = None) -> None:
    from matplotlib.figure import Figure
    panels = 3 if base_acc is not None else 2
    fig = Figure(figsize=(5.5 * panels, 4.2))
    axes = [fig.add_subplot(1, panels, k + 1) for k in range(panels)]
    ax, bx = axes[0], axes[-1]
    metrics = [(ax, "ppl", base_ppl, "held-out perplexity")]
    if base_acc is not None:
        metrics.append((axes[1], "mean_acc", base_acc, "mean downstream accuracy"))
    for a, key, base, label in metrics:
        for kind, style in (("uniform", "o-"), ("allocated", "s-"), ("hand-picked", "^")):
            pts = sorted((r["bits"], r[key]) for r in rows if r["kind"] == kind and r.get(key) is not None)
            if pts:
                a.plot(*zip(*pts), style, label=kind)
        a.axhline(base, color="gray", ls="--", lw=1, label=f"uncompressed {base:.3f}")
        a.set(xlabel="bits / parameter (linears, as stored)", ylabel=label, title=title)
        a.legend()
    layers = sorted(int(k) for k in sens["by_layer"])
    bx.bar(layers, [sens["by_layer"][str(i)]["kl_sum"] for i in layers])
    bx.set(xlabel="layer", ylabel="sum of KL over the layer's 7 matrices (nats/token)", yscale="log",
           title=f"sensitivity (one matrix at b_q={sens['probe']['b_q']}, rank {sens['probe']['rank']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.allocation_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="an asset name, or a model path")
    ap.add_argument("--config", default=os.path.join("configs", "smollm2_default.yaml"))
    ap.add_argument("--work", default=None, help="default runs/allocation-<model name>")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--ranks", default="0,32,64,128")
    ap.add_argument("--probe", default="bits=2,rank=0")
    ap.add_argument("--points", default=DEFAULT_POINTS, help=f"comma-separated, of {list(POINTS)}")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--downstream", default="", help="lm-eval tasks for every checkpoint, e.g. arc_easy,piqa")
    ap.add_argument("--downstream-limit", type=int, default=500)
    ap.add_argument("--out", default=None, help="default bench/results/allocation_<model name>.json")
    args = ap.parse_args(argv)
    points = args.points.split(",")
    if unknown := [p for p in points if p not in POINTS]:
        ap.error(f"--points: unknown {unknown}; known: {list(POINTS)}")

    from bench.common import write_report
    from caldera_jax.checkpoints_io.fingerprint import open_source
    from experiments import assets
    model = args.model if os.path.exists(args.model) else str(assets.fetch(args.model))
    name = os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
    work = args.work or os.path.join("runs", f"allocation-{name}")
    out = args.out or os.path.join("bench", "results", f"allocation_{name}.json")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "study.log")
    num_layers = open_source(model).cfg.num_hidden_layers
    py = [sys.executable, "-m"]
    common = ["--model", model, "--config", args.config]

    sens_dir, sweep_dir, fit_dir = (os.path.join(work, d) for d in ("sens", "sweep", "fit"))
    if not os.path.exists(os.path.join(sens_dir, "sensitivity.json")):
        _run(py + ["experiments.sensitivity", *common, "--probe", args.probe, "--out", sens_dir, "--no-progress"], log)
    _run(py + ["experiments.error_sweep", *common, "--grid", f"bits={args.bits}", f"rank={args.ranks}",
               "--out", sweep_dir, "--no-progress"], log)      # resumes: finished experiments are skipped
    if not os.path.exists(os.path.join(fit_dir, "error_model.json")):
        _run(py + ["experiments.fit_error_model", "--sweep", os.path.join(sweep_dir, "sweep.jsonl"), "--out", fit_dir], log)

    def compress(cfg: str, ckpt: str) -> dict:
        if not os.path.exists(os.path.join(ckpt, "report", "report.json")):
            _run(py + ["experiments.compress", "--model", model, "--config", cfg, "--out", ckpt, "--mesh", "auto",
                       "--ppl-tokens", str(args.ppl_tokens), "--no-progress"], log)
        return compress_row(ckpt)

    rows = []
    for p in points:
        cfg = os.path.join(work, p + ".yaml")
        if not os.path.exists(cfg):
            point_config(args.config, p, num_layers, cfg)
        r = compress(cfg, os.path.join(work, "c-" + p))
        rows.append({"point": p, "kind": "hand-picked" if p.startswith("hand") else "uniform", **r})
        alloc_cfg = os.path.join(work, f"alloc-at-{p}.yaml")
        if not os.path.exists(alloc_cfg):
            _run(py + ["experiments.allocate", *common, "--error-model", os.path.join(fit_dir, "error_model.json"),
                       "--avg-bits", repr(r["bits"]), "--sensitivity", os.path.join(sens_dir, "sensitivity.json"),
                       "--out", alloc_cfg], log)
        a = compress(alloc_cfg, os.path.join(work, "c-alloc-at-" + p))
        plan = json.load(open(os.path.splitext(alloc_cfg)[0] + ".json"))["summary"]
        rows.append({"point": "alloc-at-" + p, "kind": "allocated", **a, "predicted_bits": plan["bits_per_param"],
                     "options": plan["options"]})
        print(f"{p}: {r['bits']:.4f} bits ppl {r['ppl']:.3f} | allocated {a['bits']:.4f} bits "
              f"(predicted {plan['bits_per_param']:.4f}) ppl {a['ppl']:.3f}", flush=True)

    tasks = [t for t in args.downstream.split(",") if t]

    def downstream(path: str, tag: str, source: str | None) -> dict:
        res_dir = os.path.join(work, "eval", tag)
        res = os.path.join(res_dir, f"caldera-jax-{'+'.join(tasks)}-limit{args.downstream_limit}.json")
        if not os.path.exists(res):
            _run(py + ["experiments.eval", "--model", path, "--tasks", ",".join(tasks), "--limit",
                       str(args.downstream_limit), "--out", res_dir, "--batch-size", "8"]
                 + (["--source", source] if source else []), log)
        got = json.load(open(res))["results"]
        out = {f"{t}_acc": got[t]["acc,none"] for t in tasks}
        out.update({f"{t}_acc_stderr": got[t]["acc_stderr,none"] for t in tasks})
        out["mean_acc"] = sum(out[f"{t}_acc"] for t in tasks) / len(tasks)
        return out

    base_down = None
    if tasks:
        base_down = downstream(model, "source", None)
        for r in rows:
            r.update(downstream(os.path.join(work, "c-" + r["point"]), "c-" + r["point"], model))
    base_ppl = rows[0]["ppl_base"]
    for r in rows:
        r["ppl_vs_base_pct"] = 100 * (r["ppl"] / base_ppl - 1)
    sens = json.load(open(os.path.join(sens_dir, "sensitivity.json")))
    fit = json.load(open(os.path.join(fit_dir, "fit.json")))
    plot(rows, base_ppl, sens, name, os.path.splitext(out)[0] + ".png",
         base_down["mean_acc"] if base_down else None)
    write_report(out, "allocation_study", rows,
                 ["point", "kind", "bits", "predicted_bits", "rel_h", "ppl", "ppl_vs_base_pct", "seconds"]
                 + [f"{t}_acc" for t in tasks] + (["mean_acc"] if tasks else []),
                 extra={"model": model, "config": args.config, "work": work, "baseline_ppl": base_ppl,
                        "baseline_downstream": base_down, "downstream_limit": args.downstream_limit,
                        "grid": {"bits": args.bits, "ranks": args.ranks}, "probe": args.probe,
                        "sensitivity_by_layer": sens["by_layer"],
                        "fit": {k: fit.get(k) for k in ("kind", "kind_reason", "r2_log", "r2", "by_proj", "params")},
                        "command": "python -m bench.allocation_study " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
