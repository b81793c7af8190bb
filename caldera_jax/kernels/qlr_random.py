"""QLR weights with random codes of the right shapes, straight in the packed layout (formats/).

For kernel tests and benchmarks: every bit pattern of a uniform word, every 16-bit E8P index, every
8-bit E8-1bit index and every FP4 nibble is a valid code, so random codes exercise the whole decode
path (including the ignored columns past n in the last word). Building a 14336 x 4096 weight this
way takes milliseconds, where quantizing one would take minutes on a CPU. The random codes of each
format come from its registry entry (formats.packing.random_packed).

    fmt strings (used by bench/qlr_linear.py):  "e8p2", "e8p3", "e8p4", "u3g128", "u4g64a", "fp4"
    (u<bits>g<group>[a]: uniform, asymmetric with the trailing a), "bf16" / "f16" / "f32" (dense).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from caldera_jax.formats import incoherence, packing
from caldera_jax.formats.packing import PackedMatrix
from caldera_jax.formats.qlr_weight import QLRWeight


def parse_fmt(s: str) -> tuple[str, int, int, bool]:
    """-> (kind, bits, group, symmetric)."""
    f = packing.parse_key(s)
    return f.kind, f.bits, f.group_size, f.symmetric


def random_packed(rng: np.random.Generator, m: int, n: int, fmt: str, magnitude: float = 1.0) -> PackedMatrix:
    """A PackedMatrix [m, n] with random codes; values are O(magnitude)."""
    f = packing.parse_key(fmt, (m, n))
    dense_dtype = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}.get(fmt)
    return packing.random_packed(rng, f, magnitude, dense_dtype=dense_dtype)


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
