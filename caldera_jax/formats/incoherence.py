"""Incoherence processing: random ±1 signs and a fast (orthonormal) Walsh-Hadamard transform.

Definitions (used identically by the decomposition, QLRWeight.dequantize, the xla path and the kernels):

    H_n        a ±1 Hadamard matrix of order n (H Hᵀ = n I), H_n = H_K ⊗ H_{2^k}, n = K·2^k, with
               H_{2^k} Sylvester's (symmetric) and H_K one of the base matrices below (K = 1 for 2^k)
    T(s)       = H_n · diag(s) / sqrt(n)     (orthogonal; s = ±1 signs, stored packed or by seed)
    rotate:    W̃ = T(s_out) · W · T(s_in)ᵀ        (what the decomposition compresses)
    unrotate:  W  = T(s_out)ᵀ · W̃ · T(s_in)
    inputs:    x̃ = x · T(s_in)ᵀ   = hadamard_transform(x * s_in)              (row vectors x)
    outputs:   y  = ỹ · T(s_out)   = hadamard_transform(ỹ, transpose=True) * s_out
    Hessian:   H̃ = T(s_in) · H · T(s_in)ᵀ  (so that tr(E H Eᵀ) is preserved)

    so  x · Wᵀ = transform_out(transform_in(x) · W̃ᵀ).

hadamard_transform(x) computes x @ H_nᵀ / sqrt(n) along the last axis (H_n applied to each row as a
column vector), transpose=True computes x @ H_n / sqrt(n); both in O(n log n) (Kronecker factors
applied as small dense matmuls, so the cost is n·(K + log2 2^k) per vector).

Supported sizes: n = 2^k and n = 2^k·K for K in BASES = 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172:
    12, 20, 60, 108, 140   Paley I   (q = 11, 19, 59, 107, 139 primes ≡ 3 mod 4; order q + 1)
    28, 36, 52             Paley II  (q = 13, 17, 25 = 5²  ≡ 1 mod 4;      order 2(q + 1))
    40                     H_2 ⊗ H_20
    156, 172               Goethals–Seidel arrays of four circulant ±1 matrices of order 39 / 43,
                           whose first rows are embedded below; they were found by this project with a
                           meet-in-the-middle search over sequences constant on the orbits of a
                           multiplicative subgroup of Z_n (tests check H Hᵀ = n I).
Any other size: a ValueError naming the size and the supported forms (choice made here instead of
a randomized orthogonal fallback, which could not be regenerated bit-identically on every backend
without storing an n×n matrix). Callers check `is_supported(n)` up front and compress such a
matrix without incoherence.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BASES = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)

# Goethals–Seidel first rows (A, B, C, D concatenated; '+' = 1, '-' = -1)
_GS_ROWS = {
    39: ("++++++---++---+-++-+-+++++-+++-+++-+--++++-+++---+---++++++--++-+--++-++--+--++++--+---"
         "---+-+-+--+-++-+---++++++-++--++----+++--+-++++-+-+-+---+--+----++-+-"),
    43: ("++++++--+--++---+--++++----+----++-+-+-+-+++++-+--++--+----+-+--++---+++++-+-++---+-+++"
         "++-+--++--+----+-+--++---+++++-+-++---+-++++--+--+---+----+-+--+----+-+++---++-----+-"),
}
_PALEY1 = {12: 11, 20: 19, 60: 59, 108: 107, 140: 139}
_PALEY2 = {28: 13, 36: 17, 52: 25}


# ----------------------------------------------------------------------------- constructions

def _gf(q: int):
    """Elements of GF(q) (q = p or p²) as integer ids, with subtraction and the quadratic character."""
    p = next(d for d in range(2, q + 1) if q % d == 0)
    if q == p:
        sub = lambda a, b: (a - b) % p
        elems = list(range(q))
        mul = lambda a, b: a * b % p
    else:
        assert q == p * p, f"GF({q}) not implemented"
        r = next(c for c in range(2, p) if pow(c, (p - 1) // 2, p) == p - 1)   # non-residue: x² - r
        enc = lambda a, b: a + p * b                                         # a + b·√r
        sub = lambda x, y: enc((x % p - y % p) % p, (x // p - y // p) % p)
        mul = lambda x, y: enc((x % p * (y % p) + r * (x // p) * (y // p)) % p,
                               (x % p * (y // p) + (x // p) * (y % p)) % p)
        elems = list(range(q))
    squares = {mul(a, a) for a in elems if a != 0}
    chi = lambda a: 0 if a == 0 else (1 if a in squares else -1)
    return elems, sub, chi


def _jacobsthal(q: int) -> np.ndarray:
    elems, sub, chi = _gf(q)
    return np.array([[chi(sub(j, i)) for j in elems] for i in elems], np.int64)


def _paley1(q: int) -> np.ndarray:
    Q = _jacobsthal(q)
    n = q + 1
    S = np.zeros((n, n), np.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    Q = _jacobsthal(q)
    n = q + 1
    C = np.zeros((n, n), np.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    return (np.kron(C, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(n, dtype=np.int64),
                                                               np.array([[1, -1], [-1, -1]])))


def _goethals_seidel(n: int) -> np.ndarray:
    s = np.array([1 if c == "+" else -1 for c in _GS_ROWS[n]], np.int64).reshape(4, n)
    circ = lambda a: np.stack([np.roll(a, i) for i in range(n)])
    A, B, C, D = (circ(a) for a in s)
    R = np.eye(n, dtype=np.int64)[::-1]
    return np.block([[A, B @ R, C @ R, D @ R],
                     [-B @ R, A, D.T @ R, -C.T @ R],
                     [-C @ R, -D.T @ R, A, B.T @ R],
                     [-D @ R, C.T @ R, -B.T @ R, A]])


def find_goethals_seidel_rows(n: int, max_orbits: int = 10) -> str | None:
    """The search that produced _GS_ROWS (kept to make them reproducible; seconds for n = 39, 43).

    Looks for four ±1 sequences A, B, C, D of length n with sum of |DFT|^2 = 4n at every frequency
    (then the Goethals–Seidel array is a Hadamard matrix of order 4n), restricted to sequences
    constant on the orbits of a subgroup G of the units of Z_n acting by multiplication (|DFT|^2 is
    then constant on orbits too, so only one frequency per orbit is checked). Meet in the middle:
    hash the pair sums of A, B and look up 4n minus the pair sums of C, D. Returns the '+'/'-'
    string of A|B|C|D, or None."""
    import itertools
    import math
    units = [u for u in range(1, n) if math.gcd(u, n) == 1]
    groups = set()
    for g1 in units:
        for g2 in units:
            G, todo = {1}, [1]
            while todo:
                x = todo.pop()
                for g in (g1, g2):
                    if x * g % n not in G:
                        G.add(x * g % n)
                        todo.append(x * g % n)
            groups.add(frozenset(G))
    for G in sorted(groups, key=len, reverse=True):
        orbits, seen = [], set()
        for j in range(n):
            if j not in seen:
                o = sorted({j * h % n for h in G})
                seen |= set(o)
                orbits.append(o)
        t = len(orbits)
        if t > max_orbits:
            continue
        M = np.zeros((t, n))
        for i, o in enumerate(orbits):
            M[i, o] = 1
        X = np.array(list(itertools.product((1, -1), repeat=t)), np.float64) @ M
        P = (np.abs(np.fft.fft(X, axis=1)) ** 2)[:, [o[0] for o in orbits]]
        keep = (P <= 4 * n + 1e-6).all(1)
        X, P = X[keep], P[keep]
        i, j = np.triu_indices(len(X))
        PS = P[i] + P[j]
        ok = (PS <= 4 * n + 1e-6).all(1)
        i, j, PS = i[ok], j[ok], PS[ok]
        table = {}
        for a, row in enumerate(map(tuple, np.round(PS, 3))):
            table.setdefault(row, a)
        for a, row in enumerate(map(tuple, np.round(4 * n - PS, 3))):
            b = table.get(row)
            if b is not None:
                seqs = np.concatenate([X[i[a]], X[j[a]], X[i[b]], X[j[b]]])
                return "".join("+" if v > 0 else "-" for v in seqs)
    return None


def _sylvester(n: int) -> np.ndarray:
    H = np.ones((1, 1), np.int64)
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


@functools.lru_cache(maxsize=None)
def base_matrix(K: int) -> np.ndarray:
    """The ±1 Hadamard matrix of one of the BASES (or 1), int8 [K, K]."""
    if K == 1:
        H = np.ones((1, 1), np.int64)
    elif K in _PALEY1:
        H = _paley1(_PALEY1[K])
    elif K in _PALEY2:
        H = _paley2(_PALEY2[K])
    elif K == 40:
        H = np.kron(_sylvester(2), base_matrix(20).astype(np.int64))
    elif K % 4 == 0 and K // 4 in _GS_ROWS:
        H = _goethals_seidel(K // 4)
    else:
        raise ValueError(f"no base Hadamard matrix of order {K}")
    return H.astype(np.int8)


def factor(n: int) -> tuple[int, int]:
    """n = K · 2^k with K in (1,) + BASES (smallest K). Raises ValueError naming n otherwise."""
    if n >= 1:
        for K in (1,) + BASES:
            if n % K == 0:
                r = n // K
                if r & (r - 1) == 0:
                    return K, r
    raise ValueError(
        f"incoherence: no Hadamard transform for size {n}; supported sizes are 2^k and 2^k*K for "
        f"K in {BASES}. Compress this matrix with incoherence disabled (pattern_overrides: "
        f"incoherence: false).")


def is_supported(n: int) -> bool:
    try:
        factor(n)
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=None)
def hadamard_matrix(n: int) -> np.ndarray:
    """Dense ±1 Hadamard matrix H_n = H_K ⊗ Sylvester(2^k), int8 [n, n] (reference / tests)."""
    K, p = factor(n)
    return np.kron(base_matrix(K).astype(np.int64), _sylvester(p)).astype(np.int8)


# ----------------------------------------------------------------------------- fast transform

_MAX_DENSE = 64     # power-of-two part applied as dense Sylvester factors of at most this size


def _factors(n: int) -> list[int]:
    """Sizes of the Kronecker factors, outermost first: [K] + powers of two."""
    K, p = factor(n)
    out = [K] if K > 1 else []
    while p > 1:
        f = min(p, _MAX_DENSE)
        out.append(f)
        p //= f
    return out


def _factor_matrix(f: int, is_base: bool) -> np.ndarray:
    return (base_matrix(f) if is_base else _sylvester(f)).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("transpose", "normalize"))
def hadamard_transform(x: jax.Array, transpose: bool = False, normalize: bool = True) -> jax.Array:
    """x @ H_nᵀ (/ sqrt n) along the last axis; transpose=True: x @ H_n (/ sqrt n). Any leading axes;
    computed in float32 (or float64 if x is) and returned in x's dtype."""
    n = x.shape[-1]
    dt = x.dtype
    ct = jnp.float64 if dt == jnp.float64 else jnp.float32
    fs = _factors(n)
    K, _ = factor(n)
    lead = x.shape[:-1]
    y = x.astype(ct).reshape(lead + tuple(fs)) if fs else x.astype(ct)
    nd = len(lead)
    for i, f in enumerate(fs):
        M = jnp.asarray(_factor_matrix(f, is_base=(i == 0 and K > 1)), ct)
        # y_i' = sum_j H[i', j] y_j   (H applied to the column)  or  sum_j H[j, i'] y_j  (Hᵀ)
        y = jnp.tensordot(y, M if transpose else M.T, axes=[[nd + i], [0]],
                          precision=jax.lax.Precision.HIGHEST)
        y = jnp.moveaxis(y, -1, nd + i)
    y = y.reshape(lead + (n,))
    if normalize:
        y = y * (1.0 / np.sqrt(n))
    return y.astype(dt)


# ----------------------------------------------------------------------------- signs and rotations

def random_signs(seed, n: int, salt: int = 0) -> jax.Array:
    """±1 float32 [n] from an int seed (or a PRNG key) and a salt (0: input side, 1: output side)."""
    if isinstance(seed, int) or (jnp.ndim(seed) == 0
                                 and not jnp.issubdtype(jnp.asarray(seed).dtype, jax.dtypes.prng_key)):
        key = jax.random.PRNGKey(seed)          # an int (python or traced)
    else:
        key = seed                              # a raw uint32[2] key or a typed key
    return jax.random.rademacher(jax.random.fold_in(key, salt), (n,), dtype=jnp.float32)


def make_signs(seed, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """(signs_out [m], signs_in [n]) for a matrix of shape (m, n)."""
    m, n = shape
    return random_signs(seed, m, salt=1), random_signs(seed, n, salt=0)


def transform_in(x: jax.Array, signs_in: jax.Array) -> jax.Array:
    """x̃ = x · T(s_in)ᵀ along the last axis."""
    return hadamard_transform(x * signs_in.astype(x.dtype))


def transform_out(y: jax.Array, signs_out: jax.Array) -> jax.Array:
    """y = ỹ · T(s_out) along the last axis."""
    return hadamard_transform(y, transpose=True) * signs_out.astype(y.dtype)


@jax.jit
def rotate(w: jax.Array, signs_out: jax.Array | None, signs_in: jax.Array | None) -> jax.Array:
    """W̃ = T(s_out) W T(s_in)ᵀ for w [..., m, n]; a None side is left untouched."""
    if signs_in is not None:
        w = transform_in(w, signs_in)                                # W D Hᵀ
    if signs_out is not None:
        w = jnp.swapaxes(transform_in(jnp.swapaxes(w, -1, -2), signs_out), -1, -2)   # H D (.)
    return w


@jax.jit
def unrotate(w: jax.Array, signs_out: jax.Array | None, signs_in: jax.Array | None) -> jax.Array:
    """W = T(s_out)ᵀ W̃ T(s_in) for w [..., m, n] (exact inverse of rotate)."""
    if signs_in is not None:
        w = transform_out(w, signs_in)                               # W̃ H D
    if signs_out is not None:
        w = jnp.swapaxes(transform_out(jnp.swapaxes(w, -1, -2), signs_out), -1, -2)  # D Hᵀ (.)
    return w


def rotate_hessian(h: jax.Array, signs_in: jax.Array) -> jax.Array:
    """H̃ = T(s_in) H T(s_in)ᵀ for h [..., n, n] (so tr(E H Eᵀ) = tr(Ẽ H̃ Ẽᵀ))."""
    return rotate(h, signs_in, signs_in)
