"""Grouped-query self-attention over a key/value buffer (the KV cache, or just this call's keys).

One code path serves the full forward, prefill and single-token decode: the T new keys/values
are written into the buffer at slot `index`, then the queries attend over every valid slot s with
slot(s) <= slot(query) (causal), within the sliding window if the config has one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from caldera_jax.config import ModelConfig
from caldera_jax.models.layers import apply_rope, rms_norm


def self_attention(ctx, name: str, p: dict, cfg: ModelConfig, x: jax.Array, cos, sin,
                   kv: dict, index: jax.Array, key_valid: jax.Array, key_pos: jax.Array,
                   q_pos: jax.Array, segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """x: [B, T, H]; kv: {"k","v"}: [B, S, Hkv, D] buffers, or {"k","v": [n, B, S, Hkv, D], "layer": j}
    (a stack's buffers, this layer's index j in it); index: first slot written (scalar);
    key_valid [B, S] bool and key_pos [B, S] int32 already include the new tokens; q_pos [B, T].
    segment_ids [B, T] (packed rows, S == T only): a query sees only keys of its own segment; or
    [B, T, S] bool: the (query, key) pairs allowed.
    Returns (out [B, T, H], updated kv)."""
    B, T, _ = x.shape
    D, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = ctx.linear(f"{name}.q_proj", x, p["q_proj"]).reshape(B, T, nh, D)
    k = ctx.linear(f"{name}.k_proj", x, p["k_proj"]).reshape(B, T, nkv, D)
    v = ctx.linear(f"{name}.v_proj", x, p["v_proj"]).reshape(B, T, nkv, D)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"]["weight"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["weight"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    layer = kv.get("layer")
    kv_out = {k2: _write(kv[k2], new, index, layer) for k2, new in (("k", k), ("v", v))}
    k_all, v_all = ((kv_out[n] if layer is None else kv_out[n][layer]) for n in ("k", "v"))
    S = k_all.shape[1]

    q_slot = index + jnp.arange(T)
    mask = key_valid[:, None, :] & (jnp.arange(S)[None, None, :] <= q_slot[None, :, None])  # [B,T,S]
    if cfg.sliding_window is not None:
        mask &= (q_pos[:, :, None] - key_pos[:, None, :]) < cfg.sliding_window
    if segment_ids is not None and segment_ids.ndim == 3:      # [B, T, S] allowed (query, key) pairs
        mask &= segment_ids
    elif segment_ids is not None:
        mask &= segment_ids[:, :, None] == segment_ids[:, None, :]

    qg = q.reshape(B, T, nkv, nh // nkv, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_all.astype(q.dtype),
                        preferred_element_type=jnp.float32) * (D ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_all.astype(q.dtype)).reshape(B, T, nh * D)
    return ctx.linear(f"{name}.o_proj", out, p["o_proj"]), kv_out if layer is None else {**kv_out, "layer": layer}


def _write(buf: jax.Array, new: jax.Array, index: jax.Array, layer: jax.Array | None) -> jax.Array:
    """new [B, T, Hkv, D] written at slot `index` of a layer's buffer [B, S, Hkv, D], or of layer
    `layer` of a stack's buffer [n, B, S, Hkv, D] (in place inside the decoder's scan)."""
    new = new.astype(buf.dtype)
    if layer is None:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis=1)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(buf, new[None], (layer, zero, index, zero, zero))
