"""Routing for the expert-parallel layer: the family's exact top-k (caldera_jax.models.moe.route)
applied to the input the router mode chooses.

Router modes (ECMoE notes):
    "compressed"    the router sees the decoded state decode(encode(x)) (router and experts agree)
    "uncompressed"  the router sees the original x on the source device; only the experts see the
                    decoded state (the realistic expert-parallel case)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from caldera_jax.config import ModelConfig
from caldera_jax.models.moe import route

ROUTER_MODES = ("compressed", "uncompressed")


def check_router_mode(mode: str) -> str:
    if mode not in ROUTER_MODES:
        raise ValueError(f"router_mode must be one of {ROUTER_MODES}, got {mode!r}")
    return mode


def router_input(mode: str, x_router: jax.Array, x_decoded: jax.Array) -> jax.Array:
    """What the router sees: [N, H]."""
    return {"compressed": x_decoded, "uncompressed": x_router}[check_router_mode(mode)]


def route_tokens(ctx, name: str, p: dict, cfg: ModelConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [N, H] -> (topk_idx [N, k] int32, topk_weight [N, k] float32), through the gate linear
    and the "{name}.routing" tap, exactly as the dense reference does."""
    logits = ctx.linear(f"{name}.gate", x, p["gate"])
    return ctx.tap(f"{name}.routing", route(logits, cfg))


def expert_load(idx: jax.Array, num_experts: int) -> jax.Array:
    """Number of (token, choice) assignments per expert: idx [N, k] -> [E] int32."""
    return jnp.bincount(idx.reshape(-1), length=num_experts).astype(jnp.int32)
