"""Our lm-eval adapter against lm-eval's own hf backend: seconds per 100 documents and accuracy,
side by side, each run in its own process (as a user runs `experiments.eval`), rounds interleaved.

    python -m bench.lmeval_speed [--model smollm2-135m-instruct|DIR] [--tasks arc_easy,piqa]
        [--limit 500] [--rounds 2] [--batch-size 8] [--out bench/results/lmeval_speed.json]

Per (task, round): `experiments.eval --no-cache` with our adapter, then with `--lm hf`, on the same
documents; the XLA compilation cache stays on (a user's second run), lm-eval's request cache off.
The table gives each run's s/100, the median ratio hf ÷ ours (above 1: ours faster) and whether the
two agree on acc / acc_norm. Keep the machine otherwise idle: torch's threads suffer more than XLA's
from other load (BENCHMARKS.md, "lm-eval").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run_eval(model: str, task: str, limit: int, batch: int, lm: str, out: str) -> dict:
    """One `experiments.eval` process -> its result JSON."""
    cmd = [sys.executable, "-m", "experiments.eval", "--model", model, "--tasks", task, "--limit", str(limit),
           "--batch-size", str(batch), "--no-cache", "--lm", lm, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, f"{lm}-{task}-limit{limit}.json")) as f:
        return json.load(f)


def metrics(res: dict, task: str) -> dict:
    r = res["results"][task]
    return {"acc": r.get("acc,none"), "acc_norm": r.get("acc_norm,none"),
            "s_per_100": res["caldera"]["s_per_100_examples"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="an asset name or a HF directory")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=os.path.join("bench", "results", "lmeval_speed.json"))
    args = ap.parse_args(argv)

    from bench.common import write_report
    from experiments import assets
    model = args.model if os.path.exists(args.model) else str(assets.fetch(args.model))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            runs = []
            for k in range(args.rounds):
                ours = metrics(run_eval(model, task, args.limit, args.batch_size, "caldera-jax", tmp), task)
                hf = metrics(run_eval(model, task, args.limit, args.batch_size, "hf", tmp), task)
                runs.append((ours, hf))
                print(f"{task} round {k + 1}: ours {ours['s_per_100']} s/100, hf {hf['s_per_100']} s/100", flush=True)
            ours0, hf0 = runs[0]
            speedup = statistics.median(h["s_per_100"] / o["s_per_100"] for o, h in runs)
            same = all(o["acc"] == h["acc"] and o["acc_norm"] == h["acc_norm"] for o, h in runs)
            rows.append({"task": task, "docs": args.limit, "ours_s_per_100": [o["s_per_100"] for o, _ in runs],
                         "hf_s_per_100": [h["s_per_100"] for _, h in runs], "speedup_median": round(speedup, 2),
                         "acc": ours0["acc"], "acc_norm": ours0["acc_norm"], "same_accuracy": same})
    write_report(args.out, "lmeval_speed", rows,
                 ["task", "docs", "ours_s_per_100", "hf_s_per_100", "speedup_median", "acc", "acc_norm",
                  "same_accuracy"], {"model": model, "batch_size": args.batch_size, "rounds": args.rounds})


if __name__ == "__main__":
    main()
