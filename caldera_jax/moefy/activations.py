"""The dense model's FFN inputs, one decoder layer at a time (what clustering, the router fit and
the local fit see): every layer runs on the outputs of the original layers before it.

    for i, layer, x in ffn_inputs(read_layer, embed, cfg, tokens, mask):
        ...   # layer: layer i's params (float32 jax arrays); x: [n_real_tokens, H] float32 numpy
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from caldera_jax.config import ModelConfig
from caldera_jax.models.decoder import default_positions, representative_layer, standalone_layer
from caldera_jax.models.hooks import Ctx, Hooks


def _keep_mlp_input(name: str, value: Any, aux: dict) -> Any:
    if name.endswith(".mlp.input"):
        aux["mlp_input"] = value
    return value


@partial(jax.jit, static_argnames=("cfg", "rep"))
def layer_with_ffn_input(p: dict, cfg: ModelConfig, rep: int, h: jax.Array, mask: jax.Array,
                         positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One decoder layer on whole sequences h [B, T, H] -> (its output, its FFN input [B, T, H])."""
    ctx = Ctx(Hooks(tap=_keep_mlp_input), {})
    out = standalone_layer(ctx, rep, p, cfg, h, mask, positions)
    return out, ctx.aux["mlp_input"]


def _batches(embed, tokens, mask, batch_size):
    embed = jnp.asarray(embed, jnp.float32)
    out = []
    for s in range(0, len(tokens), batch_size):
        t, m = jnp.asarray(tokens[s:s + batch_size]), jnp.asarray(mask[s:s + batch_size], bool)
        out.append((jnp.take(embed, t, axis=0), m, default_positions(m)))
    return out


def _real(xs: list[jax.Array], batches) -> np.ndarray:
    return np.concatenate([np.asarray(x)[np.asarray(m)] for x, (_, m, _) in zip(xs, batches)])


def ffn_inputs(read_layer: Callable[[int], dict], embed: np.ndarray, cfg: ModelConfig, tokens: np.ndarray,
               mask: np.ndarray, batch_size: int = 8, layers: int | None = None
               ) -> Iterator[tuple[int, dict, np.ndarray]]:
    """Yields (i, layer i's params, its FFN inputs at the real tokens [n, H]) for i < `layers`
    (default all), running the dense layers in batches of `batch_size` sequences."""
    b = _batches(embed, tokens, mask, batch_size)
    hs = [h for h, _, _ in b]
    for i in range(cfg.num_hidden_layers if layers is None else layers):
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), read_layer(i))
        rep = representative_layer(cfg, i)
        outs = [layer_with_ffn_input(p, cfg, rep, h, m, q) for h, (_, m, q) in zip(hs, b)]
        yield i, p, _real([x for _, x in outs], b)
        hs = [o for o, _ in outs]
