"""A CALDERA checkpoint -> a dequantized HF checkpoint (for `lm_eval --model hf`, transformers).

    python -m experiments.export_hf --ckpt COMPRESSED_DIR --out HF_DIR [--dtype bfloat16|float32]
                                    [--source ORIGINAL] [--tokenizer DIR] [--overwrite]

Reads one decoder layer at a time; verifies the checkpoint's files (and, with --source, that it
was built from that model) before writing anything; writes atomically. Tokenizer and chat template
come from the checkpoint (copied there from the source at compression), else from --source /
--tokenizer. See caldera_jax/checkpoints_io/export.py.
"""
from __future__ import annotations

import argparse
import time

from caldera_jax.checkpoints_io.export import DTYPES, export_hf


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="the compressed checkpoint directory")
    ap.add_argument("--out", required=True, help="the HF directory to write")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--source", default=None, help="the original model (HF dir or .gguf): its fingerprint must match")
    ap.add_argument("--tokenizer", default=None, help="take the tokenizer files from this directory")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    from caldera_jax import runtime
    runtime.setup()
    t0 = time.perf_counter()
    if args.source is None:
        print("note: no --source given: the checkpoint's files are verified, its source model is not")
    out = export_hf(args.ckpt, args.out, dtype=args.dtype, source=args.source, tokenizer_dir=args.tokenizer,
                    overwrite=args.overwrite)
    print(f"wrote {out} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
    return out


if __name__ == "__main__":
    main()
