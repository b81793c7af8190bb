"""Perplexity of a token stream, in fixed non-overlapping windows.

The stream is cut into `n_windows = min(len // seq_len, max_tokens // seq_len)` windows of
`seq_len` tokens; each window predicts its last seq_len - 1 tokens. PPL = exp(mean NLL) over all
predicted tokens (natural log). The same windows are used by the transformers reference in tests
and benchmarks, so the figures are comparable.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from caldera_jax.config import ModelConfig
from caldera_jax.models.decoder import forward


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
