"""Gradient accumulation normalised by the tokens a step really holds.

A loss function returns the *sum* of its per-token losses and the number of tokens; one
optimizer step over micro-batches b_1..b_m (m <= accum: the last step of an epoch may hold fewer)
uses  grad = Σ_j ∇ sum_loss(b_j) / Σ_j tokens(b_j),  the gradient of the mean token loss over
exactly the tokens seen. So accumulating m micro-batches equals one batch holding all of them, and
a partial step is not scaled down by the micro-batches it lacks.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# loss_fn(trainable, frozen, batch, key) -> (sum of token losses, token count, {metric: value})
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


def micro_grads(loss_fn: LossFn):
    """jit((trainable, frozen, batch, key) -> (grad of the loss sum, loss sum, tokens, metrics))."""
    def f(trainable, frozen, batch, key):
        (s, (n, m)), g = jax.value_and_grad(lambda t: _split(loss_fn(t, frozen, batch, key)), has_aux=True)(trainable)
        return g, s, n, m
    return jax.jit(f)


def _split(out):
    s, n, m = out
    return s, (n, m)


@jax.jit
def add(a, b):
    return jax.tree.map(jnp.add, a, b)


def accumulated(grad_fn, trainable, frozen, micro_batches: list[dict], keys: list[jax.Array]):
    """(mean-token-loss gradient, mean token loss, tokens, summed metrics) over the micro-batches."""
    g_sum = s_sum = n_sum = None
    metrics: dict[str, float] = {}
    for b, k in zip(micro_batches, keys):
        g, s, n, m = grad_fn(trainable, frozen, b, k)
        g_sum, s_sum, n_sum = (g, s, n) if g_sum is None else (add(g_sum, g), s_sum + s, n_sum + n)
        for name, v in m.items():
            metrics[name] = metrics.get(name, 0.0) + float(v)
    n_safe = jnp.maximum(n_sum, 1)
    return jax.tree.map(lambda x: x / n_safe, g_sum), s_sum / n_safe, n_sum, metrics
