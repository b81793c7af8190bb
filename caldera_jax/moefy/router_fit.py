"""Fitting one layer's router (E x H) so that the experts it chooses carry the largest share of the
dense FFN's output, on the dense model's FFN inputs (optax, full batch).

    G = contribution_gram(moe_mlp, x, scale)              # [N, E, E]: <c_e, c_f> per token
    w, curve = fit_router(x, G, top_k, scale, steps=300, lr=3e-2)
    m = routing_metrics(w, x, G, top_k, scale)             # recovered, oracle, entropy, load

c_e(x) is expert e's share of the dense output (its neurons' contribution; the dense output is
y = sum_e c_e). The MoE computes y_hat = sum_{e in top-k} scale * w_e * c_e with w the renormalised
top-k probabilities, so every quantity below needs only the Gram matrix G of the contributions:
||y - y_hat||^2 = d^T G d with d_e = 1 - scale * w_e (chosen) or 1 (not chosen).

Loss: cross-entropy of the router's softmax against the oracle's choice (the k experts a greedy
search picks to minimise ||y - sum_S c_e||, weight 1/k each), plus `recon_weight` times the
relative reconstruction error of the routed output (its gradient shapes the weights among the
chosen experts). "Fraction of the dense FFN output recovered" = 1 - sum ||y - y_hat||^2 / sum ||y||^2.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from caldera_jax.moefy.metrics import routing_stats


@partial(jax.jit, static_argnames=("scale",))
def contribution_gram(experts: dict, x: jax.Array, scale: float) -> jax.Array:
    """experts {gate_proj, up_proj, down_proj} stacked [E, ...] (down_proj carrying `scale`),
    x [N, H] -> G [N, E, E] = <c_e(x), c_f(x)> with c_e = expert_e(x) / scale."""
    hp = jax.lax.Precision.HIGHEST
    g = jnp.einsum("nh,eih->eni", x, experts["gate_proj"]["weight"], precision=hp)
    u = jnp.einsum("nh,eih->eni", x, experts["up_proj"]["weight"], precision=hp)
    c = jnp.einsum("eni,ehi->enh", jax.nn.silu(g) * u, experts["down_proj"]["weight"], precision=hp) / scale
    return jnp.einsum("enh,fnh->nef", c, c, precision=hp)


def oracle_choice(G: jax.Array, k: int) -> jax.Array:
    """Greedy best k-subset per token: [N, E] 0/1, adding at each step the expert that most reduces
    ||y - sum_S c_e||^2 (gain 2<c_e, r> - ||c_e||^2, r the residual)."""
    N, E, _ = G.shape
    cy = jnp.sum(G, axis=2)                                   # <c_e, y>
    diag = jnp.diagonal(G, axis1=1, axis2=2)
    chosen = jnp.zeros((N, E), G.dtype)
    for _ in range(k):
        cr = cy - jnp.einsum("nef,nf->ne", G, chosen)          # <c_e, r>
        gain = jnp.where(chosen > 0, -jnp.inf, 2 * cr - diag)
        chosen = chosen + jax.nn.one_hot(jnp.argmax(gain, axis=1), E, dtype=G.dtype)
    return chosen


def routed_coefficients(logits: jax.Array, k: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """([N, E] multiplier of each contribution in the MoE output: scale * renormalised top-k
    probability, 0 elsewhere; [N, E] 0/1 chosen)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(probs, k)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(idx, logits.shape[-1], dtype=w.dtype)      # [N, k, E]
    return scale * jnp.sum(onehot * w[..., None], axis=1), jnp.sum(onehot, axis=1)


def _relative_error(a: jax.Array, G: jax.Array) -> jax.Array:
    d = 1.0 - a
    return jnp.sum(jnp.einsum("ne,nef,nf->n", d, G, d)) / jnp.sum(G)


def router_loss(w: jax.Array, x: jax.Array, G: jax.Array, target: jax.Array, k: int, scale: float,
                recon_weight: float) -> jax.Array:
    logits = x @ w.T
    ce = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return ce + recon_weight * _relative_error(routed_coefficients(logits, k, scale)[0], G)


@partial(jax.jit, static_argnames=("k", "scale", "steps", "recon_weight", "lr"))
def fit_router(x: jax.Array, G: jax.Array, k: int, scale: float, steps: int, lr: float,
               recon_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Adam (cosine-decayed lr) from a zero router, full batch. Returns (router [E, H], loss per step)."""
    E, H = G.shape[1], x.shape[1]
    target = oracle_choice(G, k) / k
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05))
    w0 = jnp.zeros((E, H), jnp.float32)
    grad = jax.value_and_grad(router_loss)

    def step(carry, _):
        w, s = carry
        loss, g = grad(w, x, G, target, k, scale, recon_weight)
        upd, s = opt.update(g, s, w)
        return (optax.apply_updates(w, upd), s), loss

    (w, _), losses = jax.lax.scan(step, (w0, opt.init(w0)), None, length=steps)
    return w, losses


@partial(jax.jit, static_argnames=("k", "scale"))
def routing_metrics(w: jax.Array, x: jax.Array, G: jax.Array, k: int, scale: float) -> dict[str, jax.Array]:
    """On tokens x [N, H] with contributions G: fraction of the dense FFN output recovered by the
    router `w` ("recovered"), by the oracle's choice with equal weights ("oracle"), and the
    routing's entropy and load (metrics.routing_stats)."""
    E = G.shape[1]
    logits = x @ w.T
    a, chosen = routed_coefficients(logits, k, scale)
    probs = jax.nn.softmax(logits, axis=-1)
    return {"recovered": 1.0 - _relative_error(a, G),
            "oracle": 1.0 - _relative_error(oracle_choice(G, k), G),
            **routing_stats(probs, chosen, E)}
