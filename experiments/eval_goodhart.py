"""Goodhart-gap probes: does a model still understand multi-step problems it no longer solves?

    python -m experiments.eval_goodhart --model LABEL=PATH [--model LABEL2=PATH2 ...] [--source ORIGINAL] \\
        [--per-category 5] [--paraphrases 3] [--seed 0] [--max-gen-toks 256] [--batch-size 8] \\
        [--dtype float32] [--no-chat-template] [--out runs/goodhart] [--no-progress]

PATH: anything the lm-eval adapter opens (HF directory, .gguf file, CALDERA checkpoint; --source is
the original a checkpoint was built from, checked). Problems: caldera_jax/eval/goodhart.py, ten
categories (discount + coupon, time durations, compound interest, recipe scaling, unit chains,
transitive ordering, scheduling, percent change, average speed, work rates), --per-category per
category from templates with verified answers, each asked in --paraphrases wordings.
Understanding: the plan the model scores highest of four (log-likelihood); execution: its greedy
step-by-step answer ("Answer: <number>"), with the model's chat template when it has one. A gap:
understood but wrong; a reverse gap: right without picking the right plan. Rates average each
problem's wordings first; ± is the standard error across problems.

Writes <out>/goodhart.json (every problem, prompt, generation, extracted answer and score per
configuration, and the summaries, per category too) and prints one row per configuration. Finished
items are appended to <out>/cache/<model key>.jsonl as they finish (the key changes when the
weights do): rerun the same command after an interruption and only the missing items run; a
configuration with nothing missing is not even loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Iterable

from caldera_jax import runtime
from experiments import cli


def parse_models(specs: Iterable[str]) -> list[tuple[str, str]]:
    """--model LABEL=PATH values -> [(label, absolute path)]; refuses a value without '=', an empty
    label, a duplicate label or a path that does not exist."""
    out: list[tuple[str, str]] = []
    for s in specs:
        label, eq, path = s.partition("=")
        label, path = label.strip(), path.strip()
        if not eq or not label or not path:
            raise ValueError(f"--model {s!r}: expected LABEL=PATH (e.g. original=models/smollm2)")
        if label in (l for l, _ in out):
            raise ValueError(f"--model {s!r}: label {label!r} given twice (each configuration needs its own)")
        if not os.path.exists(path):
            raise ValueError(f"--model {s!r}: {path}: no such file or directory")
        out.append((label, os.path.abspath(path)))
    if not out:
        raise ValueError("give at least one --model LABEL=PATH")
    return out


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.eval_goodhart", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=PATH",
                    help="a configuration: its label and a HF directory, .gguf file or CALDERA checkpoint (repeat)")
    ap.add_argument("--source", default=None, help="the model the CALDERA checkpoints were built from (checked)")
    ap.add_argument("--per-category", type=int, default=5, help="problems per category (default 5: 50 problems)")
    ap.add_argument("--paraphrases", type=int, default=3, help="wordings asked per problem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-gen-toks", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-chat-template", action="store_true", help="plain prompts even for chat models")
    ap.add_argument("--out", default=os.path.join("runs", "goodhart"))
    ap.add_argument("--compile-cache", default="~/.cache/caldera-jax/xla-cache",
                    help="jax's compilation cache ('none': off)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def _check(args: argparse.Namespace, max_paraphrases: int) -> list[tuple[str, str]]:
    """Every refusal that needs no model, before any model is loaded."""
    models = parse_models(args.model)
    for name, v, lo in (("--per-category", args.per_category, 1), ("--paraphrases", args.paraphrases, 1),
                        ("--max-gen-toks", args.max_gen_toks, 1), ("--batch-size", args.batch_size, 1)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if args.paraphrases > max_paraphrases:
        raise ValueError(f"--paraphrases {args.paraphrases}: the templates have {max_paraphrases} wordings each")
    if args.source is not None and not os.path.exists(args.source):
        raise ValueError(f"--source {args.source}: no such file or directory")
    if os.path.isfile(args.out):
        raise ValueError(f"--out {args.out}: a file, not a directory")
    return models


# ------------------------------------------------------------------ the per-configuration cache
def item_key(model_key: str, problem: Any, k: int, kind: str, settings: dict[str, Any]) -> str:
    """Names one result: problem id, wording, kind, and a digest of everything it depends on (the
    weights, the wording, the plans, the prompt settings)."""
    from caldera_jax.eval.goodhart import PROMPT_VERSION
    blob = json.dumps([PROMPT_VERSION, model_key, problem.id, k, problem.paraphrases[k],
                       problem.understanding.options, kind, settings], sort_keys=True)
    return f"{problem.id}/{k}/{kind}/{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def load_cache(path: str) -> dict[str, dict[str, Any]]:
    """key -> record from a JSONL cache (a torn last line, from an interrupted write, is skipped)."""
    out: dict[str, dict[str, Any]] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    return out


def append_cache(path: str, records: list[dict[str, Any]]) -> None:
    """Appends records to the JSONL cache, on disk before returning."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() > 0:                                     # a torn line from a kill: start a new one
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write("\n")
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def _chunks(xs: list, n: int) -> Iterable[list]:
    for s in range(0, len(xs), n):
        yield xs[s:s + n]


def run_config(label: str, path: str, problems: list, args: argparse.Namespace, out: str) -> dict[str, Any]:
    """Scores one configuration (what is not cached yet: the model is opened only then) and returns
    its items (one per problem and wording) and summary."""
    from tqdm.auto import tqdm
    from caldera_jax.eval import goodhart as gh
    from caldera_jax.lmeval.model import identity, model_key
    ident = identity(path, args.dtype)
    key = model_key(ident)
    cache_path = os.path.join(out, "cache", f"{key}.jsonl")
    cache = load_cache(cache_path)
    settings = {"chat": not args.no_chat_template}
    items = [(p, k) for p in problems for k in range(args.paraphrases)]
    ukeys = {(p.id, k): item_key(key, p, k, "understanding", settings) for p, k in items}
    ekeys = {(p.id, k): item_key(key, p, k, "execution", {**settings, "max_gen_toks": args.max_gen_toks})
             for p, k in items}
    todo_u = [(p, k) for p, k in items if ukeys[p.id, k] not in cache]
    todo_e = [(p, k) for p, k in items if ekeys[p.id, k] not in cache]
    fresh: set[str] = set()
    t0 = time.perf_counter()
    if todo_u or todo_e:
        from caldera_jax.lmeval.adapter import lm_class
        lm = lm_class()(path=path, source=args.source, dtype=args.dtype, batch_size=args.batch_size,
                        max_gen_toks=args.max_gen_toks)
        chat = None if args.no_chat_template else gh.chat_formatter(lm)
        bar = tqdm(total=len(todo_u) + len(todo_e), desc=f"{label}", unit="item", disable=args.no_progress)
        reqs = sorted(((p, k, gh.understanding_request(p, k, chat)) for p, k in todo_u), key=lambda x: -len(x[2][0]))
        for chunk in _chunks(reqs, args.batch_size):
            scores = gh.score_plans(lm, [r for _, _, r in chunk])
            recs = [{"key": ukeys[p.id, k], "kind": "understanding", "prompt": r[0], "continuations": r[1],
                     **gh.understanding_record(p, k, s, r[1])} for (p, k, r), s in zip(chunk, scores)]
            append_cache(cache_path, recs)
            cache.update((r["key"], r) for r in recs)
            fresh.update(r["key"] for r in recs)
            bar.update(len(chunk))
        prompts = sorted(((p, k, gh.execution_prompt(p, k, chat)) for p, k in todo_e), key=lambda x: -len(x[2]))
        for chunk in _chunks(prompts, args.batch_size):
            texts = gh.generate(lm, [q for _, _, q in chunk], args.max_gen_toks)
            recs = [{"key": ekeys[p.id, k], "kind": "execution", "prompt": q, **gh.execution_record(p, k, t)}
                    for (p, k, q), t in zip(chunk, texts)]
            append_cache(cache_path, recs)
            cache.update((r["key"], r) for r in recs)
            fresh.update(r["key"] for r in recs)
            bar.update(len(chunk))
        bar.close()
        del lm
    rows = []
    for p, k in items:
        u, e = cache[ukeys[p.id, k]], cache[ekeys[p.id, k]]
        rows.append({"problem": p.id, "category": p.category, "paraphrase": k,
                     "understanding": {f: u[f] for f in ("prompt", "continuations", "scores", "choice",
                                                         "correct_choice", "choice_per_char")},
                     "execution": {f: e[f] for f in ("prompt", "generation", "extracted", "answer", "matches_plan")},
                     "understood": u["understood"], "correct": e["correct"],
                     "cached": ukeys[p.id, k] not in fresh and ekeys[p.id, k] not in fresh})
    return {"label": label, "model": ident, "model_key": key, "cache": cache_path,
            "computed": len(fresh), "cached": 2 * len(items) - len(fresh),
            "wall_s": round(time.perf_counter() - t0, 2), "summary": gh.aggregate(rows), "items": rows}


# ------------------------------------------------------------------ report
def _cell(m: dict[str, float | None]) -> str:
    if m["rate"] is None:
        return "-"
    se = "" if m["stderr"] is None else f" ± {100 * m['stderr']:.1f}"
    return f"{100 * m['rate']:.1f}{se}"


COLUMNS = (("understanding", "understanding %"), ("execution", "execution %"), ("gap", "gap %"),
           ("reverse_gap", "reverse gap %"), ("gap_given_understood", "gap | understood %"))


def table(configs: list[dict[str, Any]], paraphrases: int) -> str:
    """One row per configuration: the rates ± standard error (percent) and n (problems x wordings)."""
    head = ["configuration"] + [h for _, h in COLUMNS] + ["n"]
    rows = [[c["label"]] + [_cell(c["summary"][k]) for k, _ in COLUMNS]
            + [f"{c['summary']['n_problems']} x {paraphrases}"] for c in configs]
    w = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w[0]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    from caldera_jax.eval import goodhart as gh
    problems = gh.problem_set(max(args.per_category, 1), args.seed)
    models = _check(args, min(len(p.paraphrases) for p in problems))
    runtime.setup(compile_cache=args.compile_cache, hf_offline=True)
    from caldera_jax.checkpoints_io.compressed import atomic_write_bytes
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    configs = [run_config(label, path, problems, args, out) for label, path in models]
    report = {"settings": {"per_category": args.per_category, "paraphrases": args.paraphrases, "seed": args.seed,
                           "max_gen_toks": args.max_gen_toks, "batch_size": args.batch_size, "dtype": args.dtype,
                           "chat_template": not args.no_chat_template, "source": args.source,
                           "prompt_version": gh.PROMPT_VERSION, "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "problems": [dataclasses.asdict(p) for p in problems],
              "configurations": configs, "table": table(configs, args.paraphrases),
              "wall_s": round(time.perf_counter() - t0, 2)}
    path = os.path.join(out, "goodhart.json")
    atomic_write_bytes(path, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
    print(report["table"])
    done = sum(c["computed"] for c in configs)
    print(f"{len(problems)} problems x {args.paraphrases} wordings x {len(configs)} configurations "
          f"({done} items computed, {sum(c['cached'] for c in configs)} from the cache) in {report['wall_s']:.1f} s; "
          f"wrote {path}")
    return report


if __name__ == "__main__":
    cli.run(main)
