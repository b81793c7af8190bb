"""Local training of one MoE block (router and experts) to reproduce the dense FFN's output on the
dense model's FFN inputs: cheap (one layer, no LM head), before the end-to-end distillation.

    mlp, curve = local_fit(moe_mlp, x, y, cfg, batches, lr=1e-4, router_lr=1e-3)

Loss: relative squared error sum ||MoE(x) - y||^2 / sum ||y||^2 of each minibatch (the routing is the
family's: only the chosen experts run, weighted by the renormalised top-k probabilities). Adam
with a cosine decay; `batches` [steps, B] holds the token indices of each step (the caller draws
them from a seeded permutation, so the result is a function of the inputs).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from caldera_jax.config import ModelConfig
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.models.moe import dense_moe


def _loss(mlp, x, y, cfg):
    y_moe = dense_moe("moe", mlp, cfg, x, x, Ctx(Hooks(), {}))
    return jnp.sum(jnp.square(y_moe - y)) / jnp.sum(jnp.square(y))


@partial(jax.jit, static_argnames=("cfg", "lr", "router_lr"))
def local_fit(mlp: dict, x: jax.Array, y: jax.Array, cfg: ModelConfig, batches: jax.Array, lr: float,
              router_lr: float) -> tuple[dict, jax.Array]:
    """Returns (the trained MoE block, the loss of each step)."""
    steps = batches.shape[0]
    opt = optax.multi_transform(
        {"router": optax.adam(optax.cosine_decay_schedule(router_lr, steps, 0.1)),
         "experts": optax.adam(optax.cosine_decay_schedule(lr, steps, 0.1))},
        {"gate": jax.tree.map(lambda _: "router", mlp["gate"]),
         "experts": jax.tree.map(lambda _: "experts", mlp["experts"])})
    grad = jax.value_and_grad(_loss)

    def step(carry, idx):
        p, s = carry
        loss, g = grad(p, x[idx], y[idx], cfg)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    (mlp, _), losses = jax.lax.scan(step, (mlp, opt.init(mlp)), batches)
    return mlp, losses


def minibatches(n: int, batch: int, steps: int, seed) -> np.ndarray:
    """[steps, batch] token indices: consecutive slices of seeded permutations of range(n)."""
    rng = np.random.default_rng(seed)
    need = steps * batch
    perm = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return perm[:need].reshape(steps, batch)
