"""Calibration Hessians: equal a float64 numpy recomputation from captured activations (dense and
MoE, per-expert routed tokens, padding excluded), NaN rejected naming the layer, streaming from disk
= all in memory, data-parallel along dp = single device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: F401  (the parity reference; a test dependency)

from caldera_jax.caldera.calibration import (CalibrationError,  # noqa: E402
                                             calibrate, calibration_tokens, hessian_key, hessian_shapes)
from caldera_jax.models.decoder import forward  # noqa: E402
from caldera_jax.models.hooks import Hooks  # noqa: E402
from caldera_jax.params import flatten  # noqa: E402
from caldera_jax.checkpoints_io import load_hf, open_hf  # noqa: E402
from caldera_jax.checkpoints_io.fingerprint import MemorySource  # noqa: E402
from tests.hf_tiny import tiny_hf_model  # noqa: E402


def _capture_linear(name, x, w, bias, aux):
    aux.setdefault("x:" + name, x)
    from caldera_jax.linear import apply
    return apply(x, w, bias)


def _capture_tap(name, value, aux):
    if name.endswith(".mlp.routing"):
        aux["routing:" + name[: -len(".routing")]] = value[0]
    return value


CAPTURE = Hooks(linear=_capture_linear, tap=_capture_tap)


def calib_batch(vocab: int, n: int = 5, t: int = 12, seed: int = 0):
    """Random tokens with ragged right and left padding (mask 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (n, t)).astype(np.int32)
    mask = np.ones((n, t), bool)
    mask[1, 9:] = False          # right padded
    mask[2, :4] = False          # left padded
    mask[4, 5:] = False
    tokens[~mask] = 0
    return tokens, mask


def reference_hessians(params, cfg, tokens, mask) -> dict[str, np.ndarray]:
    """float64 numpy Σ m xᵀx from activations captured in the full forward."""
    _, aux = forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), hooks=CAPTURE, return_aux=True)
    m = mask.reshape(-1).astype(np.float64)
    ref = {}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        names = {"self_attn.qkv": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj"}
        if cfg.is_moe_layer(i):
            E = cfg.num_experts
            idx = np.asarray(aux[f"routing:{pre}mlp"])
            routed = np.zeros((len(m), E))
            for k in range(idx.shape[1]):
                routed[np.arange(len(m)), idx[:, k]] = 1.0
            for g, lin in (("mlp.experts.gate_up", "mlp.experts.gate_proj"),
                           ("mlp.experts.down_proj", "mlp.experts.down_proj")):
                x = np.asarray(aux[f"x:{pre}{lin}"], np.float64)          # [E, N, in]
                ref[pre + g] = np.stack([(x[e] * (routed[:, e] * m)[:, None]).T @ x[e] for e in range(E)])
        else:
            names.update({"mlp.gate_up": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"})
        for g, lin in names.items():
            x = np.asarray(aux[f"x:{pre}{lin}"], np.float64)
            x = x.reshape(-1, x.shape[-1])
            ref[pre + g] = (x * m[:, None]).T @ x
    return ref


def assert_close(got: dict, ref: dict):
    assert sorted(got) == sorted(ref)
    for k in ref:
        scale = np.abs(ref[k]).max()
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-5 * scale, err_msg=k)


@pytest.mark.parametrize("model_type,over", [("llama", {}), ("qwen2", {}),
                                             ("qwen3_moe", {"mlp_only_layers": [0]}), ("mixtral", {})])
def test_hessians_equal_numpy_recomputation(model_type, over, tmp_path):
    path, _ = tiny_hf_model(model_type, tmp_path, **over)
    cfg, params = load_hf(path)
    tokens, mask = calib_batch(cfg.vocab_size)
    ref = reference_hessians(params, cfg, tokens, mask)
    with open_hf(path) as ck:
        stats = calibrate(ck, tokens, mask, batch_size=2)      # streaming from disk, 3 batches
    got = {k: v for s in stats.values() for k, v in s.items()}
    assert_close(got, ref)
    for i, s in stats.items():
        assert set(s) == set(hessian_shapes(cfg, i))
        for k, c in s.counts.items():
            if "experts" in k:
                assert c.shape == (cfg.num_experts,)
                # every real token is routed to exactly top-k experts
                assert c.sum() == pytest.approx(mask.sum() * cfg.num_experts_per_tok)
                # each expert's count = trace-free check: tokens whose routing hits it
            else:
                assert c == mask.sum()
    if cfg.is_moe:
        # experts' Hessians differ (each from its own routed tokens) and are not the shared input's
        i = next(j for j in range(cfg.num_hidden_layers) if cfg.is_moe_layer(j))
        Hg = got[f"model.layers.{i}.mlp.experts.gate_up"]
        assert not np.allclose(Hg[0], Hg[1])


def test_padding_excluded(tmp_path):
    """Padded positions' contents do not change anything: changing their tokens leaves H equal."""
    path, _ = tiny_hf_model("llama", tmp_path)
    cfg, params = load_hf(path)
    tokens, mask = calib_batch(cfg.vocab_size)
    t2 = tokens.copy()
    t2[~mask] = 7
    a = calibrate((cfg, params), tokens, mask, batch_size=8)
    b = calibrate((cfg, params), t2, mask, batch_size=8)
    for i in a:
        for k in a[i]:
            np.testing.assert_allclose(a[i][k], b[i][k], rtol=1e-6, atol=1e-6)
    # and dropping the padded rows entirely gives the same as keeping them fully masked
    keep = np.ones(len(tokens), bool)
    m2 = mask.copy()
    m2[3] = False
    c = calibrate((cfg, params), tokens, m2, batch_size=8)
    d = calibrate((cfg, params), tokens[keep & (np.arange(len(tokens)) != 3)], mask[np.arange(len(tokens)) != 3])
    for i in c:
        for k in c[i]:
            np.testing.assert_allclose(c[i][k], d[i][k], rtol=1e-5, atol=1e-5)


def test_streaming_equals_in_memory_and_dp(tmp_path):
    """From disk, batch 2, data parallel over dp=4 == in memory, one batch, one device."""
    path, _ = tiny_hf_model("qwen3_moe", tmp_path)
    cfg, params = load_hf(path)
    tokens, mask = calib_batch(cfg.vocab_size, n=7)
    mem = calibrate(MemorySource(cfg, jax.tree.map(np.asarray, params)), tokens, mask, batch_size=7)
    mesh = jax.make_mesh((2, 4), ("ep", "dp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with open_hf(path) as ck:
        streamed = calibrate(ck, tokens, mask, batch_size=2, mesh=mesh)
    for i in mem:
        assert_close(streamed[i], mem[i])
        for k in mem[i].counts:
            np.testing.assert_array_equal(streamed[i].counts[k], mem[i].counts[k])


def test_nan_rejected_naming_layer(tmp_path):
    path, _ = tiny_hf_model("llama", tmp_path)
    cfg, params = load_hf(path)
    flat = flatten(jax.tree.map(np.asarray, params))
    w = flat["model.layers.1.mlp.up_proj.weight"].copy()
    w[3, 5] = np.nan
    flat["model.layers.1.mlp.up_proj.weight"] = w
    tokens, mask = calib_batch(cfg.vocab_size)
    with pytest.raises(CalibrationError, match=r"model\.layers\.1\.mlp\.down_proj \(layer 1\)"):
        calibrate(MemorySource(cfg, flat), tokens, mask)
    # NaN in a padded position only is fine: a NaN embedding row used only by padding tokens
    emb = flat["model.embed_tokens.weight"].copy()
    flat["model.layers.1.mlp.up_proj.weight"] = np.asarray(params["model"]["layers"]["1"]["mlp"]["up_proj"]["weight"])
    emb[95] = np.inf
    flat["model.embed_tokens.weight"] = emb
    t2 = np.where(mask, np.minimum(tokens, 94), 95)
    calibrate(MemorySource(cfg, flat), t2, mask)
    with pytest.raises(CalibrationError, match=r"layer 0\b"):
        t3 = t2.copy()
        t3[0, 0] = 95
        calibrate(MemorySource(cfg, flat), t3, mask)


def test_hessian_key():
    assert hessian_key("model.layers.3.self_attn.k_proj.weight") == "model.layers.3.self_attn.qkv"
    assert hessian_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up"
    assert hessian_key("model.layers.3.mlp.experts.down_proj.weight") == "model.layers.3.mlp.experts.down_proj"
    assert hessian_key("model.layers.3.mlp.gate.weight") is None
    assert hessian_key("lm_head.weight") is None


def test_calibration_tokens_files(tmp_path):
    import json

    class Tok:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [ord(c) % 50 for c in s]}

    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(f"line {k} " + "abc " * 20 for k in range(200)))
    t, m = calibration_tokens(str(txt), Tok(), samples=4, seq_len=16)
    assert t.shape == (4, 16) and m.all()
    t2, _ = calibration_tokens(str(txt), Tok(), samples=4, seq_len=16)
    np.testing.assert_array_equal(t, t2)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": "x" * n}) for n in (3, 40, 7)))
    t, m = calibration_tokens(str(jl), Tok(), samples=8, seq_len=16)
    assert t.shape == (3, 16) and m.sum(1).tolist() == [3, 16, 7]
    npy = tmp_path / "c.npy"
    np.save(npy, np.array([[1, 2, 3, -1], [4, 5, 6, 7]]))
    t, m = calibration_tokens(str(npy), samples=8, seq_len=3)
    assert t.tolist() == [[1, 2, 3], [4, 5, 6]] and m.all()
    with pytest.raises(CalibrationError, match="tokenizer"):
        calibration_tokens(str(txt), None, samples=1, seq_len=4)
    with pytest.raises(CalibrationError, match="vocab"):
        calibration_tokens(str(npy), samples=8, seq_len=4, vocab_size=5)


def test_calibration_tokens_chat_rows(tmp_path):
    """A .jsonl of {"messages": ...} (experiments.selfchat's rows) is rendered with the model's chat
    template; a row with neither "text" nor "messages", or a malformed conversation, names its line."""
    import json

    from transformers import AutoTokenizer

    from tests.hf_tiny import save_tiny_tokenizer
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path / "tok"))
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]
    jl = tmp_path / "chat.jsonl"
    jl.write_text(json.dumps({"id": "a", "messages": chat}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    t, m = calibration_tokens(str(jl), tok, samples=8, seq_len=64)
    want = tok("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n",
               add_special_tokens=False)["input_ids"]
    assert m.sum(1).tolist() == [len(want), 5]
    assert t[0, :len(want)].tolist() == want
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(CalibrationError, match=r"bad.jsonl: line 2: .*messages"):
        calibration_tokens(str(bad), tok, samples=8, seq_len=64)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(CalibrationError, match=r"line 1: .*no_assistant"):
        calibration_tokens(str(bad), tok, samples=8, seq_len=64)
    tok.chat_template = None                     # a tokenizer without a template: the line is named
    with pytest.raises(CalibrationError, match=r"chat.jsonl: line 1: .*template_error"):
        calibration_tokens(str(jl), tok, samples=8, seq_len=64)
