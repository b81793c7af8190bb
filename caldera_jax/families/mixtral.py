"""mixtral (MixtralForCausalLM): llama attention, every layer a sparse MoE.

config.json: num_local_experts, num_experts_per_tok, intermediate_size (each expert's width);
the top-k routing probabilities are always renormalised (= top-k then softmax); `sliding_window`
applies whenever set. On disk (save_pretrained): model.layers.{i}.block_sparse_moe.gate.weight and
block_sparse_moe.experts.{j}.{w1,w3,w2}.weight (gate, up, down). No GGUF reader.
"""
from __future__ import annotations

from caldera_jax.families.base import (ATTENTION_INPUT_GROUPS, EXPERT_INPUT_GROUPS, SLIDING_ALWAYS,
                                       ExpertLayout, Family, MoESpec)

LAYOUT = ExpertLayout(
    name="block_sparse_moe",
    router="block_sparse_moe.gate.weight",
    experts=(("gate_proj", "block_sparse_moe.experts.{j}.w1.weight"),
             ("up_proj", "block_sparse_moe.experts.{j}.w3.weight"),
             ("down_proj", "block_sparse_moe.experts.{j}.w2.weight")),
)

FAMILY = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    attention_bias=False,
    attention_bias_key=False,
    qk_norm=False,
    sliding_window=SLIDING_ALWAYS,
    moe=MoESpec(num_experts_keys=("num_local_experts",), intermediate_key="intermediate_size",
                norm_topk_prob=True, sparse_layers=False, layout=LAYOUT),
    input_groups=ATTENTION_INPUT_GROUPS + EXPERT_INPUT_GROUPS,
)
