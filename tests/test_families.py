"""The family registry (caldera_jax.families): one module per model_type, matching transformers."""
from __future__ import annotations

import ast
import pathlib
import pkgutil

import pytest

pytest.importorskip("transformers")

from caldera_jax import families  # noqa: E402
from caldera_jax.checkpoints_io.gguf import SUPPORTED_ARCHITECTURES  # noqa: E402
from caldera_jax.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig  # noqa: E402
from caldera_jax.params import param_shapes  # noqa: E402
from tests import hf_tiny  # noqa: E402

PKG = pathlib.Path(families.__file__).parent


def test_registry_covers_exactly_the_supported_types():
    assert tuple(families.FAMILIES) == SUPPORTED_MODEL_TYPES
    assert set(families.FAMILIES) == set(hf_tiny.FAMILIES)
    modules = {m.name for m in pkgutil.iter_modules([str(PKG)])} - {"base"}
    assert modules == set(families.FAMILIES), "one module per family, each registered"
    for mt, fam in families.FAMILIES.items():
        assert fam.model_type == mt and families.get(mt) is fam
    assert SUPPORTED_ARCHITECTURES == {f.gguf_arch: mt for mt, f in families.FAMILIES.items() if f.gguf_arch}


@pytest.mark.parametrize("mt", hf_tiny.FAMILIES)
def test_family_matches_transformers(mt, tmp_path):
    """The architecture string is transformers' class name; attention bias, qk-norm and the MoE
    layout give exactly the tensors of the transformers model."""
    hf_cfg = hf_tiny.tiny_hf_config(mt)
    _, model = hf_tiny.tiny_hf_model(mt, tmp_path, save=False)
    fam = families.get(mt)
    assert type(model).__name__ == fam.architecture
    assert hf_cfg.architectures in (None, [fam.architecture])
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    assert set(param_shapes(cfg)) == set(hf_tiny.canonical_state_dict(model))
    assert cfg.qk_norm == fam.qk_norm and fam.is_moe == cfg.is_moe


def test_unknown_type_is_a_clear_error():
    with pytest.raises(families.UnknownFamilyError, match=r"unsupported model_type 'gpt2' "
                       r"\(supported: llama, qwen2, qwen3, mixtral, qwen3_moe\)"):
        families.get("gpt2")
    with pytest.raises(ConfigError, match=r"x\.json: unsupported model_type 'gpt2' \(supported: llama, "):
        ModelConfig.from_hf_dict({"model_type": "gpt2"}, source="x.json")
    with pytest.raises(families.UnknownFamilyError, match=r"unsupported GGUF architecture 'mamba' "
                                                          r"\(supported: llama, qwen2, qwen3\)"):
        families.by_gguf_arch("mamba")


ROUND_TRIP = [(mt, {}) for mt in hf_tiny.FAMILIES] + [
    ("llama", dict(attention_bias=True, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})),
    ("qwen3_moe", dict(norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[0])),
    ("mixtral", dict(sliding_window=64)),
]


@pytest.mark.parametrize("mt,over", ROUND_TRIP,
                         ids=lambda v: v if isinstance(v, str) else "-".join(v) or "base")
def test_hf_dict_round_trip(mt, over):
    cfg = ModelConfig.from_hf_dict(hf_tiny.tiny_hf_config(mt, **over).to_dict())
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    built = cfg.replace(raw_json="{}")                       # to_hf_dict builds the dict from the fields
    d = built.to_hf_dict()
    assert d["architectures"] == [families.get(mt).architecture]
    assert ModelConfig.from_hf_dict(d) == cfg


def test_families_import_nothing_else_of_caldera_jax():
    """The bottom of the layers: a family module may import only other family modules."""
    for p in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for m in mods:
                assert not m.startswith("caldera_jax") or m.startswith("caldera_jax.families"), (p.name, m)
