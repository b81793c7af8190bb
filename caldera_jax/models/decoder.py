"""The decoder: embedding, layers (attention + MLP/MoE), final norm, LM head.

    init_params(cfg, key, dtype)                         -> params
    forward(params, cfg, tokens, attention_mask)         -> logits [B, T, V]
    prefill(params, cfg, tokens, attention_mask, max_len) -> (last logits [B, V], cache)
    decode_step(params, cfg, cache, token [B])           -> (logits [B, V], cache)
    extend(params, cfg, cache, tokens [B, T], mask)      -> (logits [B, T, V], cache)

All are pure and jit-compiled with `cfg` (and `hooks`) static. Padding: `attention_mask` [B, T] is 1
for real tokens; positions default to cumsum(mask) - 1, so a left-padded row gives the same
logits as the unpadded sequence. Logits at padded positions are not meaningful.

`params` holds the layers per layer (`model.layers.{i}`, HF names) or stacked
(`layer_stacks.stack_layers`: runs of identical layers as one lax.scan, compiled once; no hooks).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from caldera_jax import params as params_lib
from caldera_jax.config import ModelConfig
from caldera_jax.models import layer_stacks
from caldera_jax.models.attention import self_attention
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.models.layers import rms_norm, rope_cos_sin, swiglu
from caldera_jax.models.moe import moe_block

Cache = dict[str, Any]  # {"k","v": one entry per layer block (layer_stacks.blocks): [B, S, Hkv, D] for a
                        #  layer, [n, B, S, Hkv, D] for a stack of n; "valid" [B,S]; "pos" [B,S]; "index";
                        #  "next_pos" [B]}


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters: N(0, 0.02) weights, unit norms, zero biases (the HF initialisation)."""
    shapes = params_lib.param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    flat = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        if name.endswith("norm.weight"):
            flat[name] = jnp.ones(shape, dtype)
        elif name.endswith(".bias"):
            flat[name] = jnp.zeros(shape, dtype)
        else:
            flat[name] = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
    return params_lib.unflatten(flat)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype, params=None) -> Cache:
    """An empty cache of max_len slots, laid out for `params`' layer blocks (per layer if None)."""
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    sizes = ([None] * cfg.num_hidden_layers if params is None else
             [b.stop - b.start if b.stacked else None for b in layer_stacks.blocks(params, cfg)])
    return {"k": [jnp.zeros(shape if n is None else (n,) + shape, dtype) for n in sizes],
            "v": [jnp.zeros(shape if n is None else (n,) + shape, dtype) for n in sizes],
            "valid": jnp.zeros((batch, max_len), bool), "pos": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32), "next_pos": jnp.zeros((batch,), jnp.int32)}


def select_rows(cache: Cache, rows: jax.Array) -> Cache:
    """The cache of rows `rows` [B'] (int) of a cache: e.g. one copy of a context per continuation."""
    def take(a, batch_axis):
        return jnp.take(a, rows, axis=batch_axis)
    return {"k": [take(a, a.ndim - 4) for a in cache["k"]], "v": [take(a, a.ndim - 4) for a in cache["v"]],
            "valid": take(cache["valid"], 0), "pos": take(cache["pos"], 0), "index": cache["index"],
            "next_pos": take(cache["next_pos"], 0)}


def decoder_layer(ctx: Ctx, i: int, p: dict, cfg: ModelConfig, h: jax.Array, cos, sin, kv: dict,
                  index, key_valid, key_pos, q_pos, segment_ids=None) -> tuple[jax.Array, dict]:
    """One pre-norm decoder layer. h: [B, T, H] -> ([B, T, H], updated kv buffers)."""
    name = f"model.layers.{i}"
    h = ctx.tap(name, h)
    a, kv = self_attention(ctx, f"{name}.self_attn", p["self_attn"], cfg,
                           rms_norm(h, p["input_layernorm"]["weight"], cfg.rms_norm_eps),
                           cos, sin, kv, index, key_valid, key_pos, q_pos, segment_ids)
    h = h + a
    x = ctx.tap(f"{name}.mlp.input", rms_norm(h, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps))
    if cfg.is_moe_layer(i):
        m = moe_block(ctx, f"{name}.mlp", p["mlp"], cfg, x)
    else:
        m = swiglu(ctx, f"{name}.mlp", p["mlp"], x)
    return h + m, kv


def representative_layer(cfg: ModelConfig, i: int) -> int:
    """The first layer of layer i's kind (dense/MoE): run under that index, layers of one kind
    share one compiled function (the index only selects the kind and names hook taps)."""
    return next(j for j in range(cfg.num_hidden_layers) if cfg.is_moe_layer(j) == cfg.is_moe_layer(i))


def standalone_layer(ctx: Ctx, i: int, p: dict, cfg: ModelConfig, h: jax.Array, mask: jax.Array,
                     positions: jax.Array) -> jax.Array:
    """Layer i on whole sequences without a cache (calibration, layer-streamed evaluation).
    h [B, T, H], mask [B, T] bool (1 = real token), positions [B, T] int -> [B, T, H]."""
    B, T = mask.shape
    cos, sin = rope_cos_sin(cfg, positions, h.dtype)
    kv = {"k": jnp.zeros((B, T, cfg.num_key_value_heads, cfg.head_dim), h.dtype),
          "v": jnp.zeros((B, T, cfg.num_key_value_heads, cfg.head_dim), h.dtype)}
    out, _ = decoder_layer(ctx, i, p, cfg, h, cos, sin, kv, jnp.zeros((), jnp.int32), mask,
                           positions, positions)
    return out


def final_logits(ctx: Ctx, params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """The final norm and LM head: h [B, T, H] -> logits [B, T, V]. `params` needs only
    model.embed_tokens (tied) or lm_head, and model.norm."""
    h = ctx.tap("model.norm", rms_norm(h, params["model"]["norm"]["weight"], cfg.rms_norm_eps))
    head = params["model"]["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    return ctx.linear("lm_head", h, {"weight": head["weight"]})


def _run(params, cfg: ModelConfig, tokens, positions, cache: Cache, new_valid, hooks: Hooks,
         last_only: bool, segment_ids=None, logits_at=None):
    """Runs the decoder on tokens [B, T] written at cache slot cache["index"]; logits at every
    position, the last one (last_only), the positions logits_at [B, P] (int) of each row, or the
    flat positions logits_at [P] (row * T + t; logits [1, P, V])."""
    ctx = Ctx(hooks, {})
    B, T = tokens.shape
    index = cache["index"]
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], new_valid, index, axis=1)
    key_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions, index, axis=1)
    embed = params["model"]["embed_tokens"]["weight"]
    h = jnp.take(embed, tokens, axis=0)
    cos, sin = rope_cos_sin(cfg, positions, h.dtype)
    if layer_stacks.is_stacked(params) and hooks != Hooks():
        raise ValueError("stacked layer parameters (layer_stacks.stack_layers) run without hooks; "
                         "give the per-layer parameters to use hooks")
    ks, vs = [], []
    for b, block in enumerate(layer_stacks.blocks(params, cfg)):
        kv = {"k": cache["k"][b], "v": cache["v"][b]}
        if block.stacked:      # the stack's cache rides in the carry: updated in place, layer by layer
            def body(carry, lp, start=block.start):
                h, k_all, v_all, j = carry
                h, kv = decoder_layer(ctx, start, lp, cfg, h, cos, sin, {"k": k_all, "v": v_all, "layer": j},
                                      index, key_valid, key_pos, positions, segment_ids)
                return (h, kv["k"], kv["v"], j + 1), None
            (h, k, v, _), _ = jax.lax.scan(body, (h, kv["k"], kv["v"], jnp.zeros((), jnp.int32)), block.params)
            kv = {"k": k, "v": v}
        else:
            h, kv = decoder_layer(ctx, block.start, block.params, cfg, h, cos, sin, kv, index, key_valid,
                                  key_pos, positions, segment_ids)
        ks.append(kv["k"])
        vs.append(kv["v"])
    if last_only:
        h = h[:, -1:]
    elif logits_at is not None and logits_at.ndim == 1:          # flat positions: [1, P, H]
        h = jnp.take(h.reshape(B * T, -1), logits_at.astype(jnp.int32), axis=0)[None]
    elif logits_at is not None:
        h = jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1)
    logits = final_logits(ctx, params, cfg, h)
    new_cache = {"k": ks, "v": vs, "valid": key_valid, "pos": key_pos, "index": index + T,
                 "next_pos": positions[:, -1] + 1}
    return logits, new_cache, ctx.aux


def default_positions(attention_mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


@partial(jax.jit, static_argnames=("cfg", "hooks", "return_aux"))
def forward(params, cfg: ModelConfig, tokens: jax.Array, attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None, hooks: Hooks = Hooks(), return_aux: bool = False,
            segment_ids: jax.Array | None = None, logits_at: jax.Array | None = None):
    """tokens [B, T] int -> logits [B, T, V] (and the hooks' aux dict if return_aux); with
    logits_at [B, P] (int positions), only those positions' logits [B, P, V]; with flat positions
    logits_at [P] (row * T + t), logits [1, P, V].

    Packed rows (caldera_jax.data.batching.pack): segment_ids [B, T] (1.. per sequence, 0 =
    padding) keeps each sequence's attention inside its segment; pass the packed positions too.
    segment_ids may instead be a [B, T, T] bool mask of the (query, key) pairs allowed on top of
    causality (caldera_jax.lmeval.engine: continuations sharing their context in one row).

    Expert parallelism is a hook: hooks=caldera_jax.moe.expert_parallel_hooks(mesh) runs the MoE
    layers on the mesh's ep (and dp, tp) axes.
    """
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    positions = default_positions(mask) if positions is None else positions.astype(jnp.int32)
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], dtype, params)
    logits, _, aux = _run(params, cfg, tokens, positions, cache, mask, hooks, last_only=False,
                          segment_ids=segment_ids, logits_at=logits_at)
    return (logits, aux) if return_aux else logits


@partial(jax.jit, static_argnames=("cfg", "max_len", "hooks"))
def prefill(params, cfg: ModelConfig, tokens: jax.Array, attention_mask: jax.Array, max_len: int,
            hooks: Hooks = Hooks()) -> tuple[jax.Array, Cache]:
    """Runs a left-padded prompt batch [B, T] into a fresh cache of max_len slots.
    Returns the logits of the last position [B, V] and the cache."""
    mask = attention_mask.astype(bool)
    positions = default_positions(mask)
    dtype = params["model"]["embed_tokens"]["weight"].dtype
    cache = init_cache(cfg, tokens.shape[0], max_len, dtype, params)
    logits, cache, _ = _run(params, cfg, tokens, positions, cache, mask, hooks, last_only=True)
    cache["next_pos"] = jnp.sum(mask, axis=1).astype(jnp.int32)
    return logits[:, 0], cache


@partial(jax.jit, static_argnames=("cfg", "hooks"), donate_argnames=("cache",))
def decode_step(params, cfg: ModelConfig, cache: Cache, token: jax.Array,
                hooks: Hooks = Hooks()) -> tuple[jax.Array, Cache]:
    """Appends one token per row (token [B]) at the cache's next slot -> (logits [B, V], cache)."""
    positions = cache["next_pos"][:, None]
    logits, cache, _ = _run(params, cfg, token[:, None], positions, cache,
                            jnp.ones((token.shape[0], 1), bool), hooks, last_only=True)
    return logits[:, 0], cache


@partial(jax.jit, static_argnames=("cfg", "hooks"), donate_argnames=("cache",))
def extend(params, cfg: ModelConfig, cache: Cache, tokens: jax.Array, attention_mask: jax.Array,
           hooks: Hooks = Hooks()) -> tuple[jax.Array, Cache]:
    """Appends T tokens per row (tokens [B, T]; attention_mask [B, T], 1 = real, padding only at
    the right end) at the cache's next slots -> (logits [B, T, V], cache). decode_step with T
    tokens: scores a continuation after a prefilled prefix in one pass."""
    mask = attention_mask.astype(bool)
    positions = cache["next_pos"][:, None] + default_positions(mask)
    logits, cache, _ = _run(params, cfg, tokens, positions, cache, mask, hooks, last_only=False)
    return logits, cache
