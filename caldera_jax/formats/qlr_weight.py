"""QLRWeight: a compressed linear weight W ≈ scale · T_outᵀ (Q + L·R) T_in, usable as a parameter leaf.

    W [m, n] = scale · T(s_out)ᵀ · (Q + L·R) · T(s_in)          (see incoherence.py for T)
    Q [m, n]: PackedMatrix (any registered quantizer kind);  L [m, r], R [r, n]: PackedMatrix (uniform, or dense
    bf16 when b_l / b_r = 16) or None when rank 0;  scale: float32 scalar (the RMS the decomposition
    divided W by);  s_in [n], s_out [m]: ±1 signs stored packed (uint8 bits, packing.pack_signs), or
    None when that side has no incoherence rotation.

    y = x · Wᵀ = transform_out(transform_in(x) · Qᵀ + (transform_in(x) · Rᵀ) · Lᵀ) · scale
    (the low-rank term as two thin matmuls; L·R is never formed) is computed by
    caldera_jax.kernels.qlr.qlr_linear; caldera_jax.linear.apply (the one place a weight is applied)
    dispatches a QLRWeight there with its `backend` ("auto": the measured table; or a forced name).
    This module is data only: it does not import the kernels.

A stack of matrices (MoE experts) is a QLRWeight whose arrays all carry a leading axis E (scale
[E], signs [E, bytes]); `shape` stays (m, n); apply(x [E, ..., n]) -> [E, ..., m], as linear.apply's
stacked convention.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats import incoherence, packing
from caldera_jax.formats.packing import PackedFormat, PackedMatrix
from caldera_jax.formats.quant import QuantizedMatrix


def _as_packed(f: Any, dense_dtype) -> PackedMatrix | None:
    if f is None:
        return None
    if isinstance(f, PackedMatrix):
        return f
    if isinstance(f, QuantizedMatrix):
        return packing.pack(f)
    return packing.pack_dense(f, dense_dtype)


def _as_sign_bits(s: Any) -> jax.Array | None:
    if s is None:
        return None
    s = jnp.asarray(s)
    if s.dtype == jnp.uint8:          # already packed
        return s
    return packing.pack_signs(s)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QLRWeight:
    q: PackedMatrix
    l: PackedMatrix | None
    r: PackedMatrix | None
    scale: jax.Array                      # f32 [] (or [E])
    signs_in: jax.Array | None            # uint8 [ceil(n/8)] (or [E, .]), bit set <=> -1
    signs_out: jax.Array | None           # uint8 [ceil(m/8)]
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    backend: str = dataclasses.field(default="auto", metadata=dict(static=True))   # qlr_linear's backend

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_parts(cls, q: QuantizedMatrix | PackedMatrix, l=None, r=None, scale=1.0,
                   signs_in=None, signs_out=None, *, dense_dtype=jnp.bfloat16,
                   backend: str = "auto") -> "QLRWeight":
        """q: the quantized Q; l [m, r], r [r, n]: QuantizedMatrix (quantized factor), PackedMatrix,
        a float array (stored dense in `dense_dtype`, bf16 by default: b_l/b_r = 16) or None (rank 0);
        scale: the global scale; signs_in [n] / signs_out [m]: ±1 arrays (or packed uint8 bits) or
        None. Works on stacked (leading E axis) parts too."""
        qp = _as_packed(q, dense_dtype)
        lp, rp = _as_packed(l, dense_dtype), _as_packed(r, dense_dtype)
        if (lp is None) != (rp is None):
            raise ValueError("QLRWeight: give both L and R, or neither (rank 0)")
        m, n = qp.fmt.shape
        if lp is not None:
            (lm, lr), (rr, rn) = lp.fmt.shape, rp.fmt.shape
            if lm != m or rn != n or lr != rr:
                raise ValueError(f"QLRWeight: L {lp.fmt.shape} and R {rp.fmt.shape} do not fit Q {(m, n)}")
        return cls(qp, lp, rp, jnp.asarray(scale, jnp.float32), _as_sign_bits(signs_in),
                   _as_sign_bits(signs_out), (m, n), backend)

    # ------------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        return 0 if self.l is None else self.l.fmt.shape[1]

    @property
    def stacked(self) -> bool:
        return self.q.codes.ndim > 2

    @property
    def num_matrices(self) -> int:
        return packing.n_matrices(self.q)

    def with_backend(self, backend: str) -> "QLRWeight":
        return dataclasses.replace(self, backend=backend)

    def signs(self) -> tuple[jax.Array | None, jax.Array | None]:
        """(signs_out [m], signs_in [n]) as ±1 float32, or None."""
        m, n = self.shape
        so = None if self.signs_out is None else packing.unpack_signs(self.signs_out, m)
        si = None if self.signs_in is None else packing.unpack_signs(self.signs_in, n)
        return so, si

    # ------------------------------------------------------------------ numerics
    def inner(self) -> jax.Array:
        """Q + L·R [(E,) m, n] float32 (the rotated, unscaled matrix the decomposition fitted)."""
        w = packing.dequantize(self.q)
        if self.l is not None:
            w = w + jnp.matmul(packing.dequantize(self.l), packing.dequantize(self.r),
                               precision=jax.lax.Precision.HIGHEST)
        return w

    def dequantize(self) -> jax.Array:
        """The effective W [(E,) m, n] float32."""
        return _dequantize(self)

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes of every stored array (codes, scales, zeros, tensor scales, factors, signs, scale)."""
        total = packing.nbytes(self.q)
        for f in (self.l, self.r):
            if f is not None:
                total += packing.nbytes(f)
        for a in (self.scale, self.signs_in, self.signs_out):
            if a is not None:
                total += int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
        return int(total)

    def bits_per_param(self) -> float:
        m, n = self.shape
        return 8.0 * self.nbytes() / (self.num_matrices * m * n)

    # ------------------------------------------------------------------ storage
    def to_arrays(self) -> tuple[dict[str, jax.Array], dict]:
        """Flat {name: array} (safetensors-storable dtypes) and a JSON-able meta dict."""
        arrays: dict[str, jax.Array] = {}
        meta: dict = dict(shape=list(self.shape), rank=self.rank)
        for part in ("q", "l", "r"):
            pm = getattr(self, part)
            if pm is None:
                continue
            meta[part] = pm.fmt.to_json()
            for k, v in pm.arrays().items():
                arrays[f"{part}.{k}"] = v
        arrays["scale"] = self.scale
        if self.signs_in is not None:
            arrays["signs_in"] = self.signs_in
        if self.signs_out is not None:
            arrays["signs_out"] = self.signs_out
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict, backend: str = "auto") -> "QLRWeight":
        parts = {}
        for part in ("q", "l", "r"):
            if part in meta:
                sub = {k.split(".", 1)[1]: jnp.asarray(v) for k, v in arrays.items()
                       if k.startswith(part + ".")}
                parts[part] = PackedMatrix.from_arrays(PackedFormat.from_json(meta[part]), sub)
            else:
                parts[part] = None
        get = lambda k: None if k not in arrays else jnp.asarray(arrays[k])
        return cls(parts["q"], parts["l"], parts["r"], jnp.asarray(arrays["scale"], jnp.float32),
                   get("signs_in"), get("signs_out"), tuple(meta["shape"]), backend)


@jax.jit
def _dequantize(w: QLRWeight) -> jax.Array:
    if w.stacked:
        return jax.vmap(_dequantize)(w)
    so, si = w.signs()
    return incoherence.unrotate(w.inner(), so, si) * w.scale
