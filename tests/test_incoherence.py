"""Hadamard constructions, the fast transform and the incoherence rotation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.formats import incoherence as inc

RNG = np.random.default_rng(2)


@pytest.mark.parametrize("K", (1,) + inc.BASES)
def test_hadamard_orthogonal_and_fast_transform(K):
    for p in (1, 4):
        n = K * p
        H = inc.hadamard_matrix(n).astype(np.int64)
        assert set(np.unique(H)) <= {-1, 1}
        np.testing.assert_array_equal(H @ H.T, n * np.eye(n, dtype=np.int64))
        x = RNG.standard_normal((3, n))
        y = np.asarray(inc.hadamard_transform(jnp.asarray(x, jnp.float32)), np.float64)
        yt = np.asarray(inc.hadamard_transform(jnp.asarray(x, jnp.float32), transpose=True), np.float64)
        np.testing.assert_allclose(y, x @ H.T / np.sqrt(n), atol=2e-5)
        np.testing.assert_allclose(yt, x @ H / np.sqrt(n), atol=2e-5)


def test_large_power_of_two_and_leading_axes():
    n = 2 ** 12 * 3 // 3          # 4096: several dense Sylvester factors
    x = RNG.standard_normal((2, 3, n)).astype(np.float32)
    y = inc.hadamard_transform(jnp.asarray(x))
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(inc.hadamard_transform(y, transpose=True)), x, atol=1e-5)
    H = inc.hadamard_matrix(n).astype(np.float64)
    np.testing.assert_allclose(np.asarray(y[1, 2], np.float64), H @ x[1, 2] / np.sqrt(n), atol=1e-4)


@pytest.mark.parametrize("n", [9, 18, 100, 88, 0])
def test_unsupported_size_is_a_clear_error(n):
    assert not inc.is_supported(n)
    with pytest.raises(ValueError, match=f"size {n}"):
        inc.hadamard_transform(jnp.ones((2, n)))


def test_supported_model_sizes():
    for n in (576, 1536, 8960, 640, 2048, 192, 48, 16, 896, 11008, 14336, 5120, 13824):
        assert inc.is_supported(n), n


def _T(signs, n):
    return inc.hadamard_matrix(n).astype(np.float64) @ np.diag(signs) / np.sqrt(n)


def test_rotation_matches_definition_and_round_trips():
    m, n = 24, 40                                   # 24 = 12*2, 40 = 40
    w = RNG.standard_normal((m, n)).astype(np.float32)
    so, si = inc.make_signs(7, (m, n))
    so64, si64 = np.asarray(so, np.float64), np.asarray(si, np.float64)
    assert set(np.unique(so64)) <= {-1.0, 1.0} and len(np.unique(si64)) == 2
    wt = np.asarray(inc.rotate(jnp.asarray(w), so, si), np.float64)
    np.testing.assert_allclose(wt, _T(so64, m) @ w @ _T(si64, n).T, atol=1e-5)
    back = np.asarray(inc.unrotate(jnp.asarray(wt, jnp.float32), so, si))
    assert np.abs(back - w).max() < 1e-5
    # one side only
    np.testing.assert_allclose(np.asarray(inc.unrotate(inc.rotate(jnp.asarray(w), None, si), None, si)),
                               w, atol=1e-5)
    # x·Wᵀ = transform_out(transform_in(x)·W̃ᵀ)
    x = RNG.standard_normal((5, n)).astype(np.float32)
    y = inc.transform_out(inc.transform_in(jnp.asarray(x), si) @ jnp.asarray(wt, jnp.float32).T, so)
    np.testing.assert_allclose(np.asarray(y), x @ w.T, atol=1e-4)
    # Hessian: tr(E H Eᵀ) preserved
    X = RNG.standard_normal((60, n))
    Hs = X.T @ X
    E = RNG.standard_normal((m, n))
    Et = _T(so64, m) @ E @ _T(si64, n).T
    Ht = np.asarray(inc.rotate_hessian(jnp.asarray(Hs, jnp.float32), si), np.float64)
    np.testing.assert_allclose(np.trace(Et @ Ht @ Et.T), np.trace(E @ Hs @ E.T), rtol=1e-5)


def test_signs_deterministic_and_vmappable():
    a = inc.random_signs(3, 100)
    assert np.array_equal(np.asarray(a), np.asarray(inc.random_signs(3, 100)))
    assert not np.array_equal(np.asarray(a), np.asarray(inc.random_signs(4, 100)))
    w = jnp.asarray(RNG.standard_normal((3, 12, 16)).astype(np.float32))
    so, si = jax.vmap(lambda k: inc.make_signs(k, (12, 16)))(jnp.arange(3))
    r = jax.vmap(inc.rotate)(w, so, si)
    np.testing.assert_allclose(np.asarray(jax.vmap(inc.unrotate)(r, so, si)), np.asarray(w), atol=1e-5)


def test_embedded_goethals_seidel_rows_are_reproducible():
    for n in (39, 43):
        assert inc.find_goethals_seidel_rows(n) == inc._GS_ROWS[n]
