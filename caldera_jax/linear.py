"""The one place a weight is applied.

A weight is either a plain array in HF layout ([out, in], or [E, out, in] for stacked experts) or
any object with an `apply(x) -> y` method (e.g. a quantized low-rank weight W ≈ Q + L·R). Swapping
a leaf of the parameter tree for such an object changes how that linear runs without touching the
model code.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_plain(w: Any) -> bool:
    return isinstance(w, (jax.Array, np.ndarray)) or hasattr(w, "shape") and not hasattr(w, "apply")


def apply(x: jax.Array, w: Any, bias: jax.Array | None = None) -> jax.Array:
    """y = x·wᵀ (+ bias).

    x: [..., in]; w: [out, in] -> y: [..., out].
    Stacked experts: x: [E, ..., in]; w: [E, out, in] -> y: [E, ..., out].
    """
    if not is_plain(w):
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
