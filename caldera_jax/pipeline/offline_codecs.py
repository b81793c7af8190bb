"""Offline codec training: collect every MoE layer's dispatched hidden states on response tokens,
then fit the compressor/decompressor pairs to reconstruct them (no gradient through the model).

    collect(CollectJob(model="runs/smollm2-moe", data="chat.jsonl", out="runs/states"))
    fit(FitJob(states="runs/states", out="runs/codec-offline-4x", ratio=4, stale="none"))
    # then: experiments.train_compressors --init offline:runs/codec-offline-4x

collect: the frozen model runs the data's train and val splits (caldera_jax.data: the seed-42
split, response-only labels); the input of every MoE layer's experts (the `expert_input` tap:
what would cross the all-to-all) at each response token is streamed into
out/{split}/layer-{i:03d}.npy, float32 [tokens, H], rows in the same token order for every layer
(so a stale codec pairs a layer with its reference layer row by row), written under a temporary
name and renamed when complete; out/meta.json: dataset path and sha256, token counts per split,
the model's config, written last.

fit: one shared training loop (caldera_jax/train/loop.py) over all MoE layers at once: loss per
token = Σ_layers MSE(x̂, x) / mean(x²) + (1 − cos(x̂, x)) (scale-free per layer), minibatches of
rows; validation on the val split's states; resume after kill -9. Report per layer on the val
split: relative MSE, mean cosine, SNR in dB (10·log10(Σx² / Σ(x − x̂)²)); report.json and
snr_by_layer.png. Output codec.safetensors and codec.json in the format of train_compressors.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from caldera_jax.checkpoints_io.hf import load_hf
from caldera_jax.checkpoints_io.model_source import load_tokenizer
from caldera_jax.config import ModelConfig
from caldera_jax.data.batching import padded_batches
from caldera_jax.data.chat import IGNORE
from caldera_jax.data.records import load_tokenized, summary
from caldera_jax.models.decoder import forward
from caldera_jax.models.hooks import Hooks
from caldera_jax.moe import add_codec_params, codec_name
from caldera_jax.pipeline.train_compressors import (CODEC_FILE, STALE, CompressorJob, CompressorJobError,
                                                    _write_json, make_codec, save_codec)
from caldera_jax.train.loop import TrainConfig, train
from caldera_jax.train.optim import OptimConfig

META = "meta.json"


# ============================================================================ collect
@dataclasses.dataclass(frozen=True)
class CollectJob:
    model: str
    data: str
    out: str
    mode: str = "chat"
    seq_len: int = 256
    batch_size: int = 8
    max_tokens: int | None = None          # response tokens per split, at most (None: all)
    progress: bool = True


def _state_tap(name: str, value, aux):
    if name.endswith(".mlp.expert_input"):
        aux[name.split(".")[2]] = value                   # layer index -> [N, H]
    return value


def moe_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]


def collect(job: CollectJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes the states (see the module docstring); a complete out/ is left as is."""
    meta_path = os.path.join(job.out, META)
    if os.path.isfile(meta_path):
        log(f"{job.out}: states already collected")
        return json.load(open(meta_path))
    if not os.path.isdir(job.model):
        raise CompressorJobError(f"{job.model}: not a directory (an HF checkpoint of an MoE model)")
    cfg, params = load_hf(job.model)
    layers = moe_layers(cfg)
    if not layers:
        raise CompressorJobError(f"{job.model}: {cfg.model_type} has no MoE layer")
    tok = load_tokenizer(job.model)
    if tok is None:
        raise CompressorJobError(f"{job.model}: no tokenizer next to the weights")
    data = load_tokenized(job.data, tok, mode=job.mode, max_len=job.seq_len)
    log(summary(data.meta))
    params = jax.tree.map(jnp.asarray, params)
    hooks = Hooks(tap=_state_tap)
    counts = {}
    for split in ("train", "val"):
        d = os.path.join(job.out, split)
        os.makedirs(d, exist_ok=True)
        ex = data.splits[split]
        total = sum(e.loss_tokens for e in ex)
        n = total if job.max_tokens is None else min(total, job.max_tokens)
        files = {i: os.path.join(d, f".layer-{i:03d}.npy.tmp") for i in layers}
        mm = {i: np.lib.format.open_memmap(f, mode="w+", dtype=np.float32, shape=(n, cfg.hidden_size))
              for i, f in files.items()}
        at = 0
        bar = tqdm(total=n, desc=f"collect {split}", unit="tok", disable=not job.progress, leave=False)
        for b in padded_batches(ex, job.batch_size, job.seq_len, tok.pad_token_id or 0):
            if at >= n:
                break
            _, aux = forward(params, cfg, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                             hooks=hooks, return_aux=True)
            sel = (b["labels"].reshape(-1) != IGNORE)
            take = min(int(sel.sum()), n - at)
            for i in layers:
                rows = np.asarray(aux[str(i)], np.float32)[sel][:take]
                mm[i][at:at + take] = rows
            at += take
            bar.update(take)
        bar.close()
        for i in layers:
            mm[i].flush()
            del mm[i]
            os.replace(files[i], os.path.join(d, f"layer-{i:03d}.npy"))
        counts[split] = at
    meta = {"model": os.path.abspath(job.model), "model_config": cfg.to_hf_dict(), "layers": layers,
            "hidden_size": cfg.hidden_size, "tokens": counts, "dtype": "float32", "data": data.meta}
    _write_json(meta_path, meta)
    log(f"{job.out}: {counts['train']} train + {counts['val']} val response tokens x {len(layers)} MoE layers")
    return meta


# ============================================================================ fit
@dataclasses.dataclass(frozen=True)
class FitJob:
    states: str
    out: str
    ratio: int = 4
    stale: str = "none"
    stride: int = 12
    steps: int = 500
    batch_tokens: int = 512
    lr: float = 1e-3
    val_interval: int = 100
    seed: int = 0
    progress: bool = True


class StateData:
    """Minibatches of state rows (the same rows of every layer), by step; memory-mapped files."""

    def __init__(self, states: str, layers: list[int], batch_tokens: int, seed: int, val_rows: int = 4096):
        self.tr = {i: np.load(os.path.join(states, "train", f"layer-{i:03d}.npy"), mmap_mode="r") for i in layers}
        self.va = {i: np.load(os.path.join(states, "val", f"layer-{i:03d}.npy"), mmap_mode="r") for i in layers}
        self.n, self.bt, self.seed = len(next(iter(self.tr.values()))), batch_tokens, seed
        self.val_rows = min(val_rows, len(next(iter(self.va.values()))))

    def micro_batches(self, step: int) -> list[dict]:
        rows = np.sort(np.random.default_rng([self.seed, step]).choice(self.n, min(self.bt, self.n), replace=False))
        return [{str(i): np.asarray(a[rows]) for i, a in self.tr.items()}]

    def val_batches(self) -> list[dict]:
        return [{str(i): np.asarray(a[:self.val_rows]) for i, a in self.va.items()}]


def _per_layer(codec, cfg: ModelConfig, trainable: dict, batch: dict) -> dict[int, tuple]:
    """Layer -> (x [n, H], x̂ [n, H]) through encode/decode, stale states from the reference layers."""
    out, sent = {}, {}
    for i in sorted(int(k) for k in batch):
        cp = trainable["model"]["layers"][str(i)]["mlp"]["codec"]
        x = batch[str(i)]
        payload = codec.encode(cp, x)
        role = codec.stale_role(cfg, i)
        stale = None
        if role == "send":
            sent[i] = codec.stale(cp, x, payload)
        elif role == "use":
            stale = sent[codec.reference_layer(cfg, i)]
        out[i] = (x, codec.decode(cp, payload, stale).astype(jnp.float32))
    return out


def fit(job: FitJob, log: Callable[[str], None] = print) -> dict[str, Any]:
    meta_path = os.path.join(job.states, META)
    if not os.path.isfile(meta_path):
        raise CompressorJobError(f"{job.states}: no {META} (collect the states first)")
    meta = json.load(open(meta_path))
    cfg = ModelConfig.from_hf_dict(meta["model_config"])
    layers = meta["layers"]
    if job.stale not in STALE:
        raise CompressorJobError(f"stale must be one of {list(STALE)}, got {job.stale!r}")
    cj = CompressorJob(model=meta["model"], data=meta["data"]["source"], out=job.out, ratio=job.ratio,
                       stale=job.stale, stride=job.stride, init="identity")
    codec = make_codec(cj)
    try:
        params = add_codec_params({}, cfg, codec, jax.random.key(job.seed))
    except ValueError as e:
        raise CompressorJobError(f"ratio {job.ratio}: {e}") from None
    trainable = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)

    def loss_fn(t, frozen, batch, key):
        total = 0.0
        n = jnp.float32(next(iter(batch.values())).shape[0])
        for x, xh in _per_layer(codec, cfg, t, batch).values():
            mse = jnp.sum((xh - x) ** 2, -1) / jnp.maximum(jnp.mean(jnp.sum(x * x, -1)), 1e-12)
            cos = jnp.sum(xh * x, -1) / jnp.maximum(jnp.linalg.norm(xh, axis=-1) * jnp.linalg.norm(x, axis=-1), 1e-12)
            total = total + jnp.sum(mse + (1.0 - cos))
        return total, n, {}

    data = StateData(job.states, layers, job.batch_tokens, job.seed)
    tc = TrainConfig(steps=job.steps, seed=job.seed, val_every=job.val_interval, ckpt_every=job.val_interval,
                     optim=OptimConfig(lr=job.lr, weight_decay=0.0, warmup_frac=0.05))
    os.makedirs(job.out, exist_ok=True)
    res = train(loss_fn, trainable, {}, data, tc, os.path.join(job.out, "train"), progress=job.progress, log=log)
    save_codec(job.out, res.best_trainable, codec, cj, cfg)
    rows = []
    for i, (x, xh) in _per_layer(codec, cfg, res.best_trainable, data.val_batches()[0]).items():
        x, xh = np.asarray(x, np.float64), np.asarray(xh, np.float64)
        err = np.sum((x - xh) ** 2)
        cos = np.sum(x * xh, -1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(xh, axis=-1), 1e-12)
        rows.append({"layer": i, "rel_mse": float(err / np.sum(x * x)), "cosine": float(np.mean(cos)),
                     "snr_db": float(10 * np.log10(np.sum(x * x) / max(err, 1e-30))),
                     "role": codec.stale_role(cfg, i)})
    report = {"codec": codec_name(codec), "states": os.path.abspath(job.states), "steps": job.steps,
              "val_rows": data.val_rows, "best_step": res.best_step, "val_loss_best": res.best_val, "layers": rows}
    _write_json(os.path.join(job.out, "report.json"), report)
    _plot_snr(rows, codec_name(codec), os.path.join(job.out, "snr_by_layer.png"))
    log(f"{codec_name(codec)} offline: mean SNR {np.mean([r['snr_db'] for r in rows]):.1f} dB, mean cosine "
        f"{np.mean([r['cosine'] for r in rows]):.4f} over {len(rows)} layers; codec in {os.path.join(job.out, CODEC_FILE)}")
    return report


def _plot_snr(rows: list[dict], title: str, path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 3.2))
    ax = fig.subplots()
    ax.bar([r["layer"] for r in rows], [r["snr_db"] for r in rows],
           color=["C1" if r["role"] == "send" else "C0" for r in rows])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("SNR of x̂ (dB, val)")
    ax.set_title(title + (" (orange: stale reference layers)" if any(r["role"] == "send" for r in rows) else ""))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)

