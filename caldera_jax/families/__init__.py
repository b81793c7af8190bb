"""Model families: one module per HF `model_type`, each exposing `FAMILY` (a `Family`), and the
registry. Adding a family: a new module here, one line in `_MODULES` (and its tests).

    from caldera_jax import families
    fam = families.get(cfg.model_type)      # UnknownFamilyError lists the supported types
    fam.architecture, fam.moe, fam.gguf_arch, ...
"""
from __future__ import annotations

from caldera_jax.families import llama, mixtral, qwen2, qwen3, qwen3_moe
from caldera_jax.families.base import (SLIDING_ALWAYS, SLIDING_IF_FLAG, SLIDING_REFUSED, ExpertLayout,
                                       Family, MoESpec, UnknownFamilyError)

__all__ = ["FAMILIES", "Family", "MoESpec", "ExpertLayout", "UnknownFamilyError", "get", "by_gguf_arch",
           "gguf_architectures", "expert_layouts", "linears", "SLIDING_ALWAYS", "SLIDING_IF_FLAG",
           "SLIDING_REFUSED"]

_MODULES = (llama, qwen2, qwen3, mixtral, qwen3_moe)

# model_type -> Family, in this order (messages list the supported types in it)
FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in _MODULES}


def get(model_type: str) -> Family:
    """The family of a config.json `model_type`; UnknownFamilyError names the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnknownFamilyError(f"unsupported model_type '{model_type}' "
                                 f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def gguf_architectures() -> dict[str, str]:
    """GGUF general.architecture -> model_type, for the families with a GGUF reader."""
    return {f.gguf_arch: f.model_type for f in FAMILIES.values() if f.gguf_arch is not None}


def by_gguf_arch(arch: str) -> Family:
    archs = gguf_architectures()
    if not isinstance(arch, str) or arch not in archs:
        raise UnknownFamilyError(f"unsupported GGUF architecture '{arch}' "
                                 f"(supported: {', '.join(archs)})")
    return FAMILIES[archs[arch]]


def expert_layouts() -> tuple[ExpertLayout, ...]:
    """Every per-expert disk layout of the MoE families (distinct, in registry order)."""
    out: list[ExpertLayout] = []
    for f in FAMILIES.values():
        if f.moe is not None and f.moe.layout not in out:
            out.append(f.moe.layout)
    return tuple(out)


def linears() -> tuple[str, ...]:
    """Every decoder-layer linear of any family (relative to "model.layers.{i}.", no ".weight")."""
    out: dict[str, None] = {}
    for f in FAMILIES.values():
        out.update(dict.fromkeys(f.linears))
    return tuple(out)
