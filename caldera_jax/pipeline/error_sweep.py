"""The error-model sweep as a library call: for every (layer, projection, bits, rank) of a grid, the
H-weighted relative error of the decomposition and its exact stored size.

    spec = SweepJob(model="hf_dir", config="base.yaml", calib="train.txt", out="runs/sweep",
                    bits=(2, 3, 4), ranks=(0, 32, 64, 128), layers=(0, 5, 10))
    summary = run(spec, SweepCallbacks(on_record=print))

Per experiment one JSON line in out/sweep.jsonl: name, layer, proj, shape, params, the budget
(quantizer, b_q, rank, b_l, b_r, ...), rel_h (sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)), raw calibration H),
rel_fro, cost_bits (QLRWeight.nbytes · 8: codes, scales, factors, signs, scale), bits_per_param,
seconds. Each line is appended with one write, flushed and fsynced; a rerun reads the file, drops a
torn last line, and skips every experiment already there (key: name, b_q, rank). out/sweep.json
records what the sweep is (model, base config digest, calibration digest, grid): a rerun with a
different one is refused. The budget of each experiment is the base config's budget of that matrix
(defaults + pattern overrides; `protect` ignored) with b_q and rank replaced; ranks above
min(m, n) are skipped for that matrix. Matrices of one layer are spread round-robin over the
devices (dispatch is asynchronous); stacked MoE experts go through decompose_many (every device).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from caldera_jax.allocation.options import Option, budget_of, is_feasible, proj_of
from caldera_jax.caldera import decompose as decomposer
from caldera_jax.caldera.calibration import Calibrator, calibration_tokens, hessian_key
from caldera_jax.caldera.config import JobConfig, compressible, layer_of, load_job_config
from caldera_jax.checkpoints_io.atomic import fsync_path
from caldera_jax.checkpoints_io.fingerprint import open_source
from caldera_jax.checkpoints_io.model_source import load_tokenizer
from caldera_jax.formats import registry
from caldera_jax.params import flatten, layer_prefix
from caldera_jax.pipeline.compress import matrix_seed

RECORDS = "sweep.jsonl"
META = "sweep.json"


class SweepError(ValueError):
    """A sweep that cannot run (bad grid, layers, or an --out holding a different sweep)."""


@dataclasses.dataclass(frozen=True)
class SweepJob:
    model: str                                  # HF directory or .gguf
    config: str | JobConfig                     # base job config (budget fields + calibration)
    calib: str                                  # calibration data (.txt / .jsonl / .npy)
    out: str                                    # directory: sweep.jsonl, sweep.json
    bits: tuple[int, ...] = (2, 3, 4)
    ranks: tuple[int, ...] = (0, 32, 64, 128)
    layers: tuple[int, ...] | None = None       # None: every layer
    projections: tuple[str, ...] | None = None  # e.g. ("q_proj", "down_proj"); None: all
    devices: int | None = None                  # spread over the first N devices (None: all; each
    #                                             device compiles every (budget, shape) once)
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class SweepCallbacks:
    """on_record(rec) after each line is durably written (raising stops the sweep like a crash);
    log(line) for human-readable lines."""
    on_record: Callable[[dict], None] | None = None
    log: Callable[[str], None] = tqdm.write


def record_key(name: str, b_q: int, rank: int) -> str:
    return f"{name}|b{b_q}|r{rank}"


def read_records(path: str) -> list[dict]:
    """The complete lines of a sweep JSONL; a torn (unterminated or unparsable) last line is cut
    off the file. A damaged line elsewhere is an error naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    out, good = [], 0
    lines = data.split(b"\n")
    for k, line in enumerate(lines):
        last = k == len(lines) - 1
        if not line.strip():
            if not last:
                good += len(line) + 1
            continue
        try:
            if last:                             # no newline after it: the write did not finish
                raise ValueError("unterminated")
            out.append(json.loads(line))
        except ValueError:
            if k >= len(lines) - 2:
                break
            raise SweepError(f"{path}: line {k + 1} is not JSON (the file is damaged; delete it to restart)") from None
        good += len(line) + 1
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return out


def append_record(path: str, rec: dict) -> None:
    """One line, one write, flushed and fsynced."""
    line = (json.dumps(rec, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    """JSON written to a temporary name, fsynced, renamed (readers never see a partial file)."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def plan_experiments(job: JobConfig, cfg, spec: SweepJob) -> list[tuple[str, tuple[int, ...], Option]]:
    """(matrix, shape, option) of every experiment, in layer order; validates the grid."""
    mats = compressible(cfg)
    n_layers = cfg.num_hidden_layers
    layers = range(n_layers) if spec.layers is None else spec.layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise SweepError(f"--layers {bad}: the model has layers 0..{n_layers - 1}")
    known = sorted({proj_of(n) for n in mats})
    if spec.projections is not None:
        unknown = [p for p in spec.projections if p not in known]
        if unknown:
            raise SweepError(f"--projections {unknown}: this model's projections are {known}")
    free = dataclasses.replace(job, protect=())
    out = []
    for name, shape in mats.items():
        if layer_of(name) not in layers or (spec.projections is not None and proj_of(name) not in spec.projections):
            continue
        base = free.budget_for(name, shape)
        for b in spec.bits:
            for r in spec.ranks:
                opt = Option(int(b), int(r))
                if b not in registry.bits(base.quantizer):
                    raise SweepError(f"--grid bits={b}: the base config's {base.quantizer} quantizer of {name} "
                                     f"does not support it")
                if is_feasible(base, opt, shape):
                    out.append((name, tuple(int(x) for x in shape), opt))
    if not out:
        raise SweepError("the sweep selects no experiment (check --layers, --projections, --grid)")
    return out


def _identity(spec: SweepJob, job: JobConfig, cfg, tokens, mask) -> dict[str, Any]:
    return {"format": "caldera-jax-sweep/1", "model": os.path.abspath(spec.model),
            "model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size, "base_config": job.to_dict(), "base_config_digest": job.digest(),
            "calibration_sha256": hashlib.sha256(tokens.tobytes() + mask.tobytes()).hexdigest(),
            "decompose_code_sha256": _decompose_code_digest()}


def _decompose_code_digest() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for d in ("caldera", "formats"):
        p = os.path.join(root, d)
        for f in sorted(os.listdir(p)):
            if f.endswith(".py"):
                with open(os.path.join(p, f), "rb") as fh:
                    h.update(f.encode() + b"\0" + hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def _dispatch(job: JobConfig, name: str, shape, opt: Option, flat: dict, stats, devices, k: int):
    """Starts one decomposition (asynchronous) on device k mod len(devices); stacked experts:
    decompose_many over every device."""
    budget = budget_of(dataclasses.replace(job, protect=()).budget_for(name, shape), opt)
    w = np.asarray(flat[name], np.float32)
    h = np.asarray(stats[hessian_key(name)], np.float32)
    t1 = time.perf_counter()
    if w.ndim == 3:
        return shape, opt, budget, decomposer.decompose_many(list(zip(w, h)), budget,
                                                             key=matrix_seed(name, budget.seed)), t1
    dev = devices[k % len(devices)]
    res = decomposer.decompose(jax.device_put(w, dev), jax.device_put(h, dev), budget,
                               key=matrix_seed(name, budget.seed))
    return shape, opt, budget, [res], t1


def _record(name: str, i: int, shape, opt: Option, budget, res, t1: float) -> dict[str, Any]:
    """The JSON line of one experiment (waits for its result)."""
    rel_h = [float(np.asarray(m["rel_err_h"])) for _, m in res]
    rel_fro = [float(np.asarray(m["rel_fro"])) for _, m in res]
    nbytes = sum(q.nbytes() for q, _ in res)
    params = int(np.prod(shape))
    rec = {"name": name, "layer": i, "proj": proj_of(name), "shape": list(shape), "params": params,
           "quantizer": budget.quantizer, "b_q": opt.b_q, "rank": opt.rank, "b_l": budget.b_l,
           "b_r": budget.b_r, "rel_h": float(np.mean(rel_h)), "rel_fro": float(np.mean(rel_fro)),
           "cost_bits": 8 * int(nbytes), "bits_per_param": 8 * nbytes / params,
           "seconds_to_result": time.perf_counter() - t1}
    if len(res) > 1:
        rec["experts_rel_h"] = rel_h
    return rec


def run(spec: SweepJob, callbacks: SweepCallbacks = SweepCallbacks()) -> dict[str, Any]:
    """Runs (or resumes) the sweep; returns {done, new, total, seconds, out}."""
    t0 = time.perf_counter()
    source = open_source(spec.model)
    cfg = source.cfg
    job = spec.config if isinstance(spec.config, JobConfig) else load_job_config(spec.config)
    todo_all = plan_experiments(job, cfg, spec)
    tokenizer = load_tokenizer(source.tokenizer_dir, source.tokenizer_kwargs)
    c = job.calibration
    tokens, mask = calibration_tokens(spec.calib, tokenizer, samples=c.samples, seq_len=c.seq_len,
                                      vocab_size=cfg.vocab_size)
    if os.path.exists(spec.out) and not os.path.isdir(spec.out):
        raise SweepError(f"--out {spec.out} is a file, not a directory")
    os.makedirs(spec.out, exist_ok=True)
    ident = _identity(spec, job, cfg, tokens, mask)
    meta_path, rec_path = os.path.join(spec.out, META), os.path.join(spec.out, RECORDS)
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        diff = [k for k in ident if k != "model" and old.get(k) != ident[k]]
        if diff:
            raise SweepError(f"{spec.out}: holds a sweep with a different {', '.join(diff)}; use another --out")
    else:
        write_json_atomic(meta_path, ident)
    done = {record_key(r["name"], r["b_q"], r["rank"]) for r in read_records(rec_path)}
    todo = [t for t in todo_all if record_key(t[0], t[2].b_q, t[2].rank) not in done]
    skipped = len(todo_all) - len(todo)
    callbacks.log(f"sweep {spec.model}: {len(todo_all)} experiments ({skipped} already in {rec_path}), "
                  f"grid bits {list(spec.bits)} x ranks {list(spec.ranks)}")
    bar = tqdm(total=len(todo_all), initial=skipped, unit="exp", desc="sweep", disable=not spec.progress,
               dynamic_ncols=True)
    new = 0
    try:
        layers = sorted({layer_of(n) for n, _, _ in todo})
        if layers:
            cal = Calibrator(source, tokens, mask, batch_size=c.batch_size)
            devices = jax.devices()[: spec.devices or None]
            for i in range(max(layers) + 1):
                layer = source.read_layer(i, np.float32)
                if i not in layers:
                    cal.advance(cal.run_layer(i, layer, collect=False)[1])
                    continue
                stats, h_next = cal.run_layer(i, layer)
                flat = {layer_prefix(i) + k: v for k, v in flatten(layer).items()}
                mine = [t for t in todo if layer_of(t[0]) == i]
                # one matrix at a time: its grid points dispatched round-robin over the devices
                # (asynchronous), then collected and written in order
                for name in dict.fromkeys(t[0] for t in mine):
                    pending = [_dispatch(job, name, shape, opt, flat, stats, devices, k)
                               for k, (n_, shape, opt) in enumerate(t for t in mine if t[0] == name)]
                    for shape, opt, budget, res, t1 in pending:
                        rec = _record(name, i, shape, opt, budget, res, t1)
                        append_record(rec_path, rec)
                        new += 1
                        bar.update()
                        bar.set_postfix_str(f"{name.removeprefix('model.')} b{opt.b_q} r{opt.rank} "
                                            f"err {rec['rel_h']:.3f}")
                        if callbacks.on_record is not None:
                            callbacks.on_record(rec)
                cal.advance(h_next)
    finally:
        bar.close()
    return {"total": len(todo_all), "done_before": skipped, "new": new,
            "seconds": time.perf_counter() - t0, "out": rec_path}
