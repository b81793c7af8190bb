"""Forward and decode throughput: our jitted JAX model vs transformers (torch), same weights, same run.

    python -m bench.forward [--model DIR] [--repeats 5] [--out bench/results/forward.json]

Rows: prefill forward at batch x 512 tokens (tokens/s), and one decode step with a KV cache of 512
filled slots (tokens/s = batch / step time). Medians of `--repeats` runs after a warm-up (the
warm-up includes our jit compilation, reported separately). float32 on both sides.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import median_time, write_report
from caldera_jax.models.decoder import decode_step, forward, prefill
from caldera_jax.checkpoints_io.hf import load_hf


def _torch_model(model_dir: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    return torch, AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                       dtype=torch.float32).eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (default: the smollm2-135m-instruct asset)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/forward.json")
    args = ap.parse_args(argv)
    if args.model is None:
        from experiments.assets import asset_path
        args.model = str(asset_path("smollm2-135m-instruct"))
    torch, tmodel = _torch_model(args.model, os.cpu_count() or 1)
    cfg, params = load_hf(args.model, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    T, rows = args.seq_len, []
    for B in [int(b) for b in args.batches.split(",")]:
        tokens = rng.integers(0, cfg.vocab_size, (B, T))
        jt, tt = jnp.asarray(tokens, jnp.int32), torch.tensor(tokens)

        def ours_fwd():
            forward(params, cfg, jt).block_until_ready()

        def theirs_fwd():
            with torch.inference_mode():
                tmodel(input_ids=tt, use_cache=False)
        t0 = time.perf_counter()
        ours_fwd()
        compile_s = time.perf_counter() - t0
        ours, _ = median_time(ours_fwd, args.repeats)
        theirs, _ = median_time(theirs_fwd, args.repeats)
        rows.append({"op": "forward", "batch": B, "tokens": T, "ours_tok_s": B * T / ours,
                     "hf_tok_s": B * T / theirs, "speedup": theirs / ours, "ours_compile_s": compile_s})

        # decode: one token appended to a cache holding T prompt tokens
        steps = args.repeats * 4 + 1
        _, cache = prefill(params, cfg, jt, jnp.ones((B, T), bool), T + steps)
        state, tok = [cache], jnp.zeros((B,), jnp.int32)

        def ours_dec():   # appends one token; the cache has room for every step
            logits, state[0] = decode_step(params, cfg, state[0], tok)
            logits.block_until_ready()
        with torch.inference_mode():
            out = tmodel(input_ids=tt, use_cache=True)
        pkv, ttok = out.past_key_values, torch.zeros((B, 1), dtype=torch.long)

        def theirs_dec():
            with torch.inference_mode():
                tmodel(input_ids=ttok, past_key_values=pkv, use_cache=True)
                pkv.crop(-1)   # drop the appended slot so every repeat sees T cached tokens
        ours_d, _ = median_time(ours_dec, steps - 1)
        theirs_d, _ = median_time(theirs_dec, args.repeats * 4)
        rows.append({"op": "decode_step", "batch": B, "tokens": T, "ours_tok_s": B / ours_d,
                     "hf_tok_s": B / theirs_d, "speedup": theirs_d / ours_d})
    write_report(args.out, "forward", rows,
                 ["op", "batch", "tokens", "ours_tok_s", "hf_tok_s", "speedup", "ours_compile_s"],
                 {"model": args.model, "dtype": "float32", "repeats": args.repeats})


if __name__ == "__main__":
    main()
