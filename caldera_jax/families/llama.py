"""llama (LlamaForCausalLM): the dense base family.

GGUF: llama.cpp's converter permutes the rows of the q/k projections (rotary pairs interleaved);
`unpermute_qk` restores HF's half-split layout (transformers' LlamaTensorProcessor does the same).
"""
from __future__ import annotations

from typing import Any

from caldera_jax.families.base import (GGUF_DENSE_LAYER_NAMES, GGUF_QKV_BIAS_NAMES, SLIDING_IF_FLAG,
                                       Family)


def permute_qk(w: Any, n_head: int) -> Any:
    """llama.cpp's permutation of q/k weight or bias rows (HF half-split rotary -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: Any, n_head: int) -> Any:
    """Inverse of llama.cpp convert_hf_to_gguf.py's `permute` (rows of q/k weight or bias)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_to_hf(hf_name: str, w: Any, n_heads: int, n_kv_heads: int) -> Any:
    """A dequantized GGUF tensor in HF layout: q/k rows unpermuted, everything else as is."""
    if ".self_attn.q_proj." in hf_name:
        return unpermute_qk(w, n_heads)
    if ".self_attn.k_proj." in hf_name:
        return unpermute_qk(w, n_kv_heads)
    return w


def gguf_hf_config(d: dict[str, Any], tensor_names) -> dict[str, Any]:
    return {"attention_bias": "blk.0.attn_q.bias" in tensor_names, "mlp_bias": False}


FAMILY = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    attention_bias=False,
    attention_bias_key=True,
    qk_norm=False,
    sliding_window=SLIDING_IF_FLAG,
    gguf_arch="llama",
    gguf_layer_names=GGUF_DENSE_LAYER_NAMES + GGUF_QKV_BIAS_NAMES,
    gguf_hf_config=gguf_hf_config,
    gguf_tensor_to_hf=gguf_tensor_to_hf,
)
