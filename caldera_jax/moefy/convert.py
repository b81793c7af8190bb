"""A dense SwiGLU model -> the same model with every FFN split into experts (pure functions).

    moe_cfg = moe_config(cfg, mc)                       # mixtral (llama source) / qwen3_moe (qwen3)
    mlp = split_mlp(dense_mlp, clusters, scale=mc.top_k)   # router zero, experts = neuron groups
    moe_cfg, moe_params = convert(cfg, params, {i: clusters_i}, mc)

Expert e of a layer holds the neurons clusters[e]: gate_proj/up_proj rows and down_proj columns
of the dense FFN, so the dense output is exactly the sum of the E experts' outputs. Both target
families renormalise the top-k routing probabilities (they sum to 1 over the chosen experts), so
each expert's down_proj is multiplied by `scale` = top_k: with equal weights 1/k the MoE output is
the plain sum of the chosen experts' dense contributions. With top_k = E and the zero router the
conversion leaves (softmax of zeros = 1/E each) the MoE computes exactly the dense FFN (up to the
order of float additions); with E = 1 it is the dense FFN bit for bit.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from caldera_jax import families
from caldera_jax.config import ModelConfig
from caldera_jax.moefy.config import MoefyConfig, check

# config.json keys of the dense families that the MoE family does not have
_DROP = ("mlp_bias", "pretraining_tp", "attention_bias", "use_sliding_window", "max_window_layers",
         "layer_types")


def moe_config(cfg: ModelConfig, mc: MoefyConfig) -> ModelConfig:
    """The MoE model's config: the dense config.json with the MoE family's type and expert keys."""
    target = check(cfg, mc)
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in _DROP}
    d.update(model_type=target, architectures=[families.get(target).architecture],
             num_experts_per_tok=mc.top_k, output_router_logits=False,
             router_aux_loss_coef=mc.aux_loss_coef)
    inter = cfg.intermediate_size // mc.experts
    if target == "mixtral":
        d.update(num_local_experts=mc.experts, intermediate_size=inter, sliding_window=None,
                 router_jitter_noise=0.0)
    else:                                               # qwen3_moe: every layer sparse, renormalised
        d.update(num_experts=mc.experts, moe_intermediate_size=inter, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=cfg.intermediate_size,
                 attention_bias=False, use_sliding_window=False, sliding_window=None)
    return ModelConfig.from_hf_dict(json.loads(json.dumps(d)), source=f"moefy({cfg.model_type})")


def expert_output_scale(moe_cfg: ModelConfig) -> float:
    """What each expert's down_proj is multiplied by: top_k under renormalised routing (equal
    weights 1/k then give the plain sum of the chosen experts)."""
    if not moe_cfg.norm_topk_prob:
        raise ValueError(f"{moe_cfg.model_type}: moefy needs renormalised top-k routing (norm_topk_prob)")
    return float(moe_cfg.num_experts_per_tok)


def split_mlp(mlp: dict, clusters: np.ndarray, scale: float) -> dict[str, Any]:
    """A dense FFN {gate_proj, up_proj, down_proj} -> MoE block params {gate, experts} (float32
    numpy): expert e holds the neurons clusters[e]; the router is zero."""
    c = np.asarray(clusters)
    g = np.asarray(mlp["gate_proj"]["weight"], np.float32)
    u = np.asarray(mlp["up_proj"]["weight"], np.float32)
    d = np.asarray(mlp["down_proj"]["weight"], np.float32)
    E, H = c.shape[0], g.shape[1]
    return {"gate": {"weight": np.zeros((E, H), np.float32)},
            "experts": {"gate_proj": {"weight": np.ascontiguousarray(g[c])},                  # [E, I/E, H]
                        "up_proj": {"weight": np.ascontiguousarray(u[c])},
                        "down_proj": {"weight": np.ascontiguousarray(
                            np.moveaxis(d[:, c], 1, 0) * np.float32(scale))}}}              # [E, H, I/E]


def convert_layer(layer: dict, clusters: np.ndarray, scale: float) -> dict[str, Any]:
    """One decoder layer's params with its FFN split (everything else unchanged)."""
    out = {k: v for k, v in layer.items() if k != "mlp"}
    out["mlp"] = split_mlp(layer["mlp"], clusters, scale)
    return out


def convert(cfg: ModelConfig, params: dict, clusters: dict[int, np.ndarray],
            mc: MoefyConfig) -> tuple[ModelConfig, dict]:
    """The whole model: (MoE config, params) with every layer's FFN split by clusters[i]."""
    moe_cfg = moe_config(cfg, mc)
    scale = expert_output_scale(moe_cfg)
    layers = params["model"]["layers"]
    model = {k: v for k, v in params["model"].items() if k != "layers"}
    model["layers"] = {str(i): convert_layer(layers[str(i)], clusters[i], scale)
                       for i in range(cfg.num_hidden_layers)}
    out = {k: v for k, v in params.items() if k != "model"}
    out["model"] = model
    return moe_cfg, out
