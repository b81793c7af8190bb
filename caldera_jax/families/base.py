"""What a model family is: the `Family` record every family module fills in, and the tables the
families share.

A family module (`caldera_jax/families/<model_type>.py`) holds everything that differs between
families: HF names and layouts, config defaults, sliding-window rule, MoE layout and routing,
GGUF architecture and tensor names. Code elsewhere asks `caldera_jax.families.get(model_type)`
instead of testing `model_type`. This package sits at the bottom of the import layers: it
imports nothing else of caldera_jax (configs are duck-typed; values are plain Python).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


class UnknownFamilyError(ValueError):
    """A model_type (or GGUF architecture) no family module describes."""


# ------------------------------------------------------------------ sliding-window rules
# How a config.json's `sliding_window` is read (ModelConfig.sliding_window; None: full attention).
SLIDING_ALWAYS = "always"           # applies to every layer whenever set (mixtral)
SLIDING_IF_FLAG = "if_flag"         # applies to every layer when `use_sliding_window` is true
SLIDING_REFUSED = "refused"         # `use_sliding_window` true is an error: HF qwen applies the
#                                     window only to layers >= max_window_layers; we refuse, not guess
SLIDING_RULES = (SLIDING_ALWAYS, SLIDING_IF_FLAG, SLIDING_REFUSED)

# ------------------------------------------------------------------ linears sharing an input
# linear (relative to "model.layers.{i}.") -> its input group (one Hessian per group)
ATTENTION_INPUT_GROUPS: tuple[tuple[str, str], ...] = (
    ("self_attn.q_proj", "self_attn.qkv"), ("self_attn.k_proj", "self_attn.qkv"),
    ("self_attn.v_proj", "self_attn.qkv"), ("self_attn.o_proj", "self_attn.o_proj"))
DENSE_MLP_INPUT_GROUPS: tuple[tuple[str, str], ...] = (
    ("mlp.gate_proj", "mlp.gate_up"), ("mlp.up_proj", "mlp.gate_up"), ("mlp.down_proj", "mlp.down_proj"))
# stacked experts (canonical names, caldera_jax.params): expert e's Hessian sums the tokens routed to e
EXPERT_INPUT_GROUPS: tuple[tuple[str, str], ...] = (
    ("mlp.experts.gate_proj", "mlp.experts.gate_up"), ("mlp.experts.up_proj", "mlp.experts.gate_up"),
    ("mlp.experts.down_proj", "mlp.experts.down_proj"))

# ------------------------------------------------------------------ llama.cpp tensor names
# Shared by every GGUF architecture we read: llama.cpp name -> HF canonical name.
GGUF_GLOBAL_NAMES: tuple[tuple[str, str], ...] = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
# "blk.{i}.<gguf>" -> "model.layers.{i}.<hf>"
GGUF_DENSE_LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
)
GGUF_QKV_BIAS_NAMES: tuple[tuple[str, str], ...] = (
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
)
GGUF_QK_NORM_NAMES: tuple[tuple[str, str], ...] = (
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
)

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------ records
@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How a checkpoint on disk stores one MoE layer's router and experts, one tensor per expert.

    Keys are relative to "model.layers.{i}."; `experts` maps each canonical projection
    (gate_proj, up_proj, down_proj) to a per-expert key with `{j}` for the expert index.
    """
    name: str
    router: str
    experts: tuple[tuple[str, str], ...]

    def expert_key(self, proj: str, j: int) -> str:
        return dict(self.experts)[proj].format(j=j)


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """A sparse-MoE family's config keys, routing and disk layout.

    Routing (every family): softmax over all experts in float32, then top-k; the top-k
    probabilities are renormalised when `norm_topk_prob` (a fixed value, or None: read from
    config.json's `norm_topk_prob`, default False).
    """
    num_experts_keys: tuple[str, ...]   # config.json keys of the expert count: first set one wins,
    #                                     the last is required
    intermediate_key: str               # config.json key of each expert's FFN width
    norm_topk_prob: bool | None
    sparse_layers: bool                 # config.json's decoder_sparse_step / mlp_only_layers apply
    layout: ExpertLayout                # what transformers' save_pretrained writes


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str                     # config.json "model_type"
    architecture: str                   # config.json "architectures"[0]: the transformers class
    attention_bias: bool = False        # q/k/v bias when config.json has no "attention_bias"
    attention_bias_key: bool = False    # the HF config class has an "attention_bias" field
    qk_norm: bool = False               # per-head RMSNorm on q and k before RoPE
    sliding_window: str = SLIDING_IF_FLAG
    moe: MoESpec | None = None          # None: dense
    input_groups: tuple[tuple[str, str], ...] = ATTENTION_INPUT_GROUPS + DENSE_MLP_INPUT_GROUPS
    # GGUF (llama.cpp); gguf_arch None: no GGUF reader for this family
    gguf_arch: str | None = None        # GGUF general.architecture
    gguf_global_names: tuple[tuple[str, str], ...] = GGUF_GLOBAL_NAMES   # llama.cpp -> HF, outside layers
    gguf_layer_names: tuple[tuple[str, str], ...] = ()   # "blk.{i}." suffix -> layer-relative HF name
    # extra config.json entries from the GGUF tensor names present: (hf dict so far, names) -> dict
    gguf_hf_config: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
    # a dequantized GGUF tensor -> HF layout: (hf name, array, n_heads, n_kv_heads) -> array
    gguf_tensor_to_hf: Callable[[str, Any, int, int], Any] | None = None

    def __post_init__(self):
        if self.sliding_window not in SLIDING_RULES:
            raise ValueError(f"{self.model_type}: sliding_window rule {self.sliding_window!r} "
                             f"not in {SLIDING_RULES}")

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def linears(self) -> tuple[str, ...]:
        """Every linear of a decoder layer (relative to "model.layers.{i}.", no ".weight")."""
        return tuple(k for k, _ in self.input_groups)

    def input_group(self, linear: str) -> str | None:
        """'self_attn.k_proj' -> 'self_attn.qkv' (the group of linears that share its input)."""
        return dict(self.input_groups).get(linear)
