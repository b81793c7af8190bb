"""Parameter pytrees: nested dicts whose dotted paths are the HF parameter names.

    params["model"]["layers"]["3"]["self_attn"]["q_proj"]["weight"]  <->  "model.layers.3.self_attn.q_proj.weight"

Linear weights keep the HF layout [out_features, in_features], so HF <-> ours is a renaming.
MoE experts are stacked per projection (HF's per-expert keys with the index moved into axis 0):

    model.layers.{i}.mlp.gate.weight                 [E, H]       router
    model.layers.{i}.mlp.experts.gate_proj.weight    [E, I, H]
    model.layers.{i}.mlp.experts.up_proj.weight      [E, I, H]
    model.layers.{i}.mlp.experts.down_proj.weight    [E, H, I]

A leaf may also be any object with an `apply(x)` method (a quantized low-rank weight); see linear.py.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from caldera_jax.config import ModelConfig

Params = dict[str, Any]


def flatten(params: Params, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": leaf}. Non-dict values are leaves."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def unflatten(flat: dict[str, Any]) -> Params:
    """{"a.b.c": leaf} -> nested dict."""
    out: Params = {}
    for name, v in flat.items():
        node = out
        *parents, last = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Canonical names (relative to the layer) and shapes of decoder layer i."""
    H, D = cfg.hidden_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    s: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (nq, H),
        "self_attn.k_proj.weight": (nkv, H),
        "self_attn.v_proj.weight": (nkv, H),
        "self_attn.o_proj.weight": (H, nq),
    }
    if cfg.attention_bias:
        s.update({"self_attn.q_proj.bias": (nq,), "self_attn.k_proj.bias": (nkv,),
                  "self_attn.v_proj.bias": (nkv,)})
    if cfg.qk_norm:
        s.update({"self_attn.q_norm.weight": (D,), "self_attn.k_norm.weight": (D,)})
    if cfg.is_moe_layer(i):
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        s.update({"mlp.gate.weight": (E, H), "mlp.experts.gate_proj.weight": (E, I, H),
                  "mlp.experts.up_proj.weight": (E, I, H), "mlp.experts.down_proj.weight": (E, H, I)})
    else:
        I = cfg.intermediate_size
        s.update({"mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H),
                  "mlp.down_proj.weight": (H, I)})
    return s


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter name of the model -> shape, in HF order."""
    s = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        s.update({layer_prefix(i) + k: v for k, v in layer_shapes(cfg, i).items()})
    s["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return s


class MemorySource:
    """A model held in memory (a params dict, or a dequantized GGUF) with the HFCheckpoint reading API."""

    def __init__(self, cfg: ModelConfig, params: Params | dict[str, Any], path: str = "<memory>",
                 tokenizer_dir: str | None = None, tokenizer_kwargs: dict | None = None):
        flat = params if params and all(not isinstance(v, dict) for v in params.values()) else flatten(params)
        self.cfg, self.path, self.source = cfg, path, path
        self.tokenizer_dir, self.tokenizer_kwargs = tokenizer_dir, tokenizer_kwargs or {}
        self._flat = {k: np.asarray(v) for k, v in flat.items()}
        if cfg.tie_word_embeddings:
            self._flat.pop("lm_head.weight", None)

    def names(self) -> list[str]:
        return [n for n in param_shapes(self.cfg) if n in self._flat]

    def read(self, name: str, dtype: Any = None) -> np.ndarray:
        if name not in self._flat:
            raise KeyError(f"{self.path}: missing tensor '{name}'")
        a = self._flat[name]
        return a if dtype is None else a.astype(dtype)

    def read_layer(self, i: int, dtype: Any = None) -> Params:
        pre = layer_prefix(i)
        return unflatten({k: self.read(pre + k, dtype) for k in layer_shapes(self.cfg, i)})

    def close(self) -> None:
        pass
