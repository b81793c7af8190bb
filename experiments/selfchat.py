"""A chat set answered by the model itself (training data for codecs and fine-tuning).

    python -m experiments.selfchat [--model DIR] [--out FILE.jsonl] [--sets arc_easy/validation,...]
                                   [--max-new-tokens 128] [--batch-size 16] [--limit N]

Default model: the smollm2-135m-instruct asset; default sets: ARC-Easy and ARC-Challenge
validation (never scored by the evaluations here). Rerun the same command after a crash to continue.
"""
from __future__ import annotations

import argparse
import os

from caldera_jax import runtime


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="runs/selfchat/smollm2-arc-val.jsonl")
    ap.add_argument("--sets", default=None, help="comma-separated <set>/<split> of the evalsets asset")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    runtime.setup(hf_offline=True)
    from caldera_jax.pipeline.selfchat import DEFAULT_SETS, SelfChatJob, run
    from experiments import assets
    model = args.model or str(assets.fetch("smollm2-135m-instruct"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    job = SelfChatJob(model=model, evalsets=str(assets.fetch("evalsets")), out=args.out,
                      sets=tuple(args.sets.split(",")) if args.sets else DEFAULT_SETS,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit)
    return run(job)


if __name__ == "__main__":
    main()
