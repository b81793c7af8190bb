"""Layer sensitivity as a library call: compress ONE matrix (one layer, one projection type) at a
probe budget, everything else original, and measure how the model's output moves on held-out text.

    rep = run(SensitivityJob(model="hf_dir", config="base.yaml", calib="train.txt", text="valid.txt",
                             out="runs/sens", b_q=2, rank=0))
    # out/sensitivity.json: {"probe": {"b_q", "rank"}, "results": [{layer, proj, name, kl, cosine,
    #   rel_h}, ...]} (experiments.allocate --sensitivity reads it); out/sensitivity.png

Metrics per experiment, over every predicted token of the held-out windows: KL(P_orig ‖ P_comp) of
the next-token distributions (nats, mean over tokens), and the cosine between the original and the
perturbed last decoder layer's output (before the final norm; mean over tokens). The probe's
Hessian comes from the calibration data through the original layers (the compress job's default).
The whole model is held in memory (float32) with the held-out windows' hidden state at the input
of every layer; an experiment at layer i reruns layers i..L-1 and the head. Results are appended to
out/sensitivity.jsonl (fsynced per line) and a rerun skips those already there.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from caldera_jax.allocation.options import proj_of
from caldera_jax.caldera import decompose as decomposer
from caldera_jax.caldera.calibration import Calibrator, calibration_tokens, hessian_key
from caldera_jax.caldera.config import JobConfig, compressible, layer_of, load_job_config
from caldera_jax.checkpoints_io.fingerprint import open_source
from caldera_jax.checkpoints_io.model_source import load_tokenizer
from caldera_jax.eval.perplexity import tokenize_text, windows
from caldera_jax.models.decoder import default_positions, final_logits, representative_layer, standalone_layer
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.params import flatten, layer_prefix, unflatten
from caldera_jax.pipeline.compress import matrix_seed
from caldera_jax.pipeline.error_sweep import append_record, read_records, write_json_atomic
from caldera_jax.pipeline.report import PROJ_ORDER


@dataclasses.dataclass(frozen=True)
class SensitivityJob:
    model: str
    config: str | JobConfig            # base budget (quantizer, factor bits, ...) + calibration
    calib: str
    text: str                          # held-out text
    out: str
    b_q: int = 2                       # the probe
    rank: int = 0
    layers: tuple[int, ...] | None = None
    projections: tuple[str, ...] | None = None
    tokens: int = 2048                 # held-out tokens (windows of seq_len)
    seq_len: int = 256
    batch_size: int = 4
    progress: bool = True


@functools.partial(jax.jit, static_argnames=("cfg", "i"))
def _layer(p, cfg, i, h, mask, positions):
    return standalone_layer(Ctx(Hooks(), {}), i, p, cfg, h, mask, positions)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _compare(glob, cfg, h_ref, h_new):
    """(Σ KL(P_ref ‖ P_new) over predicted tokens, Σ cosine of the last hidden states, count)."""
    ctx = Ctx(Hooks(), {})
    lp = jax.nn.log_softmax(final_logits(ctx, glob, cfg, h_ref)[:, :-1].astype(jnp.float32), -1)
    lq = jax.nn.log_softmax(final_logits(ctx, glob, cfg, h_new)[:, :-1].astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq))
    a, b = h_ref.astype(jnp.float32), h_new.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
    return kl, jnp.sum(cos[:, :-1]), cos[:, :-1].size


def plot(results: list[dict], n_layers: int, path: str, probe: str) -> None:
    """Bars by layer: KL stacked by projection (left), 1 − cosine by projection (right)."""
    projs = [p for p in PROJ_ORDER if any(r["proj"] == p for r in results)] + sorted(
        {r["proj"] for r in results} - set(PROJ_ORDER))
    fig = Figure(figsize=(13, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(n_layers)
    bottom = np.zeros(n_layers)
    width = 0.8 / max(len(projs), 1)
    for k, p in enumerate(projs):
        kl = np.zeros(n_layers)
        dc = np.full(n_layers, np.nan)
        for r in results:
            if r["proj"] == p:
                kl[r["layer"]] = r["kl"]
                dc[r["layer"]] = 1 - r["cosine"]
        ax1.bar(x, kl, bottom=bottom, label=p)
        bottom += kl
        ax2.bar(x - 0.4 + (k + 0.5) * width, dc, width=width, label=p)
    ax1.set_title(f"KL(orig ‖ one matrix at {probe}), stacked by projection")
    ax2.set_title("1 − cosine of the last hidden state")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("layer")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    os.replace(tmp, path)


def run(job: SensitivityJob, on_record: Callable[[dict], None] | None = None,
        log: Callable[[str], None] = tqdm.write) -> dict[str, Any]:
    t0 = time.perf_counter()
    source = open_source(job.model)
    cfg = source.cfg
    base_job = job.config if isinstance(job.config, JobConfig) else load_job_config(job.config)
    free = dataclasses.replace(base_job, protect=())
    mats = compressible(cfg)
    L = cfg.num_hidden_layers
    layers = tuple(range(L)) if job.layers is None else job.layers
    if any(not 0 <= i < L for i in layers):
        raise ValueError(f"--layers {list(layers)}: the model has layers 0..{L - 1}")
    todo_all = [n for n in mats if layer_of(n) in layers
                and (job.projections is None or proj_of(n) in job.projections)]
    if not todo_all:
        raise ValueError("the sensitivity run selects no matrix (check --layers, --projections)")
    for n in todo_all:                                          # budgets valid before any work
        free.budget_for(n, mats[n]).replace(b_q=job.b_q, rank=job.rank).validate(tuple(mats[n][-2:]), where=n)
    tokenizer = load_tokenizer(source.tokenizer_dir, source.tokenizer_kwargs)
    if tokenizer is None:
        raise ValueError(f"{job.model}: no tokenizer (needed for the held-out text)")
    c = base_job.calibration
    tokens, mask = calibration_tokens(job.calib, tokenizer, samples=c.samples, seq_len=c.seq_len,
                                      vocab_size=cfg.vocab_size)
    w = windows(tokenize_text(tokenizer, job.text), job.seq_len, job.tokens)
    os.makedirs(job.out, exist_ok=True)
    rec_path = os.path.join(job.out, "sensitivity.jsonl")
    done = {(r["name"], r["b_q"], r["rank"]) for r in read_records(rec_path)}
    todo = [n for n in todo_all if (n, job.b_q, job.rank) not in done]
    log(f"sensitivity {job.model}: {len(todo_all)} matrices at b_q={job.b_q} rank={job.rank} "
        f"({len(todo_all) - len(todo)} done), {w.size} held-out tokens")
    bar = tqdm(total=len(todo_all), initial=len(todo_all) - len(todo), unit="matrix", desc="sensitivity",
               disable=not job.progress, dynamic_ncols=True)
    glob = unflatten({n: jnp.asarray(source.read(n), jnp.float32)
                      for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
                      if n in source.names()})
    batches = [jnp.asarray(w[s:s + job.batch_size]) for s in range(0, len(w), job.batch_size)]
    masks = [jnp.ones(b.shape, bool) for b in batches]
    pos = [default_positions(m) for m in masks]
    emb = glob["model"]["embed_tokens"]["weight"]
    hs_in = [[jnp.take(emb, b, axis=0) for b in batches]]      # hs_in[i]: input of layer i
    params = []
    for i in range(L):
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), source.read_layer(i, np.float32))
        params.append(p)
        rep = representative_layer(cfg, i)
        hs_in.append([_layer(p, cfg, rep, h, m, q) for h, m, q in zip(hs_in[-1], masks, pos)])
    h_ref = hs_in[L]
    try:
        if todo:
            cal = Calibrator(source, tokens, mask, batch_size=c.batch_size)
            for i in range(max(layer_of(n) for n in todo) + 1):
                mine = [n for n in todo if layer_of(n) == i]
                if not mine:
                    cal.advance(cal.run_layer(i, params[i], collect=False)[1])
                    continue
                stats, h_next = cal.run_layer(i, params[i])
                flat = {layer_prefix(i) + k: v for k, v in flatten(params[i]).items()}
                for name in mine:
                    t1 = time.perf_counter()
                    budget = free.budget_for(name, mats[name]).replace(b_q=job.b_q, rank=job.rank)
                    wt = np.asarray(flat[name], np.float32)
                    h = np.asarray(stats[hessian_key(name)], np.float32)
                    if wt.ndim == 3:
                        res = decomposer.decompose_many(list(zip(wt, h)), budget, key=matrix_seed(name, budget.seed))
                        qlr = jax.tree.map(lambda *xs: jnp.stack(xs), *[q for q, _ in res])
                        rel_h = float(np.mean([float(m["rel_err_h"]) for _, m in res]))
                    else:
                        qlr, m = decomposer.decompose(wt, h, budget, key=matrix_seed(name, budget.seed))
                        rel_h = float(m["rel_err_h"])
                    pert = unflatten({**{k: v for k, v in flatten(params[i]).items()},
                                      name[len(layer_prefix(i)):]: qlr})
                    hs = hs_in[i]
                    for j in range(i, L):
                        rep = representative_layer(cfg, j)
                        hs = [_layer(pert if j == i else params[j], cfg, rep, h_, m_, q_)
                              for h_, m_, q_ in zip(hs, masks, pos)]
                    kl = cs = cnt = 0.0
                    for a, b in zip(h_ref, hs):
                        k_, c_, n_ = _compare(glob, cfg, a, b)
                        kl, cs, cnt = kl + float(k_), cs + float(c_), cnt + int(n_)
                    rec = {"name": name, "layer": i, "proj": proj_of(name), "b_q": job.b_q, "rank": job.rank,
                           "kl": kl / cnt, "cosine": cs / cnt, "rel_h": rel_h, "tokens": int(cnt),
                           "seconds": time.perf_counter() - t1}
                    append_record(rec_path, rec)
                    bar.update()
                    bar.set_postfix_str(f"{name.removeprefix('model.')} KL {rec['kl']:.4g}")
                    if on_record is not None:
                        on_record(rec)
                cal.advance(h_next)
    finally:
        bar.close()
    results = [r for r in read_records(rec_path) if r["b_q"] == job.b_q and r["rank"] == job.rank
               and r["name"] in set(todo_all)]
    results.sort(key=lambda r: (r["layer"], r["name"]))
    by_layer = {}
    for r in results:
        d = by_layer.setdefault(r["layer"], {"kl_sum": 0.0, "cosine_min": 1.0})
        d["kl_sum"] += r["kl"]
        d["cosine_min"] = min(d["cosine_min"], r["cosine"])
    rep = {"format": "caldera-jax-sensitivity/1", "model": job.model, "probe": {"b_q": job.b_q, "rank": job.rank},
           "heldout": {"file": job.text, "tokens": int(w.size), "seq_len": job.seq_len},
           "results": results, "by_layer": {str(k): v for k, v in sorted(by_layer.items())},
           "seconds": time.perf_counter() - t0}
    write_json_atomic(os.path.join(job.out, "sensitivity.json"), rep)
    plot(results, L, os.path.join(job.out, "sensitivity.png"), f"b_q={job.b_q}, rank={job.rank}")
    return rep
