"""The compressed checkpoint: CALDERA weights (packed), everything else dense, with its provenance.

    cfg, params = load_compressed("out/")                    # linears are QLRWeight leaves
    cfg, params = load_compressed("out/", source="hf_dir")   # + refuses a different source model
    logits = forward(params, cfg, tokens)                     # the model runs them directly

Layout of a checkpoint directory:

    caldera_config.json          written last: format, the model's HF config, the job config, the
                                 source model's fingerprint (sha256 of every source tensor), the
                                 calibration data's digest, per-matrix budgets and metrics, and the
                                 sha256 of every file below. Its presence marks a complete checkpoint.
    job.json                     the job's identity (written first; a rerun resumes only if equal)
    layers/layer-00007.safetensors   one per decoder layer, written atomically (temp name + rename)
                                 as the layer finishes: the layer's compressed matrices (packed
                                 codes uint8/uint16/uint32, float16 scales, factors, rotation signs),
                                 its dense tensors in the source dtype (norms, biases, MoE router)
                                 and its protected matrices in bf16. The safetensors metadata
                                 "caldera" holds the layer's JSON (budgets, metrics, how to rebuild
                                 each quantized weight, the job digest).
    globals.safetensors          embeddings, final norm, LM head (untied), source dtype
    tokenizer files              copied from the source model when it has them

A quantized weight is stored through its own `to_arrays()` / `from_arrays(arrays, meta)` (QLRWeight),
or else through its dataclass fields: arrays become tensors named "<matrix name>::<field>" and the
rest (formats, shapes, class) goes to the layer's JSON;
PackedMatrix (caldera_jax/caldera/quant/packing.py, the one packed layout) is stored as is; an
unpacked QuantizedMatrix is packed on the way out and unpacked on the way in. Only classes from the caldera_jax package are ever rebuilt.

Every file is deterministic (sorted JSON, no timestamps): the same job gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from caldera_jax.config import ModelConfig
from caldera_jax.params import Params, layer_prefix, layer_shapes, unflatten
from caldera_jax.checkpoints_io.atomic import fsync_path
from caldera_jax.checkpoints_io.errors import CheckpointError

FORMAT = "caldera-jax-compressed"
FORMAT_VERSION = 1
CONFIG_FILE = "caldera_config.json"
JOB_FILE = "job.json"
GLOBALS_FILE = "globals.safetensors"
LAYER_DIR = "layers"
SEP = "::"
_ALLOWED_PACKAGES = ("caldera_jax.",)


def layer_file(i: int) -> str:
    return f"{LAYER_DIR}/layer-{i:05d}.safetensors"


# ------------------------------------------------------------------ atomic files
def _tmp_name(path: str) -> str:
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


def atomic_save_safetensors(path: str, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                  # one metadata key: safetensors writes a multi-key map in no fixed order
                  metadata={"caldera": json.dumps({"format": FORMAT, **meta}, sort_keys=True)})
        os.chmod(tmp, 0o644)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(os.path.dirname(path) or ".")


def remove_stale_temps(out_dir: str) -> None:
    """Deletes temp files a killed job left behind (".<name>.tmp-<pid>")."""
    for d in (out_dir, os.path.join(out_dir, LAYER_DIR)):
        if os.path.isdir(d):
            for f in os.listdir(d):
                if f.startswith(".") and ".tmp-" in f:
                    os.remove(os.path.join(d, f))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 23):
            h.update(buf)
    return h.hexdigest()


# ------------------------------------------------------------------ quantized leaves <-> tensors
def _packing():
    return importlib.import_module("caldera_jax.caldera.quant.packing")


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__"))


def encode_leaf(obj: Any, prefix: str, tensors: dict[str, np.ndarray]) -> Any:
    """A quantized weight (dataclass pytree) -> JSON structure; its arrays go into `tensors`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    from caldera_jax.caldera.quant.base import QuantizedMatrix
    if isinstance(obj, QuantizedMatrix):          # unpacked int32 codes: store packed
        pk = _packing()
        return {"__unpack__": encode_leaf(pk.pack(obj), prefix, tensors)}
    if hasattr(obj, "to_arrays") and hasattr(type(obj), "from_arrays"):   # QLRWeight: its own layout
        cls = type(obj)
        if not cls.__module__.startswith(_ALLOWED_PACKAGES):
            raise CheckpointError(f"{prefix}: cannot store a {cls.__module__}.{cls.__qualname__}")
        arrays, meta = obj.to_arrays()
        names = {}
        for k, v in sorted(arrays.items()):
            encode_leaf(v, prefix + k, tensors)
            names[k] = prefix + k
        return {"__class__": f"{cls.__module__}:{cls.__qualname__}", "__arrays__": names,
                "meta": json.loads(json.dumps(meta))}
    if _is_array(obj):
        a = np.asarray(obj)
        if a.dtype.kind == "i" and a.dtype.itemsize > 4:
            a = a.astype(np.int32)
        tensors[prefix] = np.ascontiguousarray(a)
        return {"__tensor__": prefix}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith(_ALLOWED_PACKAGES):
            raise CheckpointError(f"{prefix}: cannot store a {cls.__module__}.{cls.__qualname__}")
        return {"__class__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode_leaf(getattr(obj, f.name), f"{prefix}.{f.name}", tensors)
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, (tuple, list)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__":
                [encode_leaf(v, f"{prefix}.{k}", tensors) for k, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return {"__dict__": {str(k): encode_leaf(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}}
    raise CheckpointError(f"{prefix}: cannot store a value of type {type(obj).__name__}")


def decode_leaf(spec: Any, tensors: dict[str, np.ndarray], where: str) -> Any:
    """Inverse of encode_leaf: arrays come back as jax arrays."""
    import jax.numpy as jnp
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    if isinstance(spec, dict) and "__unpack__" in spec:
        return _packing().unpack(decode_leaf(spec["__unpack__"], tensors, where))
    if isinstance(spec, dict) and "__tensor__" in spec:
        name = spec["__tensor__"]
        if name not in tensors:
            raise CheckpointError(f"{where}: missing tensor '{name}'")
        return jnp.asarray(tensors[name])
    if isinstance(spec, dict) and "__class__" in spec:
        mod, _, qual = spec["__class__"].partition(":")
        if not mod.startswith(_ALLOWED_PACKAGES):
            raise CheckpointError(f"{where}: refusing to build class {spec['__class__']}")
        try:
            cls = importlib.import_module(mod)
            for part in qual.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as e:
            raise CheckpointError(f"{where}: class {spec['__class__']} not found ({e}); the checkpoint "
                                  f"was written by a different version of caldera_jax") from e
        if "__arrays__" in spec:
            missing = [t for t in spec["__arrays__"].values() if t not in tensors]
            if missing:
                raise CheckpointError(f"{where}: missing tensor(s) {missing}")
            return cls.from_arrays({k: tensors[t] for k, t in spec["__arrays__"].items()}, spec["meta"])
        fields = {k: decode_leaf(v, tensors, where) for k, v in spec["fields"].items()}
        return cls(**fields)
    if isinstance(spec, dict) and "__tuple__" in spec:
        return tuple(decode_leaf(v, tensors, where) for v in spec["__tuple__"])
    if isinstance(spec, dict) and "__list__" in spec:
        return [decode_leaf(v, tensors, where) for v in spec["__list__"]]
    if isinstance(spec, dict) and "__dict__" in spec:
        return {k: decode_leaf(v, tensors, where) for k, v in spec["__dict__"].items()}
    raise CheckpointError(f"{where}: unreadable structure {str(spec)[:80]}")


# ------------------------------------------------------------------ writing
def write_layer(out_dir: str, i: int, *, dense: dict[str, np.ndarray], protected: dict[str, np.ndarray],
                quantized: dict[str, Any], matrices: dict[str, dict], job_digest: str) -> str:
    """Writes layer i's file atomically. dense: name -> array (stored as is); protected: name ->
    array (stored as bf16); quantized: name -> quantized weight; matrices: name -> JSON info
    (budget, metrics). Names are canonical (model.layers.{i}.…)."""
    tensors: dict[str, np.ndarray] = {}
    for n, a in dense.items():
        tensors[n] = np.asarray(a)
    for n, a in protected.items():
        tensors[n] = np.asarray(a, np.float32).astype(ml_dtypes.bfloat16)
    leaves = {}
    for n, q in quantized.items():
        leaves[n] = encode_leaf(q, f"{n}{SEP}", tensors)
    meta = {"layer": i, "job_digest": job_digest, "dense": sorted(dense), "protected": sorted(protected),
            "quantized": leaves, "matrices": matrices}
    path = os.path.join(out_dir, layer_file(i))
    atomic_save_safetensors(path, tensors, meta)
    return path


def read_layer_meta(path: str) -> dict[str, Any] | None:
    """The layer file's JSON, or None when the file is absent or unreadable (e.g. truncated)."""
    try:
        with safe_open(path, framework="numpy") as f:
            md = f.metadata() or {}
        return json.loads(md["caldera"])
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError):
        return None


def read_layer(path: str, dtype: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(layer JSON, {canonical name: jax array or quantized weight}) of one layer file."""
    import jax.numpy as jnp
    try:
        with safe_open(path, framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["caldera"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable compressed-layer file ({e})") from e
    out: dict[str, Any] = {}
    for n in meta["dense"] + meta["protected"]:
        a = tensors[n]
        out[n] = jnp.asarray(a if dtype is None else a.astype(dtype))
    for n, spec in meta["quantized"].items():
        out[n] = decode_leaf(spec, tensors, f"{path}: {n}")
    return meta, out


def write_globals(out_dir: str, tensors: dict[str, np.ndarray]) -> str:
    path = os.path.join(out_dir, GLOBALS_FILE)
    atomic_save_safetensors(path, {k: np.asarray(v) for k, v in tensors.items()}, {"globals": sorted(tensors)})
    return path


def copy_tokenizer(src_dir: str | None, out_dir: str) -> list[str]:
    """Copies the source's tokenizer files (if any); returns their names."""
    from caldera_jax.checkpoints_io.hf import _TOKENIZER_FILES
    import fnmatch
    if not src_dir or not os.path.isdir(src_dir):
        return []
    names = [f for f in sorted(os.listdir(src_dir)) if os.path.isfile(os.path.join(src_dir, f))
             and any(fnmatch.fnmatch(f, p) for p in _TOKENIZER_FILES)]
    for f in names:
        with open(os.path.join(src_dir, f), "rb") as fh:
            atomic_write_bytes(os.path.join(out_dir, f), fh.read())
    return names


def write_config(out_dir: str, manifest: dict[str, Any]) -> str:
    """caldera_config.json (last file written; records the sha256 of every other file)."""
    files = {}
    for root, _, fs in os.walk(out_dir):
        for f in fs:
            rel = os.path.relpath(os.path.join(root, f), out_dir).replace(os.sep, "/")
            if rel in (CONFIG_FILE,) or rel.startswith("report/") or f.startswith("."):
                continue
            files[rel] = file_sha256(os.path.join(root, f))
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": dict(sorted(files.items()))}
    path = os.path.join(out_dir, CONFIG_FILE)
    atomic_write_bytes(path, json_bytes(manifest))
    return path


def read_config(ckpt_dir: str) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        hint = (" (a job is still running or was interrupted: rerun the same command to finish it)"
                if os.path.isfile(os.path.join(ckpt_dir, JOB_FILE)) else "")
        raise CheckpointError(f"{ckpt_dir}: no {CONFIG_FILE}; not a complete compressed checkpoint{hint}")
    try:
        with open(path) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format={m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {m.get('format_version')} is not supported "
                              f"(this code reads {FORMAT_VERSION})")
    return m


# ------------------------------------------------------------------ loading
def load_compressed(ckpt_dir: str | os.PathLike, source: Any = None, *, dtype: Any = np.float32,
                    verify_files: bool = True) -> tuple[ModelConfig, Params]:
    """(cfg, params) of a compressed checkpoint; compressed linears are quantized-weight leaves
    (QLRWeight) that `caldera_jax.linear.apply` runs, everything else jax arrays in `dtype`
    (protected matrices hold their bf16 values).

    source: the original model (HF dir, .gguf, open reader or (cfg, params)); when given, its
    tensors must match the recorded fingerprint, checked before anything else is read
    (FingerprintMismatchError otherwise). verify_files: check every file's sha256 first."""
    ckpt_dir = os.fspath(ckpt_dir)
    m = read_config(ckpt_dir)
    if source is not None:
        from caldera_jax.checkpoints_io.fingerprint import verify
        verify(m["source_fingerprint"], source, what=f"the compressed checkpoint {ckpt_dir}")
    if verify_files:
        for rel, sha in m["files"].items():
            p = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(p):
                raise CheckpointError(f"{p}: missing (listed in {CONFIG_FILE})")
            if file_sha256(p) != sha:
                raise CheckpointError(f"{p}: sha256 differs from the one in {CONFIG_FILE} (modified or corrupt)")
    cfg = ModelConfig.from_hf_dict(m["model_config"], source=os.path.join(ckpt_dir, CONFIG_FILE))
    flat: dict[str, Any] = {}
    for i in range(cfg.num_hidden_layers):
        _, layer = read_layer(os.path.join(ckpt_dir, layer_file(i)), dtype)
        want = {layer_prefix(i) + k for k in layer_shapes(cfg, i)}
        if set(layer) != want:
            raise CheckpointError(f"{os.path.join(ckpt_dir, layer_file(i))}: tensors "
                                  f"{sorted(set(layer) ^ want)[:4]} do not match layer {i} of the model")
        flat.update(layer)
    import jax.numpy as jnp
    with safe_open(os.path.join(ckpt_dir, GLOBALS_FILE), framework="numpy") as f:
        for k in f.keys():
            a = f.get_tensor(k)
            flat[k] = jnp.asarray(a if dtype is None else a.astype(dtype))
    return cfg, unflatten(flat)


def compressed_info(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """caldera_config.json of a complete checkpoint (config, fingerprint, metrics)."""
    return read_config(os.fspath(ckpt_dir))


def clear_dir(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
