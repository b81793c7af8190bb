"""The one place a weight is applied.

A weight is a plain array in HF layout ([out, in], or [E, out, in] for stacked experts), a
QLRWeight (the compressed W ≈ Q + L·R, formats/qlr_weight.py), which runs through
caldera_jax.kernels.qlr.qlr_linear with the weight's own `backend` ("auto" = the measured table),
or any other object with an `apply(x) -> y` method. Swapping a leaf of the parameter tree for such
an object changes how that linear runs without touching the model code.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.formats.qlr_weight import QLRWeight
from caldera_jax.kernels.qlr import BACKENDS, qlr_linear


def is_plain(w: Any) -> bool:
    if isinstance(w, QLRWeight):
        return False
    return isinstance(w, (jax.Array, np.ndarray)) or hasattr(w, "shape") and not hasattr(w, "apply")


def apply(x: jax.Array, w: Any, bias: jax.Array | None = None) -> jax.Array:
    """y = x·wᵀ (+ bias).

    x: [..., in]; w: [out, in] -> y: [..., out].
    Stacked experts: x: [E, ..., in]; w: [E, out, in] -> y: [E, ..., out].
    """
    if isinstance(w, QLRWeight):
        y = qlr_linear(x, w, backend=w.backend)
    elif not is_plain(w):
        y = w.apply(x)
    elif w.ndim == 2:
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    elif w.ndim == 3:
        y = jnp.einsum("e...i,eoi->e...o", x, w.astype(x.dtype))
    else:
        raise ValueError(f"linear weight must be 2-D or 3-D (stacked experts), got shape {w.shape}")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def with_backend(params: Any, backend: str) -> Any:
    """The parameter tree with every QLRWeight leaf set to run on `backend` ("auto", or a name in
    caldera_jax.kernels.qlr.BACKENDS: "xla", "pallas", "triton"); other leaves unchanged. This is
    how a user forces a kernel backend for a whole model (nothing reads an environment variable)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (auto, {', '.join(sorted(BACKENDS))})")
    return jax.tree_util.tree_map(lambda w: w.with_backend(backend) if isinstance(w, QLRWeight) else w,
                                  params, is_leaf=lambda w: isinstance(w, QLRWeight))
