"""Allocate per-matrix budgets: exact knapsack over (bits, rank) or bf16 protection, minimising the
predicted sensitivity-weighted error under a memory budget; writes a compress config.

    python -m experiments.allocate --model DIR|FILE.gguf --error-model FIT/error_model.json \\
        --config BASE.yaml (--avg-bits 3.0 | --budget-gb 0.04) [--sensitivity S.json] --out alloc.yaml
    python -m experiments.compress --model DIR --config alloc.yaml --out runs/alloc ...

The budget counts the compressible linears only (q/k/v/o, gate/up/down), in bits exactly as the
checkpoint stores them. Options: the error model's grid (override with --bits / --ranks) and bf16
(--no-protect to drop it). Objective Σ w_i·E_i^p (--power, default 2; w from --sensitivity, else 1).
The job is caldera_jax.pipeline.allocate.
"""
from __future__ import annotations

import argparse
import sys

from caldera_jax import runtime
from caldera_jax.pipeline import allocate as job
from experiments import cli


def _ints(s):
    return None if s is None else tuple(int(x) for x in s.split(",") if x.strip())


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m experiments.allocate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--error-model", required=True)
    ap.add_argument("--config", required=True, help="base job config YAML")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--avg-bits", type=float, help="bits per parameter of the compressible linears")
    g.add_argument("--budget-gb", type=float, help="size of the compressible linears in GB (1e9 bytes)")
    ap.add_argument("--sensitivity", help="weights JSON (experiments.sensitivity output, or {'weights': {glob: w}})")
    ap.add_argument("--bits", help="option bits, e.g. 2,3,4 (default: the error model's grid)")
    ap.add_argument("--ranks", help="option ranks, e.g. 0,32,64,128 (default: the error model's grid)")
    ap.add_argument("--no-protect", action="store_true", help="bf16 protection is not an option")
    ap.add_argument("--power", type=float, default=2.0)
    ap.add_argument("--out", required=True, help="config YAML to write (report beside it as .json)")
    args = ap.parse_args(argv)
    runtime.setup()
    rep = job.run(job.AllocateJob(model=args.model, error_model=args.error_model, config=args.config,
                                  out=args.out, avg_bits=args.avg_bits, budget_gb=args.budget_gb,
                                  sensitivity=args.sensitivity, bits=_ints(args.bits), ranks=_ints(args.ranks),
                                  allow_protect=not args.no_protect, power=args.power,
                                  command="python -m experiments.allocate " + " ".join(argv)))
    s = rep["summary"]
    print(f"allocation of {s['matrices']} matrices ({s['linear_params']} params): predicted "
          f"{s['bits_per_param']:.4f} bits/param, {s['bytes'] / 1e6:.3f} MB of linears "
          f"(budget {s['budget_bits'] / s['linear_params']:.4f} bits/param; minimum possible "
          f"{s['min_cost_bits'] / s['linear_params']:.4f})")
    print(f"objective {s['objective']:.6g}, mean predicted error {s['mean_predicted_error']:.4f}; options "
          f"{s['options']}")
    u = rep["uniform_base"]
    if u:
        print(f"base config uniform: {u['bits_per_param']:.4f} bits/param, objective {u['objective']:.6g}, "
              f"mean predicted error {u['mean_predicted_error']:.4f}")
    print(f"DP: unit {s['dp_unit_bits']} bits x {s['dp_cells']} cells ({'exact' if s['dp_exact'] else 'costs rounded up'}; "
          f"rounding {s['dp_rounding_bits']} bits; optimality gap <= {s['optimality_gap']:.3g}), "
          f"solved in {rep['solve_seconds']:.2f}s")
    print(f"wrote {args.out}", flush=True)
    return rep


if __name__ == "__main__":
    cli.run(main)
