"""GGUF loading: tiny llama / qwen2 files written here with gguf-py, checked against the weights
they were written from (within quantization error), against transformers' own GGUF loader, through
the HF export, and on broken inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import gguf

from caldera_jax.config import ModelConfig  # noqa: E402
from caldera_jax.params import flatten, param_shapes  # noqa: E402
from caldera_jax.checkpoints_io.errors import CheckpointError  # noqa: E402
from caldera_jax.checkpoints_io.gguf import _permute_qk, gguf_to_hf, hf_name_to_gguf, load_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# tensor types per HF name pattern (first match wins); the rest is F32
QTYPES = {
    "llama": [("embed_tokens", Q.Q8_0), ("q_proj", Q.F32), ("k_proj", Q.Q8_0), ("v_proj", Q.Q4_0),
              ("o_proj", Q.F16), ("gate_proj", Q.Q4_1), ("up_proj", Q.Q5_0), ("down_proj", Q.Q8_0),
              ("lm_head", Q.BF16)],
    "qwen2": [("embed_tokens", Q.F16), ("q_proj.weight", Q.Q8_0), ("k_proj.weight", Q.Q4_0),
              ("v_proj.weight", Q.F32), ("o_proj", Q.Q8_0), ("gate_proj", Q.Q4_0), ("up_proj", Q.F16),
              ("down_proj", Q.Q5_1)],
}
QTYPES["qwen3"] = QTYPES["qwen2"]
# max |error| / max |row| allowed per type. Symmetric Qn_0 maps the block's absmax to -2^(n-1), so
# the opposite extreme can be off by a whole step (1/8 for 4 bit, 1/16 for 5 bit); Qn_1 (min/max)
# by half a step of the range (1/15, 1/31); Q8_0 by half a step of 1/127 (+ fp16 scale rounding).
TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 6e-3, Q.Q4_0: 0.13, Q.Q4_1: 0.07,
       Q.Q5_0: 0.065, Q.Q5_1: 0.035}


def _vocab():
    """A tiny gpt2-style byte-level BPE vocabulary: 256 bytes, 5 merges, 3 control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens += ["Ġt", "he", "Ġthe", "in", "an"]
    types = [1] * len(tokens)
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types += [3, 3, 3]
    return tokens, types, merges


def _hf_dict(arch: str, vocab: int, tied: bool) -> dict:
    # qwen3: head_dim != hidden / heads (GGUF attention.key_length; transformers assumes 128 for qwen3)
    d = dict(model_type=arch, vocab_size=vocab, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=128 if arch == "qwen3" else 16,
             rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tied,
             rope_parameters={"rope_theta": 10000.0 if arch == "llama" else 1e6, "rope_type": "default"})
    return d


def _weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return out


def _qtype(arch: str, name: str):
    for pat, q in QTYPES[arch]:
        if pat in name and name.endswith("weight"):
            return q
    return Q.F32


def write_gguf(path, arch: str, *, tied: bool, seed: int = 0, drop: tuple[str, ...] = (),
               gguf_arch: str | None = None, tokenizer: bool = True):
    """Writes a tiny model the way llama.cpp's converter would; returns (cfg, original weights, qtypes)."""
    tokens, types, merges = _vocab()
    cfg = ModelConfig.from_hf_dict(_hf_dict(arch, len(tokens), tied))
    w = _weights(cfg, seed)
    wr = gguf.GGUFWriter(str(path), gguf_arch or arch)
    wr.add_name(f"tiny-{arch}")
    wr.add_block_count(cfg.num_hidden_layers)
    wr.add_context_length(cfg.max_position_embeddings)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_head_count(cfg.num_attention_heads)
    wr.add_head_count_kv(cfg.num_key_value_heads)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_rope_freq_base(cfg.rope_theta)
    if arch == "llama":
        wr.add_rope_dimension_count(cfg.head_dim)
    if arch == "qwen3":
        wr.add_key_length(cfg.head_dim)
        wr.add_value_length(cfg.head_dim)
    if tokenizer:
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre("default")
        wr.add_token_list(tokens)
        wr.add_token_types(types)
        wr.add_token_merges(merges)
        wr.add_bos_token_id(tokens.index("<|im_start|>"))
        wr.add_eos_token_id(tokens.index("<|im_end|>"))
        wr.add_pad_token_id(tokens.index("<|endoftext|>"))
        wr.add_add_bos_token(False)
        wr.add_chat_template(CHAT_TEMPLATE)
    qtypes = {}
    for name, a in w.items():
        gname = hf_name_to_gguf(name)
        if gname in drop:
            continue
        if arch == "llama" and ".q_proj." in name:
            a = _permute_qk(a, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = _permute_qk(a, cfg.num_key_value_heads)
        q = _qtype(arch, name)
        qtypes[name] = q
        if q == Q.F32:
            wr.add_tensor(gname, a)
        elif q == Q.F16:
            wr.add_tensor(gname, a.astype(np.float16))
        else:
            wr.add_tensor(gname, gguf.quants.quantize(a, q), raw_dtype=q)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return cfg, w, qtypes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for seed, (arch, tied) in enumerate((("llama", False), ("qwen2", True), ("qwen3", False))):
        p = d / arch / f"tiny-{arch}.gguf"
        p.parent.mkdir()
        out[arch] = (p, *write_gguf(p, arch, tied=tied, seed=seed))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_matches_original_weights(files, arch):
    path, cfg0, w0, qtypes = files[arch]
    cfg, params = load_gguf(path)
    assert cfg.model_type == arch and cfg.vocab_size == cfg0.vocab_size
    assert cfg.hidden_size == 64 and cfg.num_key_value_heads == 2 and cfg.head_dim == cfg0.head_dim
    assert cfg.tie_word_embeddings == (arch == "qwen2") and cfg.attention_bias == (arch == "qwen2")
    assert cfg.qk_norm == (arch == "qwen3")
    assert cfg.rope_theta == cfg0.rope_theta and cfg.rms_norm_eps == pytest.approx(1e-5)
    flat = flatten(params)
    assert set(flat) == set(param_shapes(cfg))
    seen = set()
    for name, a in flat.items():
        assert a.dtype == np.float32 and a.shape == w0[name].shape, name
        q = qtypes[name]
        seen.add(q)
        err = np.abs(a - w0[name])
        scale = np.abs(w0[name]).max(axis=-1, keepdims=True)
        assert np.all(err <= TOL[q] * scale + 1e-7), (name, q.name, float((err / scale).max()))
    assert {Q.F32, Q.F16, Q.Q8_0, Q.Q4_0} <= seen
    if arch == "llama":   # q_proj was written F32 after llama.cpp's permutation: exact after undoing it
        np.testing.assert_array_equal(flat["model.layers.0.self_attn.q_proj.weight"],
                                      w0["model.layers.0.self_attn.q_proj.weight"])


def test_special_tokens_and_dtype(files):
    path, *_ = files["qwen2"]
    tokens, _, _ = _vocab()
    cfg, params = load_gguf(path, dtype="bfloat16")
    assert cfg.bos_token_id == tokens.index("<|im_start|>")
    assert cfg.eos_token_id == tokens.index("<|im_end|>")
    assert cfg.pad_token_id == tokens.index("<|endoftext|>")
    assert str(params["model"]["embed_tokens"]["weight"].dtype) == "bfloat16"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_matches_transformers_gguf_loader(files, arch):
    import torch
    import transformers
    path = files[arch][0]
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg, params = load_gguf(path)
    flat = flatten(params)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    assert set(sd) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(flat[k], sd[k], err_msg=k)


def test_gguf_to_hf(files, tmp_path):
    import torch
    import transformers
    from caldera_jax.checkpoints_io.hf import load_hf

    path, *_ = files["llama"]
    out = tmp_path / "hf"
    info = gguf_to_hf(path, out, dtype="float32", progress=False)
    assert info["gguf_tensor_types"]["Q8_0"] >= 1
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["tie_word_embeddings"] is False
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == _vocab()[0].index("<|im_end|>")

    cfg_a, a = load_gguf(path)
    cfg_b, b = load_hf(out)
    fa, fb = flatten(a), flatten(b)
    assert set(fa) == set(fb) and cfg_b.num_hidden_layers == cfg_a.num_hidden_layers
    for k in fa:
        np.testing.assert_array_equal(fa[k], np.asarray(fb[k]), err_msg=k)

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "the in"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe in<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == _vocab()[0].index("<|im_start|>")

    transformers.logging.set_verbosity_error()
    m_hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    m_gg = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(m_hf(x).logits, m_gg(x).logits, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match="nope.gguf.*not found"):
        load_gguf(p)


def test_not_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_gguf(p)


@pytest.mark.parametrize("keep", [0.5, -10, 40])
def test_truncated_file(files, tmp_path, keep):
    src = files["qwen2"][0]
    data = src.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    # cut in the tensor data: the message names the first tensor that does not fit
    pattern = r"cut\.gguf: not a readable GGUF" if keep == 40 else r"cut\.gguf: truncated GGUF file: tensor '[\w.]+'"
    with pytest.raises(CheckpointError, match=pattern):
        load_gguf(p)


def test_unknown_architecture(tmp_path):
    p = tmp_path / "mystery.gguf"
    wr = gguf.GGUFWriter(str(p), "mamba")
    wr.add_block_count(1)
    wr.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(CheckpointError, match=r"mystery\.gguf.*unsupported GGUF architecture 'mamba'"):
        load_gguf(p)


def test_missing_tensor(tmp_path):
    p = tmp_path / "holey.gguf"
    write_gguf(p, "qwen2", tied=True, drop=("blk.1.ffn_up.weight",), tokenizer=False)
    with pytest.raises(CheckpointError, match=r"holey\.gguf.*'blk\.1\.ffn_up\.weight'.*missing"):
        load_gguf(p)


def test_missing_embedding(tmp_path):
    p = tmp_path / "noembd.gguf"
    write_gguf(p, "llama", tied=False, drop=("token_embd.weight",), tokenizer=False)
    with pytest.raises(CheckpointError, match=r"noembd\.gguf.*'token_embd\.weight'"):
        load_gguf(p)


def test_unexpected_tensor(tmp_path):
    p = tmp_path / "extra.gguf"
    cfg, w, _ = write_gguf(p, "qwen2", tied=True, tokenizer=False)
    # rewrite with one stray tensor
    wr = gguf.GGUFWriter(str(p), "qwen2")
    wr.add_block_count(cfg.num_hidden_layers)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_head_count(cfg.num_attention_heads)
    wr.add_head_count_kv(cfg.num_key_value_heads)
    for name, a in w.items():
        wr.add_tensor(hf_name_to_gguf(name), a)
    wr.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 4, 64), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(CheckpointError, match=r"extra\.gguf.*unexpected tensor 'blk\.0\.ffn_gate_exps\.weight'"):
        load_gguf(p)
