"""Batched generation with the KV cache: greedy (temperature 0) or sampled (temperature, top-k, top-p)."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.config import ModelConfig
from caldera_jax.models.decoder import decode_step, prefill
from caldera_jax.models.hooks import Hooks


def left_pad(tokens: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves every row's real tokens to the right end (generation appends after the last column)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    out_t, out_m = np.full_like(tokens, pad_id), np.zeros_like(mask)
    for b in range(tokens.shape[0]):
        real = tokens[b][mask[b]]
        if len(real):
            out_t[b, -len(real):], out_m[b, -len(real):] = real, True
    return out_t, out_m


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """logits [B, V] -> token ids [B]. temperature 0 means greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "hooks"))
def _generate(params, cfg: ModelConfig, tokens, mask, key, eos_ids, pad_id, max_new_tokens: int,
              temperature: float, top_k, top_p, hooks: Hooks):
    B, T = tokens.shape
    logits, cache = prefill(params, cfg, tokens, mask, T + max_new_tokens, hooks=hooks)

    def step(carry, key_t):
        logits, cache, done = carry
        tok = sample_logits(logits, key_t, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
        logits, cache = decode_step(params, cfg, cache, tok, hooks=hooks)
        return (logits, cache, done), tok

    keys = jax.random.split(key, max_new_tokens)
    _, toks = jax.lax.scan(step, (logits, cache, jnp.zeros((B,), bool)), keys)
    return toks.T


def generate(params, cfg: ModelConfig, tokens, attention_mask=None, *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             key: jax.Array | None = None, eos_token_id: int | tuple[int, ...] | None = None,
             pad_token_id: int | None = None, hooks: Hooks = Hooks()) -> np.ndarray:
    """Continues a batch of prompts. tokens [B, T] (any padding side) -> new tokens [B, max_new_tokens].

    After a row emits an EOS token it emits `pad_token_id` (default: the EOS id, else 0).
    """
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                         else (eos[0] if eos else 0))
    tokens, mask = left_pad(tokens, mask, pad)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key")
    key = jax.random.key(0) if key is None else key
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    out = _generate(params, cfg, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), key, eos_arr,
                    jnp.int32(pad), max_new_tokens, float(temperature), top_k, top_p, hooks)
    return np.asarray(out)
