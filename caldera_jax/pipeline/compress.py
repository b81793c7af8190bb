"""CALDERA compression of a whole model as a library call: calibrate, decompose every linear,
write a checkpoint (caldera_jax/checkpoints_io/compressed.py), report.

    spec = CompressJob(model="hf_dir", config="job.yaml", calib="data.txt", out="runs/mine",
                       mesh={"ep": 4, "dp": 2}, ppl_tokens=8192, ppl_text="valid.txt")
    report = run(spec, Callbacks(on_layer=lambda i, recs: ...))

What happens, in order (this file reads top to bottom in the same order):
 1. inputs, all checked before any work: the model source (every tensor its config needs), the job
    config against the model's shapes, the calibration data (enough real tokens), the evaluation text.
 2. the output directory (job_dir.JobDir): the job's identity (config, source fingerprint,
    calibration digest, digest of the code that decides the bytes) in job.json; a rerun resumes
    after the last finished layer whose bytes match the digest recorded when it was written, and
    the final checkpoint is byte-identical to an uninterrupted run (seeds come from matrix names).
 3. per decoder layer (one layer's weights in memory): calibration Hessians (data parallel along
    `dp`), decompositions spread over every device (experts along `ep`, other matrices
    round-robin), metrics, the layer's file written atomically; hidden states then move on
    through the original layer (default) or the compressed one (`calib_propagate: compressed`).
 4. globals (embeddings, final norm, LM head), tokenizer, caldera_config.json (written last).
 5. the report: report/report.json, report/metrics.jsonl (one line per matrix, appended as
    matrices finish), report/error_by_layer.png.
 6. perplexity before and after (held-out text, fixed token budget), when asked.

Process set-up (fake CPU devices, compilation cache, LAPACK threads) is the caller's, through
caldera_jax.runtime.setup; nothing here changes global state.
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
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from caldera_jax.caldera import decompose as default_decomposer
from caldera_jax.caldera.calibration import Calibrator, calibration_tokens, hessian_key
from caldera_jax.caldera.config import JobConfig, compressible, load_job_config
from caldera_jax.checkpoints_io import compressed as ck
from caldera_jax.checkpoints_io.fingerprint import fingerprint, open_source
from caldera_jax.checkpoints_io.model_source import load_tokenizer, open_layers
from caldera_jax.eval.perplexity import streamed_perplexity, tokenize_text
from caldera_jax.params import flatten, layer_prefix, layer_shapes, param_shapes, unflatten
from caldera_jax.pipeline import report
from caldera_jax.pipeline.job_dir import JobDir, JobError, check_out_vs_model

MIN_CALIB_TOKENS = 256   # below this a "calibration" is not one (whitespace, a stray line)


@dataclasses.dataclass(frozen=True)
class CompressJob:
    """One compression job. Paths are explicit (the CLI resolves its defaults from the assets)."""
    model: str                            # HF checkpoint directory or .gguf file
    config: str | JobConfig               # job config YAML, or a JobConfig
    calib: str                            # .txt, .jsonl ({'text': ...}) or .npy token ids [N, T]
    out: str                              # output directory
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)   # {"ep": 4, "dp": 2}; {"ep": 0}: every device
    overwrite: bool = False               # replace a different job of ours in `out`
    ppl_tokens: int = 0                   # perplexity before/after on this many tokens (0: skip)
    ppl_seq_len: int = 512
    ppl_text: str | None = None           # held-out text (needed when ppl_tokens > 0)
    progress: bool = True                 # tqdm bar
    command: str = ""                     # recorded in the report


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """Per-event hooks; each is optional. on_matrix(record) as each matrix finishes;
    on_layer(i, records) after layer i's file is written (raising here stops the job like a
    crash: the layers written so far are kept and a rerun resumes); log(line) for the human-
    readable lines (default: tqdm.write, which keeps the bar intact)."""
    on_matrix: Callable[[dict], None] | None = None
    on_layer: Callable[[int, dict], None] | None = None
    log: Callable[[str], None] = tqdm.write


# ============================================================================ 1. inputs
def open_inputs(spec: CompressJob) -> dict[str, Any]:
    """Everything the job reads, validated before any work starts."""
    source = open_source(spec.model)
    check_source_complete(source, spec.model)
    job = spec.config if isinstance(spec.config, JobConfig) else load_job_config(spec.config)
    plan = job.check(source.cfg)                         # {matrix: MatrixBudget | None (protected)}
    tokenizer = load_tokenizer(source.tokenizer_dir, source.tokenizer_kwargs)
    c = job.calibration
    tokens, mask = calibration_tokens(spec.calib, tokenizer, samples=c.samples, seq_len=c.seq_len,
                                      vocab_size=source.cfg.vocab_size)
    text_tokenizer = None if spec.calib.endswith(".npy") else tokenizer     # .npy: the user's own ids
    check_calibration_size(spec.calib, real_token_count(tokens, mask, text_tokenizer), source.cfg, plan)
    ppl_ids = None
    if spec.ppl_tokens:
        if tokenizer is None:
            raise JobError(f"{spec.model}: perplexity needs the model's tokenizer (none found)")
        if spec.ppl_text is None:
            raise JobError("ppl_tokens > 0 needs ppl_text (a held-out text file)")
        ppl_ids = tokenize_text(tokenizer, spec.ppl_text)
        if len(ppl_ids) < spec.ppl_seq_len:
            raise JobError(f"{spec.ppl_text}: fewer tokens than one perplexity window of {spec.ppl_seq_len}")
    return dict(source=source, job=job, plan=plan, tokenizer=tokenizer, tokens=tokens, mask=mask,
                ppl_ids=ppl_ids)


def check_source_complete(source, model: str) -> None:
    """Every tensor the model's config needs (decoder layers, final norm, untied LM head) is in
    the source, checked before any work: a missing one is not found layers later."""
    have = set(source.names())
    missing = [n for n in param_shapes(source.cfg) if n not in have]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise JobError(f"{model}: the source lacks {len(missing)} tensor(s) its config "
                       f"({source.cfg.model_type}, {source.cfg.num_hidden_layers} layers) needs: "
                       f"{', '.join(missing[:5])}{more}")


def real_token_count(tokens: np.ndarray, mask: np.ndarray, tokenizer) -> int:
    """Calibration tokens that carry text: not padding and, with a tokenizer, not whitespace."""
    ids = tokens[mask]
    if tokenizer is None or ids.size == 0:
        return int(ids.size)
    uniq, counts = np.unique(ids, return_counts=True)
    texty = np.array([bool(tokenizer.decode([int(t)]).strip()) for t in uniq])
    return int(counts[texty].sum())


def check_calibration_size(calib: str, tokens: int, cfg, plan: dict, warn: Callable[[str], None] = None) -> None:
    """Refuses a calibration with fewer than MIN_CALIB_TOKENS real tokens; warns when it has
    fewer tokens than a compressed matrix has input features (then H = XᵀX is rank-deficient and
    only the ridge keeps it invertible)."""
    if tokens < MIN_CALIB_TOKENS:
        raise JobError(f"{calib}: only {tokens} calibration tokens (not padding or whitespace); at least "
                       f"{MIN_CALIB_TOKENS} are needed, and more than the widest input "
                       f"({max(cfg.hidden_size, cfg.intermediate_size)}) for a well-conditioned Hessian")
    shapes = param_shapes(cfg)
    widest = max((shapes[n][-1] for n, b in plan.items() if b is not None), default=0)
    if tokens < widest:
        (warn or _warn)(f"warning: {calib}: {tokens} calibration tokens < {widest} input features of the "
                        f"widest compressed matrix: its Hessian is rank-deficient and rests on the ridge "
                        f"(sigma_reg); use more calibration data")


def _warn(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr, flush=True)


def make_mesh(axes: dict[str, int]):
    """The (ep, dp) mesh of `axes` ({"ep": 0}: ep = every device); None for one device."""
    if not axes:
        return None
    if axes == {"ep": 0}:
        axes = {"ep": len(jax.devices())}
        if axes["ep"] == 1:
            return None
    n = math.prod(axes.values())
    devices = jax.devices()
    if len(devices) < n:
        raise JobError(f"--mesh {','.join(f'{k}={v}' for k, v in axes.items())} needs {n} devices, "
                       f"this process has {len(devices)} ({devices[0].platform})")
    names = ("ep", "dp")
    shape = tuple(axes.get(a, 1) for a in names)
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices[:n])


def mesh_axes(mesh) -> dict[str, int]:
    return {} if mesh is None else {a: int(mesh.shape[a]) for a in mesh.axis_names}


# ============================================================================ 2. identity
CODE = ("caldera_jax/caldera", "caldera_jax/models", "caldera_jax/linear.py", "caldera_jax/params.py",
        "caldera_jax/config.py", "caldera_jax/kernels", "caldera_jax/checkpoints_io")


def code_digest(parts: tuple[str, ...] = CODE) -> str:
    """sha256 of the sources that decide the checkpoint's bytes (decomposition, quantizers, packing,
    model, calibration, checkpoint format; `parts`: paths from the repository root): a job resumes
    only with the code it started with."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    h = hashlib.sha256()
    for part in parts:
        p = os.path.join(root, part)
        if not os.path.exists(p):
            raise FileNotFoundError(f"code_digest: {p} does not exist (CODE is out of date)")
        files = [p] if p.endswith(".py") else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".py"))
        for f in files:
            h.update(os.path.relpath(f, root).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def job_identity(spec: CompressJob, inp: dict[str, Any], fp: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same job (a rerun resumes only when this is equal)."""
    tok = hashlib.sha256(inp["tokens"].tobytes() + inp["mask"].tobytes()).hexdigest()
    model_cfg = {k: v for k, v in dataclasses.asdict(inp["source"].cfg).items() if k != "raw_json"}
    return {"format_version": ck.FORMAT_VERSION, "model_config": json.loads(json.dumps(model_cfg)),
            "job_config": inp["job"].to_dict(),
            "job_config_digest": inp["job"].digest(), "source_digest": fp["digest"],
            "code_digest": code_digest(),
            "calibration": {"file": os.path.basename(spec.calib), "tokens_sha256": tok,
                            "sequences": int(inp["tokens"].shape[0]), "seq_len": int(inp["tokens"].shape[1]),
                            "tokens": int(inp["mask"].sum())}}


# ============================================================================ 3. one layer
def matrix_seed(name: str, seed: int) -> int:
    """Deterministic per-matrix seed: the same on every run, machine and device."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _matrix_metrics(w, w_hat, h):
    e = w - w_hat
    wc, hc = w - jnp.mean(w), w_hat - jnp.mean(w_hat)
    hp = jax.lax.Precision.HIGHEST
    return {"rel_fro": jnp.linalg.norm(e) / jnp.linalg.norm(w),
            "rel_h": jnp.sqrt(jnp.sum(jnp.matmul(e, h, precision=hp) * e)
                              / jnp.sum(jnp.matmul(w, h, precision=hp) * w)),
            "corr": jnp.sum(wc * hc) / jnp.sqrt(jnp.sum(wc * wc) * jnp.sum(hc * hc))}


matrix_metrics = jax.jit(_matrix_metrics)
"""Relative Frobenius error, H-weighted relative error sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)) (raw
calibration H), and the correlation between original and reconstructed weights."""
stacked_matrix_metrics = jax.jit(jax.vmap(_matrix_metrics))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    try:
        a = np.asarray(x)
    except Exception:  # noqa: BLE001
        return str(x)
    if a.dtype.kind in "biuf":
        return a.item() if a.ndim == 0 else a.tolist()
    return str(x)


def _layer(name: str) -> int:
    return int(name.split(".")[2])


def _is_stacked(name: str) -> bool:
    return ".mlp.experts." in name


def compress_layer(i: int, layer: dict, stats, plan: dict, mesh, decomposer, log: Callable[[dict], None]):
    """Decomposes layer i's matrices. Returns (quantized {name: QLRWeight}, protected {name: array},
    records {name: deterministic JSON info}).

    Spreading: the dense matrices are dispatched round-robin over every device of the mesh
    (`decompose` on inputs committed to the device; jax dispatch is asynchronous, so they run
    concurrently) before any result is awaited; the experts of a stacked MoE projection go through
    `decompose_many` over the mesh (one SPMD program: each device decomposes a contiguous slice
    of the experts, along ep, then dp). Seeds come from the matrix names."""
    from caldera_jax.caldera.decompose import named_errors
    pre = layer_prefix(i)
    flat = {pre + k: v for k, v in flatten(layer).items()}
    names = [n for n in plan if n.startswith(pre)]
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    # round-robin position: dense compressed matrices of the earlier layers (deterministic, so a
    # resumed job places every matrix on the same device as an uninterrupted one)
    rr = sum(1 for n in plan if plan[n] is not None and _layer(n) < i and not _is_stacked(n))
    pending, records, protected, experts = [], {}, {}, []
    for name in names:
        budget = plan[name]
        w = np.asarray(flat[name], np.float32)
        h = np.asarray(stats[hessian_key(name)], np.float32)
        t0 = time.perf_counter()
        if budget is None:                                       # protected: kept in bf16
            protected[name] = flat[name]
            pending.append((name, None, w.astype(ml_dtypes.bfloat16).astype(np.float32), w, h, t0, {}))
        elif w.ndim == 3:                                        # stacked experts: after the dense ones
            experts.append(name)
        else:
            dev = devices[rr % len(devices)]
            rr += 1
            with named_errors(name, i):                          # errors name matrix and layer
                qlr, dm = decomposer.decompose(jax.device_put(w, dev), jax.device_put(h, dev), budget,
                                               key=matrix_seed(name, budget.seed))
            pending.append((name, qlr, None, w, h, t0, {"decompose": dm}))
    for name in experts:
        budget, t0 = plan[name], time.perf_counter()
        w = np.asarray(flat[name], np.float32)
        h = np.asarray(stats[hessian_key(name)], np.float32).copy()
        count = np.asarray(stats.counts[hessian_key(name)])
        empty = [int(e) for e in np.flatnonzero(count == 0)]
        h[empty] = np.eye(h.shape[-1], dtype=np.float32)        # no routed token: plain Frobenius fit
        dmesh = mesh if mesh is not None else jax.make_mesh((1,), ("d",), devices=devices[:1],
                                                            axis_types=(jax.sharding.AxisType.Auto,))
        with named_errors(name, i):
            res = decomposer.decompose_many(list(zip(w, h)), budget, mesh=dmesh, key=matrix_seed(name, budget.seed))
        qlr = jax.tree.map(lambda *xs: jnp.stack(xs), *[q for q, _ in res])
        dm = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[m for _, m in res])
        pending.append((name, qlr, None, w, h, t0, {"decompose": dm, "empty_experts": empty}))
    quantized = {}
    for name, qlr, w_hat, w, h, t0, extra in pending:
        if qlr is not None:
            w_hat = qlr.dequantize()                             # what the checkpoint will hold
            quantized[name] = qlr
        stacked = w.ndim == 3
        metrics = stacked_matrix_metrics if stacked else matrix_metrics
        mt = jax.device_get(metrics(jnp.asarray(w), jnp.asarray(w_hat), jnp.asarray(h)))
        budget = plan[name]
        rec = {"name": name, "layer": i, "shape": list(w.shape), "params": int(w.size),
               "protected": budget is None, "budget": None if budget is None else dataclasses.asdict(budget),
               "bits_per_param": 16.0 if qlr is None else float(qlr.bits_per_param()),
               **{k: float(np.mean(v)) for k, v in mt.items()}}
        if stacked:
            rec["experts"] = {k: [float(x) for x in np.asarray(v)] for k, v in mt.items()}
        for k, v in extra.items():
            rec[k] = _jsonable(v)
        records[name] = rec
        log({**rec, "seconds_to_result": time.perf_counter() - t0})
    return quantized, protected, {n: records[n] for n in names}


def _relative(saved: dict, i: int) -> dict:
    pre = layer_prefix(i)
    return unflatten({n[len(pre):]: v for n, v in saved.items()})


# ============================================================================ the job
def run(spec: CompressJob, callbacks: Callbacks = Callbacks(), *, decomposer=default_decomposer) -> dict[str, Any]:
    """Runs the job (see the module docstring); returns the report dict. `decomposer` provides
    decompose(w, h, budget, key) and decompose_many (tests substitute it)."""
    t_start = time.perf_counter()
    say = callbacks.log

    # -- 1. inputs (validated) and the mesh
    inp = open_inputs(spec)
    mesh = make_mesh(dict(spec.mesh))
    source, cfg, job, plan = inp["source"], inp["source"].cfg, inp["job"], inp["plan"]
    say(f"model {spec.model}: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
        f"{len(plan)} matrices ({sum(b is None for b in plan.values())} protected); "
        f"config {spec.config if isinstance(spec.config, str) else '(JobConfig)'}; calibration {spec.calib}: "
        f"{inp['tokens'].shape[0]} x {inp['tokens'].shape[1]} ({int(inp['mask'].sum())} tokens); "
        f"devices {1 if mesh is None else mesh.size} "
        f"({'x'.join(f'{k}={v}' for k, v in mesh_axes(mesh).items()) or 'no mesh'})")

    # -- 2. output directory: identity, resume
    check_out_vs_model(spec.out, spec.model)
    fp = fingerprint(source)
    identity = job_identity(spec, inp, fp)
    with JobDir(spec.out) as out_dir:
        digest, done = out_dir.prepare(identity, spec.overwrite)
        records, layer_times = _compress_layers(spec, callbacks, inp, mesh, out_dir, decomposer)

        # -- 4. globals, tokenizer, caldera_config.json (last; it hashes the files on disk, so
        #       every layer is first checked against the digest recorded when it was written)
        out_dir.verify_layers()
        glob_names = [n for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
                      if n in source.names()]
        ck.write_globals(spec.out, {n: source.read(n) for n in glob_names})
        if not source.tokenizer_kwargs:                         # a HF directory: copy its files
            ck.copy_tokenizer(source.tokenizer_dir, spec.out)
        elif inp["tokenizer"] is not None:                      # a GGUF file: save the tokenizer built from it
            inp["tokenizer"].save_pretrained(spec.out)
        matrices = {n: records[n] for n in plan}
        summary = report.totals(matrices, cfg, spec.out)
        ck.write_config(spec.out, {"model_config": cfg.to_hf_dict(), "job": identity, "job_digest": digest,
                                   "source_fingerprint": fp, "matrices": matrices, "summary": summary})

    # -- 5. report
    report_dir = os.path.join(spec.out, "report")
    layers = report.layer_rows(matrices, cfg)
    rep = {"command": spec.command, "model": spec.model,
           "config": spec.config if isinstance(spec.config, str) else job.to_dict(),
           "calib": spec.calib, "out": spec.out, "mesh": mesh_axes(mesh),
           "devices": [str(d) for d in (mesh.devices.flat if mesh is not None else jax.devices()[:1])],
           "resumed_layers": sorted(done), "layer_seconds": layer_times,
           "wall_seconds_compress": time.perf_counter() - t_start,
           "calibration": identity["calibration"], "summary": summary, "layers": layers,
           "matrices": list(matrices.values())}
    report.plot_errors(layers, os.path.join(report_dir, "error_by_layer.png"))

    # -- 6. perplexity before / after
    if inp["ppl_ids"] is not None:
        rep["perplexity"] = perplexity_before_after(spec, inp, say)
    rep["wall_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=1, sort_keys=True, default=str)
    return rep


def _compress_layers(spec: CompressJob, callbacks: Callbacks, inp: dict, mesh, out_dir: JobDir,
                     decomposer) -> tuple[dict[str, dict], dict[int, float]]:
    """3. layer by layer: returns ({matrix: record} of every layer, {layer: seconds} of those done now)."""
    source, cfg, job, plan = inp["source"], inp["source"].cfg, inp["job"], inp["plan"]
    done = dict(out_dir.done)
    report_dir = os.path.join(spec.out, "report")
    os.makedirs(report_dir, exist_ok=True)
    records: dict[str, dict] = {}
    for i in sorted(done):
        records.update(ck.read_layer_meta(os.path.join(spec.out, ck.layer_file(i)))["matrices"])
    metrics_path = os.path.join(report_dir, "metrics.jsonl")
    with open(metrics_path, "w") as f:                     # what the finished layers hold
        for r in records.values():
            f.write(json.dumps(r, sort_keys=True) + "\n")
    if done:
        callbacks.log(f"resuming {spec.out}: layers {sorted(done)} already finished")

    per_layer = {i: 0 for i in range(cfg.num_hidden_layers)}  # progress unit: one matrix (an expert counts 1)
    for n, shape in compressible(cfg).items():
        per_layer[_layer(n)] += shape[0] if len(shape) == 3 else 1
    bar = tqdm(total=sum(per_layer.values()), initial=sum(per_layer[i] for i in done), unit="matrix",
               desc="compress", disable=not spec.progress, dynamic_ncols=True)

    def log(rec: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        bar.update(rec["shape"][0] if len(rec["shape"]) == 3 else 1)
        bar.set_postfix_str(f"{rec['name'].removeprefix('model.')} err {rec['rel_h']:.3f}")
        if callbacks.on_matrix is not None:
            callbacks.on_matrix(rec)

    todo = [i for i in range(cfg.num_hidden_layers) if i not in done]
    propagate_compressed = job.calibration.propagate == "compressed"
    layer_times: dict[int, float] = {}
    try:
        if not todo:
            return records, layer_times
        cal = Calibrator(source, inp["tokens"], inp["mask"], batch_size=job.calibration.batch_size, mesh=mesh)
        for i in range(max(todo) + 1):
            t0 = time.perf_counter()
            layer = source.read_layer(i, np.float32)
            if i in done:
                if propagate_compressed:
                    _, saved = ck.read_layer(os.path.join(spec.out, ck.layer_file(i)), np.float32)
                    layer = _relative(saved, i)
                _, h_next = cal.run_layer(i, layer, collect=False)
            else:
                stats, h_next = cal.run_layer(i, layer)
                quantized, protected, recs = compress_layer(i, layer, stats, plan, mesh, decomposer, log)
                pre = layer_prefix(i)
                dense = {pre + k: source.read(pre + k) for k in layer_shapes(cfg, i) if pre + k not in plan}
                path = out_dir.write_layer(i, dense=dense, protected=protected, quantized=quantized,
                                           matrices=recs)
                records.update(recs)
                if propagate_compressed:
                    _, saved = ck.read_layer(path, np.float32)
                    _, h_next = cal.run_layer(i, _relative(saved, i), collect=False)
                layer_times[i] = time.perf_counter() - t0
                bar.write(report.layer_summary_line(i, recs, layer_times[i]))
                if callbacks.on_layer is not None:
                    callbacks.on_layer(i, recs)
            cal.advance(h_next)
        return records, layer_times
    finally:
        bar.close()


# ============================================================================ 6. perplexity
def perplexity_before_after(spec: CompressJob, inp: dict, say: Callable[[str], None]) -> dict[str, Any]:
    """Both models read one decoder layer at a time (memory grows with one layer, not the model)."""
    src = inp["source"]
    kw = dict(seq_len=spec.ppl_seq_len, max_tokens=spec.ppl_tokens, batch_size=4)
    res = {}
    for what, path, source in (("before", src, None), ("after", spec.out, src)):
        m = open_layers(path, source)                        # the checkpoint must match its source
        res[what] = streamed_perplexity(m.read_layer, m.read_globals, m.cfg, inp["ppl_ids"],
                                        desc=f"perplexity ({m.kind})", **kw)
    before, after = res["before"], res["after"]
    say(f"perplexity on held-out text ({before['tokens']} tokens, {before['windows']} x {before['seq_len']}): "
        f"before {before['ppl']:.3f}  after {after['ppl']:.3f}  "
        f"({100 * (after['ppl'] / before['ppl'] - 1):+.1f}%)")
    return {"before": before, "after": after}
