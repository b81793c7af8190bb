"""MoE block: routing with each family's exact semantics, and the dense reference computation.

The dense reference runs every expert on every token on one device and weights the outputs by the
routing weights (zero for unselected experts). It is the ground truth the expert-parallel version
(caldera_jax.moe) must match.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from caldera_jax.config import ModelConfig


def route(router_logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """router_logits [N, E] -> (topk_idx [N, k] int32, topk_weight [N, k] float32).

    Both families: softmax over all experts in float32, then top-k; the top-k probabilities are
    renormalised when `cfg.norm_topk_prob` (always for mixtral, where this equals top-k then
    softmax; qwen3_moe: the config's `norm_topk_prob`, default False).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weight, idx = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return idx.astype(jnp.int32), weight


def combine_weights(idx: jax.Array, weight: jax.Array, num_experts: int) -> jax.Array:
    """Dense [N, E] routing weights from top-k indices and weights."""
    return jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=weight.dtype) * weight[..., None], axis=1)


def dense_moe(name: str, p: dict, cfg: ModelConfig, x_router: jax.Array, x_expert: jax.Array,
              ctx) -> jax.Array:
    """Dense reference MoE. x_router, x_expert: [N, H] -> [N, H]."""
    logits = ctx.linear(f"{name}.gate", x_router, p["gate"])
    idx, weight = ctx.tap(f"{name}.routing", route(logits, cfg))
    cw = combine_weights(idx, weight, cfg.num_experts).astype(x_expert.dtype)       # [N, E]
    xe = jnp.broadcast_to(x_expert, (cfg.num_experts,) + x_expert.shape)           # [E, N, H]
    ep = p["experts"]
    g = ctx.linear(f"{name}.experts.gate_proj", xe, ep["gate_proj"])
    u = ctx.linear(f"{name}.experts.up_proj", xe, ep["up_proj"])
    y = ctx.linear(f"{name}.experts.down_proj", jax.nn.silu(g) * u, ep["down_proj"])  # [E, N, H]
    return jnp.einsum("enh,ne->nh", y, cw)


def moe_block(ctx, name: str, p: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """x: [B, T, H] (already normed) -> [B, T, H]. Taps router/expert inputs, then runs the
    MoE computation (hooks.moe, default dense_moe) on the flattened tokens."""
    B, T, H = x.shape
    flat = x.reshape(B * T, H)
    x_router = ctx.tap(f"{name}.router_input", flat)
    x_expert = ctx.tap(f"{name}.expert_input", flat)
    fn = ctx.hooks.moe or dense_moe
    return fn(name, p, cfg, x_router, x_expert, ctx).reshape(B, T, H)
