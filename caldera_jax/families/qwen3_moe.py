"""qwen3_moe (Qwen3MoeForCausalLM): qwen3 attention (qk_norm), sparse MoE layers.

config.json: num_experts (or num_local_experts), num_experts_per_tok, moe_intermediate_size,
norm_topk_prob (default False), decoder_sparse_step and mlp_only_layers (those layers are dense,
intermediate_size wide). On disk (save_pretrained): model.layers.{i}.mlp.gate.weight and
mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight. No GGUF reader.
"""
from __future__ import annotations

from caldera_jax.families.base import (ATTENTION_INPUT_GROUPS, DENSE_MLP_INPUT_GROUPS, EXPERT_INPUT_GROUPS,
                                       SLIDING_REFUSED, ExpertLayout, Family, MoESpec)

LAYOUT = ExpertLayout(
    name="mlp",
    router="mlp.gate.weight",
    experts=(("gate_proj", "mlp.experts.{j}.gate_proj.weight"),
             ("up_proj", "mlp.experts.{j}.up_proj.weight"),
             ("down_proj", "mlp.experts.{j}.down_proj.weight")),
)

FAMILY = Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    attention_bias=False,
    attention_bias_key=True,
    qk_norm=True,
    sliding_window=SLIDING_REFUSED,
    moe=MoESpec(num_experts_keys=("num_experts", "num_local_experts"),
                intermediate_key="moe_intermediate_size", norm_topk_prob=None, sparse_layers=True,
                layout=LAYOUT),
    input_groups=ATTENTION_INPUT_GROUPS + DENSE_MLP_INPUT_GROUPS + EXPERT_INPUT_GROUPS,
)
