"""Packed layout: round trips for every bit width, group size and odd shapes; exact word layout;
bits per parameter; safetensors storage."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from caldera_jax.formats import packing
from caldera_jax.formats.packing import PackedMatrix
from caldera_jax.formats.quant import QuantSpec, dequantize, quantize

RNG = np.random.default_rng(1)


@settings(max_examples=12, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), m=st.integers(1, 3), n=st.integers(1, 70),
       seed=st.integers(0, 2 ** 16))
def test_code_words_round_trip(bits, m, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2 ** bits, (m, n))
    words = packing.pack_codes(jnp.asarray(codes), bits)
    assert words.dtype == jnp.uint32 and words.shape == (m, packing.n_words(n, bits))
    np.testing.assert_array_equal(np.asarray(packing.unpack_codes(words, bits, n)), codes)


def test_word_layout_is_the_documented_one():
    # 4 bits: column k of a word in bits 4k..4k+3, first column least significant
    c = np.arange(16) % 16
    w = np.asarray(packing.pack_codes(jnp.asarray(c[None]), 4))[0]
    assert w[0] == sum(int(c[k]) << (4 * k) for k in range(8))
    assert w[1] == sum(int(c[8 + k]) << (4 * k) for k in range(8))
    # 3 bits: 32 columns -> [lo2 of cols 0..15, lo2 of cols 16..31, hi bit of cols 0..31]
    c = np.random.default_rng(0).integers(0, 8, 40)
    w = np.asarray(packing.pack_codes(jnp.asarray(c[None]), 3))[0]
    assert w.shape == (6,)
    for chunk in range(2):
        cc = np.zeros(32, np.int64)
        part = c[32 * chunk:32 * chunk + 32]
        cc[:len(part)] = part
        assert w[3 * chunk + 0] == sum(int(cc[k] & 3) << (2 * k) for k in range(16))
        assert w[3 * chunk + 1] == sum(int(cc[16 + k] & 3) << (2 * k) for k in range(16))
        assert w[3 * chunk + 2] == sum(int(cc[k] >> 2) << k for k in range(32))
    # 2 and 8 bits
    c = np.array([1, 2, 3, 0, 3, 2, 1, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3])
    w = np.asarray(packing.pack_codes(jnp.asarray(c[None]), 2))[0]
    assert w[0] == sum(int(c[k]) << (2 * k) for k in range(16)) and w[1] == 3
    w = np.asarray(packing.pack_codes(jnp.asarray(np.array([[7, 255, 0, 1, 9]])), 8))[0]
    assert list(w) == [7 | 255 << 8 | 0 << 16 | 1 << 24, 9]


SPECS = ([QuantSpec("uniform", b, 7, s) for b in (2, 3, 4, 8) for s in (True, False)]
         + [QuantSpec("uniform", 3, 32, False), QuantSpec("uniform", 4, 64),
            QuantSpec("e8p", 2), QuantSpec("e8p", 3), QuantSpec("e8p", 4), QuantSpec("fp4", 4)])


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_pack_unpack_round_trip(spec):
    shape = (3, 45) if spec.kind == "uniform" else (5, 21)      # odd shapes
    w = jnp.asarray(RNG.standard_normal(shape).astype(np.float32))
    qm = quantize(w, spec)
    pm = packing.pack(qm)
    for a in pm.arrays().values():
        assert a.dtype in (jnp.uint8, jnp.uint16, jnp.uint32, jnp.float16, jnp.float32)
    q2 = packing.unpack(pm)
    assert q2.spec == qm.spec and q2.shape == qm.shape
    np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(qm.codes))
    np.testing.assert_array_equal(np.asarray(q2.scales), np.asarray(qm.scales))
    if qm.tensor_scale is not None:
        np.testing.assert_array_equal(np.asarray(q2.tensor_scale), np.asarray(qm.tensor_scale))
    np.testing.assert_array_equal(np.asarray(packing.dequantize(pm)), np.asarray(dequantize(qm)))
    for name, a in pm.arrays().items():                   # what the format declares (checkpoint check)
        dtypes, shape = packing.array_specs(pm.fmt)[name]
        assert np.dtype(a.dtype).name in dtypes and tuple(a.shape) == shape, name


@pytest.mark.parametrize("spec,expected", [
    (QuantSpec("uniform", 2, 64), 2 + 16 / 64),
    (QuantSpec("uniform", 3, 128, False), 3 + 32 / 128),
    (QuantSpec("uniform", 4, 32), 4 + 16 / 32),
    (QuantSpec("uniform", 8, 64, False), 8 + 32 / 64),
    (QuantSpec("e8p", 2), 2 + 16 / 256),
    (QuantSpec("e8p", 3), 3 + 16 / 256),
    (QuantSpec("e8p", 4), 4 + 16 / 256),
    (QuantSpec("fp4", 4), 4 + 8 / 16 + 32 / (16 * 256)),        # e2m1 + e4m3 per 16 + fp32 per tensor
], ids=str)
def test_bits_per_param_is_theoretical(spec, expected):
    pm = packing.pack(quantize(jnp.asarray(RNG.standard_normal((16, 256)).astype(np.float32)), spec))
    assert abs(packing.bits_per_param(pm) - expected) <= 0.02 * expected
    assert abs(packing.theoretical_bits_per_param(pm.fmt) - expected) < 1e-9
    if spec.kind == "fp4":                                      # counted exactly
        assert packing.bits_per_param(pm) == expected
    assert packing.nbytes(pm) == sum(np.asarray(a).nbytes for a in pm.arrays().values())


def test_safetensors_round_trip(tmp_path):
    mats = {"u3": quantize(jnp.asarray(RNG.standard_normal((4, 50)).astype(np.float32)),
                           QuantSpec("uniform", 3, 16, False)),
            "e4": quantize(jnp.asarray(RNG.standard_normal((4, 50)).astype(np.float32)), QuantSpec("e8p", 4)),
            "f4": quantize(jnp.asarray(RNG.standard_normal((4, 51)).astype(np.float32)), QuantSpec("fp4", 4))}
    tensors, fmts = {}, {}
    for k, qm in mats.items():
        pm = packing.pack(qm)
        fmts[k] = pm.fmt.to_json()
        tensors.update({f"{k}.{n}": np.asarray(a) for n, a in pm.arrays().items()})
    tensors["dense.codes"] = np.asarray(packing.pack_dense(jnp.ones((3, 5)) * 0.3).codes)
    save_file(tensors, str(tmp_path / "x.safetensors"))
    back = load_file(str(tmp_path / "x.safetensors"))
    for k, qm in mats.items():
        sub = {n.split(".", 1)[1]: jnp.asarray(v) for n, v in back.items() if n.startswith(k + ".")}
        pm = PackedMatrix.from_arrays(packing.PackedFormat.from_json(fmts[k]), sub)
        np.testing.assert_array_equal(np.asarray(pm.dequantize()), np.asarray(dequantize(qm)))
    assert back["dense.codes"].dtype.name == "bfloat16"


def test_dense_factor_and_signs():
    w = RNG.standard_normal((5, 9)).astype(np.float32)
    pm = packing.pack_dense(jnp.asarray(w))
    assert pm.fmt.kind == "dense" and pm.codes.dtype == jnp.bfloat16 and packing.bits_per_param(pm) == 16
    np.testing.assert_allclose(np.asarray(pm.dequantize()), w, rtol=1e-2)
    with pytest.raises(ValueError, match="dense"):
        packing.unpack(pm)
    for n in (1, 7, 8, 13, 64):
        s = np.where(RNG.random((2, n)) < 0.5, -1.0, 1.0).astype(np.float32)
        bits = packing.pack_signs(jnp.asarray(s))
        assert bits.dtype == jnp.uint8 and bits.shape == (2, -(-n // 8))
        np.testing.assert_array_equal(np.asarray(packing.unpack_signs(bits, n)), s)


def test_fp4_byte_layout_and_float64_reference():
    """FP4 packed bytes: column 2j in the low nibble of byte j, 2j+1 in the high one; the scale bytes
    are the e4m3 bit patterns; dequantizing the bytes from the e2m1 / e4m3 definitions in float64
    gives packing.dequantize."""
    import ml_dtypes
    from tests.test_quant import e2m1_np, e4m3_np
    w = RNG.standard_normal((3, 37)).astype(np.float32)
    qm = quantize(jnp.asarray(w), QuantSpec("fp4", 4))
    pm = packing.pack(qm)
    codes, b = np.asarray(qm.codes), np.asarray(pm.codes)
    assert b.dtype == np.uint8 and b.shape == (3, 19) and pm.scales.dtype == jnp.uint8 and pm.scales.shape == (3, 3)
    np.testing.assert_array_equal(b & 15, codes[:, 0::2])
    np.testing.assert_array_equal(b[:, :18] >> 4, codes[:, 1::2])
    assert np.all(b[:, 18] >> 4 == 0)                          # the missing 38th column
    np.testing.assert_array_equal(np.asarray(pm.scales),
                                  np.asarray(qm.scales).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    c = np.stack([b & 15, b >> 4], -1).reshape(3, -1)[:, :37]
    ref = np.asarray(pm.tensor_scale).item() * np.repeat(e4m3_np(np.asarray(pm.scales)), 16, axis=1)[:, :37] * e2m1_np(c)
    np.testing.assert_allclose(np.asarray(packing.dequantize(pm), np.float64), ref, rtol=2e-7, atol=0)
