"""The QLR kernels against a float64 numpy reference of the dequantized matrix.

Backends that run on this CPU: "xla"; "pallas" in interpret mode (the GPU kernels' own code);
the Triton kernel body in Triton's interpreter (TRITON_INTERPRET=1 on torch CPU tensors, needs
`pip install triton==3.6.0`). GPU-only paths (compiled Pallas, jax-triton) skip with a reason.

The reference is built here from the packed arrays with numpy bit operations following the layout
docstrings of caldera_jax/formats (not through packing.dequantize), in float64, with dense Hadamard matrices.
Weights carry random codes (every bit pattern, including the ignored columns past n), shapes are
odd (n not a multiple of any tile, rank not a multiple of the factor group, non-power-of-two group
sizes), rows 1, 3, 16 (GEMV path) and 70 (GEMM path). Interpret-mode outputs start as NaN and the
Triton interpreter's outputs are NaN-poisoned, so an unwritten element fails the comparison.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported anywhere

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.formats import e8p, packing
from caldera_jax.formats import incoherence as inc
from caldera_jax.kernels import hadamard, qlr_pallas, select
from caldera_jax.kernels.qlr import BACKENDS, qlr_linear
from caldera_jax.kernels.qlr_random import random_qlr

HAVE_TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = jax.default_backend() == "gpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}   # max error / max |ref|
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
ROWS = (1, 3, 16, 70)

# name: (m, n, Q format, rank, factor format, incoherent)
CASES = {
    "e8p2+u4g4 r5 inco": (48, 160, "e8p2", 5, "u4g4", True),        # the 2-bit format
    "u3g32+u4g8 r13": (37, 200, "u3g32", 13, "u4g8", False),
    "u4g7a+u3g4 r6 inco": (56, 96, "u4g7a", 6, "u3g4", True),        # gather path for the groups
    "u2g16+bf16 r7": (33, 72, "u2g16", 7, "bf16", False),
    "u8g128+u2g2a r3": (20, 136, "u8g128", 3, "u2g2a", False),      # group longer than the tile
    "e8p3+u4g4 r3 inco": (20, 96, "e8p3", 3, "u4g4", True),
    "e8p4+u4g4 r3": (24, 40, "e8p4", 3, "u4g4", False),
    "u4g16 r0": (9, 13, "u4g16", 0, "u4g4", False),
    "fp4+u4g4 r5 inco": (48, 160, "fp4", 5, "u4g4", True),          # NVFP4-like Q
    "fp4 r0": (9, 45, "fp4", 0, "u4g4", False),                     # odd n: half-used byte, partial group
}
# every (case, rows, dtype) would be 96 interpret-mode compiles; each case gets a GEMV and (mostly)
# the GEMM path, and over all cases every rows value meets every dtype
f32, bf16, f16 = DTYPES
COMBOS = {
    "e8p2+u4g4 r5 inco": [(1, f32), (70, bf16)],
    "u3g32+u4g8 r13": [(3, bf16), (70, f16)],
    "u4g7a+u3g4 r6 inco": [(16, f16), (70, f32)],
    "u2g16+bf16 r7": [(1, bf16), (70, f16)],
    "u8g128+u2g2a r3": [(3, f16), (70, bf16)],
    "e8p3+u4g4 r3 inco": [(16, f32), (70, bf16)],
    "e8p4+u4g4 r3": [(1, f16), (70, f32)],
    "u4g16 r0": [(16, bf16), (3, f32)],
    "fp4+u4g4 r5 inco": [(1, f32), (70, bf16)],
    "fp4 r0": [(3, f16), (70, f32)],
}


def _weight(name, seed=0):
    m, n, q, r, f, inco = CASES[name]
    return random_qlr(np.random.default_rng(seed), m, n, q, rank=r, factors=f, incoherent=inco)


# ----------------------------------------------------------------------------- float64 reference

def _np_uniform_codes(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    words = words.astype(np.uint64)
    m = words.shape[0]
    if bits != 3:
        K = 32 // bits
        c = (words[:, :, None] >> (np.arange(K, dtype=np.uint64) * bits)) & (2 ** bits - 1)
        return c.reshape(m, -1)[:, :n].astype(np.int64)
    w = words.reshape(m, -1, 3)
    k = np.arange(32, dtype=np.uint64)
    lo_word = np.where(k < 16, w[:, :, 0:1], w[:, :, 1:2])
    lo = (lo_word >> (2 * (k % 16))) & 3
    hi = (w[:, :, 2:3] >> k) & 1
    return (lo | (hi << 2)).reshape(m, -1)[:, :n].astype(np.int64)


def _np_e2m1(c: np.ndarray) -> np.ndarray:
    e, mb = (c >> 1) & 3, (c & 1).astype(np.float64)
    mag = np.where(e == 0, mb * 0.5, 2.0 ** (e - 1) * (1.0 + mb / 2))
    return np.where(c & 8, -mag, mag)


def _np_e4m3(b: np.ndarray) -> np.ndarray:
    e, mb = (b >> 3) & 15, (b & 7).astype(np.float64)
    v = np.where(e == 0, mb / 8 * 2.0 ** -6, (1 + mb / 8) * 2.0 ** (e - 7))
    return np.where(b & 0x80, -v, v)


def np_dequantize(pm) -> np.ndarray:
    f = pm.fmt
    m, n = f.shape
    if f.kind == "dense":
        return np.asarray(pm.codes, np.float64)
    if f.kind == "fp4":                   # formats/fp4.py: nibbles (low = even column), e4m3 bytes
        b = np.asarray(pm.codes, np.int64)
        c = np.stack([b & 15, b >> 4], -1).reshape(m, -1)[:, :n]
        s = _np_e4m3(np.asarray(pm.scales, np.int64))[:, np.arange(n) // 16]
        return np.asarray(pm.tensor_scale).item() * s * _np_e2m1(c)
    if f.kind == "uniform":
        c = _np_uniform_codes(np.asarray(pm.codes), f.bits, n).astype(np.float64)
        gi = np.arange(n) // f.group_size
        s = np.asarray(pm.scales, np.float64)[:, gi]
        if pm.zeros is None:
            return s * (c - (2 ** f.bits - 1) / 2)
        return s * c + np.asarray(pm.zeros, np.float64)[:, gi]
    v = e8p.full_codebook()[np.asarray(pm.codes, np.int64)].astype(np.float64)          # [m, n8, 8]
    if f.bits == 3:
        v = v + e8p.e8_1bit_grid()[np.asarray(pm.codes2, np.int64)] / e8p.RVQ3_GAIN
    elif f.bits == 4:
        v = v + e8p.full_codebook()[np.asarray(pm.codes2, np.int64)] / e8p.RVQ4_GAIN
    return (v.reshape(m, -1) * np.asarray(pm.scales, np.float64))[:, :n]


def np_signs(bits, n):
    b = (np.asarray(bits)[:, None] >> np.arange(8)) & 1
    return 1.0 - 2.0 * b.reshape(-1)[:n]


def reference_w(w) -> np.ndarray:
    """scale · T_outᵀ (Q + L·R) T_in in float64."""
    m, n = w.shape
    M = np_dequantize(w.q)
    if w.l is not None:
        M = M + np_dequantize(w.l) @ np_dequantize(w.r)
    if w.signs_in is not None:
        M = M @ (inc.hadamard_matrix(n).astype(np.float64) * np_signs(w.signs_in, n)[None, :] / np.sqrt(n))
    if w.signs_out is not None:
        T = inc.hadamard_matrix(m).astype(np.float64) * np_signs(w.signs_out, m)[None, :] / np.sqrt(m)
        M = T.T @ M
    return float(w.scale) * M


def _x(rows, n, dt, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((rows, n)), dt)


def _check(y, x, W, dt, what):
    ref = np.asarray(x, np.float64) @ W.T               # the input as the layer receives it
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape, what
    assert np.isfinite(y).all(), f"{what}: non-finite (unwritten?) outputs"
    err = np.abs(y - ref).max() / np.abs(ref).max()
    assert err < TOL[dt], f"{what}: rel err {err:.3g} >= {TOL[dt]}"


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("name", CASES)
def test_xla_matches_float64(name):
    """Also checks that packing.dequantize (what the xla path uses) agrees with the numpy decoder."""
    w = _weight(name)
    W = reference_w(w)
    for rows, dt in COMBOS[name] + [(3, jnp.float32)]:
        x = _x(rows, w.shape[1], dt)
        y = qlr_linear(x, w, backend="xla")
        assert y.dtype == dt
        _check(y, x, W, dt, f"xla {name} rows={rows} {jnp.dtype(dt).name}")


@pytest.mark.parametrize("name", CASES)
def test_pallas_interpret_matches_float64(name):
    w = _weight(name)
    W = reference_w(w)
    for rows, dt in COMBOS[name]:
        x = _x(rows, w.shape[1], dt)
        y = qlr_linear(x, w, backend="pallas")          # interpret=True off-GPU
        assert y.dtype == dt
        _check(y, x, W, dt, f"pallas {name} rows={rows} {jnp.dtype(dt).name}")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed (pip install triton==3.6.0) or "
                    "TRITON_INTERPRET was set to something else before the test started")
@pytest.mark.parametrize("name", CASES)
def test_triton_interpreter_matches_float64(name):
    """The raw @triton.jit kernel in Triton's interpreter, every rows value, both directions."""
    from caldera_jax.kernels import qlr_triton
    w = _weight(name)
    W = reference_w(w)
    m, n = w.shape
    for i, rows in enumerate(ROWS):
        dt = DTYPES[i % 3]
        x = _x(rows, n, dt)
        y = qlr_triton.interpreted_forward(x, w)
        assert y.dtype == dt
        _check(y, x, W, dt, f"triton-interp {name} rows={rows} {jnp.dtype(dt).name}")
        dy = _x(rows, m, dt, seed=2)
        dx = qlr_triton.interpreted_transpose(dy, w)
        _check(dx, dy, W.T, dt, f"triton-interp transposed {name} rows={rows} {jnp.dtype(dt).name}")


def test_stacked_experts_pallas():
    """A stack of 2 matrices (MoE experts): qlr_linear vmaps the Pallas kernels."""
    rng = np.random.default_rng(5)
    ws = [random_qlr(rng, 24, 40, "u4g8", rank=3, factors="u4g4", incoherent=True) for _ in range(2)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ws)
    x = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
    y = qlr_linear(x, stacked, backend="pallas")
    for e in range(2):
        _check(y[e], x[e], reference_w(ws[e]), jnp.float32, f"expert {e}")


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name,rows,dt", [("e8p2+u4g4 r5 inco", 3, jnp.float32),
                                          ("u4g7a+u3g4 r6 inco", 70, jnp.float32),
                                          ("u3g32+u4g8 r13", 16, jnp.bfloat16),
                                          ("fp4+u4g4 r5 inco", 3, jnp.float32)])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_vjp_matches_grad_of_xla_reference(name, rows, dt, backend):
    """custom VJP (dx = dy·W through the backend's transposed kernels) == jax.grad of the plain
    xla function (autodiff through dequantize + Hadamard), and == dy·W in float64."""
    w = _weight(name)
    m, n = w.shape
    x = _x(rows, n, dt)
    g = _x(rows, m, dt, seed=3)
    ref_fn = BACKENDS["xla"]                              # no custom VJP: plain autodiff
    want = jax.grad(lambda x: jnp.sum((ref_fn(x, w) * g).astype(jnp.float32)))(x)
    got = jax.grad(lambda x: jnp.sum((qlr_linear(x, w, backend=backend) * g).astype(jnp.float32)))(x)
    assert got.dtype == dt and got.shape == x.shape
    scale = np.abs(np.asarray(want, np.float64)).max()
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max() / scale
    assert err < TOL[dt], f"{backend} vjp vs grad(xla): {err:.3g}"
    _check(got, g, reference_w(w).T, dt, f"{backend} vjp vs float64")


def test_weight_gets_zero_cotangent():
    w = _weight("u2g16+bf16 r7")
    x = _x(3, w.shape[1], jnp.float32)
    gw = jax.grad(lambda w: jnp.sum(qlr_linear(x, w, backend="xla")), allow_int=True)(w)
    assert float(jnp.abs(gw.scale)) == 0.0 and float(jnp.abs(gw.l.codes.astype(jnp.float32)).max()) == 0.0


# ----------------------------------------------------------------------------- Hadamard

@pytest.mark.parametrize("n", [48, 160, 576, 2752])
def test_fwht_pallas_and_xla_match_dense(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n))
    sp, so = rng.choice([-1.0, 1.0], n), rng.choice([-1.0, 1.0], n)
    bp, bo = packing.pack_signs(jnp.asarray(sp)), packing.pack_signs(jnp.asarray(so))
    H = inc.hadamard_matrix(n).astype(np.float64)
    a, b, HA, HB = hadamard.split(n)
    assert a * b == n
    if n <= 576:
        np.testing.assert_array_equal(np.kron(HA, HB), H)
    for transpose in (False, True):
        Hm = H if transpose else H.T
        ref = ((x * sp) @ Hm) / np.sqrt(n) * so * 0.5
        for backend in ("xla", "pallas"):
            y = hadamard.fwht(jnp.asarray(x, jnp.float32), pre_bits=bp, post_bits=bo, transpose=transpose,
                              scale=0.5, backend=backend)
            np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=2e-5 * np.abs(ref).max(),
                                       err_msg=f"{backend} transpose={transpose}")
    # the module's in/out helpers are the incoherence rotations
    xi = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(np.asarray(hadamard.transform_in(xi, bp, backend="pallas")),
                               np.asarray(inc.transform_in(xi, jnp.asarray(sp, jnp.float32))), atol=1e-5)


# ----------------------------------------------------------------------------- selection, GPU-only

def test_select_cpu_is_xla_and_table_lookup():
    w = _weight("e8p2+u4g4 r5 inco")
    x = _x(1, w.shape[1], jnp.float32)
    if not ON_GPU:
        assert select.choose(x, w) == "xla"
    assert select.format_key(w) == "e8p2+u4g4r5"
    assert select.format_key(_weight("fp4+u4g4 r5 inco")) == "fp4+u4g4r5"
    entries = [dict(device="dev", format="e8p2+u4g4r5", m=4096, n=4096, rows=1, us={"xla": 40.0, "pallas": 9.0}),
               dict(device="dev", format="e8p2+u4g4r5", m=4096, n=4096, rows=4096, us={"xla": 900.0, "pallas": 1200.0}),
               dict(device="other", format="e8p2+u4g4r5", m=48, n=160, rows=1, us={"triton": 1.0})]
    assert select.lookup("dev", "e8p2+u4g4r5", 4096, 4096, 2, entries)["rows"] == 1
    assert select.lookup("dev", "e8p2+u4g4r5", 4096, 11008, 2000, entries)["rows"] == 4096
    assert select.lookup("dev", "u4g64+u4g64r64", 4096, 4096, 1, entries) is None


def test_backend_is_an_argument_not_the_environment(monkeypatch):
    """The backend reaches qlr_linear as an argument: the weight's own `backend` (set for a whole
    tree by linear.with_backend) through linear.apply. The environment is never read, so a variable
    set after (or before) tracing changes nothing."""
    from caldera_jax import linear
    from caldera_jax.kernels.qlr import register_backend
    w = _weight("u4g16 r0")
    x = _x(2, w.shape[1], jnp.float32)
    monkeypatch.setenv("CALDERA_QLR_BACKEND", "pallas")
    if not ON_GPU:
        assert select.choose(x, w) == "xla"
    seen = []
    register_backend("spy", lambda x, w: seen.append(w.backend) or BACKENDS["xla"](x, w))
    try:
        params = {"a": {"weight": w}, "b": jnp.ones(3)}
        forced = linear.with_backend(params, "spy")
        assert forced["a"]["weight"].backend == "spy" and params["a"]["weight"].backend == "auto"
        y = linear.apply(x, forced["a"]["weight"])
        assert seen == ["spy"]
        _check(y, x, reference_w(w), jnp.float32, "forced backend")
        with pytest.raises(ValueError, match="unknown backend 'nope'"):
            linear.with_backend(params, "nope")
    finally:
        BACKENDS.pop("spy")


def test_triton_backend_through_jax_triton():
    from caldera_jax.kernels import qlr_triton
    ok, why = qlr_triton.available()
    if not ok:
        pytest.skip(f"GPU only: {why}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        # this process imported triton in interpreter mode (set above for the kernel-body tests): its
        # @triton.jit functions are interpreted ones, which jax-triton refuses ("`kernel` must be a
        # Triton `JITFunction`", seen on an H200): the same test in a fresh process, interpreter off
        import subprocess
        import sys
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            f"{__file__}::test_triton_backend_through_jax_triton"], env=env, capture_output=True,
                           text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
        return
    w = _weight("e8p2+u4g4 r5 inco")
    for rows, dt in ((1, jnp.bfloat16), (70, jnp.bfloat16), (16, jnp.float32)):
        x = _x(rows, w.shape[1], dt)
        _check(qlr_linear(x, w, backend="triton"), x, reference_w(w), dt, f"triton rows={rows}")


def test_pallas_compiled_on_gpu():
    if not ON_GPU:
        pytest.skip(f"GPU only: compiled Pallas (Triton lowering) needs a GPU; this is {jax.default_backend()} "
                    "(the same kernels ran above in interpret mode)")
    for name in ("e8p2+u4g4 r5 inco", "u3g32+u4g8 r13"):
        w = _weight(name)
        for rows, dt in ((1, jnp.bfloat16), (16, jnp.bfloat16), (70, jnp.bfloat16), (70, jnp.float32)):
            x = _x(rows, w.shape[1], dt)
            _check(qlr_pallas.qlr_forward(x, w, interpret=False), x, reference_w(w), dt, f"{name} rows={rows}")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton compiler (pip install triton==3.6.0)")
def test_kernels_build_for_sm90_offline(tmp_path):
    """No GPU needed: the Pallas kernels lower for "cuda" (Pallas' Triton lowering) and their TTIR,
    like the raw Triton kernel, compiles to an sm_90 cubin with the pip triton, without spills.
    (bench/qlr_gpu_compile.py runs the full grid and prints registers / instruction mix.)"""
    import json
    import subprocess
    import sys
    from bench.qlr_gpu_compile import pallas_rows
    w = random_qlr(np.random.default_rng(0), 256, 320, "e8p2", rank=16, factors="u4g64", incoherent=True)
    rows = pallas_rows(w, [1], qlr_pallas.DEFAULT_TILES)
    # the raw Triton kernel: in a fresh process, since TRITON_INTERPRET=1 (set above) turns every
    # @triton.jit function into an interpreted one that cannot be compiled
    out = tmp_path / "c.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "bench.qlr_gpu_compile", "--impl", "triton", "--shape", "256x320",
                    "--formats", "e8p2", "--rank", "16", "--rows", "64", "--out", str(out)],
                   check=True, env=env, capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    rows += json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} >= {"fwht", "qlr_gemv", "qlr_gemv_t", "main"}
    for r in rows:
        assert r["ok"], r
        assert r.get("stack", 0) == 0, f"spills: {r}"
    assert any(r["HGMMA"] for r in rows if r["impl"] == "triton"), "prefill dot should use wgmma"
