"""Quantizers: uniform (every bit width, group size, symmetric/asymmetric, odd shapes) and E8P."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.formats import e8p, fp4
from caldera_jax.formats.quant import (QuantSpec, assemble, dequantize, fit, pad_cols, padded_n, quantize,
                                       round_block)
from caldera_jax.caldera.spec import MatrixBudget

RNG = np.random.default_rng(0)


@functools.lru_cache(maxsize=None)
def _jq(spec):
    return jax.jit(lambda w: quantize(w, spec))


def _uniform_ref(w: np.ndarray, bits: int, g: int, sym: bool) -> np.ndarray:
    """float64 numpy reference of the groupwise uniform quantizer (same fp16 scale rounding)."""
    m, n = w.shape
    L = 2 ** bits - 1
    out = np.empty_like(w, dtype=np.float64)
    for j0 in range(0, n, g):
        blk = w[:, j0:j0 + g].astype(np.float64)
        if sym:
            s = np.maximum(np.abs(blk).max(1) / (L / 2), 2.0 ** -24)
            s = np.maximum(s.astype(np.float16).astype(np.float64), 2.0 ** -24)[:, None]
            c = np.clip(np.round(blk / s + L / 2), 0, L)
            out[:, j0:j0 + g] = s * (c - L / 2)
        else:
            z = blk.min(1).astype(np.float16).astype(np.float64)
            s = np.maximum((blk.max(1) - z) / L, 2.0 ** -24)
            s = np.maximum(s.astype(np.float16).astype(np.float64), 2.0 ** -24)[:, None]
            c = np.clip(np.round((blk - z[:, None]) / s), 0, L)
            out[:, j0:j0 + g] = s * c + z[:, None]
    return out


def test_spec_from_budget():
    b = MatrixBudget(b_q=3, quantizer="uniform", b_l=4, b_r=16, group_size=32, symmetric=False,
                     factor_group_size=16)
    assert QuantSpec.for_q(b) == QuantSpec("uniform", 3, 32, False)
    assert QuantSpec.for_factors(b, "l") == QuantSpec("uniform", 4, 16, False)
    assert QuantSpec.for_factors(b, "r") is None                      # bf16 factor
    e = QuantSpec.for_q(MatrixBudget(b_q=2, quantizer="e8p", group_size=128))
    assert e.block == 8 and e == QuantSpec("e8p", 2) and QuantSpec("uniform", 4).block == 1
    with pytest.raises(ValueError, match="bits"):
        QuantSpec("e8p", 8)
    with pytest.raises(ValueError, match="kind"):
        QuantSpec("nf4", 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_uniform_matches_numpy_reference(bits, sym):
    w = RNG.standard_normal((6, 45)).astype(np.float32) + (0 if sym else 0.3)
    for g in (13, 64):                 # 45 not a multiple of 13; one partial group of 64 > n
        qm = _jq(QuantSpec("uniform", bits, g, sym))(jnp.asarray(w))
        assert qm.codes.shape == (6, 45) and qm.scales.shape == (6, -(-45 // g))
        assert int(qm.codes.min()) >= 0 and int(qm.codes.max()) < 2 ** bits
        ref = _uniform_ref(w, bits, g, sym)
        np.testing.assert_allclose(np.asarray(dequantize(qm)), ref, rtol=0, atol=1e-6)
        # nearest rounding: error at most half a step (+ fp16 rounding of the scale at the edge)
        step = np.repeat(np.asarray(qm.scales), g, axis=1)[:, :45]
        assert (np.abs(ref - w) <= 0.5 * step * 1.01 + 1e-7).all()


def test_asymmetric_beats_symmetric_on_offset_data():
    w = jnp.asarray(RNG.standard_normal((16, 128)).astype(np.float32) * 0.2 + 1.0)
    for bits in (2, 4):
        e_sym = float(jnp.mean((dequantize(_jq(QuantSpec("uniform", bits, 32, True))(w)) - w) ** 2))
        e_asym = float(jnp.mean((dequantize(_jq(QuantSpec("uniform", bits, 32, False))(w)) - w) ** 2))
        assert e_asym < 0.5 * e_sym, (bits, e_asym, e_sym)


def test_error_decreases_with_bits():
    w = jnp.asarray(RNG.standard_normal((16, 100)).astype(np.float32))
    errs = [float(jnp.mean((dequantize(_jq(QuantSpec("uniform", b, 32))(w)) - w) ** 2)) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4


def test_zero_group_and_group_size_one():
    w = np.zeros((3, 20), np.float32)
    w[1, 5:] = RNG.standard_normal(15)
    for spec in (QuantSpec("uniform", 2, 4, True), QuantSpec("uniform", 3, 1, False), QuantSpec("e8p", 2),
                 QuantSpec("fp4", 4)):
        d = np.asarray(dequantize(quantize(jnp.asarray(w), spec)))
        assert np.isfinite(d).all() and np.abs(d[0]).max() < 1e-6 and np.abs(d[2]).max() < 1e-6
    d = np.asarray(dequantize(quantize(jnp.asarray(w), QuantSpec("uniform", 3, 1, False))))
    np.testing.assert_allclose(d, w, atol=1e-3)               # one value per group: near exact


@pytest.mark.parametrize("spec", [QuantSpec("uniform", 3, 10, True), QuantSpec("uniform", 4, 16, False),
                                  QuantSpec("e8p", 4), QuantSpec("fp4", 4)])
def test_round_block_over_all_blocks_equals_quantize(spec):
    m, n = 5, 37                                   # n not a multiple of the group nor of 8
    w = jnp.asarray(RNG.standard_normal((m, n)).astype(np.float32))
    qm = quantize(w, spec)
    params = fit(w, spec)
    wp = pad_cols(w, spec)
    b = spec.block * 2 if spec.kind == "e8p" else 3
    npad = -(-padded_n(n, spec) // b) * b
    wp = jnp.pad(wp, ((0, 0), (0, npad - wp.shape[1])))
    # python loop with static col0 -> list of blocks
    blocks, hats = [], []
    for c in range(0, npad, b):
        h, cb = round_block(wp[:, c:c + b], params, c, spec)
        blocks.append(cb)
        hats.append(h)
    qa = assemble(blocks, params, spec, (m, n))
    np.testing.assert_array_equal(np.asarray(qa.codes), np.asarray(qm.codes))
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(hats, 1)[:, :n]), np.asarray(dequantize(qm)))

    # traced col0 inside lax.scan -> stacked [n_blocks, m, b, ...] codes
    def step(_, c):
        h, cb = round_block(jax.lax.dynamic_slice_in_dim(wp, c, b, axis=1), params, c, spec)
        return None, cb
    _, stacked = jax.jit(lambda: jax.lax.scan(step, None, jnp.arange(0, npad, b)))()
    qs = assemble(stacked, params, spec, (m, n))
    np.testing.assert_array_equal(np.asarray(qs.codes), np.asarray(qm.codes))


@pytest.mark.parametrize("spec", [QuantSpec("uniform", 4, 16, False), QuantSpec("e8p", 3), QuantSpec("fp4", 4)])
def test_vmap_over_stack(spec):
    w = jnp.asarray(RNG.standard_normal((3, 8, 24)).astype(np.float32))
    qs = jax.vmap(lambda x: quantize(x, spec))(w)
    assert qs.shape == (8, 24) and qs.codes.shape[0] == 3
    d_stack = dequantize(qs)                                  # leading axis handled directly
    d_vmap = jax.vmap(dequantize)(qs)
    for e in range(3):
        d_one = dequantize(quantize(w[e], spec))
        np.testing.assert_array_equal(np.asarray(d_stack[e]), np.asarray(d_one))
        np.testing.assert_array_equal(np.asarray(d_vmap[e]), np.asarray(d_one))


# ------------------------------------------------------------------------------------------ E8P

def test_e8p_codebook_structure():
    cb = e8p.full_codebook()                                    # [65536, 8]
    assert cb.shape == (65536, 8) and len(np.unique(cb, axis=0)) == 65536
    v = cb - 0.25                                               # E8 + 1/4 -> E8 = D8 ∪ D8 + 1/2
    ints = np.all(v == np.round(v), 1)
    halves = np.all(v - 0.5 == np.round(v - 0.5), 1)
    assert np.all(ints | halves)
    assert np.all(np.round(v.sum(1)) % 2 == 0)                  # even coordinate sum
    assert e8p.abs_grid().shape == (256, 8) and np.all((e8p.abs_grid() ** 2).sum(1) <= 12)
    g1 = e8p.e8_1bit_grid()                                     # residual stage: points of E8
    assert np.all(np.round(g1.sum(1)) % 2 == 0) and len(np.unique(g1, axis=0)) == 256


def test_e8p_mse_target():
    x = jax.random.normal(jax.random.PRNGKey(0), (2 ** 16, 8))
    cw, _ = jax.jit(e8p.nearest_e8p)(x * e8p.E8P_OPT_SCALE)
    mse = float(jnp.mean((cw / e8p.E8P_OPT_SCALE - x) ** 2))
    assert abs(mse - 0.091) < 0.005, mse


def test_e8p_nearest_equals_brute_force():
    x = np.concatenate([RNG.standard_normal((2500, 8)) * 1.03,
                        RNG.standard_normal((500, 8)) * 3.0,              # far outside the ball
                        np.round(RNG.standard_normal((200, 8)) * 4) / 4,  # exact ties on the grid
                        ]).astype(np.float32)
    cw, code = jax.jit(e8p.nearest_e8p)(jnp.asarray(x))
    cw, code = np.asarray(cw), np.asarray(code)
    np.testing.assert_array_equal(e8p.decode_np(code), cw)
    cb = e8p.full_codebook().astype(np.float64)
    cbn = (cb ** 2).sum(1)
    best = np.concatenate([((xc.astype(np.float64) ** 2).sum(1)[:, None] - 2 * xc @ cb.T + cbn).min(1)
                           for xc in np.array_split(x, 8)])
    mine = ((x.astype(np.float64) - cw) ** 2).sum(1)
    assert np.all(mine <= best + 1e-4 * (1 + best)), np.max(mine - best)


def test_e8p_rvq_error_below_two_bit():
    w = jnp.asarray(RNG.standard_normal((64, 128)).astype(np.float32))
    errs = {b: float(jnp.mean((dequantize(_jq(QuantSpec("e8p", b))(w)) - w) ** 2)) for b in (2, 3, 4)}
    assert errs[4] < errs[3] < errs[2], errs
    assert 0.07 < errs[2] < 0.11 and errs[3] < 0.04 and errs[4] < 0.015, errs
    # and better than the uniform scalar quantizer at the same bits (group 64 costs 0.25 more)
    for b in (2, 3, 4):
        eu = float(jnp.mean((dequantize(_jq(QuantSpec("uniform", b, 64))(w)) - w) ** 2))
        assert errs[b] < eu, (b, errs[b], eu)


def test_e8p_odd_shapes():
    for (m, n), b in [((3, 5), 2), ((7, 13), 3)]:
        w = jnp.asarray(RNG.standard_normal((m, n)).astype(np.float32))
        if True:
            qm = quantize(w, QuantSpec("e8p", b))
            assert qm.codes.shape == (m, -(-n // 8), 1 if b == 2 else 2)
            d = dequantize(qm)
            assert d.shape == (m, n)
            assert float(jnp.mean((d - w) ** 2)) < 0.2 * float(jnp.mean(w ** 2)) + 0.05


# ------------------------------------------------------------------------------------------ FP4

def e2m1_np(codes: np.ndarray) -> np.ndarray:
    """float64 e2m1 values from the bit fields: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa."""
    c = np.asarray(codes, np.int64)
    e, m = (c >> 1) & 3, (c & 1).astype(np.float64)
    mag = np.where(e == 0, m * 0.5, 2.0 ** (e - 1) * (1.0 + m / 2))
    return np.where(c & 8, -mag, mag)


def e4m3_np(b: np.ndarray) -> np.ndarray:
    """float64 value of e4m3fn bytes from the bit fields (bias 7, subnormals; 0x7F/0xFF NaN)."""
    b = np.asarray(b, np.int64)
    e, m = (b >> 3) & 15, (b & 7).astype(np.float64)
    v = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    v = np.where((b & 0x7F) == 0x7F, np.nan, v)
    return np.where(b & 0x80, -v, v)


def test_fp4_grids_are_the_definitions():
    assert sorted(set(np.abs(e2m1_np(np.arange(16))))) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    np.testing.assert_array_equal(fp4.E2M1.astype(np.float64), e2m1_np(np.arange(16)))
    import ml_dtypes
    b = np.arange(256, dtype=np.uint8)
    ours, theirs = e4m3_np(b), b.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    np.testing.assert_array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(ours)])
    assert e4m3_np(np.array([0x7E]))[0] == 448 and e4m3_np(np.array([0x01]))[0] == 2.0 ** -9


def test_fp4_spec_and_budget():
    s = QuantSpec("fp4", 4, group_size=64, symmetric=False)
    assert (s.group_size, s.symmetric, s.block) == (16, True, 1) and s == QuantSpec("fp4")
    assert QuantSpec.for_q(MatrixBudget(quantizer="fp4", b_q=4)) == QuantSpec("fp4", 4)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec("fp4", 3)
    from caldera_jax.caldera.spec import BudgetError
    MatrixBudget(quantizer="fp4", b_q=4).validate()
    with pytest.raises(BudgetError, match=r"b_q=2 is not supported by the fp4 quantizer \(allowed: \(4,\)\)"):
        MatrixBudget(quantizer="fp4", b_q=2).validate()


def test_fp4_matches_float64_reference():
    """fit follows NVFP4 (tensor scale amax/(6·448), e4m3 block scales of amax/6), and dequantize
    equals tensor_scale · e4m3 · e2m1 computed in float64 from the bit-field definitions."""
    import ml_dtypes
    m, n = 7, 45                                          # n: 2 full groups of 16 and a partial one
    w = RNG.standard_normal((m, n)).astype(np.float32) * np.exp(RNG.standard_normal((m, 1))).astype(np.float32)
    w[2, 16:32] = 0.0                                     # an all-zero group
    w[3, 5] = 40.0                                        # an outlier sets the tensor scale
    qm = jax.jit(lambda w: quantize(w, QuantSpec("fp4", 4)))(jnp.asarray(w))
    assert qm.codes.shape == (m, n) and qm.scales.shape == (m, 3) and qm.tensor_scale.shape == ()
    assert int(qm.codes.min()) >= 0 and int(qm.codes.max()) < 16
    ts = float(qm.tensor_scale)
    assert ts == np.float32(np.float32(40.0) / np.float32(6 * 448))
    # block scales: e4m3 of max|block| / (6 ts), floored at the smallest subnormal
    G = 3
    wp = np.pad(np.abs(w), ((0, 0), (0, G * 16 - n))).reshape(m, G, 16).max(-1)
    want = np.clip(wp / (np.float32(6) * np.float32(ts)), 2.0 ** -9, 448).astype(np.float32)
    want = want.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(qm.scales), want)
    # dequantize vs the float64 definition
    s = e4m3_np(np.asarray(qm.scales).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    ref = ts * np.repeat(s, 16, axis=1)[:, :n] * e2m1_np(np.asarray(qm.codes))
    got = np.asarray(dequantize(qm), np.float64)
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=0)
    assert np.all(got[2, 16:32] == 0)


def test_fp4_nearest_rounding_is_optimal():
    """With the fitted scales, every weight's value is the nearest of the 16 grid points."""
    w = (RNG.standard_normal((64, 96)) * np.exp(RNG.standard_normal((64, 96)) * 0.7)).astype(np.float32)
    spec = QuantSpec("fp4", 4)
    params = fit(jnp.asarray(w), spec)
    qm = quantize(jnp.asarray(w), spec)
    eff = (np.asarray(params.scales, np.float64) * float(params.tensor_scale)).repeat(16, axis=1)   # [m, n]
    grid = eff[..., None] * e2m1_np(np.arange(16))[None, None, :]                                  # [m, n, 16]
    best = np.abs(w[..., None] - grid).min(-1)
    mine = np.abs(w - np.asarray(dequantize(qm), np.float64))
    assert np.all(mine <= best + 1e-6 * eff), np.max(mine - best)
    # and the error is what 4-bit floating point gives on heavy-tailed data (well below 2-bit E8P)
    rel = np.linalg.norm(np.asarray(dequantize(qm)) - w) / np.linalg.norm(w)
    assert rel < 0.12, rel
