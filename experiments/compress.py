"""CALDERA compression of a whole model: calibrate, decompose every linear, write a checkpoint.

    python -m experiments.compress                       # the embedded default (SmolLM2-135M-Instruct)
    python -m experiments.compress --model DIR|FILE.gguf --config CONFIG.yaml --calib DATA \\
        --out DIR [--mesh ep=4[,dp=2]] [--ppl-tokens 8192]
    python -m experiments.compress ... --avg-bits 2.5 --error-model FIT/error_model.json   # allocate first

With no arguments: SmolLM2-135M-Instruct (experiments.assets), configs/smollm2_default.yaml,
calibration text from the Shakespeare train split, output runs/compress-smollm2-default/,
`--mesh auto` (on a CPU: one fake device per core, so independent decompositions run concurrently),
and perplexity on the held-out Shakespeare split (16 x 512 tokens) before and after.

This file parses the arguments, resolves the defaults from the offline assets, sets up the process
(caldera_jax.runtime) and prints; the job itself is caldera_jax.pipeline.compress (read it top to
bottom for what happens, in order). Interrupt it (even kill -9) and rerun the same command: it
resumes, and the final checkpoint is byte-identical. A config with a `finetune:` section then
fine-tunes the checkpoint (caldera_jax.pipeline.finetune) into <out>-finetuned.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable

from caldera_jax import runtime
from caldera_jax.pipeline import compress as pipeline, report
from caldera_jax.pipeline.job_dir import LOCK_FILE, JobError  # noqa: F401  (part of this CLI's API)
from experiments import assets, cli

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "smollm2_default.yaml")
DEFAULT_OUT = os.path.join("runs", "compress-smollm2-default")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.compress", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help=f"HF checkpoint directory or .gguf file (default: the {DEFAULT_MODEL} asset)")
    ap.add_argument("--config", help="job config YAML (default: configs/smollm2_default.yaml)")
    ap.add_argument("--calib", help="calibration data: .txt, .jsonl ({'text': ...}) or .npy token ids "
                                    "[N, T] (negative = padding); default: Shakespeare train split")
    ap.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT} for the default model)")
    ap.add_argument("--mesh", default=None,
                    help="device mesh, e.g. ep=4 or ep=4,dp=2; 'auto': ep = every device (on a CPU, one "
                         "per core, up to 8). Default: one device; 'auto' for the default job")
    ap.add_argument("--ppl-tokens", type=int, default=None,
                    help="perplexity before/after on this many held-out tokens (default: 8192 for the "
                         "default job, else 0 = skip)")
    ap.add_argument("--ppl-seq-len", type=int, default=512)
    ap.add_argument("--ppl-text", help="held-out text for perplexity (default: Shakespeare valid split)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a different job of ours in --out (deletes only the files a job writes)")
    ap.add_argument("--compile-cache", default=None,
                    help="jax persistent compilation cache directory ('none' disables; default: "
                         "<asset cache>/xla-cache)")
    ap.add_argument("--avg-bits", type=float, default=None,
                    help="allocate per-matrix budgets first (experiments.allocate: exact knapsack under this "
                         "many bits/param of the linears, --config as the base) and compress with them; "
                         "needs --error-model; the allocated config is written to <out>.alloc.yaml")
    ap.add_argument("--error-model", help="error_model.json of experiments.fit_error_model (with --avg-bits)")
    ap.add_argument("--sensitivity", help="sensitivity weights JSON for the allocation (with --avg-bits)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.avg_bits is not None and not args.error_model:
        ap.error("--avg-bits needs --error-model (python -m experiments.fit_error_model writes it)")
    if args.avg_bits is None and (args.error_model or args.sensitivity):
        ap.error("--error-model / --sensitivity are used only with --avg-bits")
    args.default_job = args.model is None
    if args.model is None and args.out is None:
        args.out = DEFAULT_OUT
    if args.out is None:
        ap.error("--out is required when --model is given")
    if args.ppl_tokens is None:
        args.ppl_tokens = 8192 if args.default_job else 0
    if args.mesh is None:
        args.mesh = "auto" if args.default_job else ""
    return args


def parse_mesh(spec: str) -> dict[str, int]:
    """'ep=4,dp=2' -> {'ep': 4, 'dp': 2}; '' -> {}; 'auto' -> {'ep': 0} (0: every device)."""
    if spec.strip() == "auto":
        return {"ep": 0}
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition("=")
        if name not in ("ep", "dp") or not size.isdigit() or int(size) < 1 or name in axes:
            raise JobError(f"--mesh {spec!r}: expected comma-separated ep=N and/or dp=N (N >= 1), got {part!r}")
        axes[name] = int(size)
    return axes


def main(argv: list[str] | None = None, *, on_layer_done: Callable[[int], None] | None = None,
         decomposer=None) -> dict[str, Any]:
    """Runs the command line `argv`; returns the job's report. on_layer_done(i) is called after
    layer i's file is written (tests simulate crashes with it); decomposer replaces
    caldera_jax.caldera.decompose."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    mesh = parse_mesh(args.mesh)
    runtime.setup(cpu_devices=min(os.cpu_count() or 1, 8) if mesh == {"ep": 0} else math.prod(mesh.values()),
                  compile_cache=args.compile_cache or str(assets.cache_dir() / "xla-cache"))
    fetch = lambda name: assets.fetch(name, progress=not args.no_progress)   # noqa: E731
    model = args.model or str(fetch(DEFAULT_MODEL))
    config = args.config or DEFAULT_CONFIG
    if args.avg_bits is not None:            # allocate, then compress with the allocated config
        from caldera_jax.pipeline import allocate
        config = args.out.rstrip("/\\") + ".alloc.yaml"
        alloc = allocate.run(allocate.AllocateJob(
            model=model, error_model=args.error_model, config=args.config or DEFAULT_CONFIG, out=config,
            avg_bits=args.avg_bits, sensitivity=args.sensitivity,
            command="python -m experiments.compress " + " ".join(argv)))
        print(f"allocated {alloc['summary']['matrices']} matrices: predicted "
              f"{alloc['summary']['bits_per_param']:.4f} bits/param -> {config}", flush=True)
    spec = pipeline.CompressJob(
        model=model,
        config=config,
        calib=args.calib or str(fetch("shakespeare") / "train.txt"),
        out=args.out, mesh=mesh, overwrite=args.overwrite,
        ppl_tokens=args.ppl_tokens, ppl_seq_len=args.ppl_seq_len,
        ppl_text=args.ppl_text or (str(fetch("shakespeare") / "valid.txt") if args.ppl_tokens else None),
        progress=not args.no_progress, command="python -m experiments.compress " + " ".join(argv))
    callbacks = pipeline.Callbacks(on_layer=None if on_layer_done is None else lambda i, _: on_layer_done(i))
    rep = pipeline.run(spec, callbacks, **({} if decomposer is None else {"decomposer": decomposer}))
    print("\n" + report.format_table(rep["layers"], rep["summary"]) + "\n", flush=True)
    print(f"checkpoint: {spec.out}  report: {os.path.join(spec.out, 'report', 'report.json')}  "
          f"wall {rep['wall_seconds']:.1f}s", flush=True)
    ft = pipeline.load_job_config(spec.config).finetune_config()
    if ft is not None:                       # the config's finetune: section -> <out>-finetuned
        from caldera_jax.pipeline import finetune
        fspec = finetune.FinetuneJob(
            ckpt=spec.out, model=spec.model, calib=spec.calib, out=spec.out.rstrip("/\\") + "-finetuned",
            config=ft, overwrite=args.overwrite, ppl_tokens=spec.ppl_tokens, ppl_seq_len=spec.ppl_seq_len,
            ppl_text=spec.ppl_text, progress=spec.progress, command=spec.command + " (finetune: section)")
        rep["finetune"] = finetune.run(fspec)
        print(f"fine-tuned checkpoint: {fspec.out}  wall {rep['finetune']['wall_seconds']:.1f}s", flush=True)
    return rep


if __name__ == "__main__":
    cli.run(main)
