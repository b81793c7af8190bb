"""Distillation of the MoE's routers and experts against the dense model's logits (pure pieces;
the loop, checkpoints and resume are caldera_jax.pipeline.moefy's).

    trainable, frozen = split(moe_params, moe_cfg)         # {layer: mlp params}, the rest
    opt = optimizer(mc, steps)
    step = make_train_step(moe_cfg, dense_cfg, opt, mc.aux_loss_coef)
    trainable, opt_state, m = step(trainable, opt_state, frozen, dense_params, tokens, mask)
    kl = make_eval(moe_cfg, dense_cfg)(trainable, frozen, dense_params, tokens, mask)

Loss: mean over real next-token positions of KL(teacher || student) on the full vocabulary
(float32), plus aux_loss_coef times the Switch load-balancing loss E * sum_e f_e P_e averaged over
layers (f_e: share of top-k assignments, P_e: mean router probability; 1 when balanced). Only the
routers and experts train (attention, norms, embeddings stay the dense model's). Batches are a
pure function of the step (`batch_indices`), so a resumed run sees the same data.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from caldera_jax.config import ModelConfig
from caldera_jax.models.decoder import forward
from caldera_jax.models.hooks import Hooks
from caldera_jax.moefy.config import MoefyConfig


def split(params: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """(trainable {str(i): layer i's MoE block}, frozen: params without the MoE blocks)."""
    layers = params["model"]["layers"]
    trainable = {str(i): layers[str(i)]["mlp"] for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    frozen_layers = {k: ({n: v for n, v in lp.items() if n != "mlp"} if k in trainable else lp)
                     for k, lp in layers.items()}
    frozen = {**params, "model": {**params["model"], "layers": frozen_layers}}
    return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
    """The inverse of split."""
    layers = {k: ({**lp, "mlp": trainable[k]} if k in trainable else lp)
              for k, lp in frozen["model"]["layers"].items()}
    return {**frozen, "model": {**frozen["model"], "layers": layers}}


def schedules(mc: MoefyConfig, steps: int) -> dict[str, optax.Schedule]:
    """Learning rate per step, {"router", "experts"}: linear warm-up over distill_warmup of the
    steps, then cosine decay to 10 %."""
    warm = int(mc.distill_warmup * steps)

    def sched(lr):
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1), lr * 0.1)
    return {"router": sched(mc.distill_router_lr), "experts": sched(mc.distill_lr)}


def optimizer(mc: MoefyConfig, steps: int) -> optax.GradientTransformation:
    """Clip the global gradient norm to 1, then Adam on `schedules` (routers and experts apart)."""
    def labels(tree):
        return {k: {"gate": jax.tree.map(lambda _: "router", v["gate"]),
                    "experts": jax.tree.map(lambda _: "experts", v["experts"])} for k, v in tree.items()}
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.multi_transform({k: optax.adam(s) for k, s in schedules(mc, steps).items()}, labels))


def keep_router_input(name: str, value: Any, aux: dict) -> Any:
    """A tap hook keeping every MoE layer's router input in aux (for the balance loss, the report)."""
    if name.endswith(".mlp.router_input"):
        aux[name] = value
    return value


def balance_loss(aux: dict, trainable: dict, cfg: ModelConfig, weights: jax.Array) -> jax.Array:
    """Switch load-balancing loss, mean over the MoE layers; `weights` [N] (1 = real token)."""
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    total = 0.0
    for key, mlp in trainable.items():
        x = aux[f"model.layers.{key}.mlp.router_input"]
        probs = jax.nn.softmax((x @ mlp["gate"]["weight"].T).astype(jnp.float32), axis=-1)
        _, idx = jax.lax.top_k(probs, k)
        f = jnp.einsum("n,ne->e", weights, jnp.sum(jax.nn.one_hot(idx, E), axis=1)) / (k * jnp.sum(weights))
        p = jnp.einsum("n,ne->e", weights, probs) / jnp.sum(weights)
        total = total + E * jnp.sum(f * p)
    return total / max(len(trainable), 1)


def kl_to_teacher(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over positions with mask 1 of KL(softmax(teacher) || softmax(student)), float32."""
    lt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    ls = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)
    w = mask.astype(jnp.float32)
    return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)


def _losses(trainable, frozen, teacher, tokens, mask, cfg, teacher_cfg, aux_coef):
    t_logits = jax.lax.stop_gradient(forward(teacher, teacher_cfg, tokens, mask))
    s_logits, aux = forward(merge(trainable, frozen), cfg, tokens, mask,
                            hooks=Hooks(tap=keep_router_input), return_aux=True)
    kl = kl_to_teacher(s_logits, t_logits, mask)
    bal = balance_loss(aux, trainable, cfg, mask.reshape(-1).astype(jnp.float32))
    return kl + aux_coef * bal, {"kl": kl, "balance": bal}


def make_train_step(cfg: ModelConfig, teacher_cfg: ModelConfig, opt: optax.GradientTransformation,
                    aux_coef: float) -> Callable:
    """step(trainable, opt_state, frozen, teacher, tokens [B, T], mask [B, T]) ->
    (trainable, opt_state, {"loss", "kl", "balance", "grad_norm"}), jitted."""
    def step(trainable, opt_state, frozen, teacher, tokens, mask):
        (loss, parts), grads = jax.value_and_grad(_losses, has_aux=True)(
            trainable, frozen, teacher, tokens, mask, cfg, teacher_cfg, aux_coef)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state,
                {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)})
    return jax.jit(step, donate_argnums=(0, 1))


def make_eval(cfg: ModelConfig, teacher_cfg: ModelConfig) -> Callable:
    """val(trainable, frozen, teacher, tokens, mask) -> KL to the teacher (scalar), jitted."""
    def val(trainable, frozen, teacher, tokens, mask):
        return _losses(trainable, frozen, teacher, tokens, mask, cfg, teacher_cfg, 0.0)[1]["kl"]
    return jax.jit(val)


def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """The training windows of `step` (0-based): consecutive slices of a seeded permutation of
    range(n), a new permutation every epoch. A pure function of its arguments."""
    pos = np.arange(step * batch, (step + 1) * batch)
    out = np.empty(batch, np.int64)
    for epoch in np.unique(pos // n):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out
