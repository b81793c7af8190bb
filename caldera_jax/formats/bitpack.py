"""Bit-level packing helpers shared by the formats: b-bit codes in uint32 words, sign bits.

UNIFORM WORDS, b in {2, 4, 8}: K = 32/b codes per uint32 word, code k of a word in bits [b*k, b*k+b)
(the first column in the least significant bits). b = 3: chunks of 32 columns in 3 words, bit-plane
split (word 3c+0: low 2 bits of columns 32c+0..15, word 3c+1: low 2 bits of 32c+16..31, word 3c+2:
high bit of 32c+0..31). Columns beyond n in the last word/chunk are code 0 (ignored).

SIGNS: pack_signs(±1 [..., n]) -> uint8 [..., ceil(n/8)], bit k of byte j set <=> sign of
coordinate 8j+k is -1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from caldera_jax.formats.base import ceil_div


def words_layout(bits: int) -> tuple[int, int]:
    """(codes per chunk K, uint32 words per chunk W) of the word layout."""
    if bits == 3:
        return 32, 3
    if bits in (2, 4, 8):
        return 32 // bits, 1
    raise ValueError(f"no uniform packed layout for {bits} bits")


def n_words(n: int, bits: int) -> int:
    K, W = words_layout(bits)
    return W * ceil_div(n, K)


def _pack_plain(c: jax.Array, bits: int) -> jax.Array:
    """c uint32 [..., nc*K] -> [..., nc] words, K = 32/bits codes per word."""
    K = 32 // bits
    c = c.reshape(c.shape[:-1] + (-1, K))
    w = c[..., 0]
    for k in range(1, K):
        w = w | (c[..., k] << (bits * k))
    return w


def _unpack_plain(w: jax.Array, bits: int) -> jax.Array:
    K = 32 // bits
    sh = (jnp.arange(K, dtype=jnp.uint32) * bits)
    c = (w[..., None] >> sh) & jnp.uint32(2 ** bits - 1)
    return c.reshape(c.shape[:-2] + (-1,))


@functools.partial(jax.jit, static_argnames="bits")
def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Codes [..., n] (ints in [0, 2^bits)) -> uint32 words [..., n_words(n, bits)]."""
    n = codes.shape[-1]
    K, W = words_layout(bits)
    nc = ceil_div(n, K)
    c = codes.astype(jnp.uint32)
    c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, nc * K - n)])
    if bits != 3:
        return _pack_plain(c, bits)
    c = c.reshape(c.shape[:-1] + (nc, 32))
    lo = _pack_plain(c & jnp.uint32(3), 2)                 # [..., nc, 2]
    hi = _pack_plain(c >> 2, 1)                            # [..., nc, 1]
    return jnp.concatenate([lo, hi], axis=-1).reshape(c.shape[:-2] + (3 * nc,))


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack_codes(words: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of pack_codes: uint32 [..., n_words] -> int32 codes [..., n]."""
    if bits != 3:
        c = _unpack_plain(words.astype(jnp.uint32), bits)
    else:
        w = words.astype(jnp.uint32).reshape(words.shape[:-1] + (-1, 3))
        lo = _unpack_plain(w[..., 0:2], 2)                # [..., nc, 32]
        hi = _unpack_plain(w[..., 2:3], 1)                # [..., nc, 32]
        c = (lo | (hi << 2)).reshape(w.shape[:-2] + (-1,))
    return c[..., :n].astype(jnp.int32)


@jax.jit
def pack_signs(signs: jax.Array) -> jax.Array:
    """±1 [..., n] -> uint8 [..., ceil(n/8)], bit k of byte j set <=> coordinate 8j+k is negative."""
    n = signs.shape[-1]
    neg = (jnp.asarray(signs) < 0).astype(jnp.uint8)
    neg = jnp.pad(neg, [(0, 0)] * (neg.ndim - 1) + [(0, ceil_div(n, 8) * 8 - n)])
    neg = neg.reshape(neg.shape[:-1] + (-1, 8))
    out = neg[..., 0]
    for k in range(1, 8):
        out = out | (neg[..., k] << k)
    return out.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("n", "dtype"))
def unpack_signs(bits: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
    """uint8 [..., ceil(n/8)] -> ±1 [..., n] in dtype."""
    b = (bits.astype(jnp.int32)[..., None] >> jnp.arange(8, dtype=jnp.int32)) & 1
    b = b.reshape(b.shape[:-2] + (-1,))[..., :n]
    return (1 - 2 * b).astype(dtype)
