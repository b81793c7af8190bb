"""QLRWeight: dequantize() against a float64 definition, apply() against x @ dequantize().T for
each input dtype, stacked experts, storage, and use as a parameter leaf in the model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from caldera_jax import linear
from caldera_jax.formats import incoherence as inc
from caldera_jax.formats import packing
from caldera_jax.formats.qlr_weight import QLRWeight
from caldera_jax.formats.quant import QuantSpec, dequantize, quantize
from caldera_jax.kernels.qlr import qlr_linear

RNG = np.random.default_rng(3)
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}    # relative to max |y|


def _randn(*shape):
    return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def _weight(m, n, r, qspec, fspec, incoherent=True, scale=0.37, seed=0):
    q = quantize(_randn(m, n), qspec)
    l = r_ = None
    if r:
        l, r_ = (_randn(m, r), _randn(r, n)) if fspec is None else (quantize(_randn(m, r), fspec),
                                                                     quantize(_randn(r, n), fspec))
    so, si = inc.make_signs(seed, (m, n)) if incoherent else (None, None)
    return QLRWeight.from_parts(q, l, r_, scale, si, so)


def _reference(w: QLRWeight) -> np.ndarray:
    """scale · T_outᵀ (Q + L·R) T_in in float64 from the parts' dequantized values."""
    m, n = w.shape
    M = np.asarray(dequantize(packing.unpack(w.q)), np.float64)
    if w.l is not None:
        M = M + np.asarray(packing.dequantize(w.l), np.float64) @ np.asarray(packing.dequantize(w.r), np.float64)
    so, si = w.signs()
    if si is not None:
        M = M @ (inc.hadamard_matrix(n).astype(np.float64) @ np.diag(np.asarray(si, np.float64)) / np.sqrt(n))
    if so is not None:
        M = (inc.hadamard_matrix(m).astype(np.float64) @ np.diag(np.asarray(so, np.float64)) / np.sqrt(m)).T @ M
    return float(w.scale) * M


CASES = {
    "e8p2+u4 r5 incoherent": (48, 40, 5, QuantSpec("e8p", 2), QuantSpec("uniform", 4, 4), True),
    "u3 asym + bf16 factors r7": (20, 24, 7, QuantSpec("uniform", 3, 7, False), None, True),
    "u4 rank0 plain": (9, 13, 0, QuantSpec("uniform", 4, 8), None, False),
    "e8p4+u2 r3 plain": (10, 21, 3, QuantSpec("e8p", 4), QuantSpec("uniform", 2, 2, False), False),
    "fp4+u4 r5 incoherent": (48, 40, 5, QuantSpec("fp4", 4), QuantSpec("uniform", 4, 4), True),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dequantize_and_apply_match_float64(case):
    m, n, r, qs, fs, inco = CASES[case]
    w = _weight(m, n, r, qs, fs, inco)
    assert w.rank == r and w.shape == (m, n)
    W = _reference(w)
    np.testing.assert_allclose(np.asarray(w.dequantize(), np.float64), W, atol=2e-5 * np.abs(W).max())
    x64 = RNG.standard_normal((2, 3, n))
    for dt in (jnp.float32, jnp.bfloat16) + ((jnp.float16,) if r == 0 else ()):
        x = jnp.asarray(x64, dt)
        y = linear.apply(x, w)
        assert y.dtype == dt and y.shape == (2, 3, m)
        ref = np.asarray(x, np.float64) @ W.T             # the input as the layer receives it
        err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
        assert err < TOL[dt], (dt, err)


def test_jit_and_linear_apply():
    w = _weight(24, 16, 4, QuantSpec("e8p", 2), QuantSpec("uniform", 4, 8))
    x = _randn(5, 16)
    y = jax.jit(lambda w, x: linear.apply(x, w, bias=jnp.ones(24)))(w, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w.dequantize().T + 1), rtol=1e-4, atol=1e-4)
    assert not linear.is_plain(w)
    with pytest.raises(ValueError, match="backend"):
        qlr_linear(x, w, backend="nope")
    # gradient w.r.t. the input flows through the xla path
    g = jax.grad(lambda x: jnp.sum(linear.apply(x, w) ** 2))(x)
    g_ref = 2 * (x @ w.dequantize().T) @ w.dequantize()
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-3, atol=1e-3)


def test_stacked_experts():
    E, m, n, r = 3, 16, 24, 4
    qs, fs = QuantSpec("uniform", 2, 8), QuantSpec("uniform", 4, 4)
    q = jax.vmap(lambda a: quantize(a, qs))(_randn(E, m, n))
    l = jax.vmap(lambda a: quantize(a, fs))(_randn(E, m, r))
    rr = jax.vmap(lambda a: quantize(a, fs))(_randn(E, r, n))
    so, si = jax.vmap(lambda k: inc.make_signs(k, (m, n)))(jnp.arange(E))
    w = QLRWeight.from_parts(q, l, rr, jnp.array([0.5, 1.0, 2.0]), si, so)
    assert w.stacked and w.num_matrices == E and w.shape == (m, n)
    Wd = w.dequantize()
    assert Wd.shape == (E, m, n)
    x = _randn(E, 7, n)
    y = linear.apply(x, w)                                # linear.apply's stacked convention
    assert y.shape == (E, 7, m)
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.einsum("eni,eoi->eno", x, Wd)), atol=2e-4)
    for e in range(E):
        one = jax.tree_util.tree_map(lambda a: a[e], w)
        np.testing.assert_allclose(np.asarray(one.dequantize(), np.float64), _reference(one), atol=1e-4)
    # honest accounting: 2-bit codes + fp16 scale per 8 + 4-bit factors + signs + scale
    assert w.nbytes() == sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(w))
    assert abs(w.bits_per_param() - 8 * w.nbytes() / (E * m * n)) < 1e-12


def test_bits_per_param_of_a_realistic_weight():
    m, n, r = 256, 512, 16
    w = _weight(m, n, r, QuantSpec("e8p", 2), QuantSpec("uniform", 4, 64))
    expected = (m * n * 2 + m * 16                       # Q codes + row scales
                + (m * r + r * n) * (4 + 16 / 64)        # L, R codes + group scales
                + (m + n) + 32) / (m * n)                # sign bits + global scale
    assert abs(w.bits_per_param() - expected) <= 0.02 * expected


def test_to_arrays_round_trip(tmp_path):
    from safetensors.numpy import load_file, save_file
    w = _weight(24, 40, 6, QuantSpec("e8p", 3), None)
    arrays, meta = w.to_arrays()
    save_file({k: np.asarray(v) for k, v in arrays.items()}, str(tmp_path / "w.safetensors"))
    back = QLRWeight.from_arrays(load_file(str(tmp_path / "w.safetensors")), meta)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(w.dequantize()))
    assert back.l.codes.dtype == jnp.bfloat16 and back.rank == 6


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint (dense attention projections + stacked experts)."""
    import torch  # noqa: F401  (the parity reference; a test dependency)
    import transformers  # noqa: F401  (the parity reference; a test dependency)
    from caldera_jax.checkpoints_io import load_hf
    from tests.hf_tiny import tiny_hf_model
    path, _ = tiny_hf_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    return load_hf(path)


def _compress(w, stacked=False, spec=QuantSpec("e8p", 2)):
    """Stand-in for the decomposition: rotate, scale by RMS, quantize Q, rank-4 SVD residual as L/R."""
    def one(w, key):
        m, n = w.shape
        so, si = inc.make_signs(key, (m, n))
        wt = inc.rotate(w, so, si)
        s = jnp.sqrt(jnp.mean(wt ** 2))
        q = quantize(wt / s, spec)
        U, S, Vt = jnp.linalg.svd(wt / s - dequantize(q), full_matrices=False)
        fs = QuantSpec("uniform", 4, 4)
        return q, quantize(U[:, :4] * S[:4], fs), quantize(Vt[:4], fs), s, si, so
    w = jnp.asarray(w, jnp.float32)
    parts = jax.vmap(one)(w, jnp.arange(w.shape[0])) if stacked else one(w, 0)
    return QLRWeight.from_parts(*parts[:3], parts[3], parts[4], parts[5])


@pytest.mark.parametrize("names", [[("self_attn", "q_proj")],
                                   [("self_attn", "q_proj"), ("mlp", "experts", "gate_proj")]],
                         ids=["q_proj", "q_proj+stacked_experts"])
def test_qlr_weight_as_model_param_leaf(tiny_moe, names):
    """One q_proj (and one layer's stacked expert gate_proj) replaced by a QLRWeight: the forward pass
    equals the forward with the dequantized dense weights."""
    from caldera_jax.models.decoder import forward
    cfg, params = tiny_moe
    layer = params["model"]["layers"]["0"]
    qparams = jax.tree_util.tree_map(lambda a: a, params)
    dparams = jax.tree_util.tree_map(lambda a: a, params)
    for path in names:
        node_q, node_d = qparams["model"]["layers"]["0"], dparams["model"]["layers"]["0"]
        src = layer
        for k in path:
            node_q, node_d, src = node_q[k], node_d[k], src[k]
        w = src["weight"]
        qw = _compress(w, stacked=(w.ndim == 3))
        assert qw.shape == w.shape[-2:]
        rel = float(jnp.linalg.norm(qw.dequantize() - w) / jnp.linalg.norm(w))
        assert rel < 0.5, rel                                 # a sane compression of the weight
        node_q["weight"] = qw
        node_d["weight"] = qw.dequantize().astype(w.dtype)
    tokens = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 9)))
    yq = np.asarray(forward(qparams, cfg, tokens))
    yd = np.asarray(forward(dparams, cfg, tokens))
    y0 = np.asarray(forward(params, cfg, tokens))
    np.testing.assert_allclose(yq, yd, atol=2e-4 * np.abs(yd).max())
    assert np.abs(yq - y0).max() > 1e-4                       # the compressed weight was really used


def test_fp4_weight_accounting_and_storage(tmp_path):
    """An fp4 Q: bits counted exactly (nibbles + e4m3 byte per 16 + fp32 tensor scale), and the
    tensor scale travels through to_arrays / from_arrays (safetensors: uint8 codes and scales)."""
    from safetensors.numpy import load_file, save_file
    m, n = 32, 64
    w = _weight(m, n, 0, QuantSpec("fp4", 4), None, incoherent=False)
    assert w.q.nbytes() == m * n // 2 + m * n // 16 + 4
    assert w.q.bits_per_param() == 4 + 8 / 16 + 32 / (m * n)
    arrays, meta = w.to_arrays()
    assert {k: np.asarray(v).dtype.name for k, v in arrays.items() if k.startswith("q.")} == \
        {"q.codes": "uint8", "q.scales": "uint8", "q.tensor_scale": "float32"}
    save_file({k: np.asarray(v) for k, v in arrays.items()}, str(tmp_path / "w.safetensors"))
    back = QLRWeight.from_arrays(load_file(str(tmp_path / "w.safetensors")), meta)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(w.dequantize()))
