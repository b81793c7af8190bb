"""Perplexity of a model on a text file, in fixed windows.

    python -m experiments.perplexity --model DIR|FILE.gguf [--text FILE] [--seq-len 512] [--max-tokens 16384]

Default text: the held-out split of the offline Shakespeare corpus (assets: `shakespeare`).
"""
from __future__ import annotations

import argparse
import json

import jax.numpy as jnp

from caldera_jax.eval.perplexity import model_perplexity, tokenize_text
from caldera_jax.checkpoints_io.model_source import load_model


def heldout_text_path() -> str:
    from experiments.assets import asset_path
    return str(asset_path("shakespeare") / "valid.txt")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    cfg, params, tok = load_model(args.model, dtype=jnp.dtype(args.dtype))
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer found next to the weights")
    ids = tokenize_text(tok, args.text or heldout_text_path())
    res = model_perplexity(params, cfg, ids, seq_len=args.seq_len, batch_size=args.batch_size,
                           max_tokens=args.max_tokens)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
