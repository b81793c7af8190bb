"""Perplexity of a token stream, in fixed non-overlapping windows.

The stream is cut into `n_windows = min(len // seq_len, max_tokens // seq_len)` windows of
`seq_len` tokens; each window predicts its last seq_len - 1 tokens. PPL = exp(mean NLL) over all
predicted tokens (natural log). The same windows are used by the transformers reference in tests
and benchmarks, so the figures are comparable.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from caldera_jax.config import ModelConfig
from caldera_jax.models.decoder import (default_positions, final_logits, forward, representative_layer,
                                        standalone_layer)
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.train.loop import token_nll
from caldera_jax.params import unflatten


def tokenize_text(tokenizer, path: str) -> np.ndarray:
    """A text file's token ids [N] int32 (no special tokens), for perplexity."""
    with open(path, encoding="utf-8") as f:
        return np.asarray(tokenizer(f.read(), add_special_tokens=False)["input_ids"], np.int32)


def windows(token_ids: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """1-D token ids -> [n_windows, seq_len]."""
    token_ids = np.asarray(token_ids)
    n = len(token_ids) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    if n == 0:
        raise ValueError(f"text has {len(token_ids)} tokens, fewer than one window of {seq_len}")
    return token_ids[: n * seq_len].reshape(n, seq_len)


@jax.jit
def window_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Summed next-token NLL (float32) of windows: logits [B, T, V], tokens [B, T] -> [B]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum(axis=1)


def perplexity(logits_fn: Callable[[np.ndarray], jax.Array], token_ids: np.ndarray, seq_len: int = 512,
               batch_size: int = 4, max_tokens: int | None = None, desc: str = "perplexity") -> dict:
    """logits_fn: tokens [B, seq_len] -> logits [B, seq_len, V]. Returns {ppl, nll, tokens, windows}."""
    w = windows(token_ids, seq_len, max_tokens)
    total = 0.0
    for s in tqdm(range(0, len(w), batch_size), desc=desc, unit="batch", leave=False):
        batch = w[s:s + batch_size]
        total += float(np.sum(np.asarray(window_nll(logits_fn(batch), jnp.asarray(batch)), np.float64)))
    count = len(w) * (seq_len - 1)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(w), "seq_len": seq_len}


def model_perplexity(params, cfg: ModelConfig, token_ids: np.ndarray, **kw) -> dict:
    """Perplexity of our model (jitted forward) on a token stream; kw as in `perplexity`."""
    return perplexity(lambda b: forward(params, cfg, jnp.asarray(b, jnp.int32)), token_ids, **kw)


_token_nll = jax.jit(token_nll)


def response_perplexity(params, cfg: ModelConfig, batches: Iterable[dict[str, np.ndarray]],
                        hooks: Hooks = Hooks(), desc: str = "response perplexity") -> dict:
    """Response-only perplexity of chat examples: batches of input_ids / attention_mask / labels
    [B, T] (caldera_jax.data.batching.padded_batches; labels -100 outside assistant turns).
    Position t's logits predict labels[t + 1]. Returns {ppl, nll, tokens, sequences}."""
    total, count, seqs = 0.0, 0, 0
    for b in tqdm(list(batches), desc=desc, unit="batch", leave=False):
        logits = forward(params, cfg, jnp.asarray(b["input_ids"], jnp.int32), jnp.asarray(b["attention_mask"]),
                         hooks=hooks)
        s, n = _token_nll(logits, jnp.asarray(b["labels"]))
        total, count = total + float(s), count + int(n)
        seqs += int(np.any(np.asarray(b["labels"])[:, 1:] >= 0, axis=1).sum())
    if count == 0:
        raise ValueError("response_perplexity: no response tokens in the batches")
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "sequences": seqs}


# ------------------------------------------------------------------ one layer in memory at a time
@functools.partial(jax.jit, static_argnames=("cfg", "i"))
def _layer(p, cfg: ModelConfig, i: int, h, mask, positions):
    return standalone_layer(Ctx(Hooks(), {}), i, p, cfg, h, mask, positions)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head_nll(globals_, cfg: ModelConfig, h, tokens):
    return window_nll(final_logits(Ctx(Hooks(), {}), globals_, cfg, h), tokens)


def streamed_perplexity(read_layer: Callable[[int], Any], read_globals: Callable[[], dict[str, Any]],
                        cfg: ModelConfig, token_ids: np.ndarray, seq_len: int = 512, batch_size: int = 4,
                        max_tokens: int | None = None, desc: str = "perplexity") -> dict:
    """`perplexity` of a model read one decoder layer at a time, for models that do not fit in
    memory whole: read_layer(i) -> layer i's params (relative to model.layers.{i}; arrays or
    quantized leaves), read_globals() -> {canonical name: array} of the embedding, final norm and
    (untied) LM head. Holds the hidden states of every window (windows x seq_len x hidden float32),
    one layer, the globals and one window's logits. Same windows and result as `model_perplexity`."""
    w = windows(token_ids, seq_len, max_tokens)
    glob = unflatten({n: jnp.asarray(a, jnp.float32) for n, a in read_globals().items()})
    batches = [jnp.asarray(w[s:s + batch_size]) for s in range(0, len(w), batch_size)]
    masks = [jnp.ones(b.shape, bool) for b in batches]
    positions = [default_positions(m) for m in masks]
    embed = glob["model"]["embed_tokens"]["weight"]
    hs = [jnp.take(embed, b, axis=0) for b in batches]
    if not cfg.tie_word_embeddings:
        del glob["model"]["embed_tokens"]                 # the head is lm_head; free the embedding
    del embed
    bar = tqdm(total=cfg.num_hidden_layers + 1, desc=desc, unit="layer", leave=False)
    for i in range(cfg.num_hidden_layers):
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32) if isinstance(a, np.ndarray) else a, read_layer(i))
        rep = representative_layer(cfg, i)
        hs = [_layer(p, cfg, rep, h, m, pos) for h, m, pos in zip(hs, masks, positions)]
        del p
        bar.update()
    # the head one window at a time: logits [1, seq_len, V] float32 (V = 152k: 0.3 GB, not 1.2 GB a batch)
    total = sum(float(np.asarray(_head_nll(glob, cfg, h[j:j + 1], b[j:j + 1]), np.float64)[0])
                for h, b in zip(hs, batches) for j in range(b.shape[0]))
    bar.update()
    bar.close()
    count = len(w) * (seq_len - 1)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(w), "seq_len": seq_len}
