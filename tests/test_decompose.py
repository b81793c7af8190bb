"""CALDERA decomposition (caldera_jax.caldera.decompose): quality ordering, metrics, bad input,
vmap over a stack and sharding over 8 (fake CPU) devices.

Compiles dominate the run time, so every test reuses a handful of budgets (cached results)."""
import functools

import jax
import numpy as np
import pytest

from caldera_jax.caldera import decompose as D
from caldera_jax.caldera.hessian import HessianError
from caldera_jax.formats.qlr_weight import QLRWeight
from caldera_jax.caldera.spec import BudgetError, MatrixBudget

M, N = 64, 96          # 96 = 12·8: Hadamard-supported, E8P-aligned

BASE = MatrixBudget(b_q=2, quantizer="uniform", b_l=4, b_r=4, rank=8, group_size=32,
                    factor_group_size=8, iters=3, lplr_iters=3, requant_sweeps=2, incoherence=True)
E8P = BASE.replace(quantizer="e8p")


def _data(seed: int, m: int = M, n: int = N):
    """W with a decaying spectrum (+ noise, a few loud input columns); H from correlated,
    anisotropic Gaussian activations."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = (rng.standard_normal((m, n)) * (1.0 / (1.0 + np.arange(n) / 8.0))) @ q
    w += 0.05 * rng.standard_normal((m, n))
    w[:, rng.choice(n, 3, replace=False)] *= 4.0
    x = rng.standard_normal((2000, n)) @ (np.eye(n) + 0.4 * rng.standard_normal((n, n)) / np.sqrt(n))
    x *= np.exp(0.7 * rng.standard_normal(n))
    return w.astype(np.float32), (x.T @ x).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _run(budget: MatrixBudget, seed: int, mode: str = "ldlq"):
    w, h = _data(seed)
    qlr, met = D.decompose(w, h, budget, mode=mode)
    return qlr, {k: np.asarray(v) for k, v in met.items()}


def _herr(w, w_hat, h):
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    w = np.asarray(w, np.float64)
    return float(np.sqrt(np.sum((e @ h) * e) / np.sum((w @ h) * w)))


# ------------------------------------------------------------------------------------ quality
@pytest.mark.parametrize("budget", [BASE, E8P], ids=["uniform2", "e8p2"])
def test_caldera_never_worse_than_q_only(budget):
    for seed in range(3):
        _, m_c = _run(budget, seed)
        _, m_q = _run(budget.replace(rank=0), seed)
        assert m_c["rel_err_h"] <= m_q["rel_err_h"], (seed, m_c["rel_err_h"], m_q["rel_err_h"])
        assert m_c["rel_err_h_reg"] <= m_q["rel_err_h_reg"]
        assert m_c["bits_per_param"] > m_q["bits_per_param"]


def test_error_decreases_with_rank_and_bits():
    errs_rank = [_run(BASE.replace(rank=r), 0)[1]["rel_err_h"] for r in (0, 8, 16)]
    assert errs_rank[0] > errs_rank[1] > errs_rank[2], errs_rank
    errs_bits = [_run(BASE.replace(b_q=b, rank=0), 0)[1]["rel_err_h"] for b in (2, 3, 4)]
    assert errs_bits[0] > errs_bits[1] > errs_bits[2], errs_bits
    # bits per parameter grow with rank and bits, as the error falls
    bpp = [_run(BASE.replace(rank=r), 0)[1]["bits_per_param"] for r in (0, 8, 16)]
    assert bpp[0] < bpp[1] < bpp[2]


def test_ldlq_beats_nearest_rounding():
    for seed in range(2):
        e_ldlq = _run(BASE.replace(rank=0), seed)[1]["rel_err_h"]
        e_near = _run(BASE.replace(rank=0), seed, "nearest")[1]["rel_err_h"]
        assert e_ldlq < 0.9 * e_near, (e_ldlq, e_near)


def test_metrics_and_qlr_weight_agree():
    w, h = _data(0)
    qlr, met = _run(BASE, 0)
    assert isinstance(qlr, QLRWeight) and qlr.shape == (M, N) and qlr.rank == 8
    w_hat = np.asarray(qlr.dequantize(), np.float64)
    e = w - w_hat
    np.testing.assert_allclose(met["rel_fro"], np.linalg.norm(e) / np.linalg.norm(w), rtol=1e-4)
    np.testing.assert_allclose(met["rel_err_h"], _herr(w, w_hat, h), rtol=1e-3)
    np.testing.assert_allclose(met["corr"], np.corrcoef(w.ravel(), w_hat.ravel())[0, 1], rtol=1e-4)
    np.testing.assert_allclose(met["bits_per_param"], qlr.bits_per_param(), rtol=1e-6)
    hist = met["history"]
    assert hist.shape == (2 * BASE.iters,) and np.all(np.isfinite(hist))
    assert met["rel_err_h_reg"] == pytest.approx(hist.min(), rel=1e-6)     # best iterate is kept
    assert 0 < met["rel_err_h"] < 1 and 0.5 < met["corr"] <= 1


def test_downdate_and_q_first_options():
    b = BASE.replace(hessian_downdate=True, order="q_first")
    _, met = _run(b, 1)
    _, m_q = _run(BASE.replace(rank=0), 1)
    # q_first: the first state is exactly the Q-only decomposition, so the best can't be worse
    assert met["rel_err_h_reg"] <= m_q["rel_err_h_reg"] + 1e-6
    assert met["history"][0] == pytest.approx(m_q["rel_err_h_reg"], rel=1e-5)


def test_lattice_factors(tmp_path):
    """factor_quantizer="e8p": L and R in the E8P lattice format, stored, applied and counted as
    such; at 2-bit factors (where a lattice matters most) no worse than uniform factors, at fewer
    bits/param (E8P has one fp16 scale per row, uniform one per group of 8)."""
    from caldera_jax.kernels.qlr import qlr_linear
    w, h = _data(2)
    b2 = BASE.replace(b_l=2, b_r=2, requant_sweeps=0)
    (uni, m_uni), (lat, m_lat) = _run(b2, 2), _run(b2.replace(factor_quantizer="e8p"), 2)
    assert (lat.l.fmt.kind, lat.r.fmt.kind, lat.l.fmt.bits) == ("e8p", "e8p", 2)
    assert m_lat["rel_err_h"] <= 1.02 * m_uni["rel_err_h"] and m_lat["rel_err_h"] < 0.5
    assert lat.bits_per_param() < uni.bits_per_param()
    np.testing.assert_allclose(m_lat["rel_err_h"], _herr(w, np.asarray(lat.dequantize(), np.float64), h), rtol=1e-3)
    x = np.random.default_rng(0).standard_normal((4, N)).astype(np.float32)
    ref = x.astype(np.float64) @ np.asarray(lat.dequantize(), np.float64).T
    for backend in ("xla", "pallas"):                    # pallas: interpret mode off a GPU
        np.testing.assert_allclose(np.asarray(qlr_linear(x, lat, backend=backend)), ref, rtol=2e-3, atol=2e-3)
    from caldera_jax.checkpoints_io import compressed as ck          # stored and read back as is
    path = ck.write_layer(str(tmp_path), 0, dense={}, protected={}, quantized={"m.weight": lat}, matrices={},
                          job_digest="x")
    back = ck.read_layer(path)[1]["m.weight"]
    assert back.l.fmt == lat.l.fmt and np.array_equal(np.asarray(back.dequantize()), np.asarray(lat.dequantize()))
    with pytest.raises(BudgetError, match="factor_quantizer"):
        BASE.replace(factor_quantizer="fp4").validate()
    with pytest.raises(BudgetError, match="b_l"):
        BASE.replace(factor_quantizer="e8p", b_l=8).validate()


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    w, h = _data(0)
    b = BASE
    w_nan = w.copy(); w_nan[3, 4] = np.nan
    with pytest.raises(HessianError, match=r"W: weight has 1 NaN/Inf.*\[3, 4\]"):
        D.decompose(w_nan, h, b)
    h_inf = h.copy(); h_inf[1, 2] = np.inf
    with pytest.raises(HessianError, match="H: Hessian has .*NaN/Inf"):
        D.decompose(w, h_inf, b)
    with pytest.raises(HessianError, match="square"):
        D.decompose(w, h[:, :-1], b)
    with pytest.raises(HessianError, match=f"weight has n = {N}"):
        D.decompose(w, h[:-8, :-8], b)
    with pytest.raises(HessianError, match="not symmetric"):
        D.decompose(w, h + np.triu(np.ones_like(h)) * h.max(), b)
    lam, v = np.linalg.eigh(h.astype(np.float64))
    lam[0] = -1e-3 * lam.mean()                                   # one clearly negative eigenvalue
    with pytest.raises(HessianError, match="not positive semi-definite"):
        D.decompose(w, (v * lam) @ v.T, b)
    with pytest.raises(HessianError, match="all zeros"):
        D.decompose(np.zeros_like(w), h, b)
    with pytest.raises(HessianError, match="mean diagonal"):
        D.decompose(w, np.zeros_like(h), b)
    with pytest.raises(BudgetError, match=r"rank=97 exceeds min\(m, n\) = 64"):
        D.decompose(w, h, b.replace(rank=97))
    with pytest.raises(BudgetError, match="b_q"):
        D.decompose(w, h, b.replace(quantizer="e8p", b_q=8))
    with pytest.raises(D.DecomposeError, match="no Hadamard transform"):
        D.decompose(w[:, :90], h[:90, :90], b)
    with pytest.raises(D.DecomposeError, match="mode"):
        D.decompose(w, h, b, mode="gptq")
    with pytest.raises(D.DecomposeError, match="ws \\[E, m, n\\]"):
        D.decompose_stack(w, h, b)


# ------------------------------------------------------------------------------------ vmap / sharding
def _assert_same(met_a, met_b, parts_a, parts_b, exact: bool):
    """exact (Q only): identical codes, metrics to float rounding. Otherwise equal up to float
    reassociation: batched and unbatched matmuls/SVDs differ in the last ulp, which can flip a
    rounding decision in the quantized factors, and the iterates then drift apart a little."""
    if exact:
        for f in ("q", "l", "r"):
            a, b = getattr(parts_a, f), getattr(parts_b, f)
            np.testing.assert_array_equal(np.asarray(getattr(a, "codes", a)), np.asarray(getattr(b, "codes", b)))
    tol = 1e-5 if exact else 3e-2
    for k in ("rel_fro", "rel_err_h", "rel_err_h_reg", "corr", "history"):
        np.testing.assert_allclose(np.asarray(met_a[k]), np.asarray(met_b[k]), rtol=tol, err_msg=k)


Q_ONLY = BASE.replace(rank=0)


def test_vmap_stack_equals_per_matrix():
    """decompose_stack (jit of vmap) gives each matrix exactly what decompose gives it (Q only: the
    CALDERA budget's vmap runs inside the sharded test below)."""
    items = [_data(s) for s in range(3)]
    ws = np.stack([w for w, _ in items])
    hs_ = np.stack([h for _, h in items])
    parts, met = D.decompose_stack(ws, hs_, Q_ONLY, return_parts=True)
    assert met["history"].shape == (3, 1)
    for i, (w, h) in enumerate(items):
        p_i, m_i = D.decompose(w, h, Q_ONLY, return_parts=True)
        _assert_same(D.unstack(met, i), m_i, D.unstack(parts, i), p_i, exact=True)
    qlr = D.to_qlr(parts, Q_ONLY, (M, N))                                # stacked QLRWeight
    assert qlr.stacked and qlr.num_matrices == 3
    np.testing.assert_allclose(np.asarray(qlr.dequantize()[1]),
                               np.asarray(D.to_qlr(D.unstack(parts, 1), Q_ONLY, (M, N)).dequantize()),
                               rtol=1e-5, atol=1e-6)


def test_sharded_over_8_devices_equals_unsharded():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    items = [_data(s) for s in range(5)]              # 5 matrices: padded to 8, one per device
    mesh = jax.make_mesh((4, 2), ("ep", "dp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    for budget, exact in ((Q_ONLY, True), (BASE, False)):
        res = D.decompose_many(items, budget, mesh=mesh, return_parts=True)
        assert len(res) == 5
        for i, (w, h) in enumerate(items):
            p_i, m_i = D.decompose(w, h, budget, return_parts=True)
            _assert_same(res[i][1], m_i, res[i][0], p_i, exact)
            assert res[i][1]["bits_per_param"] == m_i["bits_per_param"]
    # mixed budgets in one call (grouped by shape and budget), QLRWeights back, input order kept
    out = D.decompose_many([items[3], items[0]], [Q_ONLY, BASE], mesh=mesh)
    assert out[0][0].rank == 0 and out[1][0].rank == 8 and out[1][0].shape == (M, N)
    np.testing.assert_allclose(out[0][1]["rel_err_h"], _run(Q_ONLY, 3)[1]["rel_err_h"], rtol=1e-5)


def test_rank_deficient_h_without_ridge_uses_robust_cholesky():
    """sigma_reg = 0 on a rank-deficient H (fewer calibration tokens than inputs, as for a rarely
    routed expert): the float32 Cholesky fails, decompose reruns with the jittered one."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 32))
    h = (x.T @ x).astype(np.float32)                                  # rank 10 of 32
    w = rng.standard_normal((16, 32)).astype(np.float32)
    b = MatrixBudget(b_q=4, quantizer="uniform", rank=0, group_size=16, incoherence=False,
                     requant_sweeps=1, sigma_reg=0.0)
    _, met = D.decompose(w, h, b)
    assert float(met["chol_jitter"]) > 0 and np.isfinite(float(met["chol_jitter"]))
    assert np.isfinite(met["rel_err_h"]) and float(met["rel_err_h"]) < 0.2
    host = D.metrics_to_host(met)
    assert isinstance(host["rel_err_h"], float) and isinstance(host["history"], list)
