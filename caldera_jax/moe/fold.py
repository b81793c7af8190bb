"""Folding a codec's linear decoder into the experts' first linears, on the expert device.

A learned codec decodes x̂ = W_d z (z [R, d]: the code c, plus the stale state for a conditioned
layer; W_d [H, d]). Every expert's gate and up projections then compute W_g x̂ = (W_g W_d) z, so
the EP layer can skip the decode and run them on z with folded weights W_g W_d [E_loc, I, d]:

    per received row   decode then experts : 2·d·H + 2·2·I·H + 2·H·I      FLOPs
                       folded              : 2·2·I·d + 2·H·I
    per call           fold                : 2·2·E_loc·I·H·d (amortised over the rows)

With d = H/ratio the folded experts are cheaper than the uncompressed layer's (the decode is gone
and gate/up read d < H inputs); the fold itself is a per-call cost that vanishes when the codec is
frozen (inference: fold once, `fold_experts`). Exact in real arithmetic; in floating point it
reassociates (W_g W_d) z vs W_g (W_d z) (float32: ~1e-6 relative).

The fold costs a fixed amount per call and saves an amount per row, so it wins for many tokens
per device (training, prefill) and loses for few (decode steps): `fold_is_cheaper` compares the
two at the traced shapes, and the EP layer's decoder="auto" takes the cheaper one. Folding applies
only when the codec has a linear decoder (decoder_input / decoder_weight) and the experts' gate/up
weights are plain arrays; otherwise (quantizers, CALDERA-quantized experts) the rows are decoded.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

FOLDED = ("gate_proj", "up_proj")


def can_fold(codec: Any, experts: dict) -> bool:
    """True when codec's decoder is linear and the experts' gate/up weights are arrays."""
    return (hasattr(codec, "decoder_weight") and hasattr(codec, "decoder_input")
            and all(isinstance(experts[k]["weight"], jax.Array) and set(experts[k]) == {"weight"}
                    for k in FOLDED))


def fold_experts(experts: dict, w_dec: jax.Array) -> dict:
    """experts with gate_proj/up_proj [E, I, H] replaced by their products with W_d [H, d] ->
    [E, I, d] (computed in float32, stored in the experts' dtype); down_proj unchanged."""
    out = dict(experts)
    for k in FOLDED:
        w = experts[k]["weight"]
        out[k] = {"weight": jnp.einsum("eih,hd->eid", w.astype(jnp.float32),
                                       w_dec.astype(jnp.float32)).astype(w.dtype)}
    return out


def fold_is_cheaper(rows: int, slots: int, experts_local: int, inter: int, hidden: int, d: int) -> bool:
    """Forward FLOPs of the expert side's decode + gate/up, decoded vs folded: `rows` received rows
    (decoded one by one), `slots` rows per local expert in the einsum layout, E_loc experts of width
    I, hidden H, decoder input width d."""
    decoded = rows * 2 * d * hidden + experts_local * slots * 4 * inter * hidden
    folded = experts_local * 4 * inter * hidden * d + experts_local * slots * 4 * inter * d
    return folded < decoded
