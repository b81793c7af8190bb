"""Deriving an MoE from a dense model as a library call: cluster each FFN's neurons into experts,
fit the routers, distill against the dense model, write a HF checkpoint, report.

    spec = MoefyJob(model="hf_dir_or.gguf", out="runs/moe", calib="train.txt",
                    config=MoefyConfig(experts=8, top_k=2), ppl_text="valid.txt")
    report = run(spec, Callbacks(on_step=lambda step, rec: ...))

What happens, in order (this file reads top to bottom in the same order):
 1. inputs, all checked before any work (caldera_jax.moefy.config.check: a dense SwiGLU source of a
    family with an MoE counterpart, experts dividing the intermediate size, top_k <= experts; the
    calibration data; the held-out text). Nothing is written to `out` before this passes.
 2. the output directory: the job's identity (settings, source fingerprint, calibration digest,
    digest of the code that decides the bytes) in out/work/job.json, an flock; a different job of
    ours is refused (or replaced with `overwrite`), anything else is always refused.
 3. per layer, on the dense model's FFN inputs: balanced clustering of the neurons, the split into
    experts, the router fit; one file per layer (out/work/fit/layer-NNNNN.npz, written atomically).
 4. distillation of routers and experts against the dense model's logits: tqdm bar with ETA,
    out/report/metrics.jsonl (one line per step, validation KL every eval_every steps),
    out/report/loss_curves.png, orbax checkpoints in out/work/distill every ckpt_every steps.
 5. the HF checkpoint in `out` itself (config.json moved into place last): transformers loads it.
 6. the report: per-layer routing entropy, expert load, fraction of the dense FFN output recovered
    (after the fit and after distillation), perplexity of dense and MoE on the same held-out
    tokens, parameters in total and active per token: out/report/report.json, layers.png.

Kill it at any moment (even kill -9) and rerun the same call: finished layers and the latest
distillation checkpoint are reused, and the checkpoint written is byte-identical to an
uninterrupted run's (every batch, seed and initial value is a function of the settings and step).
Process set-up (compilation cache, LAPACK threads) is the caller's (caldera_jax.runtime.setup).
"""
from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import hashlib
import io
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from caldera_jax.caldera.calibration import calibration_tokens
from caldera_jax.checkpoints_io.compressed import atomic_write_bytes, file_sha256, json_bytes
from caldera_jax.checkpoints_io.fingerprint import fingerprint, open_source
from caldera_jax.checkpoints_io.hf import TOKENIZER_FILES, load_hf, np_dtype, save_hf
from caldera_jax.checkpoints_io.model_source import load_tokenizer
from caldera_jax.eval.perplexity import model_perplexity, tokenize_text
from caldera_jax.models.decoder import forward
from caldera_jax.models.hooks import Hooks
from caldera_jax.moefy import distill as dist
from caldera_jax.moefy.activations import ffn_inputs
from caldera_jax.moefy.cluster import check_clusters
from caldera_jax.moefy.config import MoefyConfig, check
from caldera_jax.moefy.convert import convert, expert_output_scale, moe_config, split_mlp
from caldera_jax.moefy.layer import derive_layer
from caldera_jax.moefy.metrics import ffn_recovery, param_counts, routing_stats
from caldera_jax.params import param_shapes, unflatten
from caldera_jax.pipeline.compress import MIN_CALIB_TOKENS, check_source_complete
from caldera_jax.pipeline.compress import code_digest as compress_code_digest
from caldera_jax.pipeline.job_dir import JobError, check_out_vs_model

WORK = "work"
REPORT = "report"
LOCK_FILE = ".moefy.lock"
FORMAT_VERSION = 1
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
            "model.safetensors.index.json") + TOKENIZER_FILES
REPORT_FILES = ("report.json", "metrics.jsonl", "loss_curves.png", "layers.png")


@dataclasses.dataclass(frozen=True)
class MoefyJob:
    """One derivation. Paths are explicit (the CLI resolves its defaults from the assets)."""
    model: str                              # dense HF checkpoint directory or .gguf file
    out: str                                # output directory: the MoE HF checkpoint (+ work/, report/)
    calib: str                              # .txt, .jsonl ({'text': ...}) or .npy token ids [N, T]
    config: MoefyConfig = MoefyConfig()
    ppl_text: str | None = None             # held-out text: perplexity dense vs MoE (None: skip)
    ppl_tokens: int = 8192
    ppl_seq_len: int = 512
    overwrite: bool = False                 # replace a different moefy job in `out`
    progress: bool = True
    command: str = ""                       # recorded in the report


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """on_layer(i, record) after layer i's fit file is written; on_step(step, record) after each
    distillation step (and its checkpoint, when one is due). Raising in either stops the job like a
    crash; a rerun resumes. log(line): the human-readable lines (default tqdm.write)."""
    on_layer: Callable[[int, dict], None] | None = None
    on_step: Callable[[int, dict], None] | None = None
    log: Callable[[str], None] = tqdm.write


# ============================================================================ 1. inputs
def open_inputs(spec: MoefyJob) -> dict[str, Any]:
    """Everything the job reads, validated before any work starts."""
    mc = spec.config
    mc.check()
    source = open_source(spec.model)
    check_source_complete(source, spec.model)
    cfg = source.cfg
    target = check(cfg, mc, source=spec.model)
    tokenizer = load_tokenizer(source.tokenizer_dir, source.tokenizer_kwargs)
    tokens, mask = calibration_tokens(spec.calib, tokenizer, samples=mc.calib_samples, seq_len=mc.calib_seq_len,
                                      vocab_size=cfg.vocab_size)
    if int(mask.sum()) < MIN_CALIB_TOKENS:
        raise JobError(f"{spec.calib}: only {int(mask.sum())} calibration tokens; at least {MIN_CALIB_TOKENS} "
                       f"are needed (calib_samples={mc.calib_samples} x calib_seq_len={mc.calib_seq_len})")
    if len(tokens) < 2:
        raise JobError(f"{spec.calib}: {len(tokens)} calibration window(s); at least 2 are needed "
                       f"(one is held out for the report)")
    d_tokens, d_mask = calibration_tokens(spec.calib, tokenizer, samples=mc.distill_samples + mc.val_samples,
                                          seq_len=mc.distill_seq_len, vocab_size=cfg.vocab_size)
    if len(d_tokens) <= mc.val_samples:
        raise JobError(f"{spec.calib}: {len(d_tokens)} distillation windows, not more than "
                       f"val_samples={mc.val_samples}")
    ppl_ids = None
    if spec.ppl_text is not None and spec.ppl_tokens:
        if tokenizer is None:
            raise JobError(f"{spec.model}: perplexity needs the model's tokenizer (none found)")
        if not os.path.isfile(spec.ppl_text):
            raise JobError(f"{spec.ppl_text}: held-out text file not found")
        ppl_ids = tokenize_text(tokenizer, spec.ppl_text)
        if len(ppl_ids) < spec.ppl_seq_len:
            raise JobError(f"{spec.ppl_text}: fewer tokens than one perplexity window of {spec.ppl_seq_len}")
    moe_cfg = moe_config(cfg, mc)
    return dict(source=source, cfg=cfg, moe_cfg=moe_cfg, target=target, tokenizer=tokenizer,
                tokens=tokens, mask=mask, d_tokens=d_tokens, d_mask=d_mask, ppl_ids=ppl_ids)


def held_out_split(n: int) -> int:
    """Calibration windows [0, split) fit; [split, n) are held out for the report (1 in 8, >= 1)."""
    return n - max(1, n // 8)


def val_split(n: int, val: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of the n distillation windows: `val` evenly spaced ones validate."""
    v = np.unique(np.linspace(0, n - 1, val).round().astype(np.int64))
    return np.setdiff1d(np.arange(n), v), v


# ============================================================================ 2. identity and out dir
CODE = ("caldera_jax/moefy", "caldera_jax/models", "caldera_jax/params.py", "caldera_jax/config.py",
        "caldera_jax/families", "caldera_jax/caldera/calibration.py", "caldera_jax/checkpoints_io/hf.py",
        "caldera_jax/pipeline/moefy.py")


def code_digest() -> str:
    """sha256 of the sources that decide the derived model's bytes: a job resumes only with the code
    it started with."""
    return compress_code_digest(CODE)


def job_identity(spec: MoefyJob, inp: dict[str, Any], fp: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same job (a rerun resumes only when this is equal)."""
    tok = hashlib.sha256()
    for a in (inp["tokens"], inp["mask"], inp["d_tokens"], inp["d_mask"]):
        tok.update(np.ascontiguousarray(a).tobytes())
    return {"kind": "moefy", "format_version": FORMAT_VERSION, "moefy_config": spec.config.to_dict(),
            "target": inp["target"], "source_digest": fp["digest"], "code_digest": code_digest(),
            "calibration": {"file": os.path.basename(spec.calib), "tokens_sha256": tok.hexdigest(),
                            "windows": int(inp["tokens"].shape[0]), "tokens": int(inp["mask"].sum()),
                            "distill_windows": int(inp["d_tokens"].shape[0])}}


class OutDir:
    """The output directory, locked (flock on out/.moefy.lock) while the `with` block runs. A
    directory that is not a moefy job's is refused and left without our lock file."""

    def __init__(self, out: str):
        self.out = out
        self.work = os.path.join(out, WORK)
        self.report = os.path.join(out, REPORT)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "OutDir":
        if os.path.lexists(self.out) and not os.path.isdir(self.out):
            raise JobError(f"{self.out}: --out exists and is not a directory")
        try:
            self._created = not os.path.exists(self.out)
            os.makedirs(self.out, exist_ok=True)
            fd = os.open(os.path.join(self.out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JobError(f"{self.out}: cannot create the output directory or its lock ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobError(f"{self.out}: another moefy job is running in this directory") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self._release(remove=False)

    def _release(self, remove: bool) -> None:
        if self._fd is None:
            return
        if remove:
            try:
                os.remove(os.path.join(self.out, LOCK_FILE))
                if self._created and not os.listdir(self.out):
                    os.rmdir(self.out)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def prepare(self, identity: dict[str, Any], overwrite: bool) -> None:
        try:
            self._prepare(json.loads(json.dumps(identity)), overwrite)
        except JobError:
            self._release(remove=True)
            raise

    def _prepare(self, identity: dict[str, Any], overwrite: bool) -> None:
        job = os.path.join(self.work, "job.json")
        others = [f for f in os.listdir(self.out) if f != LOCK_FILE]
        if others:
            old = _read_json(job)
            if old != identity:
                if not (isinstance(old, dict) and old.get("kind") == "moefy"):
                    raise JobError(f"{self.out}: exists and is not a moefy job's directory (no valid "
                                   f"{WORK}/job.json); choose another --out")
                if not overwrite:
                    diff = ", ".join(k for k in identity if old.get(k) != identity[k])
                    raise JobError(f"{self.out}: holds a different moefy job ({diff} differ); use another "
                                   f"--out, or --overwrite to replace it")
                self.delete_ours()
        if not os.path.isfile(job):
            atomic_write_bytes(job, json_bytes(identity))

    def delete_ours(self) -> None:
        """Deletes what a moefy job writes (work/, report/'s files, the HF checkpoint's files)."""
        shutil.rmtree(self.work, ignore_errors=True)
        if os.path.isdir(self.report):
            for f in os.listdir(self.report):
                if f in REPORT_FILES or f.startswith("."):
                    os.remove(os.path.join(self.report, f))
            if not os.listdir(self.report):
                os.rmdir(self.report)
        for f in os.listdir(self.out):
            if os.path.isfile(os.path.join(self.out, f)) and any(fnmatch.fnmatch(f, p) for p in HF_FILES):
                os.remove(os.path.join(self.out, f))


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return "unreadable"


def _append_jsonl(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


# ============================================================================ 3. clustering + router fit
def _fit_path(work: str, i: int) -> str:
    return os.path.join(work, "fit", f"layer-{i:05d}.npz")


def _read_fit(path: str, cfg, moe_cfg) -> dict[str, Any] | None:
    """A finished layer's file, or None when absent or unreadable (then the layer is redone)."""
    try:
        with np.load(path) as z:
            rec = {k: z[k] for k in z.files if k != "metrics"}
            rec["metrics"] = json.loads(str(z["metrics"]))
        check_clusters(rec["clusters"], cfg.intermediate_size, moe_cfg.num_experts)
        if rec["router"].shape != (moe_cfg.num_experts, cfg.hidden_size):
            return None
        return rec
    except (OSError, ValueError, KeyError):
        return None


def fitted_block(dense_mlp: dict, rec: dict, moe_cfg) -> dict[str, Any]:
    """Layer's MoE block from its fit record: the split by rec's clusters, rec's router, and the
    locally trained experts when the record has them."""
    block = split_mlp(dense_mlp, rec["clusters"], expert_output_scale(moe_cfg))
    block["gate"]["weight"] = rec["router"]
    for p in ("gate_proj", "up_proj", "down_proj"):
        if f"experts.{p}" in rec:
            block["experts"][p]["weight"] = rec[f"experts.{p}"]
    return block


def _fit_stage(spec: MoefyJob, inp: dict, od: OutDir, cb: Callbacks) -> dict[int, dict]:
    cfg, moe_cfg, mc, source = inp["cfg"], inp["moe_cfg"], spec.config, inp["source"]
    L = cfg.num_hidden_layers
    fits = {i: r for i in range(L) if (r := _read_fit(_fit_path(od.work, i), cfg, moe_cfg)) is not None}
    todo = [i for i in range(L) if i not in fits]
    if not todo:
        return fits
    if fits:
        cb.log(f"resuming {spec.out}: {len(fits)} of {L} layers already clustered and fitted")
    split = held_out_split(len(inp["tokens"]))
    n_fit = int(inp["mask"][:split].sum())
    bar = tqdm(total=L, initial=L - len(todo), desc="cluster + fit", unit="layer",
               disable=not spec.progress, dynamic_ncols=True)
    try:
        for i, layer, x in ffn_inputs(lambda j: source.read_layer(j, np.float32),
                                      source.read("model.embed_tokens.weight", np.float32), cfg,
                                      inp["tokens"], inp["mask"], layers=max(todo) + 1):
            if i in fits:
                continue
            rec = derive_layer(i, layer["mlp"], x, n_fit, moe_cfg, mc)
            buf = io.BytesIO()
            np.savez(buf, **{k: v for k, v in rec.items() if k != "metrics"}, metrics=json.dumps(rec["metrics"]))
            atomic_write_bytes(_fit_path(od.work, i), buf.getvalue())
            fits[i] = rec
            m = rec["metrics"]
            bar.update()
            bar.set_postfix_str(f"layer {i} recovered {m['recovered']:.3f} (oracle {m['oracle']:.3f})"
                                + (f" local {m['recovered_local']:.3f}" if "recovered_local" in m else ""))
            if cb.on_layer is not None:
                cb.on_layer(i, m)
    finally:
        bar.close()
    return fits


# ============================================================================ 4. distillation
def _dense_params(source, cfg) -> dict:
    return unflatten({n: jnp.asarray(source.read(n, np.float32)) for n in param_shapes(cfg)})


def initial_moe(dense: dict, cfg, fits: dict[int, dict], mc: MoefyConfig) -> tuple[Any, dict]:
    """The MoE before distillation: the dense model split by the clusters, with the fitted routers."""
    moe_cfg, params = convert(cfg, dense, {i: f["clusters"] for i, f in fits.items()}, mc)
    for i, f in fits.items():
        params["model"]["layers"][str(i)]["mlp"] = fitted_block(dense["model"]["layers"][str(i)]["mlp"], f, moe_cfg)
    return moe_cfg, jax.tree.map(jnp.asarray, params)


def _distill_stage(spec: MoefyJob, inp: dict, od: OutDir, cb: Callbacks, dense: dict, moe_params: dict
                   ) -> tuple[dict, list[dict]]:
    """Returns (distilled MoE params, the metrics rows of every step)."""
    mc, moe_cfg, cfg = spec.config, inp["moe_cfg"], inp["cfg"]
    metrics_path = os.path.join(od.report, "metrics.jsonl")
    os.makedirs(od.report, exist_ok=True)
    trainable, frozen = dist.split(moe_params, moe_cfg)
    steps = mc.distill_steps
    if steps == 0:
        atomic_write_bytes(metrics_path, b"")
        return moe_params, []
    opt = dist.optimizer(mc, steps)
    state = {"trainable": trainable, "opt_state": opt.init(trainable)}
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(od.work, "distill")), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=False, cleanup_tmp_directories=True))
    start = mngr.latest_step() or 0
    if start:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
        cb.log(f"resuming {spec.out}: distillation from step {start} of {steps}")
    # the metrics of the steps the checkpoint holds (a killed run may have logged a few more)
    rows = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= start] if start else []
    atomic_write_bytes(metrics_path, b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rows))
    train_idx, val_idx = val_split(len(inp["d_tokens"]), mc.val_samples)
    tokens, mask = inp["d_tokens"], inp["d_mask"]
    val_tok, val_mask = jnp.asarray(tokens[val_idx]), jnp.asarray(mask[val_idx])
    val_fn = dist.make_eval(moe_cfg, cfg)
    if start == steps:
        mngr.close()
        return dist.merge(state["trainable"], frozen), rows
    step_fn = dist.make_train_step(moe_cfg, cfg, opt, mc.aux_loss_coef)
    lr = dist.schedules(mc, steps)
    if not rows:
        row = {"step": 0, "val_kl": float(val_fn(state["trainable"], frozen, dense, val_tok, val_mask))}
        rows.append(row)
        _append_jsonl(metrics_path, row)
    bar = tqdm(total=steps, initial=start, desc="distill", unit="step", disable=not spec.progress,
               dynamic_ncols=True)
    trainable, opt_state = state["trainable"], state["opt_state"]
    try:
        for s in range(start, steps):
            t0 = time.perf_counter()
            idx = train_idx[dist.batch_indices(s, len(train_idx), mc.distill_batch, mc.seed)]
            trainable, opt_state, m = step_fn(trainable, opt_state, frozen, dense, jnp.asarray(tokens[idx]),
                                              jnp.asarray(mask[idx]))
            row = {"step": s + 1, **{k: float(v) for k, v in m.items()},
                   "lr": float(lr["experts"](s)), "lr_router": float(lr["router"](s)),
                   "tokens": int(mask[idx].sum())}
            if (s + 1) % mc.eval_every == 0 or s + 1 == steps:
                row["val_kl"] = float(val_fn(trainable, frozen, dense, val_tok, val_mask))
            row["seconds"] = time.perf_counter() - t0
            if (s + 1) % mc.ckpt_every == 0 or s + 1 == steps:
                mngr.save(s + 1, args=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}))
                mngr.wait_until_finished()
            rows.append(row)
            _append_jsonl(metrics_path, row)
            if "val_kl" in row:
                plot_losses(rows, os.path.join(od.report, "loss_curves.png"))
            bar.update()
            bar.set_postfix_str(f"kl {row['kl']:.4f}" + (f" val {row['val_kl']:.4f}" if "val_kl" in row else ""))
            if cb.on_step is not None:
                cb.on_step(s + 1, row)
    finally:
        bar.close()
        mngr.close()
    return dist.merge(trainable, frozen), rows


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                break                                   # a line cut by a kill: drop it and the rest
    return out


def plot_losses(rows: list[dict], path: str) -> None:
    """PNG of the training KL per step and the validation KL (a Figure without pyplot), atomically."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    tr = [r for r in rows if "kl" in r]
    va = [r for r in rows if "val_kl" in r]
    if tr:
        ax.plot([r["step"] for r in tr], [r["kl"] for r in tr], lw=1, alpha=0.6, label="train KL (batch)")
    if va:
        ax.plot([r["step"] for r in va], [r["val_kl"] for r in va], marker="o", label="validation KL")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(dense || MoE), nats/token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    os.replace(tmp, path)


# ============================================================================ 5. the HF checkpoint
def _exported(out: str, work: str) -> dict[str, str] | None:
    """{file: sha256} of out/work/exported.json when every file listed is in place with that digest."""
    done = _read_json(os.path.join(work, "exported.json"))
    if isinstance(done, dict) and done and all(os.path.isfile(os.path.join(out, f))
                                               and file_sha256(os.path.join(out, f)) == sha for f, sha in done.items()):
        return done
    return None


def _export_stage(spec: MoefyJob, inp: dict, od: OutDir, params: dict) -> dict[str, str]:
    """Writes the HF checkpoint's files into `out` (config.json last); returns {file: sha256}.
    Skipped when out/work/exported.json lists files that are all in place with those digests."""
    marker = os.path.join(od.work, "exported.json")
    done = _exported(spec.out, od.work)
    if done is not None:
        return done
    source, moe_cfg = inp["source"], inp["moe_cfg"]
    staging = os.path.join(od.work, "export")
    hf_tokenizer = inp["tokenizer"] is not None and not source.tokenizer_kwargs     # a HF dir with one
    save_hf(staging, moe_cfg, params, tokenizer_dir=source.tokenizer_dir if hf_tokenizer else None,
            dtype=np_dtype(inp["cfg"].torch_dtype))
    if source.tokenizer_kwargs and inp["tokenizer"] is not None:      # a GGUF source: its tokenizer
        inp["tokenizer"].save_pretrained(staging)
    files = sorted(os.listdir(staging), key=lambda f: (f == "config.json", f))
    digests = {f: file_sha256(os.path.join(staging, f)) for f in files}
    for f in files:
        os.replace(os.path.join(staging, f), os.path.join(spec.out, f))
    shutil.rmtree(staging, ignore_errors=True)
    atomic_write_bytes(marker, json_bytes(digests))
    return digests


# ============================================================================ 6. the report
def own_routing(params: dict, moe_cfg, tokens: np.ndarray, mask: np.ndarray) -> list[dict]:
    """Per layer: routing entropy and load when the MoE runs on its own hidden states."""
    _, aux = forward(params, moe_cfg, jnp.asarray(tokens), jnp.asarray(mask), hooks=Hooks(tap=dist.keep_router_input),
                     return_aux=True)
    real = np.asarray(mask, bool).reshape(-1)
    out = []
    for i in range(moe_cfg.num_hidden_layers):
        x = jnp.asarray(np.asarray(aux[f"model.layers.{i}.mlp.router_input"])[real])
        logits = x @ params["model"]["layers"][str(i)]["mlp"]["gate"]["weight"].T
        probs = jax.nn.softmax(logits, axis=-1)
        _, idx = jax.lax.top_k(probs, moe_cfg.num_experts_per_tok)
        chosen = jnp.sum(jax.nn.one_hot(idx, moe_cfg.num_experts), axis=1)
        s = routing_stats(probs, chosen, moe_cfg.num_experts)
        out.append({"layer": i, "entropy": float(s["entropy"]), "imbalance": float(s["imbalance"]),
                    "load": [float(v) for v in np.asarray(s["load"])]})
    return out


def final_recovery(source, cfg, moe_cfg, moe_params: dict, tokens: np.ndarray, mask: np.ndarray) -> list[dict]:
    """Per layer, on the dense model's FFN inputs: the fraction of the dense FFN output the
    (distilled) MoE block recovers, and its routing entropy and load there."""
    out = []
    for i, layer, x in ffn_inputs(lambda j: source.read_layer(j, np.float32),
                                  source.read("model.embed_tokens.weight", np.float32), cfg, tokens, mask):
        m = ffn_recovery(layer["mlp"], moe_params["model"]["layers"][str(i)]["mlp"], jnp.asarray(x), moe_cfg)
        out.append({"layer": i, "recovered": float(m["recovered"]), "entropy": float(m["entropy"]),
                    "imbalance": float(m["imbalance"]), "load": [float(v) for v in np.asarray(m["load"])]})
    return out


def plot_layers(fit: list[dict], final: list[dict], own: list[dict], path: str) -> None:
    fig = Figure(figsize=(12, 4))
    a, b = fig.subplots(1, 2)
    a.plot([r["layer"] for r in fit], [r["oracle"] for r in fit], "k:", label="oracle choice (equal weights)")
    a.plot([r["layer"] for r in fit], [r["recovered"] for r in fit], marker="o", ms=3, label="after router fit")
    if all("recovered_local" in r for r in fit):
        a.plot([r["layer"] for r in fit], [r["recovered_local"] for r in fit], marker="o", ms=3, label="after local fit")
    a.plot([r["layer"] for r in final], [r["recovered"] for r in final], marker="o", ms=3, label="after distillation")
    a.set_title("fraction of the dense FFN output recovered (dense inputs)")
    b.plot([r["layer"] for r in own], [r["entropy"] for r in own], marker="o", ms=3, label="routing entropy / log E")
    b.plot([r["layer"] for r in own], [r["imbalance"] for r in own], marker="o", ms=3, label="max load x E")
    b.set_title("routing on the MoE's own hidden states")
    for ax in (a, b):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _perplexity(spec: MoefyJob, inp: dict, dense: dict, say: Callable[[str], None]) -> dict[str, Any]:
    """Dense and the MoE as written to disk (read back), on the same held-out windows."""
    kw = dict(seq_len=spec.ppl_seq_len, max_tokens=spec.ppl_tokens, batch_size=4)
    res = {"dense": model_perplexity(dense, inp["cfg"], inp["ppl_ids"], desc="perplexity (dense)", **kw)}
    moe_cfg, moe = load_hf(spec.out, dtype=jnp.float32)
    res["moe"] = model_perplexity(moe, moe_cfg, inp["ppl_ids"], desc="perplexity (moe)", **kw)
    res["ratio"] = res["moe"]["ppl"] / res["dense"]["ppl"]
    say(f"perplexity on held-out text ({res['dense']['tokens']} tokens, {res['dense']['windows']} x "
        f"{res['dense']['seq_len']}): dense {res['dense']['ppl']:.3f}  moe {res['moe']['ppl']:.3f}  "
        f"({100 * (res['ratio'] - 1):+.1f}%)")
    return res


# ============================================================================ the job
def run(spec: MoefyJob, callbacks: Callbacks = Callbacks()) -> dict[str, Any]:
    """Runs the job (see the module docstring); returns the report dict."""
    t_start = time.perf_counter()
    say = callbacks.log
    inp = open_inputs(spec)
    cfg, moe_cfg, mc = inp["cfg"], inp["moe_cfg"], spec.config
    say(f"model {spec.model}: {cfg.model_type}, {cfg.num_hidden_layers} layers, FFN {cfg.intermediate_size} -> "
        f"{moe_cfg.model_type}: {mc.experts} experts of {moe_cfg.moe_intermediate_size}, top-{mc.top_k}, "
        f"clustering {mc.clustering}; calibration {spec.calib}: {inp['tokens'].shape[0]} x "
        f"{inp['tokens'].shape[1]} ({int(inp['mask'].sum())} tokens), distillation {mc.distill_steps} steps x "
        f"{mc.distill_batch} x {mc.distill_seq_len}")
    check_out_vs_model(spec.out, spec.model)
    fp = fingerprint(inp["source"])
    identity = job_identity(spec, inp, fp)
    with OutDir(spec.out) as od:
        od.prepare(identity, spec.overwrite)
        done = _read_json(os.path.join(od.report, "report.json"))
        if isinstance(done, dict) and done.get("job") == identity and _exported(spec.out, od.work):
            say(f"{spec.out}: this job is already finished (report/report.json)")
            return done
        t0 = time.perf_counter()
        fits = _fit_stage(spec, inp, od, callbacks)
        t_fit = time.perf_counter() - t0
        dense = _dense_params(inp["source"], cfg)
        _, moe0 = initial_moe(dense, cfg, fits, mc)
        t0 = time.perf_counter()
        moe, rows = _distill_stage(spec, inp, od, callbacks, dense, moe0)
        t_distill = time.perf_counter() - t0
        digests = _export_stage(spec, inp, od, moe)

        # -- 6. report
        fit_rows = [fits[i]["metrics"] for i in range(cfg.num_hidden_layers)]
        split = held_out_split(len(inp["tokens"]))
        held_tok, held_mask = inp["tokens"][split:], inp["mask"][split:]
        final = final_recovery(inp["source"], cfg, moe_cfg, moe, held_tok, held_mask)
        _, val_idx = val_split(len(inp["d_tokens"]), mc.val_samples)
        own = own_routing(moe, moe_cfg, inp["d_tokens"][val_idx], inp["d_mask"][val_idx])
        plot_layers(fit_rows, final, own, os.path.join(od.report, "layers.png"))
        val = [r for r in rows if "val_kl" in r]
        rep = {"command": spec.command, "model": spec.model, "out": spec.out, "calib": spec.calib,
               "target": moe_cfg.model_type, "config": mc.to_dict(), "job": identity,
               "expert_output_scale": expert_output_scale(moe_cfg), "files": digests,
               "params": param_counts(cfg, moe_cfg),
               "seconds": {"fit_now": t_fit, "distill_now": t_distill,
                           "fit_recorded": sum(r["seconds"] for r in fit_rows),
                           "distill_recorded": sum(r.get("seconds", 0.0) for r in rows)},
               "distill": {"steps": mc.distill_steps, "val_kl_before": val[0]["val_kl"] if val else None,
                           "val_kl_after": val[-1]["val_kl"] if val else None,
                           "tokens_seen": sum(r.get("tokens", 0) for r in rows)},
               "layers_fit": fit_rows, "layers_final": final, "layers_own_routing": own}
        rep["seconds"]["derivation_recorded"] = rep["seconds"]["fit_recorded"] + rep["seconds"]["distill_recorded"]
        rep["summary"] = {
            "recovered_fit_mean": float(np.mean([r["recovered"] for r in fit_rows])),
            "recovered_oracle_mean": float(np.mean([r["oracle"] for r in fit_rows])),
            "recovered_final_mean": float(np.mean([r["recovered"] for r in final])),
            "entropy_own_mean": float(np.mean([r["entropy"] for r in own])),
            "imbalance_own_max": float(np.max([r["imbalance"] for r in own]))}
        if inp["ppl_ids"] is not None:
            rep["perplexity"] = _perplexity(spec, inp, dense, say)
        rep["wall_seconds"] = time.perf_counter() - t_start
        atomic_write_bytes(os.path.join(od.report, "report.json"),
                           json.dumps(rep, indent=1, sort_keys=True, default=str).encode())
    return rep


def format_summary(rep: dict[str, Any]) -> str:
    """The per-layer table and the totals, as the CLI prints them."""
    local = all("recovered_local" in f for f in rep["layers_fit"])
    lines = ["fraction of the dense FFN output recovered (held-out calibration tokens, dense inputs) and routing",
             "layer  router-fit  oracle" + ("  local-fit" if local else "") + "  distilled  entropy(own)  max-load x E (own)"]
    for f, g, o in zip(rep["layers_fit"], rep["layers_final"], rep["layers_own_routing"]):
        lines.append(f"{f['layer']:5d}  {f['recovered']:10.4f}  {f['oracle']:6.4f}"
                     + (f"  {f['recovered_local']:9.4f}" if local else "")
                     + f"  {g['recovered']:9.4f}  {o['entropy']:12.4f}  {o['imbalance']:18.3f}")
    s, p = rep["summary"], rep["params"]
    lines.append(f"mean recovered: router fit {s['recovered_fit_mean']:.4f} (oracle {s['recovered_oracle_mean']:.4f})"
                 + (f", local fit {np.mean([f['recovered_local'] for f in rep['layers_fit']]):.4f}" if local else "")
                 + f", final {s['recovered_final_mean']:.4f}; params {p['moe_total'] / 1e6:.2f} M total, "
                 f"{p['moe_active_per_token'] / 1e6:.2f} M active per token (dense {p['dense_total'] / 1e6:.2f} M)")
    if rep["distill"]["val_kl_before"] is not None:
        lines.append(f"distillation: validation KL {rep['distill']['val_kl_before']:.4f} -> "
                     f"{rep['distill']['val_kl_after']:.4f} ({rep['distill']['tokens_seen']} tokens)")
    sec = rep["seconds"]
    lines.append(f"derivation {sec['derivation_recorded']:.0f} s (fit {sec['fit_recorded']:.0f} s, distillation "
                 f"{sec['distill_recorded']:.0f} s, as recorded by the steps)")
    if "perplexity" in rep:
        pp = rep["perplexity"]
        lines.append(f"perplexity: dense {pp['dense']['ppl']:.3f}  moe {pp['moe']['ppl']:.3f}  "
                     f"({100 * (pp['ratio'] - 1):+.1f}%)")
    return "\n".join(lines)
