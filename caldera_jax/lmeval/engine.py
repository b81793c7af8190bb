"""Batched scoring and greedy decoding for evaluation, over a few bucketed shapes.

    b = Buckets(batch=8)
    score(params, cfg, [(tokens, n_cont), ...], b)        -> [(sum logprob, is_greedy)]
    greedy(params, cfg, [prompt ids, ...], 256, stop, b)   -> [generated ids]

Scoring packs each distinct context once, followed by its continuations, into rows of 128, 256
or 512 slots (first-fit decreasing, ~97% full on ARC/PIQA/HellaSwag): a continuation attends to
its context and itself only, so the choices of a multiple-choice question cost one context pass
and there is almost no padding; a whole task compiles a few shapes. Longer contexts (and
generation) run prefill + KV-cache extend/decode at shapes taken from `Buckets` (rows padded with
copies of the first row, lengths padded to the next bucket), longest first as lm-eval's HF
backend does. Pure functions over the parameter pytree: `params` may
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
from caldera_jax.models.decoder import decode_step, extend, forward, prefill, select_rows
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
        return min(self.batch, _pow2(n))


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
PACK_LENGTHS = (128, 256, 512)            # packed row lengths (a unit goes to the shortest that holds
                                          # it: attention costs row length per token); a longer
                                          # context and its continuations run as prefill + extend
PACK_TOKENS_PER_ROW = 256                 # a packed call holds Buckets.batch x this many slots


def _target_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] float32, targets [...] -> (log p(target), target is the argmax); the
    log-softmax is never materialized (logit - logsumexp)."""
    lp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return lp, jnp.argmax(logits, axis=-1) == targets


@partial(jax.jit, static_argnames=("cfg", "hooks"))
def packed_logprobs(params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, unit: jax.Array,
                    branch: jax.Array, out_pos: jax.Array, targets: jax.Array, hooks: Hooks = Hooks()):
    """Scores continuations packed into rows with their contexts (one copy of each context, its
    continuations after it, each seeing only the context and itself). tokens, positions, unit,
    branch [R, T]: unit = which context a slot belongs to (-1: empty), branch = 0 for the context,
    j for its j-th continuation; out_pos [P]: the slots (row * T + position) whose next-token
    distribution is read, targets [P] the tokens scored there.
    -> (log p(target) [P] float32, target is the argmax [P] bool)."""
    mask = unit >= 0
    pairs = (mask[:, :, None] & (unit[:, :, None] == unit[:, None, :])          # [R, T, T], on top of causality
             & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))
    logits = forward(params, cfg, tokens, mask, positions, hooks=hooks, segment_ids=pairs,
                     logits_at=out_pos).astype(jnp.float32)[0]
    return _target_logprobs(logits, targets)


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
        more, _ = extend(params, cfg, select_rows(cache, rows), cont[:, :-1], cont_mask[:, :-1], hooks=hooks)
        logits = jnp.concatenate([logits, more.astype(jnp.float32)], axis=1)
    return _target_logprobs(logits, cont)


def _cont_length(buckets: Buckets, n: int) -> int:
    return next((b for b in CONT_LENGTHS if n <= b), None) or buckets.length(n)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _unit_length(ctx: tuple[int, ...], conts: list[np.ndarray]) -> int:
    """Slots a context and its continuations take in a packed row (a continuation's last token
    is only a target, never an input)."""
    return len(ctx) + sum(len(c) - 1 for c in conts)


def _pack_rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: unit indices per row, every row's total <= row_len."""
    rows, room = [], []
    for u in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((j for j, free in enumerate(room) if free >= lengths[u]), None)
        if r is None:
            rows.append([])
            room.append(row_len)
            r = len(rows) - 1
        rows[r].append(u)
        room[r] -= lengths[u]
    return rows


def _layout_row(units: list[tuple[tuple[int, ...], list[int], list[np.ndarray]]], row_len: int):
    """One packed row: [ctx_a | cont_a1[:-1] | cont_a2[:-1] | ... | ctx_b | ...].
    -> tokens, positions, unit, branch [T] (as packed_logprobs takes them); reads: (item, slot,
    target) per scored token."""
    tokens, positions = np.zeros(row_len, np.int32), np.zeros(row_len, np.int32)
    unit, branch = np.full(row_len, -1, np.int32), np.zeros(row_len, np.int32)
    reads, s = [], 0
    for u, (ctx, ks, conts) in enumerate(units):
        c = len(ctx)
        tokens[s:s + c], positions[s:s + c], unit[s:s + c] = ctx, np.arange(c), u
        last, s = s + c - 1, s + c
        for j, (k, cont) in enumerate(zip(ks, conts), 1):
            body = cont[:-1]
            n = len(body)
            tokens[s:s + n], positions[s:s + n], unit[s:s + n], branch[s:s + n] = body, c + np.arange(n), u, j
            slots = [last] + list(range(s, s + n))
            reads += [(k, slot, int(t)) for slot, t in zip(slots, cont)]
            s += n
    return tokens, positions, unit, branch, reads


def score(params, cfg: ModelConfig, items: Sequence[tuple[Sequence[int], int]], buckets: Buckets = Buckets(),
          hooks: Hooks = Hooks(), on_batch: Callable[[list[int], list[tuple[float, bool]]], None] | None = None
          ) -> list[tuple[float, bool]]:
    """items: (tokens, n_cont): a sequence of >= 2 token ids whose last n_cont (>= 1) are scored
    given everything before them. Returns (sum of their log-probabilities, every one of them is the
    greedy choice) per item, in input order. Items with the same context (the choices of a
    multiple-choice question) share it: a context and its continuations are packed into rows of
    PACK_LENGTHS tokens (`buckets.batch` rows per call, a few compiled shapes for a whole task);
    longer ones run as prefill + extend. on_batch(indices, results) is called after each call."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (toks, n) in enumerate(items):
        if not 1 <= n < len(toks):
            raise ValueError(f"item {k}: needs 1 <= n_cont < len(tokens), got n_cont={n}, {len(toks)} tokens")
        groups.setdefault(tuple(int(t) for t in toks[:len(toks) - n]), []).append(k)
    out: list[tuple[float, bool] | None] = [None] * len(items)

    def finish(idx: list[int], res: list[tuple[float, bool]]):
        for k, r in zip(idx, res):
            out[k] = r
        if on_batch is not None:
            on_batch(idx, res)

    units = [(ctx, ks, [np.asarray(items[k][0][len(items[k][0]) - items[k][1]:], np.int32) for k in ks])
             for ctx, ks in groups.items()]
    lengths = [_unit_length(ctx, conts) for ctx, _, conts in units]
    long = {units[u][0]: units[u][1] for u, n in enumerate(lengths) if n > PACK_LENGTHS[-1]}
    if long:
        _score_prefix_calls(params, cfg, items, long, buckets, hooks, finish)
    for row_len, shorter in reversed(list(zip(PACK_LENGTHS, (0,) + PACK_LENGTHS[:-1]))):
        cls = [u for u, n in enumerate(lengths) if shorter < n <= row_len]
        if cls:
            _score_packed(params, cfg, [units[u] for u in cls], [lengths[u] for u in cls], row_len,
                          buckets, hooks, finish)
    return out  # type: ignore[return-value]


def _score_packed(params, cfg, units, lengths, row_len, buckets, hooks, finish):
    """Units (context, item indices, continuations) packed into rows of row_len slots; about
    buckets.batch x PACK_TOKENS_PER_ROW slots per call (fewer where the call's float32 logits
    would pass the budget). The LM head runs only on the slots read, counted over the whole call
    and rounded up to an eighth of its slots (a few shapes per task)."""
    per_call = 1 << (max(1, buckets.batch * PACK_TOKENS_PER_ROW // row_len).bit_length() - 1)   # a power of two
    step = max(16, per_call * row_len // 8)
    rows = [[units[u] for u in r] for r in _pack_rows(lengths, row_len)]
    n_reads = [sum(len(c) for _, _, conts in r for c in conts) for r in rows]
    calls, cur = [], []
    for r in range(len(rows)):
        P = _round_up(sum(n_reads[i] for i in cur) + n_reads[r], step)
        if cur and (len(cur) == per_call or 2 * P * cfg.vocab_size * 4 > LOGITS_BUDGET_BYTES):
            calls.append(cur)
            cur = []
        cur.append(r)
    calls.append(cur)
    for call in calls:
        laid = [_layout_row(rows[r], row_len) for r in call]
        R, P = _pow2(len(call)), _round_up(sum(n_reads[r] for r in call), step)
        tokens, positions, unit, branch = (np.zeros((R, row_len), np.int32) for _ in range(4))
        unit[:] = -1                                                            # padding rows: empty
        reads = [(k, r * row_len + slot, tgt) for r, (*_, rd) in enumerate(laid) for k, slot, tgt in rd]
        out_pos, targets = np.zeros(P, np.int32), np.zeros(P, np.int32)
        out_pos[:len(reads)], targets[:len(reads)] = [x[1] for x in reads], [x[2] for x in reads]
        for r, (t, p, u, b, _) in enumerate(laid):
            tokens[r], positions[r], unit[r], branch[r] = t, p, u, b
        lp, gr = (np.asarray(a) for a in packed_logprobs(
            params, cfg, *(jnp.asarray(a) for a in (tokens, positions, unit, branch, out_pos, targets)), hooks=hooks))
        sums: dict[int, float] = {}
        greedy_all: dict[int, bool] = {}
        for j, (k, _, _) in enumerate(reads):
            sums[k] = sums.get(k, 0.0) + float(lp[j])
            greedy_all[k] = greedy_all.get(k, True) and bool(gr[j])
        finish(list(sums), [(sums[k], greedy_all[k]) for k in sums])


def _score_prefix_calls(params, cfg, items, groups: dict[tuple[int, ...], list[int]], buckets, hooks, finish):
    """groups: context -> its items (long contexts): each context prefilled once, its continuations
    extended on copies of its KV cache; `buckets.batch` contexts per call."""
    ctxs = list(groups)

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
        n_rows = _pow2(len(idx))
        cont, cont_mask = _pad_rows(conts, n_rows, C, left=False)
        rows_arr = np.asarray(rows + [0] * (n_rows - len(rows)), np.int32)
        lp, gr = (np.asarray(a) for a in continuation_logprobs(
            params, cfg, jnp.asarray(ctx), jnp.asarray(ctx_mask), jnp.asarray(rows_arr), jnp.asarray(cont),
            jnp.asarray(cont_mask), Tc + C, hooks=hooks))
        finish(idx, [(float(np.sum(lp[r, :items[k][1]], dtype=np.float64)), bool(np.all(gr[r, :items[k][1]])))
                     for r, k in enumerate(idx)])


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
