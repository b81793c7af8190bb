"""Derive a mixture-of-experts model from a dense one: split every FFN into experts, fit routers,
distill against the dense model; write a HF checkpoint (Mixtral layout for a llama source).

    python -m experiments.moefy                  # the reference MoE: SmolLM2-135M-Instruct, 8 experts, top-2
    python -m experiments.moefy --model DIR|FILE.gguf --experts 8 --top-k 2 --out DIR \\
        [--clustering coactivation|weights] [--calib DATA] [--distill-steps N] [--set key=value ...]

With no --model: the smollm2-135m-instruct asset, the reference settings (MoefyConfig's defaults;
the `smollm2-moe` asset is built with them), output runs/moefy-smollm2-e8k2/. Calibration and
distillation text default to the Shakespeare train split, perplexity (dense vs MoE, same tokens)
to its held-out split. `--set` sets any caldera_jax.moefy.MoefyConfig field (e.g. --set
distill_lr=3e-4). Interrupt it (even kill -9) and rerun the same command: it resumes, and the
checkpoint is byte-identical to an uninterrupted run's.

This file parses the arguments, resolves the defaults from the offline assets, sets up the process
and prints; the job is caldera_jax.pipeline.moefy (read it top to bottom for what happens, in order).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from caldera_jax import runtime
from caldera_jax.moefy import MoefyConfig, MoefyError
from caldera_jax.pipeline import moefy as pipeline
from experiments import assets, cli

DEFAULT_MODEL = "smollm2-135m-instruct"
# The reference MoE's settings (the `smollm2-moe` asset) are MoefyConfig's defaults.
REFERENCE = MoefyConfig()


def default_out(mc: MoefyConfig) -> str:
    return os.path.join("runs", f"moefy-smollm2-e{mc.experts}k{mc.top_k}")


def _value(field: dataclasses.Field, text: str) -> Any:
    kind = {"int": int, "float": float, "str": str}[field.type if isinstance(field.type, str) else field.type.__name__]
    try:
        return kind(text)
    except ValueError:
        raise MoefyError(f"--set {field.name}={text}: not a valid {kind.__name__}") from None


def config_from_args(args: argparse.Namespace, base: MoefyConfig) -> MoefyConfig:
    """base, then the named options, then every --set key=value."""
    fields = {f.name: f for f in dataclasses.fields(MoefyConfig)}
    changes: dict[str, Any] = {}
    for name in ("experts", "top_k", "clustering", "seed", "distill_steps", "router_steps"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    for item in args.set:
        key, eq, val = item.partition("=")
        if not eq or key not in fields:
            raise MoefyError(f"--set {item!r}: expected key=value with key one of {', '.join(fields)}")
        changes[key] = _value(fields[key], val)
    return dataclasses.replace(base, **changes).check()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.moefy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help=f"dense HF checkpoint directory or .gguf file (default: the {DEFAULT_MODEL} asset)")
    ap.add_argument("--out", help="output directory (the MoE checkpoint; default runs/moefy-smollm2-e<E>k<K> "
                                  "for the default model)")
    ap.add_argument("--experts", type=int, help=f"experts per layer (default {REFERENCE.experts})")
    ap.add_argument("--top-k", dest="top_k", type=int, help=f"experts per token (default {REFERENCE.top_k})")
    ap.add_argument("--clustering", choices=("coactivation", "weights"),
                    help=f"neuron grouping (default {REFERENCE.clustering})")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--router-steps", dest="router_steps", type=int)
    ap.add_argument("--distill-steps", dest="distill_steps", type=int)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any MoefyConfig field, e.g. --set distill_lr=3e-4 (repeatable)")
    ap.add_argument("--calib", help="calibration / distillation data: .txt, .jsonl ({'text': ...}) or .npy token "
                                    "ids [N, T]; default: Shakespeare train split")
    ap.add_argument("--ppl-text", help="held-out text for perplexity (default: Shakespeare valid split)")
    ap.add_argument("--ppl-tokens", type=int, default=8192, help="perplexity tokens (0: skip; default 8192)")
    ap.add_argument("--ppl-seq-len", type=int, default=512)
    ap.add_argument("--overwrite", action="store_true", help="replace a different moefy job in --out")
    ap.add_argument("--compile-cache", default=None,
                    help="jax persistent compilation cache ('none' disables; default <asset cache>/xla-cache)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.model is not None and args.out is None:
        ap.error("--out is required when --model is given")
    return args


def main(argv: list[str] | None = None, callbacks: pipeline.Callbacks | None = None) -> dict[str, Any]:
    """Runs the command line `argv`; returns the job's report (callbacks: tests simulate crashes)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    mc = config_from_args(args, REFERENCE)
    runtime.setup(compile_cache=args.compile_cache or str(assets.cache_dir() / "xla-cache"))
    fetch = lambda name: assets.fetch(name, progress=not args.no_progress)   # noqa: E731
    spec = pipeline.MoefyJob(
        model=args.model or str(fetch(DEFAULT_MODEL)), out=args.out or default_out(mc),
        calib=args.calib or str(fetch("shakespeare") / "train.txt"), config=mc,
        ppl_text=(args.ppl_text or str(fetch("shakespeare") / "valid.txt")) if args.ppl_tokens else None,
        ppl_tokens=args.ppl_tokens, ppl_seq_len=args.ppl_seq_len, overwrite=args.overwrite,
        progress=not args.no_progress, command="python -m experiments.moefy " + " ".join(argv))
    rep = pipeline.run(spec, callbacks or pipeline.Callbacks())
    print("\n" + pipeline.format_summary(rep) + "\n", flush=True)
    print(f"checkpoint: {spec.out}  report: {os.path.join(spec.out, 'report', 'report.json')}", flush=True)
    return rep


if __name__ == "__main__":
    cli.run(main)
