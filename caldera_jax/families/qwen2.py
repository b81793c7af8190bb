"""qwen2 (Qwen2ForCausalLM): llama plus q/k/v biases (always: Qwen2Config has no attention_bias)."""
from __future__ import annotations

from typing import Any

from caldera_jax.families.base import (GGUF_DENSE_LAYER_NAMES, GGUF_QKV_BIAS_NAMES, SLIDING_REFUSED,
                                       Family)


def gguf_hf_config(d: dict[str, Any], tensor_names) -> dict[str, Any]:
    return {"use_sliding_window": False, "sliding_window": None,
            "max_window_layers": d["num_hidden_layers"]}


FAMILY = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    attention_bias=True,
    attention_bias_key=False,
    qk_norm=False,
    sliding_window=SLIDING_REFUSED,
    gguf_arch="qwen2",
    gguf_layer_names=GGUF_DENSE_LAYER_NAMES + GGUF_QKV_BIAS_NAMES,
    gguf_hf_config=gguf_hf_config,
)
