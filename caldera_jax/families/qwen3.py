"""qwen3 (Qwen3ForCausalLM): llama plus per-head RMSNorm on q and k before RoPE (qk_norm)."""
from __future__ import annotations

from typing import Any

from caldera_jax.families.base import (GGUF_DENSE_LAYER_NAMES, GGUF_QK_NORM_NAMES, GGUF_QKV_BIAS_NAMES,
                                       SLIDING_REFUSED, Family)


def gguf_hf_config(d: dict[str, Any], tensor_names) -> dict[str, Any]:
    return {"attention_bias": "blk.0.attn_q.bias" in tensor_names, "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": d["num_hidden_layers"]}


FAMILY = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    attention_bias=False,
    attention_bias_key=True,
    qk_norm=True,
    sliding_window=SLIDING_REFUSED,
    gguf_arch="qwen3",
    gguf_layer_names=GGUF_DENSE_LAYER_NAMES + GGUF_QKV_BIAS_NAMES + GGUF_QK_NORM_NAMES,
    gguf_hf_config=gguf_hf_config,
)
