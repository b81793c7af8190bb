"""End-to-end training of the expert-parallel codecs through a frozen MoE model, as a library call.

    job = CompressorJob(model="runs/smollm2-moe", data="chat.jsonl", out="runs/codec-4x", ratio=4,
                        stale="none", router_mode="compressed", mesh={"dp": 2, "ep": 4})
    result = run(job)

What happens, in order:
 1. inputs, checked before any work: the MoE checkpoint (an HF directory of an MoE family), the
    codec options, the mesh against the model and the batch, the data (caldera_jax.data: chat
    records with response-only labels, or plain text; the seed-42 80/10/10 split; skipped records
    counted), an offline initialisation when asked (`init="offline:DIR"`, a previous run's codec).
 2. the model's weights cast once to `dtype` (bf16 activations) and frozen; the codec parameters
    (float32) at model.layers.{i}.mlp.codec are the only trainable ones.
 3. the shared training loop (caldera_jax/train/loop.py): next-token loss on the response tokens
    through the expert-parallel MoE with the codec inside (experts along ep, data along dp), AdamW
    with warm-up + cosine, clipping, accumulation, validation, best tracking, orbax checkpoints,
    resume after kill -9, metrics JSONL and PNG curves under out/train/.
 4. out/codec.safetensors (the best validation step's codec, keyed by HF layer names,
    model.layers.{i}.mlp.codec.{compress,decompress}.weight), out/codec.json (what the codec is),
    out/run.json (the job, the data split's metadata, the result).
Multi-host: every process runs the same job (after caldera_jax.runtime.init_distributed); the
frozen weights, the codec and each batch are global arrays on the mesh over all processes' devices
(each process reads the same files and fills its own shards), orbax checkpoints are collective,
and process 0 alone writes codec.safetensors, codec.json, run.json, metrics and curves.
Codecs: stale "none" -> Learned(ratio); "compressed" -> StaleConditioned(stale_kind="compressed");
"uncompressed" -> StaleConditioned(stale_kind="raw") (the reference layer's raw state), every
`stride`-th MoE layer a reference layer. The code crosses the wire in bf16.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from caldera_jax.checkpoints_io.atomic import fsync_path
from caldera_jax.checkpoints_io.hf import load_hf
from caldera_jax.checkpoints_io.model_source import load_tokenizer
from caldera_jax.data.batching import packed_batches, padded_batches
from caldera_jax.data.chat import IGNORE
from caldera_jax.data.records import load_tokenized, summary
from caldera_jax.models.decoder import forward
from caldera_jax.moe import (Learned, StaleConditioned, add_codec_params, codec_name, expert_parallel_hooks,
                             make_mesh, merge_params, split_codec_params)
from caldera_jax.moe.codec_spec import CODEC_FILE, CODEC_JSON, STALE_KINDS, CodecSpecError, read_trained
from caldera_jax.moe.ep import check_mesh, param_shardings
from caldera_jax.moe.routing import ROUTER_MODES
from caldera_jax.params import flatten
from caldera_jax.train.placement import is_primary, place, replicated
from caldera_jax.train.loop import EpochData, TrainConfig, TrainResult, batch_placer, evaluate, token_nll, train
from caldera_jax.train.optim import OptimConfig

STALE = STALE_KINDS                     # --stale value -> StaleConditioned.stale_kind (None: Learned)
RUN_JSON = "run.json"


class CompressorJobError(ValueError):
    """A job that cannot run (bad option, model, mesh or data); the message names what."""


@dataclasses.dataclass(frozen=True)
class CompressorJob:
    model: str                            # HF directory of an MoE model
    data: str                             # JSONL: {"messages": [...]} (mode chat) or {"text": ...}
    out: str
    mode: str = "chat"
    ratio: int = 4
    stale: str = "none"                   # none | compressed | uncompressed
    stride: int = 12
    router_mode: str = "compressed"       # compressed | uncompressed
    init: str = "identity"                # identity | random | offline:DIR (a codec.safetensors)
    epochs: int = 1
    max_steps: int | None = None          # stop earlier than epochs x steps per epoch
    batch_size: int = 4                   # sequences per micro-batch
    accum: int = 1                        # micro-batches per optimizer step
    seq_len: int = 256                    # longer records are skipped (counted)
    pack: bool = False                    # several records per row (segment-masked attention), else one
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    clip_norm: float = 1.0
    val_interval: int = 50
    ckpt_interval: int = 50
    mesh: tuple[tuple[str, int], ...] = (("dp", 1), ("ep", 1))
    dtype: str = "bfloat16"               # activations and frozen weights; codec params float32
    seed: int = 0
    progress: bool = True


def make_codec(job: CompressorJob):
    if job.stale not in STALE:
        raise CompressorJobError(f"stale must be one of {list(STALE)}, got {job.stale!r}")
    if job.router_mode not in ROUTER_MODES:
        raise CompressorJobError(f"router_mode must be one of {list(ROUTER_MODES)}, got {job.router_mode!r}")
    kind = "random" if job.init == "random" else "identity"
    if STALE[job.stale] is None:
        return Learned(job.ratio, kind, wire_dtype="bfloat16")
    return StaleConditioned(job.ratio, kind, wire_dtype="bfloat16", stride=job.stride, stale_kind=STALE[job.stale])


def _offline_init(spec: str, cfg, codec) -> dict[int, dict]:
    """The parameters of a previous run's codec (offline fit or end to end), checked against the
    model and against this job's codec."""
    try:
        _, given, _ = read_trained(spec.removeprefix("offline:"), cfg)
        add_codec_params({}, cfg, codec, jax.random.key(0), given=given)     # this job's shapes
    except (CodecSpecError, ValueError) as e:
        raise CompressorJobError(f"init {spec!r}: {e}") from None
    return given


def open_inputs(job: CompressorJob) -> dict[str, Any]:
    """1. Everything checked before any work."""
    if not os.path.isdir(job.model):
        raise CompressorJobError(f"{job.model}: not a directory (an HF checkpoint of an MoE model)")
    cfg, params = load_hf(job.model)
    if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise CompressorJobError(f"{job.model}: {cfg.model_type} has no MoE layer: nothing to compress")
    codec = make_codec(job)
    try:
        codec.init(jax.random.key(0), cfg, next(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)))
    except ValueError as e:
        raise CompressorJobError(f"ratio {job.ratio}: {e}") from None
    sizes = dict(job.mesh)
    try:
        mesh = make_mesh(ep=sizes.get("ep", 1), dp=sizes.get("dp", 1))
        check_mesh(mesh, cfg, job.batch_size * job.seq_len)
    except ValueError as e:
        raise CompressorJobError(f"--mesh: {e}") from None
    if job.batch_size % sizes.get("dp", 1):
        raise CompressorJobError(f"batch_size {job.batch_size} is not divisible by dp={sizes.get('dp', 1)}")
    tok = load_tokenizer(job.model)
    if tok is None:
        raise CompressorJobError(f"{job.model}: no tokenizer next to the weights")
    data = load_tokenized(job.data, tok, mode=job.mode, max_len=job.seq_len, seed=42)
    if not data.splits["train"] or not data.splits["val"]:
        raise CompressorJobError(f"{job.data}: {summary(data.meta)}: the train and val splits need examples")
    given = _offline_init(job.init, cfg, codec) if job.init.startswith("offline:") else None
    if job.init not in ("identity", "random") and given is None:
        raise CompressorJobError(f"init must be identity, random or offline:DIR, got {job.init!r}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batcher = packed_batches if job.pack else padded_batches
    batches = {s: list(batcher(data.splits[s], job.batch_size, job.seq_len, pad)) for s in ("train", "val")}
    return {"cfg": cfg, "params": params, "codec": codec, "mesh": mesh, "data": data, "batches": batches,
            "given": given}


def run(job: CompressorJob, log: Callable[[str], None] = print,
        on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    inp = open_inputs(job)
    cfg, codec, mesh = inp["cfg"], inp["codec"], inp["mesh"]
    log(summary(inp["data"].meta))
    dtype = jnp.dtype(job.dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), inp["params"])
    params = add_codec_params(params, cfg, codec, jax.random.key(job.seed), given=inp["given"])
    trainable, frozen = split_codec_params(params)
    trainable = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), trainable)
    # placed once as the expert-parallel layer reads them (experts along ep, the rest replicated):
    # no step copies a frozen weight; global arrays, so one host or many run the same code
    frozen = place(frozen, param_shardings(frozen, mesh))
    trainable = place(trainable, replicated(mesh))
    primary = is_primary()
    hooks = expert_parallel_hooks(mesh, codec=codec, router_mode=job.router_mode)

    def loss_fn(t, f, batch, key):
        p = merge_params(jax.tree.map(lambda a: a.astype(dtype), t), f)
        labels, packed = batch["labels"], {}
        if job.pack:     # each record sees only itself; a record's first token is no target
            packed = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
            labels = jnp.where(batch["positions"] == 0, IGNORE, labels)
        logits = forward(p, cfg, batch["input_ids"], batch["attention_mask"], hooks=hooks, **packed)
        s, n = token_nll(logits, labels)
        return s, n, {}

    data = EpochData(inp["batches"]["train"], inp["batches"]["val"], job.accum, job.seed)
    steps = data.steps_per_epoch * job.epochs if job.max_steps is None else min(job.max_steps, data.steps_per_epoch * job.epochs)
    tc = TrainConfig(steps=steps, accum=job.accum, seed=job.seed, val_every=job.val_interval,
                     ckpt_every=job.ckpt_interval,
                     optim=OptimConfig(lr=job.lr, weight_decay=job.weight_decay, warmup_frac=job.warmup_frac,
                                       clip_norm=job.clip_norm))
    os.makedirs(job.out, exist_ok=True)
    start_val = None
    run_path = os.path.join(job.out, RUN_JSON)
    if os.path.isfile(run_path):
        start_val = json.load(open(run_path)).get("val_loss_before")
    if start_val is None:                                  # the codec at its initialisation
        start_val = evaluate(jax.jit(loss_fn), trainable, frozen, data.val_batches(), batch_placer(mesh),
                             jax.random.key(0))
    record = {"job": {k: (dict(v) if k == "mesh" else v) for k, v in dataclasses.asdict(job).items()},
              "codec": codec_name(codec), "data": inp["data"].meta, "steps": steps, "val_loss_before": start_val}
    if primary:
        _write_json(run_path, record)
    res: TrainResult = train(loss_fn, trainable, frozen, data, tc, os.path.join(job.out, "train"), mesh=mesh,
                             progress=job.progress, on_step=on_step, log=log)
    record.update({"best_step": res.best_step, "val_loss_best": res.best_val,
                   "val_loss_last": next((r["val_loss"] for r in reversed(res.rows) if "val_loss" in r), None),
                   "resumed_from": res.resumed_from, "processes": jax.process_count()})
    if primary:                                    # the other processes hold the same values
        save_codec(job.out, res.best_trainable, codec, job, cfg)
        _write_json(run_path, record)
    log(f"{codec_name(codec)}: validation loss {start_val:.4f} (initial codec) -> {res.best_val:.4f} "
        f"(best, step {res.best_step}); codec in {os.path.join(job.out, CODEC_FILE)}")
    return {**record, "result": res}


def save_codec(out: str, trainable: dict, codec, job: CompressorJob, cfg) -> None:
    """codec.safetensors (float32, HF layer names) and codec.json, each written atomically."""
    flat = {n: np.asarray(v, np.float32) for n, v in flatten(trainable).items()}
    tmp = os.path.join(out, "." + CODEC_FILE + ".tmp")
    save_file(flat, tmp)
    fsync_path(tmp)
    os.replace(tmp, os.path.join(out, CODEC_FILE))
    desc = {"codec": codec_name(codec), "kind": type(codec).__name__, "ratio": job.ratio, "stale": job.stale,
            "stride": job.stride if job.stale != "none" else None, "router_mode": job.router_mode,
            "wire_dtype": "bfloat16", "model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "layers": sorted({int(n.split(".")[2]) for n in flat}), "tensors": sorted(flat)}
    _write_json(os.path.join(out, CODEC_JSON), desc)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)
