"""Fit the error model E_i(b, r) = s_i·(α·2^(−β·b) + γ·(r+1)^(−δ)) to a sweep.

    python -m experiments.fit_error_model --sweep DIR/sweep.jsonl --out DIR [--r2-fallback 0.7]

Writes DIR/error_model.json (for experiments.allocate), DIR/fit.json (R² overall and per
projection type, parameters, residuals) and DIR/residuals.png; prints R². When R² on log E is below
--r2-fallback the model file selects the per-matrix interpolation of the measured grid instead.
The job is caldera_jax.pipeline.fit_error_model.
"""
from __future__ import annotations

import argparse
import sys

from caldera_jax.pipeline import fit_error_model as job
from experiments import cli


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.fit_error_model", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sweep", required=True, help="sweep.jsonl (or its directory)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--r2-fallback", type=float, default=0.7)
    ap.add_argument("--kind", choices=("parametric", "interpolation"), default=None,
                    help="force the model kind (default: by R²)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    rep = job.run(job.FitJob(args.sweep, args.out, args.r2_fallback, args.kind))
    p = rep["params"]
    print(f"fit of {rep['n_observations']} experiments on {rep['n_matrices']} matrices: "
          f"alpha {p['alpha']:.4g}  beta {p['beta']:.4g}  gamma {p['gamma']:.4g}  delta {p['delta']:.4g}")
    print(f"R² (log E) {rep['r2_log']:.4f}   R² (E) {rep['r2']:.4f}   rms log residual "
          f"{rep['rms_log_residual']:.4f}   -> model kind: {rep['kind']} ({rep['kind_reason']})")
    for proj, s in rep["by_proj"].items():
        print(f"  {proj:>22}: R² (log E) {s['r2_log']:.4f}   R² (E) {s['r2']:.4f}   n {s['n']}")
    print(f"wrote {args.out}/error_model.json, fit.json, residuals.png", flush=True)
    return rep


if __name__ == "__main__":
    cli.run(main)
