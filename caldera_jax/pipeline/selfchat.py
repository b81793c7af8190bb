"""A chat set answered by the uncompressed model itself: training data that teaches a compressed
model (or a codec) to behave like the original, from questions no evaluation here scores on.

    run(SelfChatJob(model="…/smollm2-135m-instruct", evalsets="…/evalsets", out="selfchat.jsonl"))

Prompts: the questions of the given evalset splits (default ARC-Easy and ARC-Challenge
*validation*: the evaluations score their *test* splits), each with its options and "answer with
the letter, then explain briefly". Answers: greedy decoding with our KV cache
(caldera_jax.models.generate), batches of prompts of similar length (lengths padded to multiples
of 32 so few shapes compile), stopped at the chat template's end of turn or max_new_tokens.
Output: JSONL of {"id", "source", "messages": [user, assistant], "finished"}, in the prompts'
order; rows are appended to OUT.partial as batches finish, so a rerun continues where a killed
run stopped, and OUT appears (renamed) only when complete, with OUT.meta.json (model, sets,
settings, counts).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from caldera_jax.checkpoints_io.atomic import fsync_path
from caldera_jax.checkpoints_io.model_source import load_model
from caldera_jax.models.generate import generate

DEFAULT_SETS = ("arc_easy/validation", "arc_challenge/validation")
BUCKET = 32


@dataclasses.dataclass(frozen=True)
class SelfChatJob:
    model: str
    evalsets: str                          # the `evalsets` asset directory
    out: str                               # .jsonl
    sets: tuple[str, ...] = DEFAULT_SETS   # "<set>/<split>" files of the evalsets asset
    max_new_tokens: int = 128
    batch_size: int = 16
    limit: int | None = None               # first N prompts (after ordering by set, then file order)
    progress: bool = True


def arc_prompt(row: dict) -> str:
    opts = "\n".join(f"{lab}. {txt}" for lab, txt in zip(row["choices"]["label"], row["choices"]["text"]))
    return f"{row['question']}\n\n{opts}\n\nAnswer with the letter of the correct option, then explain briefly."


def read_prompts(evalsets: str, sets: tuple[str, ...]) -> list[dict]:
    """[{"id", "source", "prompt"}] from the evalsets files (ARC-style rows)."""
    out = []
    for s in sets:
        path = os.path.join(evalsets, s + ".jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such evalset file (fetch it: python -m experiments.assets fetch evalsets)")
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                out.append({"id": f"{s}:{row['id']}", "source": s, "prompt": arc_prompt(row)})
    return out


def _done_ids(partial: str) -> set[str]:
    done = set()
    if os.path.isfile(partial):
        with open(partial) as f:
            for line in f:
                try:
                    done.add(json.loads(line)["id"])
                except (ValueError, KeyError):
                    break                          # a line cut by a kill: it and later ones are redone
    return done


def run(job: SelfChatJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    prompts = read_prompts(job.evalsets, job.sets)[: job.limit]
    cfg, params, tok = load_model(job.model, dtype=jnp.float32)
    if tok is None or not tok.chat_template:
        raise ValueError(f"{job.model}: needs a tokenizer with a chat template")
    partial = job.out + ".partial"
    done = _done_ids(partial)
    if done:                                      # keep the complete lines only
        with open(partial) as f:
            good = [line for line in f if _parses(line)]
        with open(partial, "w") as f:
            f.writelines(good)
        log(f"{job.out}: {len(done)} of {len(prompts)} answers already written; continuing")
    eos = sorted({i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), cfg.eos_token_id)
                  if isinstance(i, int) and i >= 0})
    todo = [p for p in prompts if p["id"] not in done]
    enc = {p["id"]: tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True,
                                            tokenize=True) for p in todo}
    enc = {k: (v["input_ids"] if hasattr(v, "keys") else v) for k, v in enc.items()}
    todo.sort(key=lambda p: len(enc[p["id"]]))    # similar lengths together
    bar = tqdm(total=len(prompts), initial=len(done), desc="self-chat", unit="answer", disable=not job.progress)
    with open(partial, "a") as f:
        for s in range(0, len(todo), job.batch_size):
            batch = todo[s:s + job.batch_size]
            T = -(-max(len(enc[p["id"]]) for p in batch) // BUCKET) * BUCKET
            ids = np.zeros((job.batch_size, T), np.int32)
            mask = np.zeros((job.batch_size, T), bool)
            for r, p in enumerate(batch):
                e = enc[p["id"]]
                ids[r, T - len(e):], mask[r, T - len(e):] = e, True
            mask[len(batch):, -1] = True                      # filler rows: one token, discarded
            new = generate(params, cfg, ids, mask, max_new_tokens=job.max_new_tokens, eos_token_id=tuple(eos))
            for r, p in enumerate(batch):
                row = new[r].tolist()
                stop = next((j for j, t in enumerate(row) if t in eos), None)
                reply = tok.decode(row[:stop], skip_special_tokens=True).strip()
                f.write(json.dumps({"id": p["id"], "source": p["source"], "finished": stop is not None,
                                    "messages": [{"role": "user", "content": p["prompt"]},
                                                 {"role": "assistant", "content": reply}]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    order = {p["id"]: k for k, p in enumerate(prompts)}
    with open(partial) as f:
        rows = sorted((json.loads(line) for line in f), key=lambda r: order[r["id"]])
    tmp = job.out + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    fsync_path(tmp)
    meta = {"model": os.path.abspath(job.model), "sets": list(job.sets), "max_new_tokens": job.max_new_tokens,
            "decoding": "greedy", "rows": len(rows), "finished": sum(r["finished"] for r in rows),
            "empty_replies": sum(not r["messages"][1]["content"] for r in rows)}
    with open(job.out + ".meta.json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(job.out + ".meta.json.tmp", job.out + ".meta.json")
    os.replace(tmp, job.out)
    os.remove(partial)
    log(f"{job.out}: {meta['rows']} answers ({meta['finished']} ended at end-of-turn, "
        f"{meta['empty_replies']} empty)")
    return meta


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False
