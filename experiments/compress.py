"""CALDERA compression of a whole model: calibrate, decompose every linear, write a checkpoint.

    python -m experiments.compress                       # the embedded default (SmolLM2-135M-Instruct)
    python -m experiments.compress --model DIR|FILE.gguf --config CONFIG.yaml --calib DATA \\
        --out DIR [--mesh ep=4[,dp=2]] [--ppl-tokens 8192]

With no arguments: SmolLM2-135M-Instruct (experiments.assets), configs/smollm2_default.yaml,
calibration text from the Shakespeare train split, output runs/compress-smollm2-default/,
`--mesh auto` (on a CPU: one fake device per core, so independent decompositions run concurrently),
and perplexity on the held-out Shakespeare split (16 x 512 tokens) before and after.

What happens, in order (this file reads top to bottom in the same order):
 1. arguments and the mesh: `--mesh ep=4,dp=2` needs 8 devices; on a CPU machine the fake devices
    are created (XLA_FLAGS is set before jax is imported).
 2. inputs, all checked before any work: the model source, the job config against the model's
    shapes (caldera_jax/caldera/config.py), the calibration data, the evaluation text.
 3. the output directory: the job's identity (config, source fingerprint, calibration digest,
    digest of the code that decides the bytes) in job.json; a rerun of the same command resumes after the last finished layer, and the final
    checkpoint is byte-identical to an uninterrupted run (seeds come from the matrix names).
 4. per decoder layer (one layer's weights in memory): calibration Hessians (data parallel along
    `dp`), decompositions spread over every device (experts along `ep`, other matrices
    round-robin), metrics, and the layer's file written atomically; hidden states then move on
    through the original layer (default) or the compressed one (`calib_propagate: compressed`).
 5. globals (embeddings, final norm, LM head), tokenizer, caldera_config.json (written last).
 6. the report: a per-layer table, report/report.json, report/metrics.jsonl (one line per matrix,
    appended as matrices finish), report/error_by_layer.png.
 7. perplexity before and after (held-out text, fixed token budget), when asked (default run: yes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "smollm2_default.yaml")
DEFAULT_OUT = os.path.join("runs", "compress-smollm2-default")
CRASH_ENV = "CALDERA_COMPRESS_CRASH_AFTER_LAYERS"   # testing: hard exit (no cleanup) after k layers
PAUSE_ENV = "CALDERA_COMPRESS_PAUSE_AFTER_LAYER"    # testing: sleep this many seconds after each layer


class JobError(RuntimeError):
    """A job that cannot run as asked (bad mesh, output directory of another job, ...)."""


# ============================================================================ 1. arguments and mesh
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.compress", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help=f"HF checkpoint directory or .gguf file (default: the {DEFAULT_MODEL} asset)")
    ap.add_argument("--config", help="job config YAML (default: configs/smollm2_default.yaml)")
    ap.add_argument("--calib", help="calibration data: .txt, .jsonl ({'text': ...}) or .npy token ids "
                                    "[N, T] (negative = padding); default: Shakespeare train split")
    ap.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT} for the default model)")
    ap.add_argument("--mesh", default=None,
                    help="device mesh, e.g. ep=4 or ep=4,dp=2; 'auto': ep = every device (on a CPU, one "
                         "per core, up to 8). Default: one device; 'auto' for the default job")
    ap.add_argument("--ppl-tokens", type=int, default=None,
                    help="perplexity before/after on this many held-out tokens (default: 8192 for the "
                         "default job, else 0 = skip)")
    ap.add_argument("--ppl-seq-len", type=int, default=512)
    ap.add_argument("--ppl-text", help="held-out text for perplexity (default: Shakespeare valid split)")
    ap.add_argument("--overwrite", action="store_true",
                    help="delete an --out directory that holds a different job (default: refuse)")
    ap.add_argument("--compile-cache", default=None,
                    help="jax persistent compilation cache directory ('none' disables; default: "
                         "<asset cache>/xla-cache)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.default_job = args.model is None
    if args.model is None and args.out is None:
        args.out = DEFAULT_OUT
    if args.out is None:
        ap.error("--out is required when --model is given")
    if args.compile_cache is None:
        from experiments.assets import cache_dir
        args.compile_cache = str(cache_dir() / "xla-cache")
    if args.ppl_tokens is None:
        args.ppl_tokens = 8192 if args.default_job else 0
    if args.mesh is None:
        args.mesh = "auto" if args.default_job else ""
    return args


def parse_mesh(spec: str) -> dict[str, int]:
    """'ep=4,dp=2' -> {'ep': 4, 'dp': 2}; '' -> {}; 'auto' -> {'ep': 0} (0: every device)."""
    if spec.strip() == "auto":
        return {"ep": 0}
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition("=")
        if name not in ("ep", "dp") or not size.isdigit() or int(size) < 1 or name in axes:
            raise JobError(f"--mesh {spec!r}: expected comma-separated ep=N and/or dp=N (N >= 1), got {part!r}")
        axes[name] = int(size)
    return axes


def request_cpu_devices(n: int) -> None:
    """Makes n devices exist on a CPU-only machine: sets XLA_FLAGS before jax is imported."""
    if n <= 1:
        return
    if "jax" in sys.modules:
        return   # too late to add devices; make_mesh checks what exists
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def enable_compile_cache(path: str) -> None:
    """jax's persistent compilation cache: a rerun (or a resume) skips the XLA compiles."""
    import jax
    if path and path != "none":
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def make_mesh(axes: dict[str, int]):
    import jax
    if not axes:
        return None
    if axes == {"ep": 0}:                                    # auto: every device
        axes["ep"] = len(jax.devices())
        if axes["ep"] == 1:
            axes.clear()
            return None
    n = math.prod(axes.values())
    devices = jax.devices()
    if len(devices) < n:
        raise JobError(f"--mesh {','.join(f'{k}={v}' for k, v in axes.items())} needs {n} devices, "
                       f"this process has {len(devices)} ({devices[0].platform})")
    names = ("ep", "dp")
    shape = tuple(axes.get(a, 1) for a in names)
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices[:n])


# ============================================================================ 2. inputs
def open_inputs(args) -> dict[str, Any]:
    """Everything the job reads, validated before any work starts."""
    from caldera_jax.caldera.calibration import calibration_tokens
    from caldera_jax.caldera.config import load_job_config
    from caldera_jax.checkpoints_io.fingerprint import open_source
    from caldera_jax.checkpoints_io.model_source import load_tokenizer
    from experiments import assets

    model = args.model or str(assets.fetch(DEFAULT_MODEL, progress=not args.no_progress))
    config = args.config or DEFAULT_CONFIG
    calib = args.calib or str(assets.fetch("shakespeare", progress=not args.no_progress) / "train.txt")
    source = open_source(model)
    check_source_complete(source, model)
    job = load_job_config(config)
    plan = job.check(source.cfg)                         # {matrix: MatrixBudget | None (protected)}
    tokenizer = load_tokenizer(source.tokenizer_dir, source.tokenizer_kwargs)
    c = job.calibration
    tokens, mask = calibration_tokens(calib, tokenizer, samples=c.samples, seq_len=c.seq_len,
                                      vocab_size=source.cfg.vocab_size)
    text_tokenizer = None if calib.endswith(".npy") else tokenizer     # .npy: the user's own ids
    check_calibration_size(calib, real_token_count(tokens, mask, text_tokenizer), source.cfg, plan)
    ppl_ids = None
    if args.ppl_tokens:
        if tokenizer is None:
            raise JobError(f"{model}: --ppl-tokens needs the model's tokenizer (none found)")
        from experiments.perplexity import tokenize_text
        text = args.ppl_text or str(assets.fetch("shakespeare", progress=False) / "valid.txt")
        ppl_ids = tokenize_text(tokenizer, text)
        if len(ppl_ids) < args.ppl_seq_len:
            raise JobError(f"{text}: fewer tokens than one perplexity window of {args.ppl_seq_len}")
    return dict(model=model, config=config, calib=calib, source=source, job=job, plan=plan,
                tokenizer=tokenizer, tokens=tokens, mask=mask, ppl_ids=ppl_ids)


MIN_CALIB_TOKENS = 256   # below this a "calibration" is not one (whitespace, a stray line)


def check_source_complete(source, model: str) -> None:
    """Every tensor the model's config needs (decoder layers, final norm, untied LM head) is in
    the source, checked before any work: a missing one is not found layers later."""
    from caldera_jax.params import param_shapes
    have = set(source.names())
    missing = [n for n in param_shapes(source.cfg) if n not in have]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise JobError(f"{model}: the source lacks {len(missing)} tensor(s) its config "
                       f"({source.cfg.model_type}, {source.cfg.num_hidden_layers} layers) needs: "
                       f"{', '.join(missing[:5])}{more}")


def real_token_count(tokens, mask, tokenizer) -> int:
    """Calibration tokens that carry text: not padding and, with a tokenizer, not whitespace."""
    import numpy as np
    ids = tokens[mask]
    if tokenizer is None or ids.size == 0:
        return int(ids.size)
    uniq, counts = np.unique(ids, return_counts=True)
    texty = np.array([bool(tokenizer.decode([int(t)]).strip()) for t in uniq])
    return int(counts[texty].sum())


def check_calibration_size(calib: str, tokens: int, cfg, plan: dict) -> None:
    """Refuses a calibration with fewer than MIN_CALIB_TOKENS real tokens; warns when it has
    fewer tokens than a compressed matrix has input features (then H = XᵀX is rank-deficient and
    only the ridge keeps it invertible)."""
    if tokens < MIN_CALIB_TOKENS:
        raise JobError(f"{calib}: only {tokens} calibration tokens (not padding or whitespace); at least "
                       f"{MIN_CALIB_TOKENS} are needed, and more than the widest input "
                       f"({max(cfg.hidden_size, cfg.intermediate_size)}) for a well-conditioned Hessian")
    from caldera_jax.params import param_shapes
    shapes = param_shapes(cfg)
    widest = max((shapes[n][-1] for n, b in plan.items() if b is not None), default=0)
    if tokens < widest:
        print(f"warning: {calib}: {tokens} calibration tokens < {widest} input features of the widest "
              f"compressed matrix: its Hessian is rank-deficient and rests on the ridge "
              f"(sigma_reg); use more calibration data", file=sys.stderr, flush=True)


# ============================================================================ 3. output directory
CODE = ("caldera_jax/caldera", "caldera_jax/models", "caldera_jax/linear.py", "caldera_jax/params.py",
        "caldera_jax/config.py", "caldera_jax/kernels", "caldera_jax/checkpoints_io")


def code_digest() -> str:
    """sha256 of the sources that decide the checkpoint's bytes (decomposition, quantizers, packing,
    model, calibration, checkpoint format): a job resumes only with the code it started with."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for part in CODE:
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


def job_identity(inp: dict[str, Any], fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same job (a rerun resumes only when this is equal)."""
    from caldera_jax.checkpoints_io.compressed import FORMAT_VERSION
    tok = hashlib.sha256(inp["tokens"].tobytes() + inp["mask"].tobytes()).hexdigest()
    import dataclasses
    model_cfg = {k: v for k, v in dataclasses.asdict(inp["source"].cfg).items() if k != "raw_json"}
    return {"format_version": FORMAT_VERSION, "model_config": json.loads(json.dumps(model_cfg)),
            "job_config": inp["job"].to_dict(),
            "job_config_digest": inp["job"].digest(), "source_digest": fingerprint["digest"],
            "code_digest": code_digest(),
            "calibration": {"file": os.path.basename(inp["calib"]), "tokens_sha256": tok,
                            "sequences": int(inp["tokens"].shape[0]), "seq_len": int(inp["tokens"].shape[1]),
                            "tokens": int(inp["mask"].sum())}}


LOCK_FILE = ".lock"
_LOCKS: dict[str, int] = {}


def lock_out_dir(out: str) -> None:
    """An exclusive flock on <out>/.lock for this process (released by the OS even on kill -9):
    two jobs never write into one directory at the same time. OS errors (an existing file, no
    permission, a read-only filesystem) become one-line JobErrors naming the path."""
    import fcntl
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise JobError(f"{out}: --out exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise JobError(f"{out}: cannot create the output directory or its lock ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JobError(f"{out}: another compression job is running in this directory") from None
    _LOCKS[key] = fd


def unlock_out_dir(out: str, *, remove: bool = False) -> None:
    """Releases the lock; remove=True also deletes the .lock file (and the directory, if that
    leaves it empty): what a refused --out gets, so nothing of ours is left behind."""
    fd = _LOCKS.pop(os.path.realpath(out), None)
    if fd is None:
        return
    if remove:
        try:
            os.remove(os.path.join(out, LOCK_FILE))
            if not os.listdir(out):
                os.rmdir(out)
        except OSError:
            pass
    os.close(fd)


# What a job writes into --out, and so the only things --overwrite deletes.
OUR_FILES = ("caldera_config.json", "job.json", "globals.safetensors", "progress.json")
OUR_DIRS = {"layers": ("layer-*.safetensors",), "report": ("report.json", "metrics.jsonl", "error_by_layer.png")}
PROGRESS_FILE = "progress.json"     # {"job_digest", "layers": {i: sha256 of the layer file as written}}


def check_out_vs_model(out: str, model: str) -> None:
    """--out must not be the source model's directory nor inside it (nor contain its file)."""
    o = os.path.realpath(out)
    m = os.path.realpath(model)
    mdir = m if os.path.isdir(m) else None
    if mdir is not None and (o == mdir or o.startswith(mdir + os.sep)):
        raise JobError(f"{out}: --out is the source model's directory {model} or inside it; "
                       f"choose another --out (the source is never written to)")
    if o == m:
        raise JobError(f"{out}: --out is the source model file")


def _is_our_job(identity: Any) -> bool:
    return isinstance(identity, dict) and {"job_config_digest", "code_digest", "source_digest"} <= identity.keys()


def delete_our_files(out: str) -> list[str]:
    """Deletes what a job of ours writes (OUR_FILES, OUR_DIRS' patterns, the copied tokenizer
    files, stale temporaries) and nothing else; returns what was left in place."""
    import fnmatch

    from caldera_jax.checkpoints_io.hf import _TOKENIZER_FILES
    for f in OUR_FILES:
        p = os.path.join(out, f)
        if os.path.isfile(p):
            os.remove(p)
    for d, patterns in OUR_DIRS.items():
        p = os.path.join(out, d)
        if not os.path.isdir(p):
            continue
        for f in os.listdir(p):
            if any(fnmatch.fnmatch(f, pat) for pat in patterns) or f.startswith("."):
                os.remove(os.path.join(p, f))
        if not os.listdir(p):
            os.rmdir(p)
    for f in os.listdir(out):
        if any(fnmatch.fnmatch(f, pat) for pat in _TOKENIZER_FILES) and os.path.isfile(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    return sorted(f for f in os.listdir(out) if f != LOCK_FILE)


def read_progress(out: str, digest: str) -> dict[int, str]:
    """{layer: sha256 recorded when its file was written} for this job (empty when absent)."""
    try:
        with open(os.path.join(out, PROGRESS_FILE)) as f:
            prog = json.load(f)
        if prog.get("job_digest") != digest:
            return {}
        return {int(k): str(v) for k, v in prog["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def record_progress(out: str, digest: str, layers: dict[int, str]) -> None:
    from caldera_jax.checkpoints_io import compressed as ck
    ck.atomic_write_bytes(os.path.join(out, PROGRESS_FILE),
                          ck.json_bytes({"job_digest": digest, "layers": {str(k): v for k, v in sorted(layers.items())}}))


def prepare_out_dir(out: str, identity: dict[str, Any], overwrite: bool) -> tuple[str, dict[int, str]]:
    """Creates (or resumes) the output directory; returns (job digest, {finished layer: sha256}).

    A finished layer is reused only when its file's sha256 equals the digest recorded when it was
    written (progress.json) and its metadata names this job; any other layer file is redone."""
    from caldera_jax.checkpoints_io import compressed as ck
    identity = json.loads(json.dumps(identity))            # as it reads back from job.json
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    job_path = os.path.join(out, ck.JOB_FILE)
    lock_out_dir(out)
    try:
        ck.remove_stale_temps(out)                          # what a killed run was writing
        layers_dir = os.path.join(out, ck.LAYER_DIR)
        if os.path.isdir(layers_dir) and not os.listdir(layers_dir) and not os.path.isfile(job_path):
            os.rmdir(layers_dir)                            # killed before job.json: a fresh start
        if [f for f in os.listdir(out) if f != LOCK_FILE]:
            old = None
            if os.path.isfile(job_path):
                try:
                    with open(job_path) as f:
                        old = json.load(f)
                except ValueError:
                    old = "unreadable"
            if old != identity:
                if not _is_our_job(old):
                    raise JobError(f"{out}: exists and is not a compression job's directory (no valid "
                                   f"{ck.JOB_FILE}); choose another --out (--overwrite only replaces "
                                   f"a job of ours, and deletes only the files it wrote)")
                if not overwrite:
                    what = "holds a different job (" + ", ".join(
                        k for k in identity if old.get(k) != identity[k]) + " differ)"
                    if old.get("code_digest") != identity["code_digest"]:
                        what += ("; code: the caldera_jax sources changed since this job started, and a "
                                 "checkpoint mixing layers from two versions is refused")
                    raise JobError(f"{out}: {what}; use another --out, or --overwrite to delete it")
                kept = delete_our_files(out)
                if kept:
                    print(f"--overwrite: kept {len(kept)} file(s) in {out} that are not ours: "
                          f"{', '.join(kept[:5])}", file=sys.stderr, flush=True)
        if not os.path.isfile(job_path):
            ck.atomic_write_bytes(job_path, ck.json_bytes(identity))
        os.makedirs(layers_dir, exist_ok=True)
    except JobError:
        unlock_out_dir(out, remove=True)
        raise
    except OSError as e:
        unlock_out_dir(out, remove=True)
        raise JobError(f"{e.filename or out}: cannot prepare the output directory ({e.strerror or e})") from None
    recorded = read_progress(out, digest)
    done = {}
    for f in os.listdir(layers_dir):
        if not (f.startswith("layer-") and f.endswith(".safetensors")):
            continue
        path = os.path.join(layers_dir, f)
        meta = ck.read_layer_meta(path)
        i = int(meta["layer"]) if meta is not None and meta.get("job_digest") == digest else None
        if i is not None and recorded.get(i) == ck.file_sha256(path):
            done[i] = recorded[i]
        else:                                               # unreadable, another job's, or damaged: redo
            if i is not None:
                print(f"{path}: differs from the digest recorded when it was written: redoing layer {i}",
                      file=sys.stderr, flush=True)
            os.remove(path)
    record_progress(out, digest, done)
    return digest, done


# ============================================================================ 4. one layer
def matrix_seed(name: str, seed: int) -> int:
    """Deterministic per-matrix seed: the same on every run, machine and device."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _metrics_fn():
    import jax
    import jax.numpy as jnp

    def one(w, w_hat, h):
        e = w - w_hat
        wc, hc = w - jnp.mean(w), w_hat - jnp.mean(w_hat)
        hp = jax.lax.Precision.HIGHEST
        return {"rel_fro": jnp.linalg.norm(e) / jnp.linalg.norm(w),
                "rel_h": jnp.sqrt(jnp.sum(jnp.matmul(e, h, precision=hp) * e)
                                  / jnp.sum(jnp.matmul(w, h, precision=hp) * w)),
                "corr": jnp.sum(wc * hc) / jnp.sqrt(jnp.sum(wc * wc) * jnp.sum(hc * hc))}
    return jax.jit(one), jax.jit(jax.vmap(one))


_METRICS: list = []


def matrix_metrics(w, w_hat, h, stacked: bool) -> dict[str, Any]:
    """Relative Frobenius error, H-weighted relative error sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)) (raw
    calibration H), and the correlation between original and reconstructed weights."""
    if not _METRICS:
        _METRICS.extend(_metrics_fn())
    return _METRICS[1 if stacked else 0](w, w_hat, h)


def _jsonable(x: Any) -> Any:
    import numpy as np
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
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    from caldera_jax.caldera.calibration import hessian_key
    from caldera_jax.params import flatten, layer_prefix

    pre = layer_prefix(i)
    flat = {pre + k: v for k, v in flatten(layer).items()}
    names = [n for n in plan if n.startswith(pre)]
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    # round-robin position: dense compressed matrices of the earlier layers (deterministic, so a
    # resumed job places every matrix on the same device as an uninterrupted one)
    rr = sum(1 for n in plan if plan[n] is not None and _layer(n) < i
             and not _is_stacked(n))
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
        mt = jax.device_get(matrix_metrics(jnp.asarray(w), jnp.asarray(w_hat), jnp.asarray(h), stacked))
        budget = plan[name]
        rec = {"name": name, "layer": i, "shape": list(w.shape), "params": int(w.size),
               "protected": budget is None, "budget": None if budget is None else _budget_dict(budget),
               "bits_per_param": 16.0 if qlr is None else float(qlr.bits_per_param()),
               **{k: float(np.mean(v)) for k, v in mt.items()}}
        if stacked:
            rec["experts"] = {k: [float(x) for x in np.asarray(v)] for k, v in mt.items()}
        for k, v in extra.items():
            rec[k] = _jsonable(v)
        records[name] = rec
        log({**rec, "seconds_to_result": time.perf_counter() - t0})
    return quantized, protected, {n: records[n] for n in names}


def _budget_dict(b) -> dict[str, Any]:
    import dataclasses
    return dataclasses.asdict(b)


def compressed_layer_params(layer: dict, i: int, quantized: dict, protected: dict) -> dict:
    """Layer i's params with the compressed (and bf16-rounded protected) matrices in place."""
    import ml_dtypes
    import numpy as np

    from caldera_jax.params import flatten, layer_prefix, unflatten
    pre = layer_prefix(i)
    flat = flatten(layer)
    for n, q in quantized.items():
        flat[n[len(pre):]] = q
    for n, a in protected.items():
        flat[n[len(pre):]] = np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    return unflatten(flat)


# ============================================================================ the job
def compress(args, mesh_axes: dict[str, int], *, decomposer=None,
             on_layer_done: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Runs the job (see the module docstring); returns the report dict."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from caldera_jax.caldera.calibration import Calibrator
    from caldera_jax.caldera.config import compressible
    from caldera_jax.params import layer_prefix, layer_shapes
    from caldera_jax.checkpoints_io import compressed as ck
    from caldera_jax.checkpoints_io.fingerprint import fingerprint

    t_start = time.perf_counter()
    if decomposer is None:                   # D's module: decompose(w, h, budget, key), decompose_many
        import importlib
        decomposer = importlib.import_module("caldera_jax.caldera.decompose")
    enable_compile_cache(args.compile_cache)

    # -- 2. inputs (validated) and the mesh
    inp = open_inputs(args)
    mesh = make_mesh(mesh_axes)
    source, cfg, job, plan = inp["source"], inp["source"].cfg, inp["job"], inp["plan"]
    print(f"model {inp['model']}: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
          f"{len(plan)} matrices ({sum(b is None for b in plan.values())} protected); "
          f"config {inp['config']}; calibration {inp['calib']}: {inp['tokens'].shape[0]} x "
          f"{inp['tokens'].shape[1]} ({int(inp['mask'].sum())} tokens); "
          f"devices {1 if mesh is None else mesh.size} "
          f"({'x'.join(f'{k}={v}' for k, v in mesh_axes.items()) or 'no mesh'})", flush=True)

    # -- 3. output directory: identity, resume
    check_out_vs_model(args.out, inp["model"])
    fp = fingerprint(source)
    identity = job_identity(inp, fp)
    digest, done = prepare_out_dir(args.out, identity, args.overwrite)
    report_dir = os.path.join(args.out, "report")
    os.makedirs(report_dir, exist_ok=True)
    records: dict[str, dict] = {}
    for i in sorted(done):
        records.update(ck.read_layer_meta(os.path.join(args.out, ck.layer_file(i)))["matrices"])
    metrics_path = os.path.join(report_dir, "metrics.jsonl")
    with open(metrics_path, "w") as f:                     # what the finished layers hold
        for r in records.values():
            f.write(json.dumps(r, sort_keys=True) + "\n")
    if done:
        print(f"resuming {args.out}: layers {sorted(done)} already finished", flush=True)

    def log(rec: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        bar.update(rec["shape"][0] if len(rec["shape"]) == 3 else 1)
        bar.set_postfix_str(f"{rec['name'].removeprefix('model.')} err {rec['rel_h']:.3f}")

    # -- 4. layer by layer
    per_layer = {i: 0 for i in range(cfg.num_hidden_layers)}  # progress unit: one matrix (an expert counts 1)
    for n, shape in compressible(cfg).items():
        per_layer[_layer(n)] += shape[0] if len(shape) == 3 else 1
    todo = [i for i in range(cfg.num_hidden_layers) if i not in done]
    bar = tqdm(total=sum(per_layer.values()), initial=sum(per_layer[i] for i in done), unit="matrix",
               desc="compress", disable=args.no_progress, dynamic_ncols=True)
    crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    propagate_compressed = job.calibration.propagate == "compressed"
    layer_times = {}
    if todo:
        cal = Calibrator(source, inp["tokens"], inp["mask"], batch_size=job.calibration.batch_size, mesh=mesh)
        written = 0
        for i in range(max(todo) + 1):
            t0 = time.perf_counter()
            layer = source.read_layer(i, np.float32)
            if i in done:
                if propagate_compressed:
                    _, saved = ck.read_layer(os.path.join(args.out, ck.layer_file(i)), np.float32)
                    layer = _relative(saved, i)
                _, h_next = cal.run_layer(i, layer, collect=False)
            else:
                stats, h_next = cal.run_layer(i, layer)
                quantized, protected, recs = compress_layer(i, layer, stats, plan, mesh, decomposer, log)
                pre = layer_prefix(i)
                dense = {pre + k: source.read(pre + k) for k in layer_shapes(cfg, i) if pre + k not in plan}
                path = ck.write_layer(args.out, i, dense=dense, protected=protected, quantized=quantized,
                                      matrices=recs, job_digest=digest)
                done[i] = ck.file_sha256(path)
                record_progress(args.out, digest, done)
                records.update(recs)
                if propagate_compressed:
                    _, saved = ck.read_layer(os.path.join(args.out, ck.layer_file(i)), np.float32)
                    _, h_next = cal.run_layer(i, _relative(saved, i), collect=False)
                layer_times[i] = time.perf_counter() - t0
                bar.write(layer_summary_line(i, recs, layer_times[i]))
                written += 1
                if on_layer_done is not None:
                    on_layer_done(i)
                if crash_after and written >= crash_after:
                    os._exit(137)                           # testing: die like kill -9 (no cleanup)
                time.sleep(pause)                           # testing: a window for a real kill -9
            cal.advance(h_next)
        del cal
    bar.close()

    # -- 5. globals, tokenizer, caldera_config.json (last; it hashes the files on disk, so every
    #       layer is first checked against the digest recorded when it was written)
    for i, sha in sorted(done.items()):
        path = os.path.join(args.out, ck.layer_file(i))
        if ck.file_sha256(path) != sha:
            os.remove(path)
            raise JobError(f"{path}: changed on disk after it was written (sha256 differs from "
                           f"{PROGRESS_FILE}); removed it: rerun the same command to redo layer {i}")
    glob_names = [n for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
                  if n in source.names()]
    ck.write_globals(args.out, {n: source.read(n) for n in glob_names})
    if not source.tokenizer_kwargs:                         # a HF directory: copy its files
        ck.copy_tokenizer(source.tokenizer_dir, args.out)
    elif inp["tokenizer"] is not None:                      # a GGUF file: save the tokenizer built from it
        inp["tokenizer"].save_pretrained(args.out)
    matrices = {n: records[n] for n in plan}
    summary = totals(matrices, cfg, args.out)
    ck.write_config(args.out, {"model_config": cfg.to_hf_dict(), "job": identity, "job_digest": digest,
                               "source_fingerprint": fp, "matrices": matrices, "summary": summary})

    unlock_out_dir(args.out)

    # -- 6. report
    layers = layer_rows(matrices, cfg)
    print_table(layers, summary)
    rep = {"command": "python -m experiments.compress " + " ".join(getattr(args, "argv", []) or []),
           "model": inp["model"], "config": inp["config"], "calib": inp["calib"], "out": args.out,
           "mesh": mesh_axes, "devices": [str(d) for d in (mesh.devices.flat if mesh is not None else jax.devices()[:1])],
           "resumed_layers": sorted(done), "layer_seconds": layer_times,
           "wall_seconds_compress": time.perf_counter() - t_start,
           "calibration": identity["calibration"], "summary": summary, "layers": layers,
           "matrices": list(matrices.values())}
    plot_errors(layers, os.path.join(report_dir, "error_by_layer.png"))

    # -- 7. perplexity before / after
    if inp["ppl_ids"] is not None:
        rep["perplexity"] = perplexity_before_after(inp, args)
    rep["wall_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(rep, f, indent=1, sort_keys=True, default=str)
    print(f"checkpoint: {args.out}  report: {os.path.join(report_dir, 'report.json')}  "
          f"wall {rep['wall_seconds']:.1f}s", flush=True)
    return rep


def _relative(saved: dict, i: int) -> dict:
    from caldera_jax.params import layer_prefix, unflatten
    pre = layer_prefix(i)
    return unflatten({n[len(pre):]: v for n, v in saved.items()})


# ============================================================================ 6. report
PROJ_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _proj(name: str) -> str:
    return name.rsplit(".", 2)[-2]


def layer_summary_line(i: int, recs: dict[str, dict], seconds: float) -> str:
    comp = [r for r in recs.values() if not r["protected"]]
    worst = max(recs.values(), key=lambda r: r["rel_h"])
    par = sum(r["params"] for r in recs.values())
    bits = sum(r["params"] * r["bits_per_param"] for r in recs.values()) / par
    return (f"layer {i:3d}: {len(recs)} matrices ({len(recs) - len(comp)} protected)  "
            f"rel-fro {sum(r['rel_fro'] for r in recs.values()) / len(recs):.4f}  "
            f"H-err {sum(r['rel_h'] for r in recs.values()) / len(recs):.4f} "
            f"(worst {_proj(worst['name'])} {worst['rel_h']:.4f})  {bits:.2f} bits/param  {seconds:.1f}s")


def layer_rows(matrices: dict[str, dict], cfg) -> list[dict[str, Any]]:
    rows = []
    for i in range(cfg.num_hidden_layers):
        recs = [r for r in matrices.values() if r["layer"] == i]
        par = sum(r["params"] for r in recs)
        row = {"layer": i, "params": par,
               "bits_per_param": sum(r["params"] * r["bits_per_param"] for r in recs) / par,
               "rel_fro_mean": sum(r["rel_fro"] for r in recs) / len(recs),
               "rel_h_mean": sum(r["rel_h"] for r in recs) / len(recs),
               "corr_min": min(r["corr"] for r in recs), "protected": sum(r["protected"] for r in recs)}
        for r in recs:
            row[f"rel_h:{_proj(r['name'])}"] = r["rel_h"]
            row[f"rel_fro:{_proj(r['name'])}"] = r["rel_fro"]
        rows.append(row)
    return rows


def totals(matrices: dict[str, dict], cfg, out: str) -> dict[str, Any]:
    from caldera_jax.params import param_shapes
    comp = [r for r in matrices.values()]
    par = sum(r["params"] for r in comp)
    all_params = sum(math.prod(s) for s in param_shapes(cfg).values())
    files = 0
    for root, _, fs in os.walk(out):
        if "report" in os.path.relpath(root, out).split(os.sep):
            continue
        files += sum(os.path.getsize(os.path.join(root, f)) for f in fs if f.endswith(".safetensors"))
    return {"matrices": len(comp), "protected": sum(r["protected"] for r in comp),
            "linear_params": par,
            "linear_bits_per_param": sum(r["params"] * r["bits_per_param"] for r in comp) / par,
            "rel_fro_mean": sum(r["rel_fro"] for r in comp) / len(comp),
            "rel_h_mean": sum(r["rel_h"] for r in comp) / len(comp),
            "corr_min": min(r["corr"] for r in comp),
            "model_params": all_params, "weight_file_bytes": files,
            "model_bits_per_param": 8 * files / all_params}


def print_table(rows: list[dict], summary: dict) -> None:
    projs = [p for p in PROJ_ORDER if any(f"rel_h:{p}" in r for r in rows)]
    head = ["layer"] + [p.removesuffix("_proj") for p in projs] + ["mean", "corr_min", "bits"]
    print("\nH-weighted relative error sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)) by layer and projection")
    print("  ".join(f"{h:>7}" for h in head))
    for r in rows:
        cells = [f"{r['layer']:>7d}"] + [f"{r.get(f'rel_h:{p}', float('nan')):7.4f}" for p in projs]
        cells += [f"{r['rel_h_mean']:7.4f}", f"{r['corr_min']:7.4f}", f"{r['bits_per_param']:7.3f}"]
        print("  ".join(cells) + ("  (protected: %d)" % r["protected"] if r["protected"] else ""))
    s = summary
    print(f"all: {s['matrices']} matrices ({s['protected']} protected)  mean rel-fro {s['rel_fro_mean']:.4f}  "
          f"mean H-err {s['rel_h_mean']:.4f}  min corr {s['corr_min']:.4f}  "
          f"linears {s['linear_bits_per_param']:.3f} bits/param  whole model {s['model_bits_per_param']:.3f} "
          f"bits/param ({s['weight_file_bytes'] / 1e6:.1f} MB of weights)\n", flush=True)


def plot_errors(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    projs = [p for p in PROJ_ORDER if any(f"rel_h:{p}" in r for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, metric, title in ((axes[0], "rel_h", "H-weighted relative error"),
                              (axes[1], "rel_fro", "relative Frobenius error")):
        for p in projs:
            ax.plot([r["layer"] for r in rows], [r.get(f"{metric}:{p}", float("nan")) for r in rows],
                    marker="o", ms=3, label=p)
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# ============================================================================ 7. perplexity
def source_params(src) -> dict:
    """The uncompressed model's parameters (float32 jax arrays) from an open source."""
    import jax
    import jax.numpy as jnp
    if hasattr(src, "read_all"):
        return jax.tree.map(jnp.asarray, src.read_all(jnp.float32))
    from caldera_jax.params import unflatten
    return unflatten({n: jnp.asarray(src.read(n), jnp.float32) for n in src.names()})


def perplexity_before_after(inp: dict, args) -> dict[str, Any]:
    from caldera_jax.eval.perplexity import model_perplexity
    from caldera_jax.checkpoints_io.compressed import load_compressed
    src = inp["source"]
    kw = dict(seq_len=args.ppl_seq_len, max_tokens=args.ppl_tokens, batch_size=4)
    params = source_params(src)
    before = model_perplexity(params, src.cfg, inp["ppl_ids"], **kw)
    del params
    cfg, cparams = load_compressed(args.out, source=src)      # refuses a different source model
    after = model_perplexity(cparams, cfg, inp["ppl_ids"], **kw)
    print(f"perplexity on held-out text ({before['tokens']} tokens, {before['windows']} x {before['seq_len']}): "
          f"before {before['ppl']:.3f}  after {after['ppl']:.3f}  "
          f"({100 * (after['ppl'] / before['ppl'] - 1):+.1f}%)", flush=True)
    return {"before": before, "after": after}


# ============================================================================ main
def main(argv: list[str] | None = None, *, on_layer_done: Callable[[int], None] | None = None,
         decomposer=None) -> dict[str, Any]:
    """Runs the command line `argv`. on_layer_done(i) is called after layer i's file is written
    (tests use it to simulate a crash); decomposer replaces caldera_jax.caldera.decompose."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    mesh_axes = parse_mesh(args.mesh)
    if mesh_axes == {"ep": 0}:
        request_cpu_devices(min(os.cpu_count() or 1, 8))
    else:
        request_cpu_devices(math.prod(mesh_axes.values()) if mesh_axes else 1)
    return compress(args, mesh_axes, on_layer_done=on_layer_done, decomposer=decomposer)


if __name__ == "__main__":
    try:
        main()
    except (JobError, ValueError, FileNotFoundError, PermissionError) as e:   # config, calibration, checkpoint errors
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
