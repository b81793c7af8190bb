"""Perplexity of a model: on a text file in fixed windows, or response-only on chat data; with an
expert-parallel codec for an MoE model.

    python -m experiments.perplexity --model DIR|FILE.gguf|COMPRESSED_DIR [--source DIR|FILE.gguf]
                                     [--text FILE | --data CHAT.jsonl [--split test]]
                                     [--codec none|int8|int4|int2|fp8|...|CODEC_DIR [--router-mode M]]
                                     [--seq-len 512] [--max-tokens 16384] [--out FILE.json]

Text (default: the held-out split of the offline Shakespeare corpus, asset `shakespeare`): the
model is read one decoder layer at a time (memory grows with one layer) unless a codec is given.
Chat data (`{"messages": [...]}` JSONL): the seed-42 80/10/10 split of caldera_jax.data (the one
training uses), one example per row, loss on assistant tokens only; --seq-len is the longest
example kept (longer ones are skipped and counted).
A compressed checkpoint is verified first (file digests; with --source, that it was built from
that model). --codec: a fixed codec by name or a trained codec directory (train_compressors /
offline_codecs fit); the MoE layers then run expert-parallel on one device with the codec around
the all-to-all (caldera_jax/moe/codec_spec.py); --router-mode defaults to the codec's own.
"""
from __future__ import annotations

import argparse
import json
import os

from caldera_jax.checkpoints_io.model_source import open_layers
from caldera_jax.eval.perplexity import streamed_perplexity, tokenize_text


def heldout_text_path() -> str:
    from experiments.assets import asset_path
    return str(asset_path("shakespeare") / "valid.txt")


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--source", default=None, help="the model a compressed checkpoint was built from (checked)")
    ap.add_argument("--text", default=None)
    ap.add_argument("--data", default=None, help="chat JSONL: response-only perplexity on --split")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--codec", default="none", help="fixed codec name or trained codec directory")
    ap.add_argument("--router-mode", default=None, choices=("compressed", "uncompressed"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the result here (JSON, atomically)")
    args = ap.parse_args(argv)
    if args.data and args.text:
        ap.error("give --text or --data, not both")
    return args


def _whole_model(args) -> dict:
    """Codec and/or chat data: the whole model in memory, one jitted forward per batch."""
    import jax.numpy as jnp
    from caldera_jax.eval.perplexity import perplexity, response_perplexity
    from caldera_jax.lmeval.model import open_model
    from caldera_jax.models.decoder import forward
    from caldera_jax.moe.codec_spec import CodecSpecError, attach, load_codec
    m = open_model(args.model, args.source, args.dtype)
    try:
        spec = load_codec(args.codec, m.cfg)
        params, hooks = attach(spec, m.cfg, m.params, args.router_mode)
    except CodecSpecError as e:
        raise SystemExit(f"error: {e}") from None
    head = {"model": os.path.abspath(args.model), "codec": spec.identity, "codec_name": spec.name,
            "router_mode": None if spec.codec is None else (args.router_mode or spec.router_mode),
            "dtype": args.dtype}
    if args.data:
        from caldera_jax.data.batching import padded_batches
        from caldera_jax.data.records import load_tokenized, summary
        data = load_tokenized(args.data, m.tokenizer, mode="chat", max_len=args.seq_len)
        print(summary(data.meta))
        pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
        batches = padded_batches(data.splits[args.split], args.batch_size, args.seq_len, pad)
        res = response_perplexity(params, m.cfg, batches, hooks, desc=f"{spec.name} {args.split}")
        return {**head, **res, "data": args.data, "split": args.split, "split_digest": data.meta["split_digest"]}
    ids = tokenize_text(m.tokenizer, args.text or heldout_text_path())
    res = perplexity(lambda b: forward(params, m.cfg, jnp.asarray(b, jnp.int32), hooks=hooks), ids,
                     seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    return {**head, **res, "text": args.text or heldout_text_path()}


def main(argv=None) -> dict:
    args = _parse(argv)
    from caldera_jax import runtime
    runtime.setup(hf_offline=True)
    if args.data or args.codec != "none" or args.dtype != "float32":
        res = _whole_model(args)
    else:
        m = open_layers(args.model, args.source)
        if m.tokenizer is None:
            raise SystemExit(f"{args.model}: no tokenizer found next to the weights")
        ids = tokenize_text(m.tokenizer, args.text or heldout_text_path())
        res = streamed_perplexity(m.read_layer, m.read_globals, m.cfg, ids, seq_len=args.seq_len,
                                  batch_size=args.batch_size, max_tokens=args.max_tokens)
    print(json.dumps(res))
    if args.out:
        from caldera_jax.checkpoints_io.compressed import atomic_write_bytes
        atomic_write_bytes(args.out, (json.dumps(res, indent=1) + "\n").encode())
    return res


if __name__ == "__main__":
    main()
