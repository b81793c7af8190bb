"""QLR weights with random codes of the right shapes, straight in the packed layout (packing.py).

For kernel tests and benchmarks: every bit pattern of a uniform word, every 16-bit E8P index and
every 8-bit E8-1bit index is a valid code, so random words exercise the whole decode path
(including the ignored columns past n in the last word). Building a 14336 x 4096 weight this way
takes milliseconds, where quantizing one would take minutes on a CPU.

    fmt strings (used by bench/qlr_linear.py):  "e8p2", "e8p3", "e8p4", "u3g128", "u4g64a"
    (u<bits>g<group>[a]: uniform, asymmetric with the trailing a), "bf16" (dense).
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from caldera_jax.caldera import incoherence
from caldera_jax.caldera.qlr_weight import QLRWeight
from caldera_jax.caldera.quant import packing
from caldera_jax.caldera.quant.packing import PackedFormat, PackedMatrix


def parse_fmt(s: str) -> tuple[str, int, int, bool]:
    """-> (kind, bits, group, symmetric)."""
    if s in ("bf16", "f16", "f32"):
        return "dense", {"bf16": 16, "f16": 16, "f32": 32}[s], 0, True
    mt = re.fullmatch(r"e8p([234])", s)
    if mt:
        return "e8p", int(mt.group(1)), 8, True
    mt = re.fullmatch(r"u([2348])g(\d+)(a?)", s)
    if mt:
        return "uniform", int(mt.group(1)), int(mt.group(2)), not mt.group(3)
    raise ValueError(f"unknown format {s!r} (e8p2/3/4, u<bits>g<group>[a], bf16)")


def random_packed(rng: np.random.Generator, m: int, n: int, fmt: str, magnitude: float = 1.0) -> PackedMatrix:
    """A PackedMatrix [m, n] with random codes; values are O(magnitude)."""
    kind, bits, g, sym = parse_fmt(fmt)
    if kind == "dense":
        dt = jnp.float32 if bits == 32 else (jnp.bfloat16 if fmt == "bf16" else jnp.float16)
        return packing.pack_dense(jnp.asarray(magnitude * rng.standard_normal((m, n)), jnp.float32), dt)
    f = PackedFormat(kind, bits, g, sym, (m, n))
    if kind == "uniform":
        nw = packing.n_words(n, bits)
        codes = rng.integers(0, 2 ** 32, (m, nw), dtype=np.uint64).astype(np.uint32)
        G = -(-n // g)
        half = (2 ** bits - 1) / 2
        scales = (magnitude / half * rng.uniform(0.5, 1.5, (m, G))).astype(np.float16)
        zeros = None if sym else (-magnitude * rng.uniform(0.5, 1.5, (m, G))).astype(np.float16)
        return PackedMatrix(jnp.asarray(codes), None, jnp.asarray(scales),
                            None if zeros is None else jnp.asarray(zeros), f)
    n8 = -(-n // 8)
    codes = rng.integers(0, 2 ** 16, (m, n8)).astype(np.uint16)
    codes2 = None
    if bits == 3:
        codes2 = jnp.asarray(rng.integers(0, 256, (m, n8)).astype(np.uint8))
    elif bits == 4:
        codes2 = jnp.asarray(rng.integers(0, 2 ** 16, (m, n8)).astype(np.uint16))
    scales = (magnitude / 1.5 * rng.uniform(0.5, 1.5, (m, 1))).astype(np.float16)
    return PackedMatrix(jnp.asarray(codes), codes2, jnp.asarray(scales), None, f)


def random_qlr(rng: np.random.Generator, m: int, n: int, q: str, rank: int = 0, factors: str = "u4g64",
               incoherent: bool = True, scale: float = 0.37, backend: str = "auto") -> QLRWeight:
    """QLRWeight with random Q (format q), rank-`rank` L [m, r] / R [r, n] in format `factors`,
    random incoherence signs (only where incoherence.is_supported) and global scale."""
    qp = random_packed(rng, m, n, q)
    lp = rp = None
    if rank:
        lp = random_packed(rng, m, rank, factors, magnitude=0.5)
        rp = random_packed(rng, rank, n, factors, magnitude=0.5)
    si = so = None
    if incoherent:
        if incoherence.is_supported(n):
            si = jnp.asarray(rng.choice([-1.0, 1.0], n), jnp.float32)
        if incoherence.is_supported(m):
            so = jnp.asarray(rng.choice([-1.0, 1.0], m), jnp.float32)
    return QLRWeight.from_parts(qp, lp, rp, scale, si, so, backend=backend)


def theoretical_bits(w: QLRWeight) -> float:
    """Bits per parameter of the format: b_q + scale overhead, plus the factors' bits spread over
    the m·n parameters (packing.theoretical_bits_per_param per part), plus the signs."""
    m, n = w.shape
    total = packing.theoretical_bits_per_param(w.q.fmt) * m * n
    if w.l is not None:
        for pm in (w.l, w.r):
            a, b = pm.fmt.shape
            total += packing.theoretical_bits_per_param(pm.fmt) * a * b
    total += (m if w.signs_out is not None else 0) + (n if w.signs_in is not None else 0) + 32
    return total / (m * n)
