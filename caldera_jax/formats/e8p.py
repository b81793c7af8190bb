"""E8P: the QuIP# 2-bit E8 lattice codebook (2^16 codewords over 8 weights), and residual (RVQ)
versions for 3 and 4 bits.

Codebook (constructed here, not copied):
  S = 256 "absolute value" patterns a in (Z + 1/2)^8, a > 0: all 227 with |a|^2 <= 10, plus the first
      29 (in itertools.combinations order of the positions of the three 1/2's) of the 56 patterns
      with five 3/2's and three 1/2's (|a|^2 = 12).
  codeword(a, signs, shift) = signs * a + shift * 1/4, shift in {-1, +1}, with the parity rule:
      number of negative signs == sum(a) (mod 2).  Then signs*a is in D8 + 1/2 (even coordinate sum),
      and the codebook is a subset of E8 + 1/4 (D8+1/2+1/4 union D8+1/4).
  16-bit code:  bits 15..8 = index of a in S, bits 7..1 = bit j set <=> coordinate j negative
      (j = 1..7), bit 0 = shift (1: +1/4, 0: -1/4); the sign of coordinate 0 follows from parity.

Nearest codeword (exact, through the structure; never a search over the 2^16 codewords): for each
shift t, y = x - t, u = |y|. For a pattern a, the best signs are sign(y), distance
|u - a|^2, if that sign pattern has a's parity; otherwise one sign must flip, the cheapest being
j = argmin_j u_j a_j, adding 4 u_j a_j. So the search is over 2 shifts x 256 patterns (a [.,8]x[8,256]
matmul plus a min over 8 coordinates), and picks the smallest distance. This is exact (tests compare
with brute force over all 2^16 codewords); QuIP#'s own fast path only tries flipping coordinate 0
or a coordinate whose pattern value is 1/2.

Scale: weights are divided by a per-row scale s = rms(row) / E8P_OPT_SCALE before rounding, so a
unit-variance row is quantized as E8P(1.03 x) / 1.03 (MSE per coordinate ~0.091 on N(0,1)).

Residual versions (RVQ, as QuIP#): stage 2 quantizes the stage-1 residual, multiplied by a fixed
gain, with its own codebook:
  4 bits: stage 2 = E8P again (16 bits / 8 weights), gain RVQ4_GAIN.
  3 bits: stage 2 = "E8-1bit", 256 points of E8 (the origin, the 240 roots of norm^2 2, and 15 of the
          16 vectors +-2 e_i: all but -2 e_7), 8 bits / 8 weights, gain RVQ3_GAIN, found by brute
          force over its 256 entries.
  value = s_row * (c1 + c2 / gain).   Codes: [m, n/8, stages] int32 (stage 2 in 0..2^16 or 0..255).

LDLQ block 8 (one vector); LDLQ rounds with `ldlq_round`, a re-laid-out copy of the exact nearest
search (`nearest_e8p_fast`: same codes, ~2x faster on XLA:CPU for LDLQ's many small calls).

Packed (b = 2, 3, 4): one 16-bit index per 8 consecutive columns (columns padded to a multiple of 8
with zeros):
    codes : uint16 [m, ceil(n/8)]           E8P index (bits 15..8 pattern of the 256x8 table
                                            abs_grid(), bits 7..1 signs of coords 1..7, bit 0
                                            shift +-1/4; sign of coord 0 from parity)
    codes2: None                   (2 bits)
            uint8  [m, ceil(n/8)]  (3 bits) index into e8_1bit_grid() (256x8 table)
            uint16 [m, ceil(n/8)]  (4 bits) second E8P index
    scales: float16 [m, 1]                  w[8 cols] = scale * (cb1[codes] + cb2[codes2] / gain)
  The codebooks are not stored per matrix: abs_grid() / e8_1bit_grid() are 8 KiB constant tables.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats.base import Quantizer
from caldera_jax.formats.packing import PackedFormat, PackedMatrix
from caldera_jax.formats.quant import QuantParams, QuantSpec, QuantizedMatrix
from caldera_jax.formats.uniform import F16_TINY, to_f16

KIND = "e8p"
BITS = (2, 3, 4)

E8P_OPT_SCALE = 1.03
# Gains of the residual stage, chosen by a sweep on N(0, 1) data (MSE per coordinate at scale 1.03:
# 2 bits 0.0914; 3 bits 0.0299 (gains 1.7 / 2.0 / 2.3: 0.0314 / 0.0299 / 0.0311);
# 4 bits 0.0097 (gains 3.2 / 3.45 / 3.7: 0.0097 / 0.0097 / 0.0100), for the codebooks below.
RVQ4_GAIN = 3.45          # stage-1 residual is multiplied by this before stage 2 (4 bits)
RVQ3_GAIN = 2.0           # same, 3 bits (E8-1bit stage)


@functools.lru_cache(maxsize=None)
def abs_grid() -> np.ndarray:
    """S: [256, 8] float32 positive half-integer patterns (see module docstring)."""
    pats = []
    for k in itertools.product(range(3), repeat=8):      # coordinates 1/2, 3/2, 5/2
        a = np.array(k, np.float64) + 0.5
        if (a * a).sum() <= 10:
            pats.append(a)
    pats.sort(key=lambda a: ((a * a).sum(), tuple(a)))
    assert len(pats) == 227, len(pats)
    extra = []
    for halves in itertools.combinations(range(8), 3):
        a = np.full(8, 1.5)
        a[list(halves)] = 0.5
        extra.append(a)
    grid = np.stack(pats + extra[:29]).astype(np.float32)
    assert len(np.unique(grid, axis=0)) == 256
    return grid


@functools.lru_cache(maxsize=None)
def abs_parity() -> np.ndarray:
    """[256] int32: sum(a) mod 2 = required parity of the number of negative signs."""
    return (abs_grid().sum(1).round().astype(np.int64) % 2).astype(np.int32)


def decode_np(codes: np.ndarray) -> np.ndarray:
    """codes (any shape, 0..65535) -> [..., 8] float32 codewords (numpy reference)."""
    codes = np.asarray(codes, np.int64)
    a = abs_grid()[codes >> 8]
    bits = (codes[..., None] >> np.arange(8)) & 1            # bit j -> coordinate j (j>=1)
    neg = bits.copy()
    neg[..., 0] = (bits[..., 1:].sum(-1) + abs_parity()[codes >> 8]) % 2
    shift = np.where(codes & 1, 0.25, -0.25)
    return (np.where(neg, -a, a) + shift[..., None]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def full_codebook() -> np.ndarray:
    """All 2^16 codewords [65536, 8] (index = code); for tests and kernels' lookup tables."""
    return decode_np(np.arange(2 ** 16))


@jax.jit
def decode(codes: jax.Array) -> jax.Array:
    """int codes [...] -> [..., 8] float32 (jittable, via the 256x8 pattern table)."""
    codes = codes.astype(jnp.int32)
    a = jnp.asarray(abs_grid())[codes >> 8]
    par = jnp.asarray(abs_parity())[codes >> 8]
    bits = (codes[..., None] >> jnp.arange(8, dtype=jnp.int32)) & 1
    neg0 = (jnp.sum(bits[..., 1:], axis=-1) + par) % 2
    neg = jnp.concatenate([neg0[..., None], bits[..., 1:]], axis=-1)
    shift = jnp.where((codes & 1) == 1, 0.25, -0.25)
    return jnp.where(neg == 1, -a, a) + shift[..., None]


def _first_argmin(d: jax.Array) -> jax.Array:
    """argmin over the last axis (first index among ties) via two plain reductions; XLA:CPU's
    variadic argmin reduction is ~3x slower here."""
    k = d.shape[-1]
    dm = jnp.min(d, axis=-1, keepdims=True)
    return jnp.min(jnp.where(d == dm, jnp.arange(k, dtype=jnp.int32), k), axis=-1)


CHUNK = 4096     # vectors per step when one call quantizes many (bounds the [N, 2, 256, 8] temporary)


def _chunked(fn, x: jax.Array, n_out: int):
    """Applies fn (x [N, 8] -> tuple of [N, ...]) in chunks of CHUNK vectors."""
    N = x.shape[0]
    if N <= CHUNK:
        return fn(x)
    nc = -(-N // CHUNK)
    xp = jnp.pad(x, ((0, nc * CHUNK - N), (0, 0))).reshape(nc, CHUNK, 8)
    outs = jax.lax.map(fn, xp)
    return tuple(o.reshape((nc * CHUNK,) + o.shape[2:])[:N] for o in outs)


def _nearest_e8p_flat(x: jax.Array):
    A = jnp.asarray(abs_grid())                        # [256, 8]
    par = jnp.asarray(abs_parity())                    # [256]
    y = jnp.stack([x + 0.25, x - 0.25], axis=1)        # [N, 2, 8]: shift -1/4 (bit 0), +1/4 (bit 1)
    u = jnp.abs(y)
    neg = (y < 0).astype(jnp.int32)
    p = jnp.sum(neg, axis=-1) % 2                      # [N, 2] parity of sign(y)
    dist = (jnp.sum(A * A, -1) - 2.0 * jnp.einsum("nsj,kj->nsk", u, A)
            + jnp.sum(u * u, -1, keepdims=True))       # [N, 2, 256]: |u - a|^2
    flip_cost = jnp.min(u[:, :, None, :] * A, axis=-1)  # [N, 2, 256]: min_j u_j a_j
    dist = dist + jnp.where(par != p[..., None], 4.0 * flip_cost, 0.0)
    k = _first_argmin(dist.reshape(-1, 512))           # [N]
    shift, ai = k // 256, k % 256
    u_s = jnp.where((shift == 1)[:, None], u[:, 1], u[:, 0])
    neg_s = jnp.where((shift == 1)[:, None], neg[:, 1], neg[:, 0])
    p_s = jnp.where(shift == 1, p[:, 1], p[:, 0])
    a = A[ai]                                          # [N, 8]
    jflip = _first_argmin(u_s * a)
    flip = (jnp.arange(8)[None, :] == jflip[:, None]) & (par[ai] != p_s)[:, None]
    neg_s = jnp.where(flip, 1 - neg_s, neg_s)
    code = (ai << 8) | jnp.sum(neg_s[:, 1:] << jnp.arange(1, 8, dtype=jnp.int32), axis=-1) | shift
    cw = jnp.where(neg_s == 1, -a, a) + jnp.where(shift == 1, 0.25, -0.25)[:, None]
    return cw, code.astype(jnp.int32)


@jax.jit
def nearest_e8p(x: jax.Array):
    """Nearest E8P codeword of each 8-vector. x [..., 8] -> (codeword [..., 8], code [...] int32)."""
    shp = x.shape[:-1]
    cw, code = _chunked(_nearest_e8p_flat, x.reshape(-1, 8).astype(jnp.float32), 2)
    return cw.reshape(shp + (8,)), code.reshape(shp)


@functools.lru_cache(maxsize=None)
def e8_1bit_grid() -> np.ndarray:
    """256 points of E8 for the 1-bit residual stage: origin, 240 roots, +-2 e_i except -2 e_7."""
    pts = [np.zeros(8)]
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1, -1), repeat=2):
            v = np.zeros(8); v[i] = 2 * si; v[j] = 2 * sj
            pts.append(v / 2 * 1.0)
    for s in itertools.product((1, -1), repeat=8):
        if s.count(-1) % 2 == 0:
            pts.append(np.array(s, np.float64) / 2)
    for i in range(8):
        for sg in (1, -1):
            if not (i == 7 and sg == -1):
                v = np.zeros(8); v[i] = 2 * sg; pts.append(v)
    grid = np.stack(pts).astype(np.float32)
    assert grid.shape == (256, 8) and len(np.unique(grid, axis=0)) == 256
    return grid


@jax.jit
def nearest_e8_1bit(x: jax.Array):
    """Nearest of the 256 E8-1bit points (brute force over 256). x [..., 8] -> (point, code)."""
    shp = x.shape[:-1]
    G = jnp.asarray(e8_1bit_grid())

    def one(v):
        return (_first_argmin(jnp.sum(G * G, -1)[None, :] - 2.0 * (v @ G.T)),)
    (code,) = _chunked(one, x.reshape(-1, 8).astype(jnp.float32), 1)
    return G[code].reshape(shp + (8,)), code.reshape(shp)


def _stage_fns(spec: QuantSpec):
    if spec.bits == 2:
        return []
    if spec.bits == 4:
        return [(nearest_e8p, decode, RVQ4_GAIN)]
    return [(nearest_e8_1bit, lambda c: jnp.asarray(e8_1bit_grid())[c], RVQ3_GAIN)]


def quantize_vectors(x: jax.Array, spec: QuantSpec):
    """x [..., 8] already divided by the scale -> (x_hat [..., 8], codes [..., stages])."""
    cw, c = nearest_e8p(x)
    codes = [c]
    xh = cw
    for near, _, gain in _stage_fns(spec):
        cw2, c2 = near((x - xh) * gain)
        xh = xh + cw2 / gain
        codes.append(c2)
    return xh, jnp.stack(codes, axis=-1)


def decode_vectors(codes: jax.Array, spec: QuantSpec) -> jax.Array:
    """codes [..., stages] -> [..., 8] (unscaled)."""
    xh = decode(codes[..., 0])
    for s, (_, dec, gain) in enumerate(_stage_fns(spec)):
        xh = xh + dec(codes[..., s + 1]) / gain
    return xh


def fit(w: jax.Array, spec: QuantSpec) -> QuantParams:
    m, n = w.shape
    rms = jnp.sqrt(jnp.mean(w * w, axis=1, keepdims=True))
    s = to_f16(jnp.maximum(rms / E8P_OPT_SCALE, F16_TINY))
    return QuantParams(jnp.maximum(s, F16_TINY), None, spec, (m, n))


def round_block(w_block: jax.Array, params: QuantParams, col0, spec: QuantSpec):
    m, b = w_block.shape
    if b % 8:
        raise ValueError(f"e8p round_block needs a multiple of 8 columns, got {b}")
    s = params.scales                                  # [m, 1]
    xh, codes = quantize_vectors((w_block / s).reshape(m, b // 8, 8), spec)
    return xh.reshape(m, b) * s, codes


def dequantize(qm: QuantizedMatrix) -> jax.Array:
    """[..., m, n] f32 (any leading stack axes)."""
    m, n = qm.shape
    xh = decode_vectors(qm.codes, qm.spec)             # [..., m, n8, 8]
    return (xh.reshape(xh.shape[:-2] + (-1,)) * qm.scales)[..., :n]


def theoretical_bits(fmt) -> float:
    """codes + one fp16 scale per row (n a multiple of 8)."""
    return fmt.bits + 16.0 / fmt.shape[1]


# ---------------------------------------------------------------- LDLQ: faster nearest search

def nearest_e8p_fast(x: jax.Array):
    """Nearest E8P codeword of each row of x [N, 8] -> (codeword [N, 8], code [N] int32).

    The same exact search as nearest_e8p (2 shifts x 256 absolute-value patterns, parity fixed
    by the cheapest sign flip, first index among ties), laid out for XLA:CPU: the flip cost
    min_j u_j a_j is reduced over a *major* axis ([N, 2, 8, 256] -> [N, 2, 256]) so it vectorises
    over the 256 patterns, and the codeword is assembled directly instead of decoded from the code.
    ~2x faster than nearest_e8p on 1024 vectors; LDLQ rounds one [m, 8] block at a time,
    2·(1 + sweeps) times per column block, so this is most of its run time.
    tests/test_ldlq.py checks the codes against nearest_e8p."""
    a = jnp.asarray(abs_grid())                               # [256, 8]
    par = jnp.asarray(abs_parity())                           # [256]
    y = jnp.stack([x + 0.25, x - 0.25], axis=1)               # [N, 2, 8]: shift -1/4, +1/4
    u = jnp.abs(y)
    neg = (y < 0).astype(jnp.int32)
    p = jnp.sum(neg, axis=-1) % 2                             # [N, 2]
    dist = (jnp.sum(a * a, -1) - 2.0 * jnp.einsum("nsj,kj->nsk", u, a)
            + jnp.sum(u * u, -1, keepdims=True))              # [N, 2, 256]
    flip = jnp.min(u[:, :, :, None] * a.T[None, None], axis=2)   # [N, 2, 256]
    dist = dist + jnp.where(par != p[..., None], 4.0 * flip, 0.0)
    d = dist.reshape(-1, 512)
    k = jnp.min(jnp.where(d == jnp.min(d, axis=-1, keepdims=True),
                          jnp.arange(512, dtype=jnp.int32), 512), axis=-1)
    shift, ai = k // 256, k % 256
    plus = (shift == 1)[:, None]
    u_s = jnp.where(plus, u[:, 1], u[:, 0])
    neg_s = jnp.where(plus, neg[:, 1], neg[:, 0])
    p_s = jnp.where(shift == 1, p[:, 1], p[:, 0])
    a_s = a[ai]                                               # [N, 8]
    prod = u_s * a_s
    jflip = jnp.min(jnp.where(prod == jnp.min(prod, axis=-1, keepdims=True),
                              jnp.arange(8, dtype=jnp.int32), 8), axis=-1)
    fl = (jnp.arange(8)[None, :] == jflip[:, None]) & (par[ai] != p_s)[:, None]
    neg_s = jnp.where(fl, 1 - neg_s, neg_s)
    # sign of coordinate 0 is implied by parity in the code; the codeword uses the actual signs
    code = (ai << 8) | jnp.sum(neg_s[:, 1:] << jnp.arange(1, 8, dtype=jnp.int32), axis=-1) | shift
    cw = jnp.where(neg_s == 1, -a_s, a_s) + jnp.where(plus, 0.25, -0.25)
    return cw, code.astype(jnp.int32)


def ldlq_params(params: QuantParams):
    return (params.scales,)


def ldlq_round(w_block: jax.Array, col0, prm, spec: QuantSpec, n: int):
    """round_block with nearest_e8p_fast for the E8P stages (RVQ stages as quantize_vectors);
    prm = (scales [rows, 1],). Same codes and values as round_block."""
    (scales,) = prm
    m, b = w_block.shape
    x = (w_block / scales).reshape(m * (b // 8), 8)
    xh, c = nearest_e8p_fast(x)
    codes = [c]
    for near, _, gain in _stage_fns(spec):
        near = nearest_e8p_fast if near is nearest_e8p else near
        cw2, c2 = near((x - xh) * gain)
        xh = xh + cw2 / gain
        codes.append(c2)
    return xh.reshape(m, b) * scales, jnp.stack(codes, axis=-1).reshape(m, b // 8, len(codes))


# ---------------------------------------------------------------- packing

def pack(qm: QuantizedMatrix) -> PackedMatrix:
    spec = qm.spec
    codes = qm.codes[..., 0].astype(jnp.uint16)
    codes2 = None
    if spec.bits == 3:
        codes2 = qm.codes[..., 1].astype(jnp.uint8)
    elif spec.bits == 4:
        codes2 = qm.codes[..., 1].astype(jnp.uint16)
    return PackedMatrix(codes, codes2, qm.scales.astype(jnp.float16), None, PackedFormat.of(spec, qm.shape))


def unpack(pm: PackedMatrix) -> QuantizedMatrix:
    codes = [pm.codes.astype(jnp.int32)]
    if pm.codes2 is not None:
        codes.append(pm.codes2.astype(jnp.int32))
    return QuantizedMatrix(jnp.stack(codes, axis=-1), pm.scales.astype(jnp.float32), None, pm.fmt.spec,
                           pm.fmt.shape)


def array_specs(fmt: PackedFormat) -> dict:
    m, n = fmt.shape
    g8 = -(-n // 8)
    return {"codes": (frozenset({"uint16"}), (m, g8)),
            "codes2": {2: None, 3: (frozenset({"uint8"}), (m, g8)), 4: (frozenset({"uint16"}), (m, g8))}[fmt.bits],
            "scales": (frozenset({"float16"}), (m, 1))}


def format_key(fmt) -> str:
    return f"e8p{fmt.bits}"


def parse_key(s: str) -> dict | None:
    if s in ("e8p2", "e8p3", "e8p4"):
        return dict(kind=KIND, bits=int(s[3]), group_size=8, symmetric=True)
    return None


def random_packed(rng: np.random.Generator, fmt: PackedFormat, magnitude: float = 1.0) -> PackedMatrix:
    """Random 16-bit E8P indices (and E8-1bit / E8P second stage): every index is a codeword."""
    m, n = fmt.shape
    n8 = -(-n // 8)
    codes = rng.integers(0, 2 ** 16, (m, n8)).astype(np.uint16)
    codes2 = None
    if fmt.bits == 3:
        codes2 = jnp.asarray(rng.integers(0, 256, (m, n8)).astype(np.uint8))
    elif fmt.bits == 4:
        codes2 = jnp.asarray(rng.integers(0, 2 ** 16, (m, n8)).astype(np.uint16))
    scales = (magnitude / 1.5 * rng.uniform(0.5, 1.5, (m, 1))).astype(np.float16)
    return PackedMatrix(jnp.asarray(codes), codes2, jnp.asarray(scales), None, fmt)


QUANTIZER = Quantizer(
    kind=KIND, bits=BITS, block=8, vector=8, code_ndim=3, kernel_id=1,
    normalize=lambda spec: {"group_size": 8, "symmetric": True},   # one scale per row
    fit=fit, round_block=round_block, dequantize=dequantize,
    ldlq_params=ldlq_params, ldlq_round=ldlq_round,
    pack=pack, unpack=unpack, array_specs=array_specs, theoretical_bits=theoretical_bits,
    code_chunk=lambda fmt: 8, format_key=format_key, parse_key=parse_key, random_packed=random_packed)
