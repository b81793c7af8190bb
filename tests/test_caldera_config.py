"""The job config YAML: precedence, protection, and every rejection before work starts."""
from __future__ import annotations

import glob
import os

import pytest

from caldera_jax.caldera.config import (JobConfig, JobConfigError, compressible, is_compressible,
                                        load_job_config)
from caldera_jax.caldera.spec import MatrixBudget
from caldera_jax.config import ModelConfig
from tests.hf_tiny import BASE_CONFIG, FAMILY_CONFIG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smollm2_cfg() -> ModelConfig:
    return ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=49152, hidden_size=576,
                                         intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3))


def moe_cfg() -> ModelConfig:
    return ModelConfig.from_hf_dict(dict(model_type="qwen3_moe", **BASE_CONFIG, **FAMILY_CONFIG["qwen3_moe"]))


def write(tmp_path, text: str) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return str(p)


def test_precedence_and_protect(tmp_path):
    path = write(tmp_path, """
defaults: {b_q: 2, rank: 64, quantizer: e8p, calib_samples: 16, calib_seq_len: 128}
pattern_overrides:
  "model.layers.2[0-9].mlp.*": {rank: 128, b_q: 3}
  "model.layers.2[5-9].mlp.down_proj.weight": {rank: 32}
  "model.layers.0.*": {quantizer: uniform, b_q: 4, group_size: 32}
protect: ["model.layers.29.*", "model.layers.3.self_attn.o_proj.weight"]
""")
    jc = load_job_config(path, smollm2_cfg())
    assert jc.calibration.samples == 16 and jc.calibration.seq_len == 128
    b = jc.budget_for("model.layers.26.mlp.down_proj.weight", (576, 1536))
    assert (b.rank, b.b_q) == (32, 3)           # later pattern wins for the fields it sets only
    b = jc.budget_for("model.layers.21.mlp.down_proj.weight", (576, 1536))
    assert (b.rank, b.b_q) == (128, 3)
    b = jc.budget_for("model.layers.0.self_attn.q_proj.weight", (576, 576))
    assert (b.quantizer, b.b_q, b.group_size, b.rank) == ("uniform", 4, 32, 64)
    assert jc.budget_for("model.layers.5.self_attn.q_proj.weight", (576, 576)) == MatrixBudget(b_q=2, rank=64)
    assert jc.budget_for("model.layers.29.mlp.down_proj.weight", (576, 1536)) is None   # protect wins
    plan = jc.check(smollm2_cfg())
    assert len(plan) == 30 * 7 and sum(v is None for v in plan.values()) == 8
    # round trip through to_dict
    again = JobConfig.from_dict(jc.to_dict(), source="again")
    assert again.check(smollm2_cfg()) == plan and again.digest() == jc.digest()


def test_moe_names():
    cfg = moe_cfg()
    names = compressible(cfg)
    assert "model.layers.0.mlp.experts.gate_proj.weight" in names
    assert names["model.layers.0.mlp.experts.down_proj.weight"] == (4, 32, 16)
    assert not is_compressible("model.layers.0.mlp.gate.weight")        # router
    assert not is_compressible("model.embed_tokens.weight") and not is_compressible("lm_head.weight")
    jc = JobConfig.from_dict({"defaults": {"rank": 16},
                              "pattern_overrides": {"*experts.down_proj*": {"rank": 8}}})
    plan = jc.check(cfg)
    assert plan["model.layers.1.mlp.experts.down_proj.weight"].rank == 8
    jc = JobConfig.from_dict({"defaults": {"rank": 8}, "pattern_overrides": {"*.experts.*": {"rank": 17}}})
    with pytest.raises(JobConfigError, match=r"experts\.gate_proj\.weight: rank=17 exceeds min\(m, n\) = 16 of the 16x32"):
        jc.check(cfg)


@pytest.mark.parametrize("text,match", [
    ("defaults: {b_q: 5}", r"job\.yaml: defaults: b_q=5 is not supported by the e8p"),
    ("defaults: {quantizer: uniform, b_q: 1}", r"b_q=1 is not supported by the uniform"),
    ("defaults: {b_l: 5}", r"b_l=5 must be one of"),
    ("defaults: {rank: 'big'}", r"defaults\.rank='big' must be int"),
    ("defaults: {incoherence: 1}", r"defaults\.incoherence=1 must be bool"),
    ("defaults: {bq: 2}", r"unknown key 'defaults\.bq'"),
    ("defualts: {b_q: 2}", r"unknown top-level key\(s\) 'defualts'"),
    ("defaults: {calib_samples: 0}", r"defaults\.calib_samples=0 must be >= 1"),
    ("defaults: {calib_propagate: sideways}", r"calib_propagate='sideways'"),
    ("pattern_overrides: {'model.layers.1.*': {rnak: 3}}", r"unknown key 'pattern_overrides\['model\.layers\.1\.\*'\]\.rnak'"),
    ("pattern_overrides: {'model.layers.1.*': {calib_samples: 3}}", r"calibration settings go in 'defaults'"),
    ("pattern_overrides: {'model.layers.1.*': {b_q: 7}}", r"matrix model\.layers\.1\.self_attn\.q_proj\.weight: "
                                                           r"b_q=7 .*set by pattern_overrides\['model\.layers\.1\.\*'\]"),
    ("pattern_overrides: {'model.layers.1.mlp.*': {rank: 600}}",
     r"job\.yaml: matrix model\.layers\.1\.mlp\.gate_proj\.weight: rank=600 exceeds min\(m, n\) = 576 "
     r"of the 1536x576 matrix \(set by pattern_overrides\['model\.layers\.1\.mlp\.\*'\]\)"),
    ("defaults: {rank: 200}", r"matrix model\.layers\.0\.self_attn\.k_proj\.weight: rank=200 exceeds min\(m, n\) = 192 .*set by defaults"),
    ("pattern_overrides: {'model.layers.30.*': {rank: 8}}", r"pattern_overrides\['model\.layers\.30\.\*'\] matches no compressible matrix"),
    ("protect: ['model.layer.1.*']", r"protect\['model\.layer\.1\.\*'\] matches no compressible matrix"),
    ("protect: 3", r"'protect' must be a list"),
    ("defaults: {b_q: 2}\ndefaults: {b_q: 3}", r"duplicate key 'defaults'"),
    ("pattern_overrides:\n  'a*': {rank: 1}\n  'a*': {rank: 2}", r"duplicate key 'a\*'"),
    ("defaults: [1, 2]", r"'defaults' must be a mapping"),
    ("defaults: {b_q: 2", r"not valid YAML"),
])
def test_rejections(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(JobConfigError, match=match):
        load_job_config(path, smollm2_cfg())


def test_missing_file(tmp_path):
    with pytest.raises(JobConfigError, match="config file not found"):
        load_job_config(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_configs_valid(path):
    jc = load_job_config(path)
    if "smollm2" in os.path.basename(path):
        jc.check(smollm2_cfg())


def test_incoherence_size_rejected():
    cfg = ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=64, hidden_size=44,
                                        intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=4))
    jc = JobConfig.from_dict({"defaults": {"rank": 4, "incoherence": True}}, source="x.yaml")
    with pytest.raises(JobConfigError, match=r"x\.yaml: matrix model\.layers\.0\.self_attn\.q_proj\.weight: "
                                             r"incoherence=True \(set by defaults\) but its m \(rows\) = 44"):
        jc.check(cfg)
    jc = JobConfig.from_dict({"defaults": {"rank": 4, "incoherence": True},
                              "pattern_overrides": {"*": {"incoherence": False}}})
    assert all(not b.incoherence for b in jc.check(cfg).values())
