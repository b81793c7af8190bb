"""What the derivation reports about an MoE layer and model: routing entropy and load, the
fraction of the dense FFN output recovered, parameters in total and active per token."""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from caldera_jax.config import ModelConfig
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.models.layers import swiglu
from caldera_jax.models.moe import dense_moe, route
from caldera_jax.params import param_shapes


def routing_stats(probs: jax.Array, chosen: jax.Array, E: int) -> dict[str, jax.Array]:
    """probs [N, E] router softmax, chosen [N, E] 0/1 top-k -> mean normalised entropy of the
    router distribution (1 = uniform over the E experts), the load (share of the assignments each
    expert gets, [E]) and its imbalance max(load) * E (1 = perfectly balanced)."""
    ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1) / math.log(max(E, 2))
    load = jnp.sum(chosen, axis=0) / jnp.sum(chosen)
    return {"entropy": jnp.mean(ent), "load": load, "imbalance": jnp.max(load) * E}


@partial(jax.jit, static_argnames=("cfg",))
def recovery(moe_mlp: dict, x: jax.Array, y: jax.Array, cfg: ModelConfig) -> dict[str, jax.Array]:
    """On inputs x [N, H] with wanted outputs y [N, H]: the fraction of y the MoE block recovers,
    1 - sum ||y - y_moe||^2 / sum ||y||^2, and the block's routing entropy and load on x."""
    ctx = Ctx(Hooks(), {})
    y_moe = dense_moe("moe", moe_mlp, cfg, x, x, ctx)
    logits = ctx.linear("gate", x, moe_mlp["gate"])
    idx, _ = route(logits, cfg)
    chosen = jnp.sum(jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32), axis=1)
    rec = 1.0 - jnp.sum(jnp.square(y - y_moe)) / jnp.sum(jnp.square(y))
    return {"recovered": rec, **routing_stats(jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                                              chosen, cfg.num_experts)}


def ffn_recovery(dense_mlp: dict, moe_mlp: dict, x: jax.Array, cfg: ModelConfig) -> dict[str, jax.Array]:
    """`recovery` of the dense FFN's output on the dense model's FFN inputs x [N, H]."""
    return recovery(moe_mlp, x, swiglu(Ctx(Hooks(), {}), "dense", dense_mlp, x), cfg)


def param_counts(dense_cfg: ModelConfig, moe_cfg: ModelConfig) -> dict[str, int]:
    """Parameters of the dense and the MoE model, in total and used per token (the MoE runs top_k
    of its E experts), with and without the embedding / LM head."""
    def total(cfg):
        return sum(math.prod(s) for s in param_shapes(cfg).values())
    H, V = dense_cfg.hidden_size, dense_cfg.vocab_size
    embed = V * H * (1 if dense_cfg.tie_word_embeddings else 2)
    E, k, inter = moe_cfg.num_experts, moe_cfg.num_experts_per_tok, moe_cfg.moe_intermediate_size
    idle = sum(moe_cfg.is_moe_layer(i) for i in range(moe_cfg.num_hidden_layers)) * (E - k) * 3 * H * inter
    d, m = total(dense_cfg), total(moe_cfg)
    return {"dense_total": d, "moe_total": m, "moe_active_per_token": m - idle,
            "dense_non_embedding": d - embed, "moe_non_embedding": m - embed,
            "moe_active_non_embedding": m - idle - embed}
