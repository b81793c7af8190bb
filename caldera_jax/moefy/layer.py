"""One layer of the derivation, from the dense FFN and its inputs to a fitted MoE block:
cluster the neurons (balanced k-means, then the routing-aware refinement), split, fit the
router, optionally train the block locally.

    rec = derive_layer(i, dense_mlp, x, n_fit, moe_cfg, mc)
    rec["clusters"] [E, I/E], rec["router"] [E, H], rec["metrics"] (held-out x[n_fit:]),
    rec["experts.{gate_proj,up_proj,down_proj}"] when mc.local_steps > 0
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.config import ModelConfig
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.models.layers import swiglu
from caldera_jax.moefy.cluster import balanced_kmeans, coactivation_features, refine_for_routing, weight_features
from caldera_jax.moefy.config import MoefyConfig
from caldera_jax.moefy.convert import expert_output_scale, split_mlp
from caldera_jax.moefy.local_fit import local_fit, minibatches
from caldera_jax.moefy.metrics import recovery
from caldera_jax.moefy.router_fit import contribution_gram, fit_router, routing_metrics


def derive_layer(i: int, mlp: dict, x: np.ndarray, n_fit: int, moe_cfg: ModelConfig, mc: MoefyConfig
                 ) -> dict[str, Any]:
    """Clusters layer i's neurons, splits its FFN, fits its router on the dense model's FFN inputs
    x[:n_fit] (and, with local_steps, trains the whole block to the dense FFN's output); metrics on
    the held-out x[n_fit:]. Returns {clusters, router, metrics} (+ the experts' arrays when trained)."""
    t0 = time.perf_counter()
    E, k = moe_cfg.num_experts, moe_cfg.num_experts_per_tok
    scale = expert_output_scale(moe_cfg)
    x_fit, x_held = jnp.asarray(x[:n_fit]), jnp.asarray(x[n_fit:])
    pick = np.unique(np.linspace(0, n_fit - 1, min(mc.cluster_tokens, n_fit)).round().astype(np.int64))
    if mc.clustering == "coactivation":
        feats = coactivation_features(mlp, x[:n_fit][pick])
    else:
        feats = weight_features(mlp)
    clusters = balanced_kmeans(feats, E, seed=[mc.seed, i], iters=mc.kmeans_iters)
    refine = []
    if mc.refine_iters:
        clusters, refine = refine_for_routing(mlp, x[:n_fit][pick], clusters, k, mc.refine_iters)
    experts = jax.tree.map(jnp.asarray, split_mlp(mlp, clusters, scale)["experts"])
    G = contribution_gram(experts, x_fit, scale)
    if mc.router_steps:
        w, losses = fit_router(x_fit, G, k, scale, mc.router_steps, mc.router_lr, mc.router_recon_weight)
    else:
        w, losses = jnp.zeros((E, x.shape[1]), jnp.float32), jnp.zeros((0,))
    m = routing_metrics(w, x_held, contribution_gram(experts, x_held, scale), k, scale)
    metrics = {"layer": i, "recovered": float(m["recovered"]), "oracle": float(m["oracle"]),
               "entropy": float(m["entropy"]), "imbalance": float(m["imbalance"]),
               "load": [float(v) for v in np.asarray(m["load"])],
               "fit_loss_first": float(losses[0]) if losses.size else None,
               "fit_loss_last": float(losses[-1]) if losses.size else None,
               "refine_oracle": refine, "tokens_fit": int(n_fit), "tokens_held_out": int(len(x) - n_fit)}
    rec = {"clusters": clusters, "router": np.asarray(w, np.float32)}
    if mc.local_steps:
        y = swiglu(Ctx(Hooks(), {}), "dense", jax.tree.map(jnp.asarray, mlp), jnp.asarray(x))
        batches = minibatches(n_fit, min(mc.local_batch, n_fit), mc.local_steps, [mc.seed, i, 1])
        block, curve = local_fit({"gate": {"weight": w}, "experts": experts}, x_fit, y[:n_fit], moe_cfg,
                                 jnp.asarray(batches), mc.local_lr, mc.local_router_lr)
        after = recovery(block, x_held, y[n_fit:], moe_cfg)
        metrics.update(recovered_local=float(after["recovered"]), local_loss_first=float(curve[0]),
                       local_loss_last=float(curve[-1]), entropy=float(after["entropy"]),
                       imbalance=float(after["imbalance"]), load=[float(v) for v in np.asarray(after["load"])])
        rec["router"] = np.asarray(block["gate"]["weight"], np.float32)
        rec.update({f"experts.{p}": np.asarray(block["experts"][p]["weight"], np.float32)
                    for p in ("gate_proj", "up_proj", "down_proj")})
    metrics["seconds"] = time.perf_counter() - t0
    rec["metrics"] = metrics
    return rec
