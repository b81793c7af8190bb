"""Train the expert-parallel codecs end to end through a frozen MoE model.

    python -m experiments.train_compressors --model MOE_DIR --data chat.jsonl --out runs/codec-4x \\
        [--ratio 2|4|8|16] [--stale none|compressed|uncompressed] [--stride 12] \\
        [--router-mode compressed|uncompressed] [--init identity|random|offline:DIR] [--epochs 1] \\
        [--max-steps N] [--batch-size 4] [--accum 1] [--seq-len 256] [--pack] [--lr 1e-4] [--val-interval 50] \\
        [--mesh dp=2,ep=4] [--dtype bfloat16]

Rerunning the same command after a crash resumes from the last checkpoint (out/train/ckpt). See
caldera_jax/pipeline/train_compressors.py for what is written.

Multi-host: start the same command on every host (the mesh spans all their devices; --out on a
shared file system). Under srun or mpirun jax finds the other processes itself; with any other
launcher set JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID (BUILD.md).
"""
from __future__ import annotations

import argparse
import sys

from caldera_jax import runtime


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k not in ("dp", "ep") or not v.isdigit() or int(v) < 1:
            raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected e.g. dp=2,ep=4")
        out[k] = int(v)
    return tuple(sorted(out.items()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="chat", choices=["chat", "text"])
    ap.add_argument("--ratio", type=int, default=4, choices=[2, 4, 8, 16])
    ap.add_argument("--stale", default="none", choices=["none", "compressed", "uncompressed"])
    ap.add_argument("--stride", type=int, default=12)
    ap.add_argument("--router-mode", default="compressed", choices=["compressed", "uncompressed"])
    ap.add_argument("--init", default="identity")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pack", action="store_true", help="several records per row (attention kept inside each)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--val-interval", type=int, default=50)
    ap.add_argument("--ckpt-interval", type=int, default=50)
    ap.add_argument("--mesh", type=parse_mesh, default=(("dp", 1), ("ep", 1)))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    sizes = dict(args.mesh)
    try:
        dist = runtime.distributed_env()
    except runtime.DistributedError as e:
        ap.error(str(e))
    devices, nproc = sizes.get("dp", 1) * sizes.get("ep", 1), runtime.process_count(dist)
    if devices % nproc:
        mesh = ",".join(f"{k}={v}" for k, v in args.mesh)
        ap.error(f"--mesh {mesh}: {devices} devices do not split evenly over {nproc} processes")
    runtime.setup(cpu_devices=devices // nproc, hf_offline=True)
    runtime.init_distributed(dist)
    from caldera_jax.pipeline.train_compressors import CompressorJob, CompressorJobError, run
    job = CompressorJob(model=args.model, data=args.data, out=args.out, mode=args.mode, ratio=args.ratio,
                        stale=args.stale, stride=args.stride, router_mode=args.router_mode, init=args.init,
                        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                        accum=args.accum, seq_len=args.seq_len, pack=args.pack, lr=args.lr,
                        val_interval=args.val_interval,
                        ckpt_interval=args.ckpt_interval, mesh=args.mesh, dtype=args.dtype, seed=args.seed,
                        progress=not args.no_progress)
    try:
        return run(job)
    except CompressorJobError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
