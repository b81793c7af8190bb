"""The compressed checkpoint: save/load round trip equals the in-memory QLRWeights (dense and
stacked experts), the model runs the loaded leaves, fingerprints refuse a different source model
before anything runs, and modified files are detected."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: F401  (the parity reference; a test dependency)

from caldera_jax.caldera.calibration import calibrate, hessian_key  # noqa: E402
from caldera_jax.caldera.config import compressible  # noqa: E402
from caldera_jax.caldera.spec import MatrixBudget  # noqa: E402
from caldera_jax.models.decoder import forward  # noqa: E402
from caldera_jax.params import flatten, layer_prefix, layer_shapes, unflatten  # noqa: E402
from caldera_jax.checkpoints_io import CheckpointError, load_hf, open_hf  # noqa: E402
from caldera_jax.checkpoints_io import compressed as ck  # noqa: E402
from caldera_jax.checkpoints_io.fingerprint import FingerprintMismatchError, fingerprint, verify  # noqa: E402
from tests.hf_tiny import tiny_hf_model  # noqa: E402

# every linear is 32 x 32 (one compiled decomposition for the whole file)
TINY = dict(intermediate_size=32, num_key_value_heads=4, moe_intermediate_size=32)
BUDGET = MatrixBudget(quantizer="uniform", b_q=4, group_size=16, rank=4, b_l=8, b_r=8, factor_group_size=8,
                      iters=1, lplr_iters=1, requant_sweeps=0, incoherence=True)
FP4_BUDGET = BUDGET.replace(quantizer="fp4")          # NVFP4-like Q (e4m3 scale per 16, fp32 per tensor)


def tiny(model_type, tmp_path, **kw):
    over = dict(TINY)
    if model_type != "qwen3_moe":
        over.pop("moe_intermediate_size")
    return tiny_hf_model(model_type, tmp_path, **{**over, **kw})


def build_checkpoint(path, out, protect=("model.layers.1.self_attn.o_proj.weight",), budget=BUDGET):
    """Decomposes every linear of a tiny model with D's decompose and writes a checkpoint with the
    checkpoint API. Returns (cfg, in-memory params with QLRWeight leaves, source params)."""
    from caldera_jax.caldera import decompose as dec
    cfg, params = load_hf(path)
    src = jax.tree.map(np.asarray, params)
    flat_src = flatten(src)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (4, 12))
    stats = calibrate((cfg, src), tokens, batch_size=4)
    mem = dict(flat_src)
    for i in range(cfg.num_hidden_layers):
        pre = layer_prefix(i)
        quantized, protected, dense = {}, {}, {}
        for n in layer_shapes(cfg, i):
            name = pre + n
            if name in protect:
                protected[name] = flat_src[name]
                mem[name] = jnp.asarray(flat_src[name].astype(jnp.bfloat16).astype(np.float32))
            elif name in compressible(cfg):
                h = stats[i][hessian_key(name)]
                if flat_src[name].ndim == 3:
                    res = dec.decompose_many(list(zip(flat_src[name], h)), budget, key=3,
                                             mesh=jax.make_mesh((1,), ("d",), devices=jax.devices()[:1]))
                    q = jax.tree.map(lambda *xs: jnp.stack(xs), *[r[0] for r in res])
                else:
                    q, _ = dec.decompose(flat_src[name], h, budget, key=7)
                quantized[name] = mem[name] = q
            else:
                dense[name] = flat_src[name]
        ck.write_layer(out, i, dense=dense, protected=protected, quantized=quantized,
                       matrices={n: {"test": True} for n in quantized}, job_digest="test")
    ck.write_globals(out, {n: flat_src[n] for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
                           if n in flat_src})
    ck.write_config(out, {"model_config": cfg.to_hf_dict(), "source_fingerprint": fingerprint(path)})
    return cfg, unflatten(mem), src


@pytest.mark.parametrize("model_type,budget", [("llama", BUDGET), ("qwen3_moe", BUDGET), ("qwen3_moe", FP4_BUDGET)],
                         ids=["llama", "qwen3_moe", "qwen3_moe-fp4"])
def test_round_trip_equals_in_memory(model_type, budget, tmp_path):
    path, _ = tiny(model_type, tmp_path)
    out = str(tmp_path / "ckpt")
    cfg, mem, src = build_checkpoint(path, out, budget=budget)
    cfg2, loaded = ck.load_compressed(out, source=path)
    assert cfg2 == cfg
    fm, fl = flatten(mem), flatten(loaded)
    assert sorted(fm) == sorted(fl)
    n_q = 0
    for k, v in fm.items():
        got = fl[k]
        if hasattr(v, "to_arrays"):
            n_q += 1
            assert type(got) is type(v) and got.shape == v.shape
            a, ma = v.to_arrays()
            b, mb = got.to_arrays()
            assert ma == mb and sorted(a) == sorted(b), k
            for name in a:
                assert np.asarray(a[name]).dtype == np.asarray(b[name]).dtype, (k, name)
                np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=f"{k}:{name}")
                assert np.asarray(b[name]).dtype.kind != "i" or np.asarray(b[name]).dtype.itemsize <= 4
            np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(v.dequantize()), err_msg=k)
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(v), err_msg=k)
    assert n_q == len(compressible(cfg)) - 1
    assert {v.q.fmt.kind for v in fm.values() if hasattr(v, "to_arrays")} == {budget.quantizer}
    # the model runs the loaded leaves directly, with the same logits as the in-memory ones
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)))
    np.testing.assert_array_equal(np.asarray(forward(loaded, cfg, tokens)), np.asarray(forward(mem, cfg, tokens)))
    # and they are near the original model (4-bit Q + rank-4 8-bit L/R, ~7% weight error per
    # matrix on random weights; test_compress_job checks closeness at 8 bits)
    ref = np.asarray(forward(jax.tree.map(jnp.asarray, src), cfg, tokens))
    got = np.asarray(forward(loaded, cfg, tokens))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.3, rel
    # only storable dtypes on disk (no int4, codes packed as unsigned words)
    from safetensors import safe_open
    with safe_open(os.path.join(out, ck.layer_file(0)), framework="numpy") as f:
        dts = {f.get_tensor(k).dtype.name for k in f.keys() if "::" in k}
    assert dts <= {"uint8", "uint16", "uint32", "float16", "float32", "bfloat16"}, dts


def test_fingerprint_and_mismatch_refused_before_anything_runs(tmp_path):
    path, model = tiny("llama", tmp_path)
    fp = fingerprint(path)
    assert fp == fingerprint(path) and len(fp["tensors"]) == len(open_hf(path).names())
    verify(fp, path)
    out = str(tmp_path / "ckpt")
    build_checkpoint(path, out)
    # another model: same architecture, one weight changed slightly
    other, m2 = tiny("llama", tmp_path, name="other")
    import torch
    with torch.no_grad():
        m2.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    m2.save_pretrained(other)
    # break the checkpoint's layer file too: the fingerprint error must come first
    with open(os.path.join(out, ck.layer_file(0)), "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    with pytest.raises(FingerprintMismatchError, match=r"model\.layers\.1\.mlp\.up_proj\.weight \(sha256"):
        ck.load_compressed(out, source=other)
    # a different random model: many tensors differ; the first ones are named, in model order
    third, _ = tiny("llama", tmp_path, seed=5, name="third")
    with pytest.raises(FingerprintMismatchError, match=r"tensors differ, first 5 \(stopped checking\): "
                                                       r"model\.embed_tokens\.weight"):
        verify(fp, third)
    # a structurally different model: names listed without reading tensors
    tied, _ = tiny("llama", tmp_path, tie_word_embeddings=True, name="tied")
    with pytest.raises(FingerprintMismatchError, match=r"1 tensor\(s\) missing from the source, first: lm_head\.weight"):
        verify(fp, tied)
    # without a source, the corrupted file is caught by its recorded sha256
    with pytest.raises(CheckpointError, match=r"layer-00000\.safetensors: sha256 differs"):
        ck.load_compressed(out)


def test_incomplete_checkpoint_refused(tmp_path):
    path, _ = tiny("llama", tmp_path)
    out = str(tmp_path / "ckpt")
    build_checkpoint(path, out)
    os.remove(os.path.join(out, ck.CONFIG_FILE))
    with pytest.raises(CheckpointError, match="not a complete compressed checkpoint"):
        ck.load_compressed(out)


def test_refuses_foreign_classes(tmp_path):
    with pytest.raises(CheckpointError, match="refusing to build class os:system"):
        ck.decode_leaf({"__class__": "os:system", "fields": {}}, {}, "x")
