"""Fine-tuning a compressed checkpoint against its uncompressed model, as a library call.

    job = FinetuneJob(ckpt="runs/smollm2", model=SMOLLM2_DIR, calib=TRAIN_TXT, out="runs/smollm2-ft",
                      config=FinetuneConfig(steps=300), ppl_text=VALID_TXT, ppl_tokens=8192)
    report = run(job)

What happens, in order:
 1. inputs, checked before any work: the settings; the checkpoint against the source model (its
    manifest, every file's sha256, the source's fingerprint: a checkpoint of another model is
    refused); --out neither the checkpoint, nor the model, nor inside them; the calibration windows
    (train / validation split by a seeded permutation); the held-out text.
 2. the output directory (caldera_jax/pipeline/job_dir.py): one job per directory, resume, and
    --overwrite that deletes only our files.
 3. the shared training loop (caldera_jax/train/loop.py) over caldera_jax/caldera/finetune.py's
    trainable parameters (L, R, Q's row scales, norms): KL to the teacher's next-token
    distribution on calibration windows, AdamW with warm-up + cosine, clipping, validation (KL and
    the student's NLL on windows never trained on), best step, orbax checkpoints, exact resume
    after kill -9, out/finetune/metrics.jsonl and curves.png.
 4. the best validation step's values written back into the checkpoint's own formats (Q's codes
    unchanged, L and R re-quantized, row scales folded into Q's scales): a normal compressed
    checkpoint in out/, fingerprinted against the same source, loadable by `load_compressed`, with
    the same bits/param; caldera_config.json (last) records the base checkpoint and the settings.
 5. report/: perplexity on held-out text of the source, the base checkpoint and the fine-tuned
    one (one layer in memory at a time), the validation perplexity against fine-tuning tokens
    (ppl_by_tokens.png), report.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from caldera_jax.caldera.calibration import calibration_tokens
from caldera_jax.caldera.finetune import FinetuneConfig, assemble, distill_loss, factor_formats, finalize, split
from caldera_jax.checkpoints_io import compressed as ck
from caldera_jax.checkpoints_io.fingerprint import open_source
from caldera_jax.checkpoints_io.model_source import load_model, load_tokenizer, open_layers
from caldera_jax.eval.perplexity import streamed_perplexity, tokenize_text
from caldera_jax.params import flatten
from caldera_jax.pipeline.compress import CODE, code_digest, make_mesh, mesh_axes
from caldera_jax.pipeline.job_dir import JobDir, JobError, check_out_vs_model
from caldera_jax.train.placement import place, replicated
from caldera_jax.train.loop import EpochData, TrainConfig, batch_placer, evaluate_metrics, save_png, train
from caldera_jax.train.optim import OptimConfig

FINETUNE_CODE = CODE + ("caldera_jax/train", "caldera_jax/pipeline/finetune.py")
TRAIN_DIR = "finetune"


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    ckpt: str                             # a complete compressed checkpoint (experiments.compress)
    model: str                            # its source model (HF directory or .gguf): the teacher
    calib: str                            # calibration text (.txt / .jsonl) or token ids (.npy)
    out: str                              # the fine-tuned checkpoint's directory
    config: FinetuneConfig = FinetuneConfig()
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)   # {"dp": 2}: batches along dp
    overwrite: bool = False
    ppl_text: str | None = None           # held-out text for the perplexity report
    ppl_tokens: int = 0                   # 0: no perplexity report
    ppl_seq_len: int = 512
    progress: bool = True
    command: str = ""


# ============================================================================ 1. inputs
def open_inputs(job: FinetuneJob) -> dict[str, Any]:
    """Everything the job reads, validated before any work starts."""
    ft = job.config.check()
    if not os.path.exists(job.model):
        raise JobError(f"{job.model}: no such file or directory (--model, the source model)")
    for other, what in ((job.ckpt, "the checkpoint"), (job.model, "the source model")):
        if os.path.exists(other):
            check_out_vs_model(job.out, other)
        if os.path.realpath(job.out) == os.path.realpath(other):
            raise JobError(f"{job.out}: --out is {what}")
    source = open_source(job.model)
    reader = ck.open_compressed(job.ckpt, source)            # manifest, file digests, fingerprint
    tokenizer = load_tokenizer(source.tokenizer_dir, source.tokenizer_kwargs)
    tokens, mask = calibration_tokens(job.calib, tokenizer, samples=ft.samples + ft.val_samples,
                                      seq_len=ft.seq_len, vocab_size=reader.cfg.vocab_size)
    if len(tokens) < ft.val_samples + ft.batch:
        raise JobError(f"{job.calib}: {len(tokens)} calibration windows of {ft.seq_len} tokens, fewer than "
                       f"val_samples + batch = {ft.val_samples + ft.batch}")
    ppl_ids = None
    if job.ppl_tokens:
        if job.ppl_text is None or not os.path.isfile(job.ppl_text):
            raise JobError(f"{job.ppl_text}: held-out text not found (ppl_tokens > 0 needs it)")
        ppl_ids = tokenize_text(tokenizer, job.ppl_text)
        if len(ppl_ids) < job.ppl_seq_len:
            raise JobError(f"{job.ppl_text}: fewer tokens than one perplexity window of {job.ppl_seq_len}")
    return dict(ft=ft, source=source, reader=reader, tokenizer=tokenizer, tokens=tokens, mask=mask,
                ppl_ids=ppl_ids)


def batches(tokens: np.ndarray, mask: np.ndarray, ft: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    """(train micro-batches, validation batches) of ft.batch windows; the split is a permutation
    seeded by ft.seed (val: its first ft.val_samples windows); a last partial batch is dropped."""
    order = np.random.default_rng(ft.seed).permutation(len(tokens))
    val, tr = order[:ft.val_samples], order[ft.val_samples:]

    def group(idx: np.ndarray, keep_partial: bool) -> list[dict]:
        n = len(idx) if keep_partial else len(idx) // ft.batch * ft.batch
        return [{"input_ids": tokens[idx[s:s + ft.batch]].astype(np.int32),
                 "attention_mask": mask[idx[s:s + ft.batch]].astype(np.int32)} for s in range(0, n, ft.batch)]
    return group(tr, False), group(val, True)


def job_identity(job: FinetuneJob, inp: dict[str, Any]) -> dict[str, Any]:
    ft = inp["ft"]
    tok = hashlib.sha256(inp["tokens"].tobytes() + inp["mask"].tobytes()).hexdigest()
    cfg_digest = hashlib.sha256(json.dumps(ft.to_dict(), sort_keys=True).encode()).hexdigest()
    return {"kind": "finetune", "finetune": ft.to_dict(), "job_config_digest": cfg_digest,
            "source_digest": inp["reader"].manifest["source_fingerprint"]["digest"],
            "base_checkpoint": inp["reader"].manifest[ck.MANIFEST_DIGEST],
            "code_digest": code_digest(FINETUNE_CODE),
            "calibration": {"file": os.path.basename(job.calib), "tokens_sha256": tok,
                            "windows": int(inp["tokens"].shape[0]), "seq_len": int(inp["tokens"].shape[1])}}


# ============================================================================ 3. training
def train_model(job: FinetuneJob, inp: dict[str, Any], mesh, log: Callable[[str], None], on_step=None):
    """(the fine-tuned params, the compressed params it started from, TrainResult, the validation
    row of step 0)."""
    ft, cfg = inp["ft"], inp["reader"].cfg
    _, params = ck.load_compressed(job.ckpt, verify_files=False)      # verified in open_inputs
    _, teacher, _ = load_model(job.model)
    trainable, frozen = split(params, ft)
    formats = factor_formats(params)
    n_train = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(trainable))
    log(f"trainable: {n_train:,} values ({sum(isinstance(v, dict) for v in trainable.values())} compressed "
        f"matrices: L, R{', row scales' if ft.train_row_scales else ''}"
        f"{'; norms' if ft.train_norms else ''}); factors {ft.factors}")

    def loss_fn(t, fz, batch, key):
        return distill_loss(assemble(t, fz["student"], ft, formats), fz["teacher"], cfg, batch, ft)

    tr, val = batches(inp["tokens"], inp["mask"], ft)
    frozen = {"student": frozen, "teacher": teacher}
    if mesh is not None:                 # replicated once on the dp devices, not broadcast every step
        frozen, trainable = place((frozen, trainable), replicated(mesh))
    kl0, m0 = evaluate_metrics(jax.jit(loss_fn), trainable, frozen, val,
                               batch_placer(mesh), jax.random.key(ft.seed))
    start = {"step": 0, "val_loss": kl0, **{f"val_{k}": v for k, v in m0.items()}}
    log(f"before fine-tuning: validation KL {kl0:.4f}, perplexity {math.exp(m0['nll']):.3f} "
        f"(uncompressed {math.exp(m0['teacher_nll']):.3f})")
    tc = TrainConfig(steps=ft.steps, accum=ft.accum, val_every=ft.val_every, ckpt_every=ft.ckpt_every,
                     seed=ft.seed, optim=OptimConfig(lr=ft.lr, weight_decay=ft.weight_decay,
                                                     warmup_frac=ft.warmup_frac, clip_norm=ft.clip_norm))
    res = train(loss_fn, trainable, frozen, EpochData(tr, val, ft.accum, ft.seed),
                tc, os.path.join(job.out, TRAIN_DIR), mesh=mesh, progress=job.progress, log=log, on_step=on_step)
    return finalize(res.best_trainable, params, ft), params, res, start


# ============================================================================ 4. the checkpoint
def write_checkpoint(job: FinetuneJob, inp: dict[str, Any], new_params, out_dir: JobDir, identity: dict,
                     extra: dict[str, Any]) -> None:
    """Layer files with the trained leaves (everything else byte-for-byte the base's values),
    globals, tokenizer, caldera_config.json last."""
    reader, cfg = inp["reader"], inp["reader"].cfg
    new = flatten(new_params)
    for i in tqdm(range(cfg.num_hidden_layers), desc="write", unit="layer", disable=not job.progress, leave=False):
        meta, old = ck.read_layer(os.path.join(job.ckpt, ck.layer_file(i)))
        dense = {n: np.asarray(new[n]).astype(np.asarray(old[n]).dtype) for n in meta["dense"]}
        protected = {n: np.asarray(old[n], np.float32) for n in meta["protected"]}
        quantized = {n: new[n] for n in meta["quantized"]}
        out_dir.write_layer(i, dense=dense, protected=protected, quantized=quantized, matrices=meta["matrices"])
    out_dir.verify_layers()
    old_globals = load_file(os.path.join(job.ckpt, ck.GLOBALS_FILE))
    ck.write_globals(job.out, {n: np.asarray(new[n]).astype(a.dtype) if n in new else a
                               for n, a in old_globals.items()})
    ck.copy_tokenizer(job.ckpt, job.out)
    base = reader.manifest
    keep = {k: v for k, v in base.items() if k not in ("files", "format", "format_version", ck.MANIFEST_DIGEST)}
    ck.write_config(job.out, {**keep, "job": identity, "job_digest": out_dir.digest,
                              "base_job": base.get("job"), "finetune": extra}, skip_dirs=("report", TRAIN_DIR))


# ============================================================================ 5. report
def plot_ppl_by_tokens(rows: list[dict], tokens_per_step: float, path: str) -> None:
    """PNG: validation perplexity (exp of the student's NLL) against fine-tuning tokens (rows with
    "step" and "val_nll"; step 0: before training); atomic."""
    from matplotlib.figure import Figure
    pts = [(r["step"] * tokens_per_step, math.exp(r["val_nll"])) for r in rows if "val_nll" in r]
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label="compressed, fine-tuned")
    teacher = [math.exp(r["val_teacher_nll"]) for r in rows if "val_teacher_nll" in r]
    if teacher:
        ax.axhline(teacher[-1], ls="--", c="gray", lw=1, label="uncompressed")
        ax.legend(fontsize=8)
    ax.set_xlabel("fine-tuning tokens")
    ax.set_ylabel("validation perplexity")
    save_png(fig, path)


def perplexities(job: FinetuneJob, inp: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    kw = dict(seq_len=job.ppl_seq_len, max_tokens=job.ppl_tokens, batch_size=4)
    res = {}
    for what, path, source in (("source", inp["source"], None), ("base", job.ckpt, inp["source"]),
                               ("finetuned", job.out, inp["source"])):
        m = open_layers(path, source)
        res[what] = streamed_perplexity(m.read_layer, m.read_globals, m.cfg, inp["ppl_ids"],
                                        desc=f"perplexity ({what})", **kw)
    s, b, f = (res[k]["ppl"] for k in ("source", "base", "finetuned"))
    say(f"perplexity on held-out text ({res['source']['tokens']} tokens): source {s:.3f}  compressed {b:.3f} "
        f"({100 * (b / s - 1):+.1f}%)  fine-tuned {f:.3f} ({100 * (f / s - 1):+.1f}%)")
    return res


def _bits_per_param(params) -> float:
    from caldera_jax.formats.qlr_weight import QLRWeight
    ws = [w for w in flatten(params).values() if isinstance(w, QLRWeight)]
    return 8.0 * sum(w.nbytes() for w in ws) / sum(w.num_matrices * w.shape[0] * w.shape[1] for w in ws)


# ============================================================================ the job
def run(job: FinetuneJob, log: Callable[[str], None] = tqdm.write,
        on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Runs the job (see the module docstring); returns the report. on_step(step, metrics row) after
    each optimizer step (raising there stops the job like a crash; a rerun resumes)."""
    t0 = time.perf_counter()
    inp = open_inputs(job)
    ft = inp["ft"]
    mesh = make_mesh(dict(job.mesh))
    identity = job_identity(job, inp)
    log(f"fine-tune {job.ckpt} against {job.model}: {ft.steps} steps x {ft.accum} x {ft.batch} x {ft.seq_len} "
        f"tokens; calibration {job.calib}: {len(inp['tokens'])} windows ({ft.val_samples} for validation)")
    with JobDir(job.out) as out_dir:
        out_dir.prepare(identity, job.overwrite)
        # a rerun resumes the training (orbax) and writes every file again from its result
        if os.path.isfile(os.path.join(job.out, ck.CONFIG_FILE)):
            os.remove(os.path.join(job.out, ck.CONFIG_FILE))
        for f in os.listdir(os.path.join(job.out, ck.LAYER_DIR)):
            os.remove(os.path.join(job.out, ck.LAYER_DIR, f))
        out_dir.done = {}
        t_train = time.perf_counter()
        new_params, base_params, res, start = train_model(job, inp, mesh, log, on_step)
        train_s = time.perf_counter() - t_train
        tokens_per_step = ft.accum * ft.batch * (ft.seq_len - 1)
        bits = {"base": _bits_per_param(base_params), "finetuned": _bits_per_param(new_params)}
        extra = {"settings": ft.to_dict(), "best_step": res.best_step, "best_val_kl": res.best_val,
                 "tokens_trained": ft.steps * tokens_per_step, "bits_per_param": bits,
                 "base_checkpoint": {"path": os.path.abspath(job.ckpt),
                                     "manifest_sha256": inp["reader"].manifest[ck.MANIFEST_DIGEST]}}
        write_checkpoint(job, inp, new_params, out_dir, identity, extra)
    report_dir = os.path.join(job.out, "report")
    os.makedirs(report_dir, exist_ok=True)
    val_rows = [r for r in res.rows if "val_loss" in r]
    rep = {"command": job.command, "ckpt": job.ckpt, "model": job.model, "calib": job.calib, "out": job.out,
           "mesh": mesh_axes(mesh), "resumed_from_step": res.resumed_from, "train_seconds": train_s,
           **extra, "validation": [{k: r[k] for k in r if k.startswith("val") or k == "step"}
                                   for r in [start] + val_rows]}
    if val_rows:
        log(f"validation: KL {val_rows[0]['val_loss']:.4f} -> {val_rows[-1]['val_loss']:.4f} (best "
            f"{res.best_val:.4f} at step {res.best_step}); bits/param {bits['base']:.4f} -> {bits['finetuned']:.4f}")
    if inp["ppl_ids"] is not None:
        rep["perplexity"] = perplexities(job, inp, log)
    plot_ppl_by_tokens([start] + res.rows, tokens_per_step, os.path.join(report_dir, "ppl_by_tokens.png"))
    rep["wall_seconds"] = time.perf_counter() - t0
    ck.atomic_write_bytes(os.path.join(report_dir, "report.json"),
                          json.dumps(rep, indent=1, sort_keys=True, default=str).encode())
    return rep
