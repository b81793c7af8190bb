"""Codec parameters inside the model's param tree, and the trainable/frozen split for optax.

Learned codec parameters live at `params["model"]["layers"][str(i)]["mlp"][slot]` for every MoE
layer i (slot "codec" for the dispatch codec, "combine_codec" for an optional combine-path codec),
so the moe hook receives them in its mlp params and `jax.grad` of the model reaches them.

    params = add_codec_params(params, cfg, codec, jax.random.key(0))      # near-identity / random
    params = add_codec_params(params, cfg, codec, key, given={3: {...}})  # e.g. offline weights
    trainable, frozen = split_codec_params(params)                        # optax sees `trainable`
    loss = lambda t: lm_loss(merge_params(t, frozen), ...)
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from caldera_jax.config import ModelConfig

CODEC_SLOTS = ("codec", "combine_codec")


def _with_leaf(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of `tree` with tree[path] = value (dicts along the path are copied, leaves shared)."""
    head, *rest = path
    out = dict(tree)
    out[head] = value if not rest else _with_leaf(tree.get(head, {}), tuple(rest), value)
    return out


def _check_shapes(layer: int, expected: Any, given: Any) -> None:
    exp, got = jax.tree.map(lambda a: tuple(a.shape), expected), jax.tree.map(lambda a: tuple(a.shape), given)
    if exp != got:
        raise ValueError(f"given codec params for layer {layer} have shapes {got}, expected {exp}")


def add_codec_params(params: dict, cfg: ModelConfig, codec, key: jax.Array, *, slot: str = "codec",
                     given: Mapping[int, dict] | None = None) -> dict:
    """Returns params with `codec.init(...)` (or `given[i]`, shape-checked) at every MoE layer's
    mlp[slot]. Codecs without parameters add nothing. The input tree is not modified."""
    if slot not in CODEC_SLOTS:
        raise ValueError(f"slot must be one of {CODEC_SLOTS}, got {slot!r}")
    given = dict(given or {})
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    unknown = set(given) - set(moe_layers)
    if unknown:
        raise ValueError(f"given codec params for non-MoE layers {sorted(unknown)}")
    keys = jax.random.split(key, max(len(moe_layers), 1))
    for k, i in zip(keys, moe_layers):
        p = codec.init(k, cfg, i)
        if i in given:
            _check_shapes(i, p, given[i])
            p = given[i]
        if p:
            params = _with_leaf(params, ("model", "layers", str(i), "mlp", slot), p)
    return params


def split_codec_params(params: dict) -> tuple[dict, dict]:
    """(trainable, frozen): the codec subtrees and everything else, as two trees of the same nesting."""
    def split(node: dict, path: tuple[str, ...]) -> tuple[dict, dict]:
        train, frozen = {}, {}
        for k, v in node.items():
            if k in CODEC_SLOTS and path and path[-1] == "mlp":
                train[k] = v
            elif isinstance(v, dict):
                t, f = split(v, path + (k,))
                if t:
                    train[k] = t
                if f or not t:
                    frozen[k] = f
            else:
                frozen[k] = v
        return train, frozen
    return split(params, ())


def merge_params(trainable: dict, frozen: dict) -> dict:
    """Inverse of split_codec_params: one tree with both."""
    out = dict(frozen)
    for k, v in trainable.items():
        out[k] = merge_params(v, frozen.get(k, {})) if isinstance(v, dict) and k not in CODEC_SLOTS else v
    return out
