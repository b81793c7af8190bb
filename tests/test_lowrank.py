"""LR step (caldera_jax.caldera.lowrank): closed form in the H-norm, randomized SVD, LPLR."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.caldera import hessian as hs
from caldera_jax.caldera import ldlq
from caldera_jax.caldera import lowrank
from caldera_jax.formats import quant as qb

M, N, R = 64, 96, 8


def _a(seed=0, m=M, n=N):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (rng.standard_normal((m, n)) * (1.0 / (1.0 + np.arange(n) / 6.0))) @ q


def _h(seed=0, n=N):
    rng = np.random.default_rng(100 + seed)
    x = rng.standard_normal((1500, n)) @ (rng.standard_normal((n, n)) * np.exp(-np.arange(n) / 15.0))
    x *= np.exp(0.6 * rng.standard_normal(n))
    return np.asarray(hs.regularize(x.T @ x, 1e-2), np.float64)


def _herr(e, h):
    return float(np.sum((e @ h) * e))


def test_identity_h_is_truncated_svd():
    a = _a()
    eye = jnp.eye(N, dtype=jnp.float32)
    l, r = jax.jit(functools.partial(lowrank.weighted_lowrank, rank=R))(jnp.asarray(a, jnp.float32), eye, eye)
    u, s, vt = np.linalg.svd(a)
    ref = (u[:, :R] * s[:R]) @ vt[:R]
    np.testing.assert_allclose(np.asarray(l @ r, np.float64), ref, atol=1e-5)


def test_weighted_closed_form_is_optimal():
    """||(A − LR) H^{1/2}||² equals the tail of A H^{1/2}'s squared singular values (float64)."""
    a, h = _a(1), _h(1)
    hsq, hisq = jax.jit(hs.sqrt_and_inv_sqrt)(jnp.asarray(h, jnp.float32))
    l, r = jax.jit(lowrank.weighted_lowrank, static_argnums=3)(jnp.asarray(a, jnp.float32), hsq, hisq, R)
    lam, v = np.linalg.eigh(h)
    s = np.linalg.svd(a @ (v * np.sqrt(lam)) @ v.T, compute_uv=False)
    opt = float(np.sum(s[R:] ** 2))
    got = _herr(a - np.asarray(l @ r, np.float64), h)
    assert abs(got - opt) <= 1e-4 * _herr(a, h), (got, opt)


def test_randomized_svd_close_to_exact():
    a = _a(2, m=200, n=300)
    eye = jnp.eye(300, dtype=jnp.float32)
    f = jax.jit(lowrank.weighted_lowrank, static_argnums=(3, 4))
    le, re = f(jnp.asarray(a, jnp.float32), eye, eye, 16, "exact")
    lr_, rr = f(jnp.asarray(a, jnp.float32), eye, eye, 16, "randomized", jax.random.PRNGKey(0))
    ee = np.linalg.norm(a - np.asarray(le @ re))
    er = np.linalg.norm(a - np.asarray(lr_ @ rr))
    assert er <= ee * (1 + 1e-2), (er, ee)          # 2 power iterations: within 1% of exact
    assert lowrank.svd_method_for((1024, 1024), 64) == "randomized"
    assert lowrank.svd_method_for((64, 96), 8) == "exact"


@functools.partial(jax.jit, static_argnames=("spec", "iters"))
def _lr(a, h, hsq, hisq, fac_r, *, spec, iters):
    return lowrank.lr_step(a, h, hsq, hisq, rank=R, spec_l=spec, spec_r=spec, fac_r=fac_r,
                           lplr_iters=iters)


def test_lplr_quantized_factors():
    a, h = _a(3), _h(3)
    aj, hj = jnp.asarray(a, jnp.float32), jnp.asarray(h, jnp.float32)
    hsq, hisq = jax.jit(hs.sqrt_and_inv_sqrt)(hj)
    spec = qb.QuantSpec("uniform", 3, 8)
    fac_r = jax.jit(ldlq.factors_for, static_argnums=1)(hj, spec)
    res1 = _lr(aj, hj, hsq, hisq, fac_r, spec=spec, iters=1)
    res4 = _lr(aj, hj, hsq, hisq, fac_r, spec=spec, iters=4)
    for res in (res1, res4):
        e = a - np.asarray(res.l_hat, np.float64) @ np.asarray(res.r_hat, np.float64)
        assert abs(float(res.err) - _herr(e, h)) <= 1e-4 * _herr(a, h)      # reported error is real
        np.testing.assert_array_equal(np.asarray(qb.dequantize(res.l_store)), np.asarray(res.l_hat))
        np.testing.assert_array_equal(np.asarray(qb.dequantize(res.r_store)), np.asarray(res.r_hat))
        assert float(res.err) < _herr(a, h)                                   # better than L = R = 0
    assert float(res4.err) <= float(res1.err) * (1 + 1e-6)                    # best pair is kept
    # quantized factors cost something over the unquantized optimum, but not much at 3 bits
    l, r = jax.jit(lowrank.weighted_lowrank, static_argnums=3)(aj, hsq, hisq, R)
    opt = _herr(a - np.asarray(l @ r, np.float64), h)
    assert opt <= float(res4.err) < opt + 0.25 * (_herr(a, h) - opt)


def test_bf16_factors():
    a, h = _a(4), _h(4)
    aj, hj = jnp.asarray(a, jnp.float32), jnp.asarray(h, jnp.float32)
    hsq, hisq = jax.jit(hs.sqrt_and_inv_sqrt)(hj)
    res = _lr(aj, hj, hsq, hisq, None, spec=None, iters=5)
    assert res.l_store.dtype == jnp.bfloat16 and res.r_store.dtype == jnp.bfloat16
    l, r = jax.jit(lowrank.weighted_lowrank, static_argnums=3)(aj, hsq, hisq, R)
    opt = _herr(a - np.asarray(l @ r, np.float64), h)
    assert float(res.err) <= opt * 1.01
