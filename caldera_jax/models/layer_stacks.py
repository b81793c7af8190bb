"""Consecutive decoder layers stacked on a leading axis, so the decoder runs them as one
`jax.lax.scan` instead of unrolling them: one layer body to trace and compile instead of L.

    fast = stack_layers(params, cfg)      # params["model"]["layers"] -> params["model"]["layer_stacks"]
    logits = forward(fast, cfg, tokens)   # the same logits; each new shape compiles ~3x faster
    params = unstack_layers(fast, cfg)    # back to the HF-named per-layer layout

On XLA:CPU an unrolled 30-layer program costs, per new input shape, ~0.6 s to trace, 1-2 s to
compile and ~0.02 s per layer on its first run; an evaluation meets a new shape every few calls
(BENCHMARKS.md, "lm-eval"). The scanned program runs at the same speed once compiled.

A stack is a maximal run of consecutive layers of one kind (dense / MoE) whose parameter trees
have the same structure, shapes and dtypes (a CALDERA checkpoint with per-layer budgets makes
several). `params["model"]["layer_stacks"]` maps "start:stop" to the stacked tree (leaves
[stop - start, ...]). Stacked parameters run without hooks: a hook is told layer names, and a
scanned layer has no static index.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from caldera_jax.config import ModelConfig

STACKS = "layer_stacks"


@dataclasses.dataclass(frozen=True)
class Block:
    """Layers start..stop-1: one layer's params (stacked=False, stop = start + 1) or a stack."""
    start: int
    stop: int
    params: Any
    stacked: bool


def is_stacked(params) -> bool:
    return STACKS in params["model"]


def blocks(params, cfg: ModelConfig) -> list[Block]:
    """The decoder's layers in order, as single layers or stacks."""
    model = params["model"]
    if STACKS not in model:
        return [Block(i, i + 1, model["layers"][str(i)], False) for i in range(cfg.num_hidden_layers)]
    spans = sorted((tuple(int(x) for x in key.split(":")), key) for key in model[STACKS])
    if [a for (a, _), _ in spans] != [0] + [b for (_, b), _ in spans[:-1]] or spans[-1][0][1] != cfg.num_hidden_layers:
        raise ValueError(f"params: layer stacks {[k for _, k in spans]} do not cover layers "
                         f"0..{cfg.num_hidden_layers - 1} once each")
    return [Block(a, b, model[STACKS][key], True) for (a, b), key in spans]


def _signature(cfg: ModelConfig, i: int, layer) -> tuple:
    leaves, treedef = jax.tree.flatten(layer)
    return cfg.is_moe_layer(i), treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def stack_layers(params, cfg: ModelConfig, *, consume: bool = False):
    """params with per-layer `model.layers` -> params with `model.layer_stacks` (a new dict;
    leaves outside the layers are shared). The stacks are copies: drop `params` afterwards to
    free the per-layer arrays. consume=True takes the layers out of `params` (its layers dict is
    left empty) and drops each per-layer array once its stack exists, so the peak is one model
    plus one stacked leaf instead of two models; `params` is unusable afterwards."""
    if is_stacked(params):
        return params
    layers = params["model"]["layers"] if consume else dict(params["model"]["layers"])
    runs: list[list[int]] = []
    for i in range(cfg.num_hidden_layers):
        sig = _signature(cfg, i, layers[str(i)])
        if runs and runs[-1][1] == sig:
            runs[-1][0].append(i)
        else:
            runs.append([[i], sig])
    stacks = {}
    for idx, (_, treedef, _) in runs:
        per_layer = [jax.tree.leaves(layers.pop(str(i))) for i in idx]
        stacked = []
        for j in range(treedef.num_leaves):
            stacked.append(jnp.stack([leaves[j] for leaves in per_layer]))
            for leaves in per_layer:             # the last reference when consuming
                leaves[j] = None
        stacks[f"{idx[0]}:{idx[-1] + 1}"] = jax.tree.unflatten(treedef, stacked)
    model = {k: v for k, v in params["model"].items() if k != "layers"}
    model[STACKS] = stacks
    return {**params, "model": model}


def unstack_layers(params, cfg: ModelConfig, *, consume: bool = False):
    """The inverse of stack_layers: per-layer `model.layers` keyed "0".."L-1". consume=True takes
    each stack out of `params` once it is sliced (peak: one model plus one stack)."""
    if not is_stacked(params):
        return params
    spans = [(b.start, b.stop) for b in blocks(params, cfg)]         # checks they cover the layers
    stacks = params["model"][STACKS] if consume else dict(params["model"][STACKS])
    layers = {}
    for a, b in spans:
        stack = stacks.pop(f"{a}:{b}")
        for j in range(b - a):
            layers[str(a + j)] = jax.tree.map(lambda x, j=j: x[j], stack)
        del stack
    model = {k: v for k, v in params["model"].items() if k != STACKS}
    model["layers"] = layers
    return {**params, "model": model}
