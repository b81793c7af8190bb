"""What a dense -> MoE derivation is asked to do (`MoefyConfig`), and the checks that refuse a
source or a setting before any work, each in one line naming the field.

    mc = MoefyConfig(experts=8, top_k=2)
    target = check(dense_cfg, mc, source="path/to/model")   # MoefyError, or the MoE family's model_type
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from caldera_jax.config import ModelConfig

CLUSTERINGS = ("coactivation", "weights")
# dense model_type -> the MoE family whose attention is the same (no other change to the layer)
TARGETS = {"llama": "mixtral", "qwen3": "qwen3_moe"}


class MoefyError(ValueError):
    """A source model or a setting the derivation cannot use; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MoefyConfig:
    """Every setting that decides the derived model's bytes (the job's identity hashes it)."""
    experts: int = 8                 # E: each layer's FFN (intermediate I) becomes E experts of I/E
    top_k: int = 2                   # experts per token (Mixtral routing: top-k renormalised)
    clustering: str = "coactivation"  # how neurons are grouped: "coactivation" | "weights"
    seed: int = 0
    # calibration (clustering, router fit): windows of the calibration text
    calib_samples: int = 64
    calib_seq_len: int = 256
    cluster_tokens: int = 4096       # tokens whose activations describe a neuron (coactivation)
    kmeans_iters: int = 6
    refine_iters: int = 6           # routing-aware refinement of the split (0: the k-means split as is)
    # router fit, per layer, on the dense model's FFN inputs
    router_steps: int = 150
    router_lr: float = 3e-2
    router_recon_weight: float = 1.0  # weight of the reconstruction term next to the oracle cross-entropy
    # local training of each MoE block (router + experts) to the dense FFN's output, per layer
    local_steps: int = 300
    local_batch: int = 256           # tokens per step
    local_lr: float = 5e-3
    local_router_lr: float = 2e-3
    # distillation of routers and experts against the dense model's logits
    distill_steps: int = 150
    distill_batch: int = 4
    distill_seq_len: int = 256
    distill_samples: int = 1024      # distinct training windows (drawn in a seeded order)
    distill_lr: float = 3e-4          # probe, 30 steps at top-2 (val KL 1.085 at the start): 1e-4 0.927,
                                      # 3e-4 0.871, 1e-3 0.878, 3e-3 0.975 (BENCHMARKS.md)
    distill_router_lr: float = 1e-3
    distill_warmup: float = 0.1      # fraction of the steps with a linear warm-up
    aux_loss_coef: float = 0.01      # Switch-style load-balancing loss on the routers
    val_samples: int = 8             # held-out calibration windows for the validation KL
    eval_every: int = 25
    ckpt_every: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoefyConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MoefyError(f"unknown moefy setting(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**d)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def check(self) -> "MoefyConfig":
        """The settings alone (no model): positive counts, a known clustering, top_k <= experts."""
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise MoefyError(f"{name}={v!r}: must be an integer >= {0 if allow_zero else 1}")
        for n in ("experts", "top_k", "calib_samples", "calib_seq_len", "cluster_tokens", "kmeans_iters",
                  "distill_batch", "distill_seq_len", "distill_samples", "val_samples", "eval_every",
                  "ckpt_every"):
            positive(n)
        positive("router_steps", allow_zero=True)
        positive("refine_iters", allow_zero=True)
        positive("local_steps", allow_zero=True)
        positive("local_batch")
        positive("distill_steps", allow_zero=True)
        if self.top_k > self.experts:
            raise MoefyError(f"top_k={self.top_k} > experts={self.experts}: a token cannot choose more "
                             f"experts than there are")
        if self.clustering not in CLUSTERINGS:
            raise MoefyError(f"clustering={self.clustering!r}: must be one of {', '.join(CLUSTERINGS)}")
        for n in ("router_lr", "local_lr", "local_router_lr", "distill_lr", "distill_router_lr"):
            if not getattr(self, n) > 0:
                raise MoefyError(f"{n}={getattr(self, n)!r}: must be > 0")
        for n in ("router_recon_weight", "aux_loss_coef"):
            if not getattr(self, n) >= 0:
                raise MoefyError(f"{n}={getattr(self, n)!r}: must be >= 0")
        if not 0 <= self.distill_warmup < 1:
            raise MoefyError(f"distill_warmup={self.distill_warmup!r}: must be in [0, 1)")
        return self


def check(cfg: ModelConfig, mc: MoefyConfig, source: str = "the source model") -> str:
    """Refuses, in one line naming the field, a source that is not a dense SwiGLU model of a family
    with an MoE counterpart, or settings that do not fit it. Returns the MoE model_type."""
    mc.check()
    raw = json.loads(cfg.raw_json or "{}")
    if cfg.is_moe:
        raise MoefyError(f"{source}: model_type '{cfg.model_type}' is already a mixture of experts "
                         f"(num_experts={cfg.num_experts}); moefy splits a dense model")
    if cfg.model_type not in TARGETS:
        raise MoefyError(f"{source}: model_type '{cfg.model_type}' has no MoE counterpart here (supported "
                         f"sources: {', '.join(f'{a} -> {b}' for a, b in TARGETS.items())})")
    act = raw.get("hidden_act", cfg.hidden_act)
    if act not in ("silu", "swish"):
        raise MoefyError(f"{source}: hidden_act '{act}': the FFN is not SwiGLU (silu)")
    if raw.get("mlp_bias"):
        raise MoefyError(f"{source}: mlp_bias=true: the FFN has biases, not a plain SwiGLU "
                         f"(an expert split of a bias is not defined)")
    if cfg.attention_bias:
        raise MoefyError(f"{source}: attention_bias=true: {TARGETS[cfg.model_type]} has no q/k/v biases")
    if cfg.sliding_window is not None:
        raise MoefyError(f"{source}: sliding_window={cfg.sliding_window}: only full attention is converted")
    I = cfg.intermediate_size
    if I % mc.experts:
        raise MoefyError(f"experts={mc.experts} does not divide the source's intermediate_size={I} "
                         f"(each expert gets I/E neurons)")
    if mc.clustering == "coactivation" and mc.cluster_tokens < mc.experts:
        raise MoefyError(f"cluster_tokens={mc.cluster_tokens}: fewer than experts={mc.experts}")
    return TARGETS[cfg.model_type]
