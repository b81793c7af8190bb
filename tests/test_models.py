"""Logits / generation parity of our decoder with transformers, for every supported family.

Tiny random models are built by transformers from a config (no hub), saved with save_pretrained,
loaded by our checkpoint reader, and compared in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caldera_jax import params as params_lib
from caldera_jax.models import Hooks, decode_step, forward, generate, prefill
from caldera_jax.models.moe import dense_moe
from caldera_jax.checkpoints_io.hf import load_hf, save_hf
from tests.hf_tiny import tiny_hf_model

FAMILIES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-rope-llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "qwen2": ("qwen2", {}),
    "qwen2-rope-yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 16},
                                  "max_position_embeddings": 64}),
    "qwen3": ("qwen3", {}),
    "mixtral": ("mixtral", {}),
    "mixtral-window": ("mixtral", {"sliding_window": 4}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-norm-topk": ("qwen3_moe", {"norm_topk_prob": True, "mlp_only_layers": [1]}),
}
B, T = 3, 11


def _batch(vocab: int, seed: int = 0):
    tokens = np.random.default_rng(seed).integers(0, vocab, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :4] = 0     # left padding
    mask[2, -3:] = 0    # right padding
    return tokens, mask


def _hf_logits(model, tokens, mask):
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)   # HF's forward uses arange positions; pass the real ones
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_type, overrides = FAMILIES[request.param]
    path, model = tiny_hf_model(model_type, tmp_path_factory.mktemp(request.param), **overrides)
    cfg, params = load_hf(path, dtype=jnp.float32)
    return request.param, path, model, cfg, params


def test_logits_match_transformers_with_padding(family):
    name, _, model, cfg, params = family
    tokens, mask = _batch(cfg.vocab_size)
    ours = np.asarray(forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    ref = _hf_logits(model, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ref).max() > 0.1, "degenerate test model"
    np.testing.assert_array_less(np.abs(ours - ref)[real].max(), 1e-4)


def test_left_padding_equals_unpadded(family):
    _, _, _, cfg, params = family
    tokens, _ = _batch(cfg.vocab_size)
    padded = np.concatenate([np.zeros((1, 5), np.int64), tokens[:1]], axis=1)
    mask = np.concatenate([np.zeros((1, 5)), np.ones((1, T))], axis=1)
    a = np.asarray(forward(params, cfg, jnp.asarray(tokens[:1])))
    b = np.asarray(forward(params, cfg, jnp.asarray(padded), jnp.asarray(mask)))[:, 5:]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_export_reloads_in_transformers(family, tmp_path):
    _, _, _, cfg, params = family
    from transformers import AutoModelForCausalLM
    save_hf(tmp_path / "out", cfg, params)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    tokens, mask = _batch(cfg.vocab_size, seed=1)
    ours = np.asarray(forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_array_less(np.abs(ours - _hf_logits(reloaded, tokens, mask))[real].max(), 1e-4)


def test_greedy_generation_matches_transformers(family):
    _, _, model, cfg, params = family
    tokens, _ = _batch(cfg.vocab_size, seed=2)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :2] = 0
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                             max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    ours = generate(params, cfg, tokens, mask, max_new_tokens=8, eos_token_id=(), pad_token_id=0)
    np.testing.assert_array_equal(ours, ref.numpy()[:, T:])


def test_decode_steps_reproduce_forward(family):
    """Prefill + one-token decode steps give the logits of a full forward at the same positions."""
    _, _, _, cfg, params = family
    tokens, _ = _batch(cfg.vocab_size, seed=3)
    full = np.asarray(forward(params, cfg, jnp.asarray(tokens)))
    P = 6
    logits, cache = prefill(params, cfg, jnp.asarray(tokens[:, :P]), jnp.ones((B, P), bool), T)
    got = [np.asarray(logits)]
    for t in range(P, T):
        logits, cache = decode_step(params, cfg, cache, jnp.asarray(tokens[:, t], jnp.int32))
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, 1), full[:, P - 1:], atol=2e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_sampling(model_type, tmp_path):
    cfg, params = load_hf(tiny_hf_model(model_type, tmp_path)[0], dtype=jnp.float32)
    tokens, _ = _batch(cfg.vocab_size, seed=4)
    greedy = generate(params, cfg, tokens, max_new_tokens=6, eos_token_id=())
    top1 = generate(params, cfg, tokens, max_new_tokens=6, temperature=0.7, top_k=1, key=jax.random.key(1),
                    eos_token_id=())
    np.testing.assert_array_equal(greedy, top1)
    a = generate(params, cfg, tokens, max_new_tokens=6, temperature=1.5, key=jax.random.key(1), eos_token_id=())
    b = generate(params, cfg, tokens, max_new_tokens=6, temperature=1.5, key=jax.random.key(1), eos_token_id=())
    c = generate(params, cfg, tokens, max_new_tokens=6, temperature=1.5, key=jax.random.key(2), eos_token_id=())
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_eos_stops_rows():
    from caldera_jax.config import ModelConfig
    from caldera_jax.models import init_params
    cfg = ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 50, (2, 4))
    free = generate(params, cfg, tokens, max_new_tokens=6, eos_token_id=())
    eos = int(free[0, 2])
    out = generate(params, cfg, tokens, max_new_tokens=6, eos_token_id=eos, pad_token_id=49)
    first = int(np.argmax(free[0] == eos))
    np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first + 1:] == 49).all()


# ----------------------------------------------------------------------------------- hooks
@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    path, _ = tiny_hf_model("qwen3_moe", tmp_path_factory.mktemp("hooks"))
    return load_hf(path, dtype=jnp.float32)


def _ident_tap(name, value, aux):
    return value


def test_hooks_identity_is_bit_identical(moe_model):
    cfg, params = moe_model
    tokens = jnp.asarray(_batch(cfg.vocab_size)[0])
    plain = np.asarray(forward(params, cfg, tokens))
    hooked = np.asarray(forward(params, cfg, tokens, hooks=Hooks(tap=_ident_tap, moe=dense_moe)))
    np.testing.assert_array_equal(plain, hooked)


def _record_linear(name, x, w, b, aux):
    from caldera_jax import linear
    aux[name] = jnp.einsum("...i,...j->ij", x, x) if w.ndim == 2 else jnp.einsum("e...i,e...j->eij", x, x)
    return linear.apply(x, w, b)


def _record_tap(name, value, aux):
    aux["tap:" + name] = value
    return value


def test_hooks_see_every_linear_and_tap(moe_model):
    cfg, params = moe_model
    tokens = jnp.asarray(_batch(cfg.vocab_size)[0])
    _, aux = forward(params, cfg, tokens, hooks=Hooks(linear=_record_linear, tap=_record_tap), return_aux=True)
    linears = {n.rsplit(".", 1)[0] for n in params_lib.param_shapes(cfg)
               if n.endswith(".weight") and n.count("norm") == 0 and "embed" not in n}
    linears.add("lm_head")
    assert {k for k in aux if not k.startswith("tap:")} == linears
    for i in range(cfg.num_hidden_layers):
        for t in ("", ".mlp.input", ".mlp.router_input", ".mlp.expert_input", ".mlp.routing"):
            assert f"tap:model.layers.{i}{t}" in aux
    # the recorded q_proj Gram matrix is XᵀX of the normed layer input
    H = np.asarray(aux["model.layers.0.self_attn.q_proj"])
    np.testing.assert_allclose(H, H.T, rtol=1e-5)
    assert np.linalg.eigvalsh(H).min() > -1e-3


def _perturb_experts(name, value, aux):
    return value * 1.5 if name.endswith("expert_input") else value


def _perturb_router(name, value, aux):
    return value * 1.5 if name.endswith("router_input") else value


def test_router_and_expert_taps_are_separate(moe_model):
    """Changing what the experts see leaves routing alone, and vice versa."""
    cfg, params = moe_model
    tokens = jnp.asarray(_batch(cfg.vocab_size)[0])

    def routing(hooks_tap):
        def tap(name, value, aux):
            value = hooks_tap(name, value, aux)
            if name.endswith("mlp.routing"):
                aux[name] = value
            return value
        return forward(params, cfg, tokens, hooks=Hooks(tap=tap), return_aux=True)

    base_logits, base = routing(_ident_tap)
    ex_logits, ex = routing(_perturb_experts)
    ro_logits, ro = routing(_perturb_router)
    key = "model.layers.0.mlp.routing"
    np.testing.assert_array_equal(base[key][0], ex[key][0])        # same experts chosen
    np.testing.assert_array_equal(base[key][1], ex[key][1])        # with the same weights
    assert not np.array_equal(base[key][1], ro[key][1])            # router input changed the weights
    assert not np.allclose(base_logits, ex_logits) and not np.allclose(base_logits, ro_logits)
