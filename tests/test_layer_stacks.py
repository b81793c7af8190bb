"""Stacked layers (models/layer_stacks.py): the scanned decoder gives transformers' logits, the same
prefill/decode as the per-layer parameters, stacks split where layers differ (kind, structure),
the layout round-trips exactly, and misuse is refused."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caldera_jax.checkpoints_io.hf import load_hf
from caldera_jax.models import Hooks, decode_step, forward, prefill
from caldera_jax.models.layer_stacks import STACKS, blocks, stack_layers, unstack_layers
from tests.hf_tiny import tiny_hf_model

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint_v1")


def _batch(vocab, seed=0, B=3, T=9):
    tokens = np.random.default_rng(seed).integers(0, vocab, (B, T))
    mask = np.ones((B, T), bool)
    mask[1, :3] = False                                       # left padding
    return tokens, mask


@pytest.mark.parametrize("model_type,overrides,spans", [
    ("llama", {"num_hidden_layers": 3}, [(0, 3)]),
    ("qwen3_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}, [(0, 1), (1, 2), (2, 3)]),
])
def test_scanned_decoder_matches_transformers_and_per_layer_params(tmp_path, model_type, overrides, spans):
    path, model = tiny_hf_model(model_type, tmp_path, **overrides)
    cfg, params = load_hf(path, dtype=jnp.float32)
    stacked = stack_layers(params, cfg)
    assert [(b.start, b.stop) for b in blocks(stacked, cfg)] == spans and all(b.stacked for b in blocks(stacked, cfg))
    tokens, mask = _batch(cfg.vocab_size)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                     position_ids=torch.tensor(pos)).logits.float().numpy()
    got = np.asarray(forward(stacked, cfg, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask], want[mask], atol=2e-5, rtol=2e-5)

    la, ca = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), 12)
    lb, cb = prefill(stacked, cfg, jnp.asarray(tokens), jnp.asarray(mask), 12)
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=2e-5, rtol=2e-5)
        tok = jnp.argmax(la, -1).astype(jnp.int32)
        la, ca = decode_step(params, cfg, ca, tok)
        lb, cb = decode_step(stacked, cfg, cb, tok)


def test_stacks_split_where_layer_structures_differ_and_round_trip():
    """A CALDERA checkpoint whose layers were compressed differently (quantized leaves of other
    shapes, dense leaves) stacks into runs of identical layers; unstack_layers gives back every
    leaf bit for bit; the logits equal the per-layer ones."""
    from caldera_jax.checkpoints_io.compressed import load_compressed
    cfg, params = load_compressed(os.path.join(FIXTURE, "checkpoint"), source=os.path.join(FIXTURE, "source"))
    stacked = stack_layers(params, cfg)
    assert [(b.start, b.stop) for b in blocks(stacked, cfg)] == [(0, 1), (1, 2)]     # the fixture's 2 layers differ
    back = unstack_layers(stacked, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    tokens, mask = _batch(cfg.vocab_size, seed=1)
    np.testing.assert_allclose(np.asarray(forward(stacked, cfg, jnp.asarray(tokens), jnp.asarray(mask)))[mask],
                               np.asarray(forward(params, cfg, jnp.asarray(tokens), jnp.asarray(mask)))[mask],
                               atol=1e-4, rtol=1e-4)
    same = {**params, "model": {**params["model"], "layers": {"0": params["model"]["layers"]["0"],
                                                              "1": params["model"]["layers"]["0"]}}}
    scanned = stack_layers(same, cfg)                          # quantized leaves scanned as one stack
    assert [(b.start, b.stop) for b in blocks(scanned, cfg)] == [(0, 2)]
    np.testing.assert_allclose(np.asarray(forward(scanned, cfg, jnp.asarray(tokens), jnp.asarray(mask)))[mask],
                               np.asarray(forward(same, cfg, jnp.asarray(tokens), jnp.asarray(mask)))[mask],
                               atol=1e-4, rtol=1e-4)


def test_consuming_conversions_free_the_source_arrays_and_give_the_same_params(tmp_path):
    """consume=True (the lm-eval adapter's switch between scoring and decoding): the result equals
    the copying conversion, and no reference to the per-layer arrays (or the stacks) is left, so
    the peak is one model plus one leaf, not two models."""
    import gc
    import weakref
    path, _ = tiny_hf_model("llama", tmp_path, num_hidden_layers=3)
    cfg, params = load_hf(path)
    expect = stack_layers(params, cfg)
    src = jax.tree.map(jnp.copy, params)
    refs = [weakref.ref(a) for a in jax.tree.leaves(src["model"]["layers"])]
    stacked = stack_layers(src, cfg, consume=True)
    gc.collect()
    assert src["model"]["layers"] == {} and all(r() is None for r in refs)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(expect)))
    refs = [weakref.ref(a) for a in jax.tree.leaves(stacked["model"][STACKS])]
    back = unstack_layers(stacked, cfg, consume=True)
    gc.collect()
    assert stacked["model"][STACKS] == {} and all(r() is None for r in refs)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_mixed_layer_structures_make_separate_stacks(tmp_path):
    path, _ = tiny_hf_model("llama", tmp_path, num_hidden_layers=4)
    cfg, params = load_hf(path, dtype=jnp.float32)
    params["model"]["layers"]["2"]["mlp"]["up_proj"]["weight"] = params["model"]["layers"]["2"]["mlp"]["up_proj"][
        "weight"].astype(jnp.bfloat16)
    assert [(b.start, b.stop) for b in blocks(stack_layers(params, cfg), cfg)] == [(0, 2), (2, 3), (3, 4)]


def test_misuse_is_refused(tmp_path):
    path, _ = tiny_hf_model("llama", tmp_path, num_hidden_layers=2)
    cfg, params = load_hf(path, dtype=jnp.float32)
    stacked = stack_layers(params, cfg)
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="without hooks"):
        forward(stacked, cfg, tokens, hooks=Hooks(tap=lambda name, v, aux: v))
    broken = {**stacked, "model": {**stacked["model"], STACKS: {"0:1": stacked["model"][STACKS]["0:2"]}}}
    with pytest.raises(ValueError, match="do not cover layers 0..1"):
        blocks(broken, cfg)
