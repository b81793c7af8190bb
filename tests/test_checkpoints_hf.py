"""HF safetensors checkpoints: transformers <-> caldera_jax.checkpoints_io.hf, layouts, bf16, bad input, atomicity."""
from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

import torch
import transformers

from safetensors.numpy import load_file, save_file  # noqa: E402

from caldera_jax.config import ConfigError, ModelConfig  # noqa: E402
from caldera_jax.params import flatten, layer_prefix, param_shapes, unflatten  # noqa: E402
from caldera_jax.checkpoints_io import CheckpointError, load_hf, open_hf, save_hf  # noqa: E402
from tests.hf_tiny import canonical_state_dict, tiny_hf_model, to_numpy  # noqa: E402

CASES = {  # test id -> (model_type, config overrides)
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mixtral": ("mixtral", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_mixed": ("qwen3_moe", {"mlp_only_layers": [0]}),   # layer 0 dense, layer 1 MoE
}


def assert_params_equal(params, ref: dict[str, np.ndarray]) -> None:
    flat = flatten(params)
    assert sorted(flat) == sorted(ref)
    for k, v in ref.items():
        got = np.asarray(flat[k])
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)


def hf_load(path):
    """transformers from_pretrained; asserts a clean load (no missing/unexpected/mismatched keys)."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), (kind, info[kind])
    return model


def assert_same_torch(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def tree_bytes(root) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


# ------------------------------------------------------------------ 1. transformers -> ours
@pytest.mark.parametrize("case", CASES)
def test_transformers_save_our_load(case, tmp_path):
    mt, over = CASES[case]
    path, model = tiny_hf_model(mt, tmp_path, **over)
    ref = canonical_state_dict(model)
    assert all(np.abs(v).max() > 0 for v in ref.values())
    cfg, params = load_hf(path)
    assert cfg.model_type == mt and set(flatten(params)) == set(param_shapes(cfg))
    assert_params_equal(params, ref)
    with open_hf(path) as ck:
        assert ck.names() == list(param_shapes(cfg))
        assert ck.dir == os.path.abspath(path)
        for i in range(cfg.num_hidden_layers):
            pre = layer_prefix(i)
            assert_params_equal(ck.read_layer(i), {k[len(pre):]: v for k, v in ref.items() if k.startswith(pre)})


# ------------------------------------------------------------------ 2. ours -> transformers
@pytest.mark.parametrize("case", CASES)
def test_our_save_transformers_load(case, tmp_path):
    mt, over = CASES[case]
    path, model = tiny_hf_model(mt, tmp_path, **over)
    cfg = ModelConfig.from_json(path)
    # numpy leaves, deliberately not C-contiguous (Fortran order) to check save_hf copes
    params = unflatten({k: np.asfortranarray(v) for k, v in canonical_state_dict(model).items()})
    out = save_hf(tmp_path / "ours", cfg, params)
    files = sorted(os.listdir(out))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in open_hf(out).source_tensor_names()
    assert_same_torch(hf_load(out), model)


def test_jax_leaves_sharded_save_and_lazy_layer(tmp_path):
    path, model = tiny_hf_model("qwen3_moe", tmp_path)
    cfg, params = load_hf(path)                                # jax leaves
    out = save_hf(tmp_path / "sharded", cfg, params, max_shard_bytes=16 * 1024)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        np.asarray(v).nbytes for v in flatten(params).values())
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in index["weight_map"]
    assert_same_torch(hf_load(out), model)
    ref = canonical_state_dict(model)
    with open_hf(out) as ck:
        assert_params_equal(ck.read_layer(1), {k[len("model.layers.1."):]: v for k, v in ref.items()
                                               if k.startswith("model.layers.1.")})


def test_save_copies_tokenizer_and_generation_config(tmp_path):
    path, model = tiny_hf_model("llama", tmp_path)
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (tok / f).write_text(f"contents of {f}")
    (tok / "notes.txt").write_text("not a tokenizer file")
    cfg, params = load_hf(path)
    out = save_hf(tmp_path / "out", cfg, params, tokenizer_dir=tok,
                  generation_config={"eos_token_id": [2, 3], "temperature": 0.7, "do_sample": True})
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "contents of chat_template.jinja"
    assert not os.path.exists(os.path.join(out, "notes.txt"))
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == [2, 3]
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        save_hf(tmp_path / "out2", cfg, params, tokenizer_dir=path)   # a checkpoint, no tokenizer
    assert not os.path.exists(tmp_path / "out2")


# ------------------------------------------------------------------ 3. fused layout on disk
@pytest.mark.parametrize("mt", ["qwen3_moe", "mixtral"])
def test_fused_layout_checkpoint(mt, tmp_path):
    path, model = tiny_hf_model(mt, tmp_path)
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(os.path.join(path, "config.json"), fused / "config.json")
    sd = {k: to_numpy(v) for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd and "model.layers.0.mlp.experts.down_proj" in sd
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    _, params = load_hf(fused)
    assert_params_equal(params, canonical_state_dict(model))
    # the canonical stacked names themselves are read too
    save_file(canonical_state_dict(model), str(fused / "model.safetensors"), metadata={"format": "pt"})
    assert_params_equal(load_hf(fused)[1], canonical_state_dict(model))


# ------------------------------------------------------------------ 4. bf16
def test_bf16_round_trip(tmp_path):
    path, model = tiny_hf_model("qwen3_moe", tmp_path, dtype=torch.bfloat16)
    ref = canonical_state_dict(model)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in ref.values())
    cfg, params = load_hf(path)
    assert_params_equal(params, ref)
    out = save_hf(tmp_path / "ours", cfg, params)
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    back = hf_load(out)
    assert back.dtype == torch.bfloat16
    assert_same_torch(back, model)
    with open_hf(out) as ck:   # cast on read
        w = ck.read("model.layers.1.mlp.experts.up_proj.weight", dtype=np.float32)
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, ref["model.layers.1.mlp.experts.up_proj.weight"].astype(np.float32))


def test_save_with_dtype_cast(tmp_path):
    path, model = tiny_hf_model("llama", tmp_path)
    cfg, params = load_hf(path)
    out = save_hf(tmp_path / "bf", cfg, params, dtype="bfloat16")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    want = {k: v.astype(ml_dtypes.bfloat16) for k, v in canonical_state_dict(model).items()}
    assert_params_equal(open_hf(out).read_all(), want)
    assert hf_load(out).dtype == torch.bfloat16


# ------------------------------------------------------------------ 5. bad input
@pytest.fixture
def llama_dir(tmp_path):
    return tiny_hf_model("llama", tmp_path)[0]


def rewrite(file, change):
    """Rewrites a safetensors file after change(dict of numpy tensors) edits it in place."""
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_path_and_config(tmp_path, llama_dir):
    with pytest.raises(CheckpointError, match="nowhere.*does not exist"):
        open_hf(tmp_path / "nowhere")
    os.remove(os.path.join(llama_dir, "config.json"))
    with pytest.raises(CheckpointError, match="config.json.*not found"):
        open_hf(llama_dir)


def test_no_safetensors(llama_dir):
    os.remove(os.path.join(llama_dir, "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{llama_dir}: no model.safetensors"):
        open_hf(llama_dir)


def test_unknown_model_type(llama_dir):
    p = os.path.join(llama_dir, "config.json")
    d = json.load(open(p))
    json.dump({**d, "model_type": "gpt2"}, open(p, "w"))
    with pytest.raises(ConfigError, match=rf"{p}: unsupported model_type 'gpt2'"):
        open_hf(llama_dir)


@pytest.fixture
def sharded_dir(tmp_path):
    path, model = tiny_hf_model("qwen3_moe", tmp_path)
    cfg, params = load_hf(path)
    return save_hf(tmp_path / "sharded", cfg, params, max_shard_bytes=16 * 1024)


def shard_file(sharded_dir, k):
    """Path of the k-th (1-based) shard of a sharded checkpoint."""
    shards = sorted(f for f in os.listdir(sharded_dir) if f.endswith(".safetensors"))
    return os.path.join(sharded_dir, shards[k - 1])


def test_index_references_missing_shard(sharded_dir):
    shard = shard_file(sharded_dir, 2)
    os.remove(shard)
    with pytest.raises(CheckpointError, match=rf"index.json: shard file {shard}"
                                              r" \(holding tensor 'model\..*'\) does not exist"):
        open_hf(sharded_dir)


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_shard(sharded_dir, keep):
    shard = shard_file(sharded_dir, 3)
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=rf"{shard}: not a readable safetensors file"):
        open_hf(sharded_dir)


def test_truncated_single_file(llama_dir):
    f = os.path.join(llama_dir, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{f}: not a readable safetensors file"):
        load_hf(llama_dir)


def test_wrong_shape(llama_dir):
    f = os.path.join(llama_dir, "model.safetensors")
    rewrite(f, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.ones((40, 32), np.float32)}))
    ck = open_hf(llama_dir)
    msg = rf"{f}: tensor 'model.layers.1.mlp.up_proj.weight' has shape \(40, 32\), expected \(48, 32\)"
    with pytest.raises(CheckpointError, match=msg):
        ck.read_all()
    with pytest.raises(CheckpointError, match=msg):
        ck.read_layer(1)
    ck.read_layer(0)   # the other layer is fine


def test_wrong_shape_per_expert(sharded_dir):
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    index = json.load(open(os.path.join(sharded_dir, "model.safetensors.index.json")))
    f = os.path.join(sharded_dir, index["weight_map"][key])
    rewrite(f, lambda t: t.update({key: np.ones((32, 15), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"{f}: tensor '{key}' has shape \(32, 15\), expected \(32, 16\)"):
        load_hf(sharded_dir)


def test_missing_tensor(llama_dir):
    f = os.path.join(llama_dir, "model.safetensors")
    rewrite(f, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    assert "model.layers.0.self_attn.k_proj.weight" not in open_hf(llama_dir).names()
    with pytest.raises(CheckpointError, match=rf"{f}: missing tensor 'model.layers.0.self_attn.k_proj.weight'"):
        load_hf(llama_dir)


def test_missing_expert_and_router(sharded_dir):
    index = os.path.join(sharded_dir, "model.safetensors.index.json")
    wm = json.load(open(index))["weight_map"]
    for key in ("model.layers.0.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.gate.weight"):
        rewrite(os.path.join(sharded_dir, wm.pop(key)), lambda t: t.pop(key))
    json.dump({"metadata": {}, "weight_map": wm}, open(index, "w"))
    ck = open_hf(sharded_dir)
    with pytest.raises(CheckpointError, match=rf"{index}: missing tensor 'model.layers.0.mlp.experts.3.up_proj"
                                              r".weight' \(needed for 'model.layers.0.mlp.experts.up_proj.weight'\)"):
        ck.read_layer(0)
    with pytest.raises(CheckpointError, match=rf"{index}: missing tensor 'model.layers.1.mlp.gate.weight'"):
        ck.read_layer(1)


def test_untied_without_lm_head_and_tied_extras(tmp_path, llama_dir):
    f = os.path.join(llama_dir, "model.safetensors")
    rewrite(f, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=rf"{f}: missing tensor 'lm_head.weight'"):
        load_hf(llama_dir)
    # a tied model ignores a stored lm_head and any unknown extra tensor
    path, model = tiny_hf_model("llama", tmp_path, name="tied", tie_word_embeddings=True)
    extra = {"lm_head.weight": np.ones((96, 32), np.float32), "model.rotary_emb.inv_freq": np.ones(4, np.float32)}
    rewrite(os.path.join(path, "model.safetensors"), lambda t: t.update(extra))
    _, params = load_hf(path)
    assert_params_equal(params, canonical_state_dict(model))


def test_save_rejects_bad_params(tmp_path, llama_dir):
    cfg, params = load_hf(llama_dir)
    flat = flatten(params)
    bad = unflatten({**flat, "model.layers.1.mlp.up_proj.weight": np.zeros((40, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \(40, 32\)"):
        save_hf(tmp_path / "x", cfg, bad)
    missing = unflatten({k: v for k, v in flat.items() if k != "model.norm.weight"})
    with pytest.raises(CheckpointError, match="params has no tensor 'model.norm.weight'"):
        save_hf(tmp_path / "x", cfg, missing)
    extra = unflatten({**flat, "model.layers.0.mlp.extra.weight": np.zeros(3)})
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.extra.weight"):
        save_hf(tmp_path / "x", cfg, extra)
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------ 6. atomicity
class QuantizedWeight:
    """Stands in for a compressed low-rank weight: has .apply, is not an array."""
    shape, dtype = (96, 32), np.float32

    def apply(self, x):
        return x


class ExplodingArray:
    """Looks like an array until it is materialised; records what the temp dir held at that point."""

    def __init__(self, shape, tmp_dir):
        self.shape, self.dtype, self.tmp_dir, self.seen = shape, np.dtype(np.float32), tmp_dir, None

    def __array__(self, dtype=None, copy=None):
        self.seen = sorted(os.listdir(self.tmp_dir))
        raise RuntimeError("disk full")


def test_atomic_replace(tmp_path):
    path, model = tiny_hf_model("llama", tmp_path)
    cfg, params = load_hf(path)
    out = save_hf(tmp_path / "out", cfg, params, max_shard_bytes=8 * 1024)
    before = tree_bytes(out)
    flat = flatten(params)
    boom = ExplodingArray((96, 32), f"{out}.tmp-{os.getpid()}")
    with pytest.raises(RuntimeError, match="disk full"):            # fails midway: shards already written
        save_hf(out, cfg, unflatten({**flat, "lm_head.weight": boom}), max_shard_bytes=8 * 1024)
    assert any(f.endswith(".safetensors") for f in boom.seen), boom.seen
    with pytest.raises(CheckpointError, match="compressed-checkpoint writer"):
        save_hf(out, cfg, unflatten({**flat, "lm_head.weight": QuantizedWeight()}))
    assert tree_bytes(out) == before
    assert sorted(os.listdir(tmp_path)) == ["hf-llama", "out"]
    # a successful save replaces the old directory completely
    save_hf(out, cfg, params, dtype="bfloat16")
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["hf-llama", "out"]
    assert_same_torch(hf_load(out), model.to(torch.bfloat16))
