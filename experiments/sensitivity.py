"""Layer sensitivity: compress one (layer, projection) at a probe setting, measure the output change.

    python -m experiments.sensitivity --model DIR|FILE.gguf --config BASE.yaml --probe bits=2,rank=0 \\
        [--layers 0,1,2] [--projections q_proj,down_proj] [--tokens 2048] [--seq-len 256] \\
        [--calib DATA] [--text HELDOUT] --out DIR

Per matrix: KL(P_orig ‖ P_one-matrix-compressed) of next-token distributions (nats/token) and the
cosine of the last hidden state, on held-out text (default: Shakespeare valid split; calibration:
Shakespeare train). Writes DIR/sensitivity.json (experiments.allocate --sensitivity reads it),
DIR/sensitivity.jsonl (one line per matrix, a rerun skips those done) and DIR/sensitivity.png.
The job is caldera_jax.pipeline.sensitivity (the whole model in memory).
"""
from __future__ import annotations

import argparse
import os
import sys

from caldera_jax import runtime
from experiments import cli


def parse_probe(s: str) -> tuple[int, int]:
    kv = dict(p.split("=", 1) for p in s.replace(" ", ",").split(",") if "=" in p)
    try:
        return int(kv["bits"]), int(kv["rank"])
    except (KeyError, ValueError):
        raise ValueError(f"--probe {s!r}: expected bits=B,rank=R (e.g. bits=2,rank=0)") from None


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m experiments.sensitivity", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="base job config YAML")
    ap.add_argument("--probe", default="bits=2,rank=0")
    ap.add_argument("--layers")
    ap.add_argument("--projections")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib")
    ap.add_argument("--text")
    ap.add_argument("--out", required=True)
    ap.add_argument("--compile-cache", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    b, r = parse_probe(args.probe)
    from experiments import assets
    runtime.setup(compile_cache=args.compile_cache or str(assets.cache_dir() / "xla-cache"))
    from caldera_jax.pipeline import sensitivity as job
    sh = None if args.calib and args.text else assets.fetch("shakespeare", progress=not args.no_progress)
    rep = job.run(job.SensitivityJob(
        model=args.model, config=args.config, calib=args.calib or str(sh / "train.txt"),
        text=args.text or str(sh / "valid.txt"), out=args.out, b_q=b, rank=r,
        layers=None if args.layers is None else tuple(int(x) for x in args.layers.split(",")),
        projections=None if args.projections is None else tuple(args.projections.split(",")),
        tokens=args.tokens, seq_len=args.seq_len, progress=not args.no_progress))
    print(f"{'layer':>5} {'KL sum':>10} {'min cos':>9}")
    for k, v in rep["by_layer"].items():
        print(f"{k:>5} {v['kl_sum']:10.5f} {v['cosine_min']:9.5f}")
    print(f"wrote {os.path.join(args.out, 'sensitivity.json')}, sensitivity.png ({rep['seconds']:.1f}s)", flush=True)
    return rep


if __name__ == "__main__":
    cli.run(main)
