"""The training loop shared by the project's training jobs.

    tc = TrainConfig(steps=200, accum=4, optim=OptimConfig(lr=1e-4), val_every=50, ckpt_every=50)
    res = train(loss_fn, trainable, frozen, data, tc, "runs/x/train", mesh=mesh)
    res.trainable, res.best_trainable, res.rows

loss_fn(trainable, frozen, batch, key) -> (sum of token losses, tokens, {metric: sum}) (see
accumulate.py); only `trainable` is differentiated and updated, `frozen` is passed through
unchanged every step (placed once by the caller, never copied). `data` gives the micro-batches
of optimizer step s, `data.micro_batches(s)` (a list of at most tc.accum numpy dicts, the same
for the same s: the step is the data position), and `data.val_batches()`. With a mesh that has
a "dp" axis every batch array is sharded along its first dimension.

Multi-host (caldera_jax.runtime.init_distributed): every process runs `train` with the same
arguments; batches, the trainable params and the optimizer state become global arrays on the mesh
(caldera_jax.train.placement; the caller places `frozen`), orbax checkpoints are written by all,
metrics.jsonl and curves.png by process 0 only.

On disk (out_dir): ckpt/ (orbax: trainable, optimizer state; JSON meta: step = data position,
seed, best step and validation loss), best/ (orbax: the trainable params of the best validation
loss), metrics.jsonl (one row per step; validation rows carry val_loss), curves.png (smoothed
train loss, validation loss, learning rate). A rerun after a crash or kill -9 restores the last
checkpoint, drops the metrics rows after it, and continues: the RNG key of each micro-batch is
fold_in(seed, step, j) and the batches depend only on the step, so the final parameters equal an
uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from caldera_jax.train.accumulate import LossFn, accumulated, micro_grads
from caldera_jax.train.optim import OptimConfig, adamw, schedule
from caldera_jax.train.placement import global_array, is_primary, place as place_on, replicated


class Data(Protocol):
    def micro_batches(self, step: int) -> list[dict]: ...
    def val_batches(self) -> list[dict]: ...


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    accum: int = 1                    # micro-batches per optimizer step (at most)
    optim: OptimConfig = OptimConfig()
    val_every: int = 50               # validation every N steps (and after the last)
    ckpt_every: int = 50              # orbax checkpoint every N steps (and after the last)
    seed: int = 0

    def __post_init__(self):
        for f in ("steps", "accum", "val_every", "ckpt_every"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) >= 1):
                raise ValueError(f"TrainConfig.{f} must be an integer >= 1, got {getattr(self, f)!r}")


@dataclasses.dataclass
class TrainResult:
    trainable: Any
    best_trainable: Any
    best_step: int | None
    best_val: float | None
    rows: list[dict]
    resumed_from: int


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break                                 # a line cut by a kill: drop it and the rest
    return rows


def _write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


def plot_curves(rows: list[dict], path: str, smooth: float = 0.9) -> None:
    """PNG: train loss (raw and exponentially smoothed), validation loss, learning rate; atomic."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.5))
    ax, ax_lr = fig.subplots(1, 2)
    tr = [r for r in rows if "loss" in r]
    if tr:
        steps = [r["step"] for r in tr]
        ema, sm = None, []
        for r in tr:
            ema = r["loss"] if ema is None else smooth * ema + (1 - smooth) * r["loss"]
            sm.append(ema)
        ax.plot(steps, [r["loss"] for r in tr], lw=0.6, alpha=0.35, label="train (step)")
        ax.plot(steps, sm, lw=1.5, label=f"train (EMA {smooth})")
        ax_lr.plot(steps, [r["lr"] for r in tr], lw=1.2)
    va = [r for r in rows if "val_loss" in r]
    if va:
        ax.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", lw=1.2, ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per token)")
    ax.legend(fontsize=8)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    save_png(fig, path)


def save_png(fig, path: str) -> None:
    """A matplotlib Figure to path, atomically (temporary name, then rename)."""
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def batch_placer(mesh):
    """batch (numpy dict) -> arrays: split along "dp" when the mesh has it, else replicated on the
    mesh (global arrays, so that it works across hosts); no mesh: the default device."""
    if mesh is None:
        return lambda b: jax.tree.map(jnp.asarray, b)
    sharding = NamedSharding(mesh, P("dp") if "dp" in mesh.axis_names else P())
    return lambda b: jax.tree.map(lambda a: global_array(a, sharding), b)


def evaluate_metrics(eval_fn, trainable, frozen, batches: list[dict], place, key) -> tuple[float, dict]:
    """(mean token loss, {metric: sum / tokens}) over batches (eval_fn: jitted loss_fn)."""
    s = n = 0.0
    msum: dict[str, float] = {}
    for b in batches:
        ls, nt, m = eval_fn(trainable, frozen, place(b), key)
        s, n = s + float(ls), n + float(nt)
        for k, v in m.items():
            msum[k] = msum.get(k, 0.0) + float(v)
    return s / max(n, 1.0), {k: v / max(n, 1.0) for k, v in msum.items()}


def evaluate(eval_fn, trainable, frozen, batches: list[dict], place, key) -> float:
    """Mean token loss over batches (eval_fn: jitted loss_fn)."""
    return evaluate_metrics(eval_fn, trainable, frozen, batches, place, key)[0]


class EpochData:
    """Fixed micro-batches of a train split, reshuffled every epoch by (seed, epoch); step s holds
    the epoch's micro-batches [k·accum, (k+1)·accum) (fewer in an epoch's last step). Depends only
    on the step, as `train`'s exact resume needs."""

    def __init__(self, train_batches: list[dict], val_batches: list[dict], accum: int, seed: int):
        if not train_batches:
            raise ValueError("EpochData: no training batches")
        self.train, self.val, self.accum, self.seed = train_batches, val_batches, accum, seed
        self.steps_per_epoch = math.ceil(len(train_batches) / accum)

    def micro_batches(self, step: int) -> list[dict]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        return [self.train[i] for i in order[k * self.accum:(k + 1) * self.accum]]

    def val_batches(self) -> list[dict]:
        return self.val


def train(loss_fn: LossFn, trainable, frozen, data: Data, tc: TrainConfig, out_dir: str, *, mesh=None,
          progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Trains `trainable` for tc.steps optimizer steps (see the module docstring); resumes from
    out_dir's last checkpoint when there is one."""
    import orbax.checkpoint as ocp
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    opt = adamw(tc.optim, tc.steps)
    lr = schedule(tc.optim, tc.steps)
    opts = dict(enable_async_checkpointing=False, cleanup_tmp_directories=True)
    mngr = ocp.CheckpointManager(os.path.join(out_dir, "ckpt"), options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))
    best_mngr = ocp.CheckpointManager(os.path.join(out_dir, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=1, **opts))
    state = {"trainable": trainable, "opt_state": opt.init(trainable)}
    if mesh is not None:                           # global arrays: the same code on one host or many
        state = place_on(state, replicated(mesh))
    primary = is_primary()
    meta = {"step": 0, "seed": tc.seed, "best_step": None, "best_val": None}
    start = mngr.latest_step() or 0
    if start:
        got = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(state)),
                                                          meta=ocp.args.JsonRestore()))
        state, meta = got["state"], dict(got["meta"])
        if meta.get("seed") != tc.seed:
            raise ValueError(f"{out_dir}: its checkpoint was trained with seed {meta.get('seed')}, not {tc.seed}; "
                             f"use another directory")
        log(f"resuming {out_dir}: from step {start} of {tc.steps}")
    for st in best_mngr.all_steps():               # a best saved after the restored point is redone
        if st > start or st != meta["best_step"]:
            best_mngr.delete(st)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    rows = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= start] if start else []
    if primary:
        _write_jsonl(metrics_path, rows)
    grad_fn = micro_grads(loss_fn)
    eval_fn = jax.jit(loss_fn)
    update = jax.jit(lambda g, s, p: _apply(opt, g, s, p))
    place = batch_placer(mesh)
    root = jax.random.key(tc.seed)
    if mesh is not None:
        root = jax.random.wrap_key_data(global_array(jax.random.key_data(root), replicated(mesh)))
    val = data.val_batches()
    trainable, opt_state = state["trainable"], state["opt_state"]
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not (progress and primary),
               dynamic_ncols=True)
    try:
        for s in range(start, tc.steps):
            t0 = time.perf_counter()
            micro = data.micro_batches(s)
            if not 1 <= len(micro) <= tc.accum:
                raise ValueError(f"data.micro_batches({s}) gave {len(micro)} micro-batches (1..{tc.accum} expected)")
            keys = [jax.random.fold_in(jax.random.fold_in(root, s), j) for j in range(len(micro))]
            g, loss, ntok, msum = accumulated(grad_fn, trainable, frozen, [place(b) for b in micro], keys)
            trainable, opt_state, gnorm = update(g, opt_state, trainable)
            row = {"step": s + 1, "loss": float(loss), "tokens": int(ntok), "micro_batches": len(micro),
                   "grad_norm": float(gnorm), "lr": float(lr(s)),
                   **{k: v / max(float(ntok), 1.0) for k, v in msum.items()}}
            last = s + 1 == tc.steps
            if val and ((s + 1) % tc.val_every == 0 or last):
                row["val_loss"], vm = evaluate_metrics(eval_fn, trainable, frozen, val, place, root)
                row.update({f"val_{k}": v for k, v in vm.items()})
                if meta["best_val"] is None or row["val_loss"] < meta["best_val"]:
                    meta["best_val"], meta["best_step"] = row["val_loss"], s + 1
                    best_mngr.save(s + 1, args=ocp.args.StandardSave(trainable), force=True)
                    best_mngr.wait_until_finished()
            row["seconds"] = time.perf_counter() - t0
            if (s + 1) % tc.ckpt_every == 0 or last:
                meta["step"] = s + 1
                mngr.save(s + 1, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
                    meta=ocp.args.JsonSave(meta)), force=True)
                mngr.wait_until_finished()
            rows.append(row)
            if primary:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
                if "val_loss" in row or last:
                    plot_curves(rows, os.path.join(out_dir, "curves.png"))
            bar.update()
            bar.set_postfix_str(f"loss {row['loss']:.4f}" + (f" val {row['val_loss']:.4f}" if "val_loss" in row else ""))
            if on_step is not None:
                on_step(s + 1, row)
        best = trainable
        if meta["best_step"] is not None and best_mngr.latest_step() is not None:
            best = best_mngr.restore(best_mngr.latest_step(), args=ocp.args.StandardRestore(_abstract(trainable)))
        return TrainResult(trainable, best, meta["best_step"], meta["best_val"], rows, start)
    finally:
        bar.close()
        mngr.close()
        best_mngr.close()


def _apply(opt: optax.GradientTransformation, grads, opt_state, params):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL, count) for logits [B, T, V] and labels [B, T] (IGNORE = -100 where
    no loss): position t's logits predict labels[t + 1]."""
    lg, lb = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    ok = lb >= 0
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(ok, lb, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(ok, nll, 0.0)), jnp.sum(ok).astype(jnp.float32)

