"""Error-model sweep: every (layer, projection, bits, rank) of a grid -> H-weighted error + exact size.

    python -m experiments.error_sweep --model DIR|FILE.gguf --config BASE.yaml \\
        --grid bits=2,3,4 rank=0,32,64,128 [--layers 0,5,10] [--projections q_proj,down_proj] \\
        [--calib DATA] --out DIR

One JSON line per experiment in DIR/sweep.jsonl (fsynced as each finishes); interrupt it and rerun
the same command: finished experiments are skipped. The budget of each experiment is the base
config's (defaults + overrides) with b_q and rank replaced. Default --calib: Shakespeare train.
The job is caldera_jax.pipeline.error_sweep.
"""
from __future__ import annotations

import argparse
import os
import sys

from caldera_jax import runtime
from caldera_jax.allocation.options import parse_grid
from caldera_jax.pipeline import error_sweep as job
from experiments import cli


def _ints(s: str | None):
    return None if s is None else tuple(int(x) for x in s.split(",") if x.strip())


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m experiments.error_sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True, help="HF checkpoint directory or .gguf file")
    ap.add_argument("--config", required=True, help="base job config YAML (quantizer, b_l, b_r, calibration ...)")
    ap.add_argument("--grid", nargs="+", default=["bits=2,3,4", "rank=0,32,64,128"],
                    help="bits=B1,B2,.. rank=R1,R2,.. (default: bits=2,3,4 rank=0,32,64,128)")
    ap.add_argument("--layers", help="comma-separated layer indices (default: every layer)")
    ap.add_argument("--projections", help="comma-separated, e.g. q_proj,down_proj (default: all)")
    ap.add_argument("--calib", help="calibration data (default: Shakespeare train split)")
    ap.add_argument("--out", required=True, help="output directory (sweep.jsonl, sweep.json)")
    ap.add_argument("--mesh-devices", type=int, default=None,
                    help="CPU: fake devices to spread decompositions over (default: cores, up to 8)")
    ap.add_argument("--compile-cache", default=None, help="jax compilation cache ('none': off)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None, *, on_record=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    grid = parse_grid(args.grid)
    from experiments import assets
    runtime.setup(cpu_devices=args.mesh_devices or min(os.cpu_count() or 1, 8),
                  compile_cache=args.compile_cache or str(assets.cache_dir() / "xla-cache"))
    calib = args.calib or str(assets.fetch("shakespeare", progress=not args.no_progress) / "train.txt")
    spec = job.SweepJob(model=args.model, config=args.config, calib=calib, out=args.out, bits=grid["bits"],
                        ranks=grid["rank"], layers=_ints(args.layers),
                        projections=None if args.projections is None else tuple(args.projections.split(",")),
                        progress=not args.no_progress)
    res = job.run(spec, job.SweepCallbacks(on_record=on_record))
    print(f"sweep: {res['new']} new experiments, {res['done_before']} already done, {res['total']} in all, "
          f"{res['seconds']:.1f}s -> {res['out']}", flush=True)
    return res


if __name__ == "__main__":
    cli.run(main)
