"""Codecs around the expert-parallel all-to-all: round-trip error bounds, identity bit-exactness,
learned/stale gradients (EP vs one device), router modes, codec params in the tree, and the bytes
each codec puts on the wire as read from the compiled HLO."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from caldera_jax.models.decoder import forward
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.models.moe import route
from caldera_jax.moe import (FP8, Identity, IntQuant, Learned, StaleConditioned, add_codec_params,
                             codec_name, expert_parallel_hooks, make_mesh, merge_params, roundtrip,
                             simulated_hooks, split_codec_params)
from caldera_jax.moe.codecs import pack_bits, unpack_bits
from caldera_jax.moe.wire import bytes_by_scope, collectives, compiled_hlo
from tests.hf_tiny import tiny_hf_model
from tests.test_moe_ep import E, N, assert_close, layer_cfg, layer_params, run_layer


def _gaussian(hidden=256, seed=0):
    """[128, hidden] tokens with per-token scales from 0.1 to 3 (never all-zero)."""
    x = jax.random.normal(jax.random.key(seed), (128, hidden))
    return x * jnp.linspace(0.1, 3.0, 128)[:, None]


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# ----------------------------------------------------------------------------------- round trips
BOUNDS = {IntQuant(8): 0.01, IntQuant(8, "zeropoint"): 0.01, IntQuant(4): 0.15,
          IntQuant(4, "zeropoint"): 0.13, IntQuant(2): 0.85, IntQuant(2, "zeropoint"): 0.6,
          FP8(): 0.035, IntQuant(4, group=64): 0.15, IntQuant(2, "zeropoint", group=32): 0.6}


@pytest.mark.parametrize("codec", list(BOUNDS), ids=codec_name)
def test_quantizer_round_trip_bounds(codec):
    cfg, x = layer_cfg(hidden=256), _gaussian()
    p = codec.init(jax.random.key(0), cfg, 0)
    xh = roundtrip(codec, p, x)
    assert _rel(xh, x) < BOUNDS[codec]
    err = jnp.abs(xh - x)
    if isinstance(codec, IntQuant):      # elementwise: half a quantization step
        payload = codec.encode(p, x)
        step = jnp.repeat(payload["scale"], x.shape[1] // payload["scale"].shape[1], axis=1)   # per channel
        assert bool(jnp.all(err <= 0.5 * step * (1 + 1e-5) + 1e-7))
    else:                                # e4m3: 3 mantissa bits -> relative 2^-4 above the normals
        assert bool(jnp.all(err <= 2.0 ** -4 * jnp.abs(x) + 2.0 ** -9 * jnp.max(jnp.abs(x), -1, keepdims=True) / 448))


def test_group_scales_survive_outlier_channels():
    """Two channels 100x the rest (as SmolLM2's hidden states have): one INT4 scale per token rounds
    every other channel to zero; a scale per 64 channels confines the damage to their two groups:
    the other groups (channels 64-191) keep plain INT4's error."""
    cfg, x = layer_cfg(hidden=256), _gaussian()
    x = x.at[:, 7].multiply(100.0).at[:, 200].multiply(-100.0)
    clean = slice(64, 192)
    per_token, grouped = IntQuant(4), IntQuant(4, group=64)
    e_tok = _rel(roundtrip(per_token, {}, x)[:, clean], x[:, clean])
    e_grp = _rel(roundtrip(grouped, {}, x)[:, clean], x[:, clean])
    assert e_tok > 0.9 and e_grp < BOUNDS[IntQuant(4)]
    assert grouped.encode({}, x)["scale"].shape == (x.shape[0], 4)
    with pytest.raises(ValueError, match="group=48 must divide hidden_size=256"):
        IntQuant(4, group=48).init(None, cfg, 0)


def test_quantizer_error_ordering():
    cfg, x = layer_cfg(hidden=256), _gaussian()
    errs = [_rel(roundtrip(c, c.init(None, cfg, 0), x), x) for c in (IntQuant(8), IntQuant(4), IntQuant(2))]
    assert errs[0] < errs[1] < errs[2]


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_is_exact_and_shrinks(bits):
    codes = jax.random.randint(jax.random.key(1), (5, 32), 0, 2 ** bits).astype(jnp.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (5, 32 * bits // 8)
    np.testing.assert_array_equal(np.asarray(unpack_bits(packed, bits)), np.asarray(codes))


def test_identity_and_unit_ratio_learned_are_exact():
    cfg, x = layer_cfg(hidden=256), _gaussian()
    np.testing.assert_array_equal(np.asarray(roundtrip(Identity(), {}, x)), np.asarray(x))
    ident = Learned(ratio=1)
    np.testing.assert_array_equal(np.asarray(roundtrip(ident, ident.init(jax.random.key(0), cfg, 0), x)),
                                  np.asarray(x))


def test_simulated_identity_codec_is_bit_identical(tmp_path):
    from caldera_jax.checkpoints_io.hf import load_hf
    cfg, params = load_hf(tiny_hf_model("qwen3_moe", tmp_path)[0])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    plain = forward(params, cfg, tokens)
    hooked = forward(params, cfg, tokens, hooks=simulated_hooks(codec=Identity()))
    np.testing.assert_array_equal(np.asarray(hooked), np.asarray(plain))


def test_stale_codec_near_identity_uses_the_reference_state():
    cfg = layer_cfg(hidden=16, layers=3)
    codec = StaleConditioned(ratio=4, stride=2)
    x0, x1 = _gaussian(16, 1), _gaussian(16, 2)
    assert [codec.stale_role(cfg, i) for i in range(3)] == ["send", "use", "send"]
    p0, p1 = codec.init(jax.random.key(0), cfg, 0), codec.init(jax.random.key(0), cfg, 1)
    stale = codec.stale(p0, x0, codec.encode(p0, x0))
    xh = codec.decode(p1, codec.encode(p1, x1), stale)
    np.testing.assert_array_equal(np.asarray(xh[:, :4]), np.asarray(x1[:, :4]))
    np.testing.assert_array_equal(np.asarray(xh[:, 4:]), np.asarray(x0[:, 4:]))


# ----------------------------------------------------------------------------------- parameters
def test_codec_params_in_tree_split_merge_and_train(tmp_path):
    from caldera_jax.checkpoints_io.hf import load_hf
    cfg, params = load_hf(tiny_hf_model("qwen3_moe", tmp_path)[0])
    codec = Learned(ratio=4, init_kind="random")
    full = add_codec_params(params, cfg, codec, jax.random.key(0))
    assert "codec" not in params["model"]["layers"]["0"]["mlp"]           # input untouched
    assert full["model"]["layers"]["1"]["mlp"]["codec"]["compress"]["weight"].shape == (8, 32)
    train, frozen = split_codec_params(full)
    assert {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(train)} == {
        f"['model']['layers']['{i}']['mlp']['codec']['{w}']['weight']" for i in (0, 1)
        for w in ("compress", "decompress")}
    assert jax.tree.structure(merge_params(train, frozen)) == jax.tree.structure(full)
    given = {0: jax.tree.map(jnp.zeros_like, full["model"]["layers"]["0"]["mlp"]["codec"])}
    assert float(jnp.sum(jnp.abs(add_codec_params(params, cfg, codec, jax.random.key(0), given=given)
                                 ["model"]["layers"]["0"]["mlp"]["codec"]["compress"]["weight"]))) == 0
    with pytest.raises(ValueError, match="shapes"):
        add_codec_params(params, cfg, codec, jax.random.key(0), given={0: {"compress": {"weight": jnp.ones(3)}}})

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    hooks = expert_parallel_hooks(make_mesh(ep=4, dp=2), codec=codec)

    def loss(t):
        logits = forward(merge_params(t, frozen), cfg, tokens, hooks=hooks)
        return -jnp.mean(jax.nn.log_softmax(logits[:, :-1])[..., 0])
    opt = optax.adamw(1e-2)
    g = jax.jit(jax.grad(loss))(train)
    upd, _ = opt.update(g, opt.init(train), train)
    new = optax.apply_updates(train, upd)
    assert all(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(train)))
    with pytest.raises(ValueError, match="add_codec_params"):
        forward(params, cfg, tokens, hooks=hooks)


# -------------------------------------------------------------------- gradients: EP vs one device
@pytest.mark.parametrize("codec,mode,decoder", [
    (Learned(ratio=4, init_kind="random"), "compressed", "fold"),
    (Learned(ratio=4, init_kind="random"), "compressed", "rows"),
    (StaleConditioned(ratio=4, stride=2, init_kind="random"), "uncompressed", "fold"),
    (StaleConditioned(ratio=2, stride=2, stale_kind="compressed", init_kind="random"), "compressed", "fold"),
    (StaleConditioned(ratio=2, stride=2, stale_kind="compressed", init_kind="random"), "compressed", "rows")],
    ids=["learned-fold", "learned-rows", "stale-raw-fold", "stale-compressed-fold", "stale-compressed-rows"])
def test_codec_gradients_match_single_device(codec, mode, decoder, tmp_path):
    """LM-style loss through a 3-layer model (reference, conditioned, reference layer):
    gradients w.r.t. every codec parameter on ep=4 x dp=2 equal the one-device simulation, whether
    the expert side decodes every row or folds the linear decoder into the experts (moe/fold.py)."""
    from caldera_jax.checkpoints_io.hf import load_hf
    cfg, params = load_hf(tiny_hf_model("qwen3_moe", tmp_path, num_hidden_layers=3)[0])
    params = add_codec_params(params, cfg, codec, jax.random.key(0))
    train, frozen = split_codec_params(params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)

    def grads(hooks):
        def loss(t):
            logits = forward(merge_params(t, frozen), cfg, tokens, hooks=hooks)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
        return jax.jit(jax.value_and_grad(loss))(train)
    l_sim, g_sim = grads(simulated_hooks(codec=codec, router_mode=mode))
    l_ep, g_ep = grads(expert_parallel_hooks(make_mesh(ep=4, dp=2), codec=codec, router_mode=mode,
                                             decoder=decoder))
    np.testing.assert_allclose(float(l_ep), float(l_sim), rtol=1e-5)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_sim))
    assert_close(g_ep, g_sim)
    if isinstance(codec, StaleConditioned):   # the reference layer's compressor feeds layer 1's decoder
        assert float(jnp.max(jnp.abs(g_sim["model"]["layers"]["0"]["mlp"]["codec"]["compress"]["weight"]))) > 0


# ---------------------------------------------------------------------------------- router modes
def _routing_tap(name, value, aux):
    if name.endswith(".routing"):
        aux["routing"] = value
    return value


def test_router_modes():
    """uncompressed: routing == the no-codec routing, experts see decoded inputs;
    compressed: routing == top-k of the decoded inputs. EP equals the one-device simulation."""
    cfg = layer_cfg()
    p, x = layer_params()
    codec = IntQuant(2)
    mesh = make_mesh(ep=4, dp=2)
    _, plain_aux = jax.jit(run_layer(Hooks(tap=_routing_tap), cfg))(p, x)
    y_plain, _ = jax.jit(run_layer(Hooks(), cfg))(p, x)
    xh = roundtrip(codec, {}, x)
    idx_dec, _ = route(xh @ p["gate"]["weight"].T, cfg)
    for mode in ("uncompressed", "compressed"):
        y_sim, _ = jax.jit(run_layer(simulated_hooks(codec=codec, router_mode=mode), cfg))(p, x)
        y, aux = jax.jit(run_layer(expert_parallel_hooks(mesh, codec=codec, router_mode=mode,
                                                         base=Hooks(tap=_routing_tap)), cfg))(p, x)
        idx, w = aux["routing"]
        assert_close(y, y_sim)
        assert float(jnp.max(jnp.abs(y - y_plain))) > 1e-3 * float(jnp.max(jnp.abs(y_plain)))
        if mode == "uncompressed":
            np.testing.assert_array_equal(np.asarray(idx), np.asarray(plain_aux["routing"][0]))
            assert_close(w, plain_aux["routing"][1])
            # the experts saw the decoded state: dense experts on x̂ with the original routing
            cw = jax.nn.one_hot(idx, E).transpose(0, 2, 1) @ w[..., None]
            want = jnp.einsum("enh,ne->nh", _dense_experts(p, xh), cw[..., 0])
            assert_close(y, want)
        else:
            np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_dec))
    assert not np.array_equal(np.asarray(idx_dec), np.asarray(plain_aux["routing"][0]))


def _dense_experts(p, x):
    ex = p["experts"]
    g = jnp.einsum("nh,eih->eni", x, ex["gate_proj"]["weight"])
    u = jnp.einsum("nh,eih->eni", x, ex["up_proj"]["weight"])
    return jnp.einsum("eni,ehi->enh", jax.nn.silu(g) * u, ex["down_proj"]["weight"])


def test_combine_codec_matches_simulation():
    cfg = layer_cfg()
    p, x = layer_params()
    mesh = make_mesh(ep=4, dp=2)
    y_sim, _ = jax.jit(run_layer(simulated_hooks(combine_codec=IntQuant(8)), cfg))(p, x)
    y, _ = jax.jit(run_layer(expert_parallel_hooks(mesh, combine_codec=IntQuant(8)), cfg))(p, x)
    y_plain, _ = jax.jit(run_layer(Hooks(), cfg))(p, x)
    scale = float(jnp.max(jnp.abs(y_plain)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_sim), atol=2e-2 * scale)
    assert 0 < _rel(y, y_plain) < 0.02


# ---------------------------------------------------------------------------------- wire bytes
WIRE_H = 128


def _row_bytes(codec) -> int:
    """Expected dispatch bytes per routed token row at hidden 128 with a bf16 model."""
    H = WIRE_H
    if isinstance(codec, Identity):
        return 2 * H
    if isinstance(codec, IntQuant):
        groups = H // codec.group if codec.group else 1
        return H * codec.bits // 8 + (4 if codec.scheme == "absmax" else 8) * groups
    if isinstance(codec, FP8):
        return H + 4 * H // codec.block
    return 2 * H // codec.ratio


WIRE_CODECS = [Identity(), IntQuant(8), IntQuant(4), IntQuant(2), IntQuant(4, "zeropoint"), IntQuant(4, group=64),
               FP8(),
               Learned(ratio=2), Learned(ratio=4), Learned(ratio=8), Learned(ratio=16)]


def _wire(codec, layers: int = 1, combine_codec=None):
    """Per-layer {scope: bytes per device} of a stack of `layers` EP MoE layers (bf16, ep=4 x dp=2),
    and the slot rows per device (E * C, C = n: no drops)."""
    cfg = layer_cfg(hidden=WIRE_H, layers=layers)
    p, x = layer_params(hidden=WIRE_H)
    tree = {"model": {"layers": {str(i): {"mlp": p} for i in range(layers)}}}
    tree = jax.tree.map(lambda a: a.astype(jnp.bfloat16), add_codec_params(tree, cfg, codec, jax.random.key(0)))
    hooks = expert_parallel_hooks(make_mesh(ep=4, dp=2), codec=codec, combine_codec=combine_codec)

    def stack(tree, x):
        ctx = Ctx(hooks, {})
        for i in range(layers):
            x = hooks.moe(f"model.layers.{i}.mlp", tree["model"]["layers"][str(i)]["mlp"], cfg, x, x, ctx)
        return x
    ops = collectives(compiled_hlo(stack, tree, x.astype(jnp.bfloat16)))
    assert {op.scope for op in ops} <= {"moe_dispatch", "moe_combine", "moe_stale", "moe_token_ids"}, ops
    n = N // 8
    return [bytes_by_scope(ops, layer=i) for i in range(layers)], E * n, n


@pytest.mark.parametrize("codec", WIRE_CODECS, ids=codec_name)
def test_wire_bytes_per_token_from_hlo(codec):
    (by,), rows, _ = _wire(codec)
    assert by["moe_dispatch"] == rows * _row_bytes(codec)
    assert by["moe_combine"] == rows * 2 * WIRE_H                 # bf16 outputs come back
    if isinstance(codec, Learned):
        assert by["moe_dispatch"] / (rows * 2 * WIRE_H) == 1 / codec.ratio


@pytest.mark.parametrize("stale_kind", ["raw", "compressed"])
def test_wire_bytes_stale_share(stale_kind):
    """Reference layers add one all_gather of the stale state (raw: H, compressed: b values per
    token); conditioned layers send the 4x code plus an int32 token id per row."""
    codec = StaleConditioned(ratio=4, stride=2, stale_kind=stale_kind)
    (ref, cond), rows, n = _wire(codec, layers=2)
    b = WIRE_H // 4
    assert ref["moe_dispatch"] == cond["moe_dispatch"] == rows * 2 * b
    assert ref["moe_stale"] == n * 2 * (WIRE_H if stale_kind == "raw" else b)
    assert "moe_stale" not in cond and "moe_token_ids" not in ref
    assert cond["moe_token_ids"] == rows * 4


def test_wire_bytes_combine_codec():
    (by,), rows, _ = _wire(Identity(), combine_codec=IntQuant(8))
    assert by["moe_combine"] == rows * (WIRE_H + 4)


def test_ragged_dispatch_with_stale_codec():
    """Token ids travel with the ragged rows so conditioned layers find their stale state."""
    from caldera_jax.moe import Ragged
    cfg = layer_cfg(layers=2)
    p, x = layer_params()
    codec = StaleConditioned(ratio=4, stride=2, init_kind="random")
    tree = add_codec_params({"model": {"layers": {str(i): {"mlp": p} for i in range(2)}}}, cfg, codec,
                            jax.random.key(0))

    def stack(hooks):
        def f(tree, x):
            ctx = Ctx(hooks, {})
            for i in range(2):
                x = hooks.moe(f"model.layers.{i}.mlp", tree["model"]["layers"][str(i)]["mlp"], cfg, x, x, ctx)
            return x
        return jax.jit(f)
    want = stack(simulated_hooks(codec=codec))(tree, x)
    got = stack(expert_parallel_hooks(make_mesh(ep=4, dp=2), codec=codec, dispatch=Ragged(emulate=True)))(tree, x)
    assert_close(got, want)


def test_fold_pays_off_with_many_tokens_per_device():
    """decoder="auto" folds W_d into the experts for a training/prefill batch and decodes rows for
    a decode step (Qwen3-30B-A3B widths, learned 4x, ep=8: 16 local experts, capacity 1.25)."""
    from caldera_jax.moe.fold import fold_is_cheaper
    H, I, E, k, ep, d = 2048, 768, 128, 8, 8, 512

    def cheaper(n):
        C = -(-5 * n * k // (4 * E))                 # ceil(1.25 n k / E) slots per (source, expert)
        return fold_is_cheaper(E * C, ep * C, E // ep, I, H, d)
    assert cheaper(4096) and not cheaper(1)
    with pytest.raises(ValueError, match="decoder must be one of"):
        expert_parallel_hooks(make_mesh(ep=2), codec=Learned(4), decoder="fused")
