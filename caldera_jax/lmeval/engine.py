"""Batched scoring and greedy decoding for evaluation, over a few bucketed shapes.

    b = Buckets(batch=8)
    score(params, cfg, [(tokens, n_cont), ...], b)        -> [(sum logprob, is_greedy)]
    greedy(params, cfg, [prompt ids, ...], 256, stop, b)   -> [generated ids]

Every call runs at shapes taken from `Buckets` (rows padded with copies of the first row, lengths
padded to the next bucket), so a whole evaluation compiles a handful of programs instead of one
per request. Work is processed longest first (as lm-eval's HF backend does), so the rows of a
call have similar lengths. Scoring runs each distinct context once (prefill) and its
continuations on copies of its KV cache (decoder.extend): the choices of a multiple-choice
question cost one context pass, not one each. Pure functions over the parameter pytree: `params` may
hold arrays or quantized leaves (QLRWeight), `hooks` any caldera_jax.models.Hooks.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.config import ModelConfig
from caldera_jax.models.decoder import decode_step, extend, prefill
from caldera_jax.models.hooks import Hooks

DEFAULT_LENGTHS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """batch: rows per call (fewer rows are padded to the next power of two <= batch);
    lengths: the sequence lengths a call is padded to (beyond the last: multiples of the last);
    chunk: decode steps per compiled call (stop sequences are checked between calls)."""
    batch: int = 8
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    chunk: int = 16

    def __post_init__(self):
        if self.batch < 1 or self.chunk < 1 or not self.lengths or sorted(self.lengths) != list(self.lengths):
            raise ValueError(f"Buckets: batch and chunk must be >= 1 and lengths increasing, got {self}")

    def length(self, n: int) -> int:
        for b in self.lengths:
            if n <= b:
                return b
        return math.ceil(n / self.lengths[-1]) * self.lengths[-1]

    def rows(self, n: int) -> int:
        return min(self.batch, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _batches(lengths: Sequence[int], batch: int) -> list[list[int]]:
    """Indices sorted longest first (ties: original order), cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch] for s in range(0, len(order), batch)]


def _pad_rows(rows: list[np.ndarray], n_rows: int, length: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> (tokens [n_rows, length] int32, mask bool); missing rows copy row 0."""
    rows = rows + [rows[0]] * (n_rows - len(rows))
    toks, mask = np.zeros((n_rows, length), np.int32), np.zeros((n_rows, length), bool)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if left else slice(0, len(r))
        toks[i, sl], mask[i, sl] = r, True
    return toks, mask


# ------------------------------------------------------------------ scoring
CONT_LENGTHS = (1, 2, 4, 8, 16, 32)       # continuation buckets below Buckets.lengths
LOGITS_BUDGET_BYTES = 1 << 30             # a scoring call holds at most ~this much of float32 logits


@partial(jax.jit, static_argnames=("cfg", "max_len", "hooks"))
def continuation_logprobs(params, cfg: ModelConfig, ctx: jax.Array, ctx_mask: jax.Array, rows: jax.Array,
                          cont: jax.Array, cont_mask: jax.Array, max_len: int, hooks: Hooks = Hooks()):
    """Scores continuations after shared contexts: each context once, each continuation on a copy
    of its context's KV cache. ctx [Bc, Tc] (left-padded), rows [Bk]: the context of each
    continuation, cont [Bk, C] (right-padded, C >= 1), max_len = Tc + C.
    -> (log p(cont token) [Bk, C] float32, cont token is the argmax [Bk, C] bool)."""
    last, cache = prefill(params, cfg, ctx, ctx_mask, max_len, hooks=hooks)
    logits = last[rows][:, None].astype(jnp.float32)                       # predicts cont[:, 0]
    if cont.shape[1] > 1:                                                  # the rest: one pass
        cache = jax.tree.map(lambda a: a[rows] if a.ndim else a, cache)
        more, _ = extend(params, cfg, cache, cont[:, :-1], cont_mask[:, :-1], hooks=hooks)
        logits = jnp.concatenate([logits, more.astype(jnp.float32)], axis=1)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), cont[..., None], axis=-1)[..., 0]
    return lp, jnp.argmax(logits, axis=-1) == cont


def _cont_length(buckets: Buckets, n: int) -> int:
    return next((b for b in CONT_LENGTHS if n <= b), None) or buckets.length(n)


def score(params, cfg: ModelConfig, items: Sequence[tuple[Sequence[int], int]], buckets: Buckets = Buckets(),
          hooks: Hooks = Hooks(), on_batch: Callable[[list[int], list[tuple[float, bool]]], None] | None = None
          ) -> list[tuple[float, bool]]:
    """items: (tokens, n_cont): a sequence of >= 2 token ids whose last n_cont (>= 1) are scored
    given everything before them. Returns (sum of their log-probabilities, every one of them is the
    greedy choice) per item, in input order. Items with the same context (the choices of a
    multiple-choice question) share one pass over it; a call holds `buckets.batch` contexts and
    their continuations. on_batch(indices, results) is called after each call."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (toks, n) in enumerate(items):
        if not 1 <= n < len(toks):
            raise ValueError(f"item {k}: needs 1 <= n_cont < len(tokens), got n_cont={n}, {len(toks)} tokens")
        groups.setdefault(tuple(int(t) for t in toks[:len(toks) - n]), []).append(k)
    ctxs = list(groups)
    out: list[tuple[float, bool] | None] = [None] * len(items)

    def fits(cidx: list[int]) -> bool:        # the call's float32 logits [rows, C, V] stay under the budget
        n_rows = sum(len(groups[ctxs[c]]) for c in cidx)
        C = _cont_length(buckets, max(items[k][1] for c in cidx for k in groups[ctxs[c]]))
        return len(cidx) == 1 or 2 * n_rows * C * cfg.vocab_size * 4 <= LOGITS_BUDGET_BYTES

    calls, todo = [], _batches([len(c) + max(items[k][1] for k in groups[c]) for c in ctxs], buckets.batch)
    while todo:
        cidx = todo.pop(0)
        if fits(cidx):
            calls.append(cidx)
        else:
            todo[:0] = [cidx[:len(cidx) // 2], cidx[len(cidx) // 2:]]
    for cidx in calls:
        batch_ctx = [ctxs[c] for c in cidx]
        idx = [k for c in batch_ctx for k in groups[c]]
        rows = [r for r, c in enumerate(batch_ctx) for _ in groups[c]]
        conts = [np.asarray(items[k][0][len(items[k][0]) - items[k][1]:], np.int32) for k in idx]
        Tc, C = buckets.length(max(len(c) for c in batch_ctx)), _cont_length(buckets, max(len(c) for c in conts))
        ctx, ctx_mask = _pad_rows([np.asarray(c, np.int32) for c in batch_ctx], buckets.rows(len(cidx)), Tc, left=True)
        n_rows = 1 << max(0, math.ceil(math.log2(len(idx))))
        cont, cont_mask = _pad_rows(conts, n_rows, C, left=False)
        rows_arr = np.asarray(rows + [0] * (n_rows - len(rows)), np.int32)
        lp, gr = (np.asarray(a) for a in continuation_logprobs(
            params, cfg, jnp.asarray(ctx), jnp.asarray(ctx_mask), jnp.asarray(rows_arr), jnp.asarray(cont),
            jnp.asarray(cont_mask), Tc + C, hooks=hooks))
        res = []
        for r, k in enumerate(idx):
            n = items[k][1]
            res.append((float(np.sum(lp[r, :n], dtype=np.float64)), bool(np.all(gr[r, :n]))))
            out[k] = res[-1]
        if on_batch is not None:
            on_batch(idx, res)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------ greedy decoding
@partial(jax.jit, static_argnames=("cfg", "steps", "hooks"), donate_argnames=("cache",))
def decode_chunk(params, cfg: ModelConfig, cache, logits: jax.Array, done: jax.Array, eos_ids: jax.Array,
                 pad_id: jax.Array, steps: int, hooks: Hooks = Hooks()):
    """`steps` greedy steps from logits [B, V]: rows already done emit pad_id; a row is done once
    it emits an id in eos_ids. -> (tokens [B, steps], logits, cache, done)."""
    def step(carry, _):
        logits, cache, done = carry
        tok = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        logits, cache = decode_step(params, cfg, cache, tok, hooks=hooks)
        return (logits, cache, done), tok

    (logits, cache, done), toks = jax.lax.scan(step, (logits, cache, done), None, length=steps)
    return toks.T, logits, cache, done


def _until_eos(ids: np.ndarray, eos: set[int]) -> list[int]:
    out = []
    for t in ids.tolist():
        if t in eos:
            break
        out.append(t)
    return out


def greedy(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           stop: Callable[[int, list[int]], bool] | None = None, buckets: Buckets = Buckets(),
           eos_ids: Sequence[int] = (), pad_id: int = 0, hooks: Hooks = Hooks(),
           on_batch: Callable[[list[int], list[list[int]]], None] | None = None) -> list[list[int]]:
    """Greedy continuations of token prompts with the KV cache: per prompt, the new ids up to (not
    including) the first id of eos_ids, at most max_new_tokens. stop(k, ids) -> True once prompt k's
    ids so far (EOS excluded) hold a stop sequence: decoding of a batch ends when every row has
    stopped (checked every buckets.chunk steps; the caller cuts the text at the stop sequence).
    Same tokens as caldera_jax.models.generate at temperature 0."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = set(int(e) for e in eos_ids)
    eos_arr = jnp.asarray(sorted(eos) if eos else [-1], jnp.int32)
    steps = buckets.chunk
    G = math.ceil(max_new_tokens / steps) * steps
    out: list[list[int] | None] = [None] * len(prompts)
    for idx in _batches([len(p) for p in prompts], buckets.batch):
        rows = [np.asarray(prompts[i], np.int32) for i in idx]
        if min(len(r) for r in rows) == 0:
            raise ValueError("greedy: an empty prompt (give at least one token, e.g. BOS)")
        T = buckets.length(max(len(r) for r in rows))
        toks, mask = _pad_rows(rows, buckets.rows(len(idx)), T, left=True)
        logits, cache = prefill(params, cfg, jnp.asarray(toks), jnp.asarray(mask), T + G, hooks=hooks)
        done = jnp.asarray(np.arange(toks.shape[0]) >= len(idx))
        gen = np.zeros((toks.shape[0], 0), np.int32)
        while gen.shape[1] < max_new_tokens:
            new, logits, cache, done = decode_chunk(params, cfg, cache, logits, done, eos_arr,
                                                    jnp.int32(pad_id), steps, hooks=hooks)
            gen = np.concatenate([gen, np.asarray(new)], axis=1)
            ids = [_until_eos(gen[r, :max_new_tokens], eos) for r in range(len(idx))]
            hit_eos = np.asarray(done)
            finished = [bool(hit_eos[r]) or len(ids[r]) >= max_new_tokens
                        or (stop is not None and stop(i, ids[r])) for r, i in enumerate(idx)]
            if all(finished):
                break
        res = [_until_eos(gen[r, :max_new_tokens], eos) for r in range(len(idx))]
        for r, i in enumerate(idx):
            out[i] = res[r]
        if on_batch is not None:
            on_batch(list(idx), res)
    return out  # type: ignore[return-value]
