"""Decode tokens/s at batch 1: SmolLM2-135M with CALDERA-compressed linears vs the float model.

    python -m bench.decode_qlr [--model DIR] [--compressed CKPT_DIR] [--format e8p2+u4g64r64]
                               [--backend auto] [--prompt 64] [--steps 16]

Models in the same run, same prompt and cache length:
  float32 and bfloat16: the dense model (load_hf; SmolLM2's GGUF was already Q4_1 upstream).
  qlr: every decoder linear (q/k/v/o, gate/up/down) a QLRWeight run by qlr_linear(backend=...).
       With --compressed, the checkpoint written by `experiments.compress`; otherwise random codes
       of the right shapes in --format (tokens/s does not depend on the code values; the outputs are
       meaningless, which is fine for a speed measurement). Embeddings, norms, LM head stay dense,
       in bf16 (activations bf16, as in the kernel benchmark) and, as a second row, in float32
       (XLA:CPU has no fast bf16 matmul, so on a CPU the f32 rows are the fair comparison).
Reported: median seconds per decode step over --steps steps (after a warm-up step that compiles),
tokens/s = 1 / step time, and the bytes of the linear weights each model reads per token.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import device_description, write_report
from caldera_jax import params as params_lib
from caldera_jax.models.decoder import decode_step, prefill

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_linear(name: str) -> bool:
    return ".layers." in name and name.endswith(".weight") and name.split(".")[-2] in LINEARS


def random_qlr_params(params, fmt: str, backend: str, seed: int = 0, dtype=jnp.bfloat16):
    """Every decoder linear replaced by a random-code QLRWeight of the same shape; the other
    parameters cast to dtype (which sets the activation dtype)."""
    from bench.qlr_linear import FORMATS
    from caldera_jax.kernels.qlr_random import random_qlr
    q, rank, fac = FORMATS[fmt]
    rng = np.random.default_rng(seed)
    flat = params_lib.flatten(params)
    out = {}
    for name, v in flat.items():
        if _is_linear(name):
            m, n = v.shape
            out[name] = random_qlr(rng, m, n, q, rank=min(rank, m, n), factors=fac, incoherent=True,
                                   backend=backend)
        else:
            out[name] = v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
    return params_lib.unflatten(out)


def linear_bytes(params) -> int:
    total = 0
    for name, v in params_lib.flatten(params).items():
        if _is_linear(name):
            total += v.nbytes() if hasattr(v, "nbytes") and callable(v.nbytes) else int(v.size * v.dtype.itemsize)
    return total


def time_decode(params, cfg, prompt: int, steps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt)), jnp.int32)
    _, cache = prefill(params, cfg, tokens, jnp.ones((1, prompt), bool), prompt + steps + 2)
    tok = jnp.zeros((1,), jnp.int32)
    logits, cache = decode_step(params, cfg, cache, tok)          # compile
    jax.block_until_ready(logits)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, cache = decode_step(params, cfg, cache, tok)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir (default: the smollm2-135m-instruct asset)")
    ap.add_argument("--compressed", default=None, help="a compressed checkpoint dir (experiments.compress)")
    ap.add_argument("--format", default="e8p2+u4g64r64")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default="bench/results/decode_qlr.json")
    args = ap.parse_args(argv)
    from caldera_jax.checkpoints_io.hf import load_hf
    if args.model is None:
        from experiments.assets import asset_path
        args.model = str(asset_path("smollm2-135m-instruct"))
    cfg, p32 = load_hf(args.model, dtype=jnp.float32)
    models = {"float32": p32, "bfloat16": jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p32)}
    if args.compressed:
        from caldera_jax.checkpoints_io.compressed import load_compressed
        _, pq = load_compressed(args.compressed, dtype=jnp.bfloat16)
        label = f"qlr ({os.path.basename(args.compressed.rstrip('/'))}, backend {args.backend})"
        pq = params_lib.unflatten({k: (v.with_backend(args.backend) if hasattr(v, "with_backend") else v)
                                   for k, v in params_lib.flatten(pq).items()})
        models[label] = pq
    else:
        for dt in (jnp.bfloat16, jnp.float32):
            label = f"qlr {args.format} random codes, {jnp.dtype(dt).name} act. (backend {args.backend})"
            models[label] = random_qlr_params(p32, args.format, args.backend, dtype=dt)
    rows = []
    print(f"device: {device_description()}")
    for name, p in models.items():
        t = time_decode(p, cfg, args.prompt, args.steps)
        rows.append({"model": name, "step_ms": t * 1e3, "tok_s": 1.0 / t,
                     "linear_MB": linear_bytes(p) / 1e6})
        print(f"  {name}: {t * 1e3:.2f} ms/step", flush=True)
    base = rows[1]["tok_s"]
    for r in rows:
        r["vs_bf16"] = r["tok_s"] / base
    write_report(args.out, "decode_qlr", rows, ["model", "step_ms", "tok_s", "vs_bf16", "linear_MB"],
                 {"prompt": args.prompt, "steps": args.steps, "batch": 1, "model_dir": args.model,
                  "command": "python -m bench.decode_qlr " + " ".join(argv if argv is not None else os.sys.argv[1:])})


if __name__ == "__main__":
    main()
