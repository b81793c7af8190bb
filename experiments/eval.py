"""Evaluate a model on the offline lm-eval tasks: prints a table, writes JSON.

    python -m experiments.eval --model DIR|FILE.gguf|COMPRESSED_DIR [--source ORIGINAL] \
        --tasks arc_easy,piqa [--limit N] [--batch-size 8] [--num-fewshot K] [--dtype float32] \
        [--apply-chat-template [--fewshot-as-multiturn]] [--lm caldera-jax|hf] [--out DIR] [--no-cache]

Tasks (caldera_jax/lmeval/tasks; data: `python -m experiments.assets fetch evalsets`): arc_easy,
arc_challenge, hellaswag, piqa, winogrande, boolq, mmlu, lambada_openai, gsm8k_cot.
--lm caldera-jax (default) runs our JAX model (a CALDERA checkpoint runs its quantized weights);
--lm hf runs lm-eval's own transformers backend on a HF directory (e.g. `experiments.export_hf`'s
output), for comparison.

Every finished request is stored in <out>/requests-<lm>-<model key>_rank0.db (lm-eval's
CachingLM; the key changes when the weights do): rerun the same command after an interruption and
only the missing requests run. Results: <out>/<lm>-<tasks>[-limitN].json, lm-eval's results plus
the wall time. Default --out: runs/eval/<model name>.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF directory, .gguf file or CALDERA checkpoint")
    ap.add_argument("--source", default=None, help="the model a CALDERA checkpoint was built from (checked)")
    ap.add_argument("--tasks", required=True, help="comma-separated task names")
    ap.add_argument("--limit", type=float, default=None, help="documents per task (first N; < 1: a fraction)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-fewshot", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    ap.add_argument("--apply-chat-template", action="store_true")
    ap.add_argument("--fewshot-as-multiturn", action="store_true")
    ap.add_argument("--codec", default="none", help="MoE models: a fixed codec (int8, int4, int2, fp8, ...) or a "
                    "trained codec directory around the expert-parallel all-to-all (caldera-jax only)")
    ap.add_argument("--router-mode", default=None, choices=("compressed", "uncompressed"))
    ap.add_argument("--lm", default="caldera-jax", choices=("caldera-jax", "hf"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-cache", action="store_true", help="do not read or write the request cache")
    ap.add_argument("--log-samples", action="store_true", help="keep every document's prompt and output in the JSON")
    ap.add_argument("--compile-cache", default="~/.cache/caldera-jax/xla-cache", help="jax's compilation cache ('none': off)")
    return ap.parse_args(argv)


def _model(args, key: str):
    if args.lm == "caldera-jax":
        from caldera_jax.lmeval.adapter import register
        return register()(path=args.model, source=args.source, dtype=args.dtype, batch_size=args.batch_size,
                          max_length=args.max_length, codec=args.codec, router_mode=args.router_mode)
    if args.codec != "none":
        raise SystemExit("--codec runs in our JAX model only (--lm caldera-jax)")
    from caldera_jax.checkpoints_io import compressed as ck
    if not os.path.isdir(args.model) or os.path.isfile(os.path.join(args.model, ck.CONFIG_FILE)):
        raise SystemExit(f"{args.model}: --lm hf needs a HF directory (export a CALDERA checkpoint with "
                         f"`python -m experiments.export_hf --ckpt {args.model} --out DIR`)")
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=os.path.abspath(args.model), dtype=args.dtype, batch_size=args.batch_size,
                max_length=args.max_length, device="cpu")


def main(argv=None) -> dict:
    args = _parse(argv)
    from caldera_jax import runtime
    runtime.setup(compile_cache=args.compile_cache, hf_offline=True)
    from caldera_jax.checkpoints_io.compressed import atomic_write_bytes
    from caldera_jax.lmeval import tasks_dir
    from caldera_jax.lmeval.model import identity, model_key
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ident = identity(args.model, args.dtype)
    if args.codec != "none":
        from caldera_jax.moe.codec_spec import codec_identity
        ident = {**ident, **codec_identity(args.codec), "router_mode": args.router_mode}
    key = model_key(ident)
    out = os.path.abspath(args.out or os.path.join("runs", "eval", os.path.basename(ident["path"].rstrip("/"))))
    if os.path.isfile(out):
        raise SystemExit(f"{out}: --out is a file, not a directory")
    os.makedirs(out, exist_ok=True)

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table
    logging.getLogger("lm_eval.api.task").setLevel(logging.ERROR)   # "custom kwargs" notice, once per task
    tm = TaskManager(include_path=tasks_dir(), include_defaults=False)
    unknown = sorted(set(tasks) - set(tm.all_tasks))
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {', '.join(unknown)} (known: {', '.join(sorted(tm.all_tasks))})")
    lm = _model(args, key)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=tm,
        use_cache=None if args.no_cache else os.path.join(out, f"requests-{args.lm}-{key}"),
        apply_chat_template=args.apply_chat_template, fewshot_as_multiturn=args.fewshot_as_multiturn,
        log_samples=args.log_samples, verbosity="WARNING", bootstrap_iters=1000)
    wall = time.perf_counter() - t0
    print(make_table(res))
    examples = sum(v.get("effective", 0) for v in res.get("n-samples", {}).values())
    res["caldera"] = {"lm": args.lm, "model": ident, "model_key": key, "wall_s": round(wall, 2),
                      "examples": examples, "s_per_100_examples": round(100 * wall / max(examples, 1), 2),
                      "batch_size": args.batch_size, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    name = (f"{args.lm}-{'+'.join(tasks)}" + (f"-limit{args.limit:g}" if args.limit else "")
            + ("" if args.codec == "none" else f"-codec-{os.path.basename(args.codec.rstrip('/'))}")
            + (f"-router-{args.router_mode}" if args.router_mode else ""))
    path = os.path.join(out, name + ".json")
    atomic_write_bytes(path, (json.dumps(res, indent=1, default=handle_non_serializable, ensure_ascii=False)
                              + "\n").encode())
    print(f"{examples} examples in {wall:.1f} s ({res['caldera']['s_per_100_examples']} s / 100); wrote {path}")
    return res


if __name__ == "__main__":
    main()
