"""Named interception points of the decoder, so later work plugs in without editing the model.

Names are HF module paths:
- linear(name, x, w, bias, aux) -> y, called for every linear, e.g. name
  "model.layers.3.self_attn.q_proj" or (stacked experts, x: [E, N, in])
  "model.layers.3.mlp.experts.gate_proj". Default: `caldera_jax.linear.apply`.
- tap(name, value, aux) -> value, called at:
    "model.layers.{i}"                  hidden state entering layer i (residual stream)  [B, T, H]
    "model.layers.{i}.mlp.input"        MLP/MoE block input, after post_attention_layernorm [B, T, H]
    "model.layers.{i}.mlp.router_input" what the router sees (MoE layers)               [N, H]
    "model.layers.{i}.mlp.expert_input" what the experts see (MoE layers)               [N, H]
    "model.layers.{i}.mlp.routing"      (topk_idx [N, k] int32, topk_weight [N, k] f32)  (MoE)
    "model.norm"                        final normed hidden state                        [B, T, H]
  A tap returns the value to use from then on (identity to just observe).
- moe(name, mlp_params, cfg, x_router [N, H], x_expert [N, H], ctx) -> y [N, H]: replaces the
  dense MoE computation (expert parallelism). Default: `caldera_jax.models.moe.dense_moe`.

`aux` is a dict created fresh for each forward call; hooks may store arrays in it (e.g. partial
Hessians) and `forward(..., return_aux=True)` returns it. Hooks must be hashable (they are a jit
static argument): plain functions or frozen dataclasses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from caldera_jax import linear as linear_lib


@dataclasses.dataclass(frozen=True)
class Hooks:
    linear: Callable[..., jax.Array] | None = None
    tap: Callable[[str, Any, dict], Any] | None = None
    moe: Callable[..., jax.Array] | None = None


@dataclasses.dataclass
class Ctx:
    """Per-call context threaded through the layers: the hooks and the aux dict."""
    hooks: Hooks
    aux: dict

    def linear(self, name: str, x: jax.Array, p: dict) -> jax.Array:
        w, b = p["weight"], p.get("bias")
        if self.hooks.linear is None:
            return linear_lib.apply(x, w, b)
        return self.hooks.linear(name, x, w, b, self.aux)

    def tap(self, name: str, value: Any) -> Any:
        return value if self.hooks.tap is None else self.hooks.tap(name, value, self.aux)
