"""LDLQ (caldera_jax.caldera.ldlq): block LDL, error feedback, re-quantization sweeps, padding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.caldera import hessian as hs
from caldera_jax.caldera import ldlq
from caldera_jax.formats import quant as qb

M, N = 48, 64


def _problem(seed=0, m=M, n=N):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n)) * (1.0 + 3.0 * (rng.random(n) < 0.1))     # a few loud columns
    x = rng.standard_normal((1500, n)) @ (rng.standard_normal((n, n)) * np.exp(-np.arange(n) / 12.0))
    x *= np.exp(0.8 * rng.standard_normal(n))                                 # anisotropic scales
    h = np.asarray(hs.regularize(x.T @ x, 1e-2), np.float64)
    return w, h


@functools.partial(jax.jit, static_argnames=("spec", "sweeps"))
def _ldlq(w, fac, params, *, spec, sweeps):
    return ldlq.ldlq_quantize(w, fac, spec, sweeps, params=params)


def _run(w, h, spec, sweeps):
    wj = jnp.asarray(w, jnp.float32)
    fac = jax.jit(ldlq.factors_for, static_argnums=1)(jnp.asarray(h, jnp.float32), spec)
    return _ldlq(wj, fac, qb.fit(wj, spec), spec=spec, sweeps=sweeps)


def _herr(w, w_hat, h):
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum((e @ h) * e))


STEP = 0.5


def _grid_round(blk, c0, prm=None):
    q = jnp.round(blk / STEP) * STEP
    return q, jnp.round(blk / STEP).astype(jnp.int32)


def _numpy_ldlq(w, h, g):
    """float64 reference: Ŵ_k = round(W_k + Σ_{j<k} E_j U_jk) with H = U D Uᵀ (U block-unit-upper)."""
    n = h.shape[0]
    c = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]          # upper, h = C Cᵀ
    u = c.copy()
    for k in range(n // g):
        s = slice(k * g, (k + 1) * g)
        u[:, s] = c[:, s] @ np.linalg.inv(c[s, s])
    e = np.zeros_like(w)
    wh = np.zeros_like(w)
    for k in range(n // g):
        s = slice(k * g, (k + 1) * g)
        t = w[:, s] + e[:, :k * g] @ u[:k * g, s]
        wh[:, s] = np.round(t / STEP) * STEP
        e[:, s] = w[:, s] - wh[:, s]
    return wh, u


@pytest.mark.parametrize("g,sb", [(1, 16), (8, 16), (8, 64)])
def test_ldlq_pass_matches_float64_reference(g, sb):
    w, h = _problem()
    fac = ldlq.ldl_factors(jnp.asarray(h, jnp.float32), g, super_block=sb)
    wh, codes = jax.jit(lambda w, f: ldlq.ldlq_pass(w, f, _grid_round))(jnp.asarray(w, jnp.float32), fac)
    ref, u = _numpy_ldlq(w, h, g)
    np.testing.assert_array_equal(np.asarray(wh), ref)
    # codes are stored block by block: [n/g, m, g]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(codes), 0, 1).reshape(M, N) * STEP, ref)
    # the factor pieces reassemble U (block strictly-upper part)
    u_off = u - np.kron(np.eye(N // g), np.ones((g, g))) * u
    got = np.array(fac.u_cross)
    for s in range(N // sb):
        got[s * sb:(s + 1) * sb, s * sb:(s + 1) * sb] = np.asarray(fac.u_in[s])
    np.testing.assert_allclose(got, u_off, atol=2e-4)


@pytest.mark.parametrize("spec", [qb.QuantSpec("uniform", 2, 16), qb.QuantSpec("uniform", 3, 16, False),
                                  qb.QuantSpec("e8p", 2), qb.QuantSpec("fp4", 4)], ids=["u2", "u3asym", "e8p2", "fp4"])
def test_ldlq_beats_nearest_in_h_norm(spec):
    for seed in range(2):
        w, h = _problem(seed)
        qm, wh = _run(w, h, spec, 0)
        _, wn = ldlq.nearest_quantize(jnp.asarray(w, jnp.float32), spec)
        e_ldlq, e_near = _herr(w, wh, h), _herr(w, wn, h)
        assert e_ldlq < 0.9 * e_near, (e_ldlq, e_near)
        np.testing.assert_array_equal(np.asarray(qb.dequantize(qm)), np.asarray(wh))


@pytest.mark.parametrize("spec", [qb.QuantSpec("uniform", 2, 16), qb.QuantSpec("e8p", 2), qb.QuantSpec("fp4", 4)],
                         ids=["u2", "e8p2", "fp4"])
def test_sweeps_monotone_and_consistent(spec):
    w, h = _problem(3)
    _, w0 = _run(w, h, spec, 0)
    qm, w3 = _run(w, h, spec, 2)
    assert _herr(w, w3, h) <= _herr(w, w0, h) * (1 + 1e-6)
    assert _herr(w, w3, h) < _herr(w, w0, h)            # sweeps do something on this problem
    np.testing.assert_array_equal(np.asarray(qb.dequantize(qm)), np.asarray(w3))


def test_sweep_row_compaction_equals_plain_sweeps():
    """Skipping converged rows (chunks of 8 rows) gives the same result as sweeping every row."""
    spec = qb.QuantSpec("uniform", 2, 16)
    w, h = _problem(4)
    wj = jnp.asarray(w, jnp.float32)
    fac = ldlq.factors_for(jnp.asarray(h, jnp.float32), spec)
    params = qb.fit(wj, spec)
    rf = functools.partial(qb.ldlq_round, spec=spec, n=N)
    prm = qb.ldlq_params(params)
    wh, codes = ldlq.ldlq_pass(wj, fac, rf, prm)

    @jax.jit
    def plain(wh, codes):
        for _ in range(3):
            wh, codes = ldlq._one_sweep(wj, wh, codes, fac, rf, prm)
        return wh, codes

    @jax.jit
    def compact(wh, codes):
        return ldlq.greedy_sweeps(wj, wh, codes, fac, rf, 3, prm, row_chunk=8)

    a, b = plain(wh, codes), compact(wh, codes)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_e8p_ldlq_pads_odd_width():
    """E8P pads n to a multiple of 8; padded columns get no coupling and are dropped."""
    spec = qb.QuantSpec("e8p", 2)
    w, h = _problem(5, m=M, n=60)
    assert ldlq.factors_for(jnp.asarray(h, jnp.float32), spec).n == 64
    qm, wh = _run(w, h, spec, 0)
    assert wh.shape == (M, 60) and qm.shape == (M, 60)
    np.testing.assert_array_equal(np.asarray(qb.dequantize(qm)), np.asarray(wh))
    _, wn = ldlq.nearest_quantize(jnp.asarray(w, jnp.float32), spec)
    assert _herr(w, wh, h) < _herr(w, wn, h)


def test_choose_super_block():
    assert ldlq.choose_super_block(1024, 8) == 128
    assert ldlq.choose_super_block(576, 8) == 96
    assert ldlq.choose_super_block(60, 1) == 60
    with pytest.raises(ValueError, match="multiple"):
        ldlq.choose_super_block(60, 8)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fast_e8p_rounding_matches_quantizer(bits):
    """LDLQ's E8P rounding (the registry's ldlq_round: e8p.nearest_e8p_fast) gives the quantizer's
    codes and values."""
    spec = qb.QuantSpec("e8p", bits)
    rng = np.random.default_rng(bits)
    w = jnp.asarray(rng.standard_normal((512, 64)) * np.exp(rng.standard_normal((512, 1))), jnp.float32)
    w = w.at[0, :8].set(0.0)                                   # ties / zeros
    params = qb.fit(w, spec)
    ref = jax.jit(lambda w: qb.round_block(w, params, 0, spec))(w)
    got = jax.jit(lambda w: qb.ldlq_round(w, 0, qb.ldlq_params(params), spec, w.shape[1]))(w)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))


def test_fp4_ldlq_round_is_the_quantizers_rounding():
    """LDLQ's FP4 rounding (per-row effective scales tensor·e4m3) gives round_block's codes and values,
    on column blocks at any offset (including the partial last group)."""
    spec = qb.QuantSpec("fp4", 4)
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((40, 50)) * np.exp(rng.standard_normal((40, 1))), jnp.float32)
    params = qb.fit(w, spec)
    prm = qb.ldlq_params(params)
    assert jax.tree.leaves(prm)[0].shape[0] == 40                     # per-row (greedy_sweeps slices rows)
    for c0, b in ((0, 1), (17, 1), (32, 18), (49, 1)):
        ref = qb.round_block(w[:, c0:c0 + b], params, c0, spec)
        got = jax.jit(lambda x: qb.ldlq_round(x, c0, prm, spec, 50))(w[:, c0:c0 + b])
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))
