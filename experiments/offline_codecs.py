"""Offline codecs: collect the MoE layers' dispatched states, then fit compressor/decompressor pairs.

    python -m experiments.offline_codecs collect --model MOE_DIR --data chat.jsonl --out runs/states \\
        [--seq-len 256] [--batch-size 8] [--max-tokens N]
    python -m experiments.offline_codecs fit --states runs/states --out runs/codec-off-4x \\
        [--ratio 4] [--stale none|compressed|uncompressed] [--stride 12] [--steps 500] [--lr 1e-3]

The fitted codec initialises end-to-end training: experiments.train_compressors --init offline:OUT.
"""
from __future__ import annotations

import argparse
import sys

from caldera_jax import runtime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--model", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--mode", default="chat", choices=["chat", "text"])
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--max-tokens", type=int, default=None)
    f = sub.add_parser("fit")
    f.add_argument("--states", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--ratio", type=int, default=4, choices=[2, 4, 8, 16])
    f.add_argument("--stale", default="none", choices=["none", "compressed", "uncompressed"])
    f.add_argument("--stride", type=int, default=12)
    f.add_argument("--steps", type=int, default=500)
    f.add_argument("--batch-tokens", type=int, default=512)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--val-interval", type=int, default=100)
    for p in (c, f):
        p.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    runtime.setup(hf_offline=True)
    from caldera_jax.pipeline.offline_codecs import CollectJob, FitJob, collect, fit
    from caldera_jax.pipeline.train_compressors import CompressorJobError
    try:
        if args.cmd == "collect":
            return collect(CollectJob(args.model, args.data, args.out, args.mode, args.seq_len, args.batch_size,
                                      args.max_tokens, not args.no_progress))
        return fit(FitJob(args.states, args.out, args.ratio, args.stale, args.stride, args.steps, args.batch_tokens,
                          args.lr, args.val_interval, progress=not args.no_progress))
    except CompressorJobError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
