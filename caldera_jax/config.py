"""ModelConfig: one frozen dataclass for every supported decoder family, read from a HF config.json.

Supported `model_type`s: those of `caldera_jax.families` (llama, qwen2, qwen3, mixtral, qwen3_moe);
what differs between them (defaults, sliding-window rule, MoE keys) is read from the family record.
The raw HF dict is kept (as a JSON string) so an exported checkpoint carries the user's config unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from caldera_jax import families

SUPPORTED_MODEL_TYPES = tuple(families.FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A config.json that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope scaling as sorted (key, value) pairs so the dataclass stays hashable (jit static arg)
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # q/k/v bias (qwen2: True)
    qk_norm: bool = False             # per-head RMSNorm on q and k before RoPE (qwen3, qwen3_moe)
    sliding_window: int | None = None  # None: full attention in every layer
    hidden_act: str = "silu"
    # MoE (num_experts == 0: dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False      # renormalise the top-k probabilities (families.MoESpec)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    raw_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    # ---------------------------------------------------------------- derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """HF semantics (qwen3_moe): sparse unless in mlp_only_layers or off the sparse step."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---------------------------------------------------------------- I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a HF config dict; `source` names the file in error messages."""
        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise ConfigError(f"{source}: required field '{key}' is missing")
            return d[key]

        mt = need("model_type")
        try:
            fam = families.get(mt)
        except families.UnknownFamilyError as e:
            raise ConfigError(f"{source}: {e}") from None
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        head_dim = int(d.get("head_dim") or hidden // heads)

        # RoPE: transformers 5 writes `rope_parameters`, older configs `rope_theta` + `rope_scaling`.
        rp = dict(d.get("rope_parameters") or {})
        if d.get("rope_scaling"):
            rp = {**dict(d["rope_scaling"]), **rp}
        theta = float(rp.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rp.pop("rope_type", rp.pop("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: unsupported rope type '{rope_type}' "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if rp.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
        rope_scaling = tuple(sorted({"rope_type": rope_type, **rp}.items()))

        window = None
        if d.get("sliding_window") and (fam.sliding_window == families.SLIDING_ALWAYS
                                        or d.get("use_sliding_window")):
            window = int(d["sliding_window"])
            if fam.sliding_window == families.SLIDING_REFUSED:
                raise ConfigError(f"{source}: use_sliding_window=True is not supported for {mt}")

        moe: dict[str, Any] = {}
        if fam.moe is not None:
            spec = fam.moe
            *optional, required = spec.num_experts_keys
            moe = dict(num_experts=int(next((d[k] for k in optional if d.get(k)), None) or need(required)),
                       num_experts_per_tok=int(need("num_experts_per_tok")),
                       moe_intermediate_size=int(need(spec.intermediate_key)),
                       norm_topk_prob=(spec.norm_topk_prob if spec.norm_topk_prob is not None
                                       else bool(d.get("norm_topk_prob", False))))
            if spec.sparse_layers:
                moe.update(decoder_sparse_step=int(d.get("decoder_sparse_step") or 1),
                           mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()))
        if moe and not 0 < moe["num_experts_per_tok"] <= moe["num_experts"]:
            raise ConfigError(f"{source}: num_experts_per_tok={moe['num_experts_per_tok']} must be in "
                              f"[1, num_experts={moe['num_experts']}]")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{source}: hidden_act '{act}' is not supported (SwiGLU with silu only)")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        return cls(
            model_type=mt,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", fam.attention_bias)),
            qk_norm=fam.qk_norm,
            sliding_window=window,
            hidden_act=act,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            raw_json=json.dumps(d, sort_keys=True),
            **moe,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config dict: the original one when we have it, else one built from the fields."""
        d = json.loads(self.raw_json)
        if d:
            return d
        fam = families.get(self.model_type)
        d = dict(model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings, hidden_act=self.hidden_act,
                 rope_parameters={"rope_theta": self.rope_theta, **self.rope},
                 bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                 pad_token_id=self.pad_token_id, dtype=self.torch_dtype,
                 architectures=[fam.architecture])
        if fam.attention_bias_key:
            d["attention_bias"] = self.attention_bias
        if fam.sliding_window == families.SLIDING_ALWAYS:
            d["sliding_window"] = self.sliding_window
        spec = fam.moe
        if spec is not None:
            d[spec.num_experts_keys[0]] = self.num_experts
            d["num_experts_per_tok"] = self.num_experts_per_tok
            if spec.intermediate_key != "intermediate_size":
                d[spec.intermediate_key] = self.moe_intermediate_size
            if spec.norm_topk_prob is None:
                d["norm_topk_prob"] = self.norm_topk_prob
            if spec.sparse_layers:
                d.update(decoder_sparse_step=self.decoder_sparse_step,
                         mlp_only_layers=list(self.mlp_only_layers))
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# model_type -> HF architectures[0] (kept for callers; the family records are the source)
ARCHITECTURES = {mt: f.architecture for mt, f in families.FAMILIES.items()}


def rope_inv_freq(cfg: ModelConfig):
    """Inverse frequencies [head_dim/2] (float64 numpy) and the cos/sin attention factor (float).

    Mirrors transformers' ROPE_INIT_FUNCTIONS for default, linear, llama3 and yarn.
    """
    import numpy as np
    rope = cfg.rope
    kind = rope.get("rope_type", "default")
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(rope["factor"]), 1.0
    if kind == "llama3":
        factor, lo, hi = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old = float(rope["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        out = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wl >= hi_wl) & (wl <= lo_wl)
        return np.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        factor = rope.get("factor")
        old = float(rope["original_max_position_embeddings"])
        if factor is None:
            factor = cfg.max_position_embeddings / old
        factor = float(factor)

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        attn = rope.get("attention_factor")
        if attn is None:
            m, mad = rope.get("mscale"), rope.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, mad) if (m and mad) else mscale(factor)
        fast, slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

        def corr_dim(rot):
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        lo_c, hi_c = corr_dim(fast), corr_dim(slow)
        if rope.get("truncate", True):
            lo_c, hi_c = math.floor(lo_c), math.ceil(hi_c)
        lo_c, hi_c = max(lo_c, 0), min(hi_c, dim - 1)
        if lo_c == hi_c:
            hi_c += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo_c) / (hi_c - lo_c), 0, 1)
        extra = 1 - ramp
        return (inv / factor) * (1 - extra) + inv * extra, float(attn)
    raise ConfigError(f"unsupported rope type '{kind}'")
