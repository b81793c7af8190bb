"""Forward and decode throughput: our jitted JAX model vs transformers (torch), same weights, same run.

    python -m bench.forward [--model DIR] [--repeats 5] [--out bench/results/forward.json]

Rows: prefill forward at batch x 512 tokens (tokens/s), and one decode step with a KV cache of 512
filled slots (tokens/s = batch / step time). Forward rows also give both sides' model GFLOP/s
(`flops_per_token`), to set against the CPU's peak. Medians of `--repeats` runs after a warm-up (the
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


def flops_per_token(cfg, context: int) -> float:
    """Model FLOPs of one token's forward (2 per multiply-add): every linear, the LM head, and
    attention's scores and weighted sum over `context` positions (not halved for the causal mask,
    the usual MFU convention)."""
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    per_layer = 2 * (H * q + 2 * H * kv + q * H + 3 * H * I) + 4 * context * q
    return cfg.num_hidden_layers * per_layer + 2 * H * cfg.vocab_size


def _matmul_row(torch, repeats: int, n: int = 2048) -> dict:
    """The machine's practical float32 peak: one n x n x n matmul, jnp.dot vs torch.mm (GFLOP/s);
    the forward rows' GFLOP/s read against it."""
    a = np.random.default_rng(1).standard_normal((n, n), np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    dot = jax.jit(jnp.dot)
    dot(ja, ja).block_until_ready()
    ours, _ = median_time(lambda: dot(ja, ja).block_until_ready(), repeats)
    with torch.inference_mode():
        theirs, _ = median_time(lambda: torch.mm(ta, ta), repeats)
    gf = 2 * n ** 3 / 1e9
    return {"op": f"matmul {n}^3", "batch": 1, "tokens": n, "speedup": theirs / ours,
            "ours_gflop_s": gf / ours, "hf_gflop_s": gf / theirs}


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
        gf = flops_per_token(cfg, T) / 1e9
        rows.append({"op": "forward", "batch": B, "tokens": T, "ours_tok_s": B * T / ours,
                     "hf_tok_s": B * T / theirs, "speedup": theirs / ours, "ours_compile_s": compile_s,
                     "ours_gflop_s": gf * B * T / ours, "hf_gflop_s": gf * B * T / theirs})

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
    rows.append(_matmul_row(torch, args.repeats))
    write_report(args.out, "forward", rows,
                 ["op", "batch", "tokens", "ours_tok_s", "hf_tok_s", "speedup", "ours_gflop_s", "hf_gflop_s",
                  "ours_compile_s"],
                 {"model": args.model, "dtype": "float32", "repeats": args.repeats})


if __name__ == "__main__":
    main()
