"""Deriving a mixture-of-experts model from a dense SwiGLU model (pure functions; the whole job
with checkpoints, resume and report is caldera_jax.pipeline.moefy).

    config.py       MoefyConfig (experts, top_k, clustering, fit and distillation settings), check()
    activations.py  the dense model's FFN inputs, one layer at a time
    cluster.py      balanced k-means of a layer's neurons (co-activation or weight features)
    convert.py      dense FFN -> router + experts (Mixtral / Qwen3-MoE layout), the expert scaling
    router_fit.py   one router per layer, fitted so the chosen experts carry the dense output
    local_fit.py    one MoE block (router + experts) trained to the dense FFN's output
    layer.py        one layer's derivation: cluster, split, fit (+ local training), metrics
    distill.py      routers and experts trained against the dense model's logits
    metrics.py      routing entropy and load, FFN output recovered, active parameters
"""
from caldera_jax.moefy.config import CLUSTERINGS, TARGETS, MoefyConfig, MoefyError, check
from caldera_jax.moefy.convert import convert, expert_output_scale, moe_config, split_mlp

__all__ = ["CLUSTERINGS", "TARGETS", "MoefyConfig", "MoefyError", "check", "convert", "expert_output_scale",
           "moe_config", "split_mlp"]
