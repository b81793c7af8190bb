"""Tiny random transformers models for checkpoint and parity tests (CPU, no hub).

    path, model = tiny_hf_model("qwen3_moe", tmp_path)          # saved with save_pretrained
    ref = canonical_state_dict(model)                            # {canonical name: np.ndarray}

Every model: vocab 96, hidden 32, 2 layers, 4 heads, 2 kv heads, head_dim 8; MoE: 4 experts, top 2.
All weights are random (norm weights around 1), including the MoE routers.
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np

FAMILIES = ("llama", "qwen2", "qwen3", "mixtral", "qwen3_moe")

BASE_CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
FAMILY_CONFIG = {
    "llama": dict(bos_token_id=1, eos_token_id=2),
    "qwen2": dict(bos_token_id=1, eos_token_id=2),
    "qwen3": dict(bos_token_id=1, eos_token_id=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      bos_token_id=1, eos_token_id=2),
}


def tiny_hf_config(model_type: str, **overrides):
    """A transformers config for a tiny `model_type` model (overrides win)."""
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, **{**BASE_CONFIG, **FAMILY_CONFIG[model_type], **overrides})


def randomize_(model, seed: int = 0, scale: float = 0.1) -> None:
    """Fills every parameter in place: N(0, scale²), norm weights 1 + N(0, scale²)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = scale * torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)


def tiny_hf_model(model_type: str, tmp_path, *, seed: int = 0, dtype=None, name: str | None = None,
                  save: bool = True, **overrides):
    """Builds a random tiny transformers model and saves it with save_pretrained.

    Returns (checkpoint directory as str, torch model in eval mode). `dtype` is a torch dtype
    (default float32); `overrides` go to the transformers config (e.g. tie_word_embeddings=True).
    """
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **overrides))
    randomize_(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    path = os.path.join(os.fspath(tmp_path), name or f"hf-{model_type}")
    if save:
        model.save_pretrained(path)
    return path, model


def to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, bit-exact (bfloat16 becomes ml_dtypes.bfloat16)."""
    import torch
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def canonical_state_dict(model) -> dict[str, np.ndarray]:
    """The torch model's state dict under caldera_jax canonical names (flat).

    transformers 5 keeps experts fused in memory: mlp.experts.gate_up_proj [E, 2I, H] is split into
    mlp.experts.gate_proj.weight (rows :I) and mlp.experts.up_proj.weight (rows I:), and
    mlp.experts.down_proj [E, H, I] becomes mlp.experts.down_proj.weight. A tied lm_head is dropped.
    All arrays are C-contiguous (safetensors.numpy.save_file silently mis-writes strided views).
    """
    out: dict[str, np.ndarray] = {}
    for k, v in model.state_dict().items():
        a = to_numpy(v)
        if k.endswith("mlp.experts.gate_up_proj"):
            pre, i = k[: -len("gate_up_proj")], a.shape[1] // 2
            out[pre + "gate_proj.weight"] = np.ascontiguousarray(a[:, :i])
            out[pre + "up_proj.weight"] = np.ascontiguousarray(a[:, i:])
        elif k.endswith("mlp.experts.down_proj"):
            out[k + ".weight"] = a
        else:
            out[k] = a
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out
