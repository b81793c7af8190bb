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
rest (formats, shapes, kind) goes to the layer's JSON;
PackedMatrix (caldera_jax/formats/packing.py, the packed layout of every registered format) is
stored as is (a field with a default, e.g. tensor_scale, may be absent in older files); an
unpacked QuantizedMatrix is packed on the way out and unpacked on the way in.

A checkpoint never names code. Each stored object carries a kind ("__kind__": "qlr_weight"), looked
up in a fixed registry (leaf_classes(): "qlr_weight" -> QLRWeight, "packed_matrix" -> PackedMatrix,
"packed_format" -> PackedFormat); nothing a file says is imported or looked up by name. Version-1
files stored "__class__": "module:qualname"; exactly the historic paths of those three classes
(HISTORIC_CLASS_PATHS) still load, anything else is refused before any object is built. Every
object is checked after it is built (dtypes and shapes of its arrays against its format), and
load_compressed checks the checkpoint against the model config: every tensor the config needs,
with its shape, and nothing else.

Format versions: 1 (class paths, no self-digest) is still read; 2 (kinds) adds "manifest_sha256" to
caldera_config.json: the sha256 of the file's canonical JSON without that key, so a changed byte in
the manifest is refused like a changed byte in any file it lists.

Every file is deterministic (sorted JSON, no timestamps): the same job gives the same bytes.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from caldera_jax.config import ModelConfig
from caldera_jax.params import Params, layer_prefix, layer_shapes, param_shapes, unflatten
from caldera_jax.checkpoints_io.atomic import fsync_path
from caldera_jax.checkpoints_io.errors import CheckpointError

FORMAT = "caldera-jax-compressed"
FORMAT_VERSION = 2            # 2: objects stored by registry kind, caldera_config.json self-digest
READ_FORMAT_VERSIONS = (1, 2)
MANIFEST_DIGEST = "manifest_sha256"
CONFIG_FILE = "caldera_config.json"
JOB_FILE = "job.json"
GLOBALS_FILE = "globals.safetensors"
GLOBAL_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
LAYER_DIR = "layers"
SEP = "::"

# The only objects a checkpoint can rebuild: kind -> how it is stored ("arrays": the class's own
# to_arrays()/from_arrays(arrays, meta); "fields": its dataclass fields). The classes: leaf_classes().
LEAF_LAYOUTS = {"qlr_weight": "arrays", "packed_matrix": "fields", "packed_format": "fields"}
# Version-1 files named the class by its import path (where the classes lived then; today they are in
# caldera_jax.formats): exactly these strings map to a kind; any other string is refused (never imported).
HISTORIC_CLASS_PATHS = {
    "caldera_jax.caldera.qlr_weight:QLRWeight": "qlr_weight",
    "caldera_jax.caldera.quant.packing:PackedMatrix": "packed_matrix",
    "caldera_jax.caldera.quant.packing:PackedFormat": "packed_format",
}
_QLR_META = frozenset({"shape", "rank", "q", "l", "r"})
# dtypes a quantized object's tensors may have (jax holds each as is: no silent 64 -> 32 bit cast)
_LEAF_DTYPES = frozenset({"bool", "int8", "int16", "int32", "uint8", "uint16", "uint32",
                          "float16", "bfloat16", "float32"})
_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


@functools.cache
def leaf_classes() -> dict[str, type]:
    """The registry: kind -> class (imported here, lazily: the classes pull in jax)."""
    from caldera_jax.formats.packing import PackedFormat, PackedMatrix
    from caldera_jax.formats.qlr_weight import QLRWeight
    return {"qlr_weight": QLRWeight, "packed_matrix": PackedMatrix, "packed_format": PackedFormat}


@functools.cache
def _qlr_arrays() -> frozenset:
    """Array names a qlr_weight's to_arrays() writes: "<part>.<slot>" for every PackedMatrix slot."""
    slots = _packing().ARRAY_SLOTS
    return frozenset({f"{p}.{k}" for p in ("q", "l", "r") for k in slots} | {"scale", "signs_in", "signs_out"})


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
    from caldera_jax.formats import packing      # lazily: it pulls in jax
    return packing


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__"))


def _show(v: Any, n: int = 200) -> str:
    """A value from a file, for an error message (bounded)."""
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[:n] + "…"


def _kind_of_class(obj: Any, prefix: str) -> str:
    cls = type(obj)
    for kind, c in leaf_classes().items():
        if cls is c:
            return kind
    raise CheckpointError(f"{prefix}: cannot store a {cls.__module__}.{cls.__qualname__} (a checkpoint "
                          f"holds only the kinds {', '.join(LEAF_LAYOUTS)})")


def encode_leaf(obj: Any, prefix: str, tensors: dict[str, np.ndarray]) -> Any:
    """A quantized weight (dataclass pytree) -> JSON structure; its arrays go into `tensors`.
    Objects are stored by registry kind ("__kind__"); a class outside the registry is refused."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    from caldera_jax.formats.quant import QuantizedMatrix
    if isinstance(obj, QuantizedMatrix):          # unpacked int32 codes: store packed
        pk = _packing()
        return {"__unpack__": encode_leaf(pk.pack(obj), prefix, tensors)}
    if hasattr(obj, "to_arrays") or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        kind = _kind_of_class(obj, prefix)
        if LEAF_LAYOUTS[kind] == "arrays":        # QLRWeight: its own layout
            arrays, meta = obj.to_arrays()
            names = {}
            for k, v in sorted(arrays.items()):
                encode_leaf(v, prefix + k, tensors)
                names[k] = prefix + k
            return {"__kind__": kind, "__arrays__": names, "meta": json.loads(json.dumps(meta))}
        return {"__kind__": kind,
                "fields": {f.name: encode_leaf(getattr(obj, f.name), f"{prefix}.{f.name}", tensors)
                           for f in dataclasses.fields(obj)}}
    if _is_array(obj):
        a = np.asarray(obj)
        if a.dtype.kind == "i" and a.dtype.itemsize > 4:
            a = a.astype(np.int32)
        tensors[prefix] = np.ascontiguousarray(a)
        return {"__tensor__": prefix}
    if isinstance(obj, (tuple, list)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__":
                [encode_leaf(v, f"{prefix}.{k}", tensors) for k, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return {"__dict__": {str(k): encode_leaf(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}}
    raise CheckpointError(f"{prefix}: cannot store a value of type {type(obj).__name__}")


def _leaf_kind(spec: dict, where: str) -> tuple[str, str]:
    """(kind, the key naming it) of a stored object; refuses anything not in the registry. Only
    string comparisons: nothing named by the file is imported or looked up."""
    if "__kind__" in spec and "__class__" in spec:
        raise CheckpointError(f"{where}: both __kind__ and __class__ given ({_show(spec['__kind__'])}, "
                              f"{_show(spec['__class__'])})")
    if "__kind__" in spec:
        kind = spec["__kind__"]
        if isinstance(kind, str) and kind in LEAF_LAYOUTS:
            return kind, "__kind__"
        raise CheckpointError(f"{where}: unknown object kind {_show(kind)} (a checkpoint holds only "
                              f"{', '.join(LEAF_LAYOUTS)})")
    path = spec["__class__"]
    if isinstance(path, str) and path in HISTORIC_CLASS_PATHS:
        return HISTORIC_CLASS_PATHS[path], "__class__"
    raise CheckpointError(f"{where}: refusing to build class {_show(path)} (not one of the classes a "
                          f"checkpoint may hold: {', '.join(HISTORIC_CLASS_PATHS)})")


def _check_tensor_ref(name: Any, tensors: dict[str, np.ndarray], where: str, refs: set | None) -> None:
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: tensor reference {_show(name)} is not a name")
    if name not in tensors:
        raise CheckpointError(f"{where}: missing tensor '{_show(name)}'")
    dt = tensors[name].dtype.name
    if dt not in _LEAF_DTYPES:
        raise CheckpointError(f"{where}: tensor '{name}' has dtype {dt}, not one a quantized weight "
                              f"stores ({', '.join(sorted(_LEAF_DTYPES))})")
    if refs is not None:
        refs.add(name)


def check_leaf_spec(spec: Any, tensors: dict[str, np.ndarray], where: str, refs: set | None = None) -> None:
    """Checks a stored structure without building anything: known markers only, every object's kind
    in the registry (a version-1 "__class__" exactly a historic path), its fields those of the class,
    every referenced tensor present and of a storable dtype (its name added to `refs`). Raises
    CheckpointError."""
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: unreadable structure {_show(spec, 80)}")
    keys = set(spec)
    if keys == {"__tensor__"}:
        _check_tensor_ref(spec["__tensor__"], tensors, where, refs)
    elif keys == {"__unpack__"}:
        inner = spec["__unpack__"]
        if not (isinstance(inner, dict) and ("__kind__" in inner or "__class__" in inner)
                and _leaf_kind(inner, where)[0] == "packed_matrix"):
            raise CheckpointError(f"{where}: __unpack__ of {_show(inner, 80)}, not a packed matrix")
        check_leaf_spec(inner, tensors, where, refs)
    elif keys in ({"__tuple__"}, {"__list__"}):
        items = spec[keys.pop()]
        if not isinstance(items, list):
            raise CheckpointError(f"{where}: unreadable structure {_show(spec, 80)}")
        for i, v in enumerate(items):
            check_leaf_spec(v, tensors, f"{where}.{i}", refs)
    elif keys == {"__dict__"}:
        items = spec["__dict__"]
        if not isinstance(items, dict):
            raise CheckpointError(f"{where}: unreadable structure {_show(spec, 80)}")
        for k, v in items.items():
            check_leaf_spec(v, tensors, f"{where}.{k}", refs)
    elif "__kind__" in keys or "__class__" in keys:
        kind, tag = _leaf_kind(spec, where)
        if LEAF_LAYOUTS[kind] == "arrays":
            if keys != {tag, "__arrays__", "meta"}:
                raise CheckpointError(f"{where}: a {kind} is stored as __arrays__ and meta, got keys {sorted(keys)}")
            arrays, meta = spec["__arrays__"], spec["meta"]
            if not isinstance(arrays, dict) or not isinstance(meta, dict):
                raise CheckpointError(f"{where}: {kind}: __arrays__ and meta must be objects")
            unknown = sorted(set(arrays) - _qlr_arrays()) + sorted(set(meta) - _QLR_META)
            if unknown:
                raise CheckpointError(f"{where}: {kind}: unknown entries {[_show(u, 40) for u in unknown[:4]]}")
            for k, t in arrays.items():
                _check_tensor_ref(t, tensors, f"{where} ({k})", refs)
        else:
            fields = spec.get("fields")
            if keys != {tag, "fields"} or not isinstance(fields, dict):
                raise CheckpointError(f"{where}: a {kind} is stored as its fields, got {_show(spec, 80)}")
            cls_fields = dataclasses.fields(leaf_classes()[kind])
            want = {f.name for f in cls_fields}
            required = {f.name for f in cls_fields
                        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
            if not required <= set(fields) <= want:
                raise CheckpointError(f"{where}: {kind} fields {sorted(fields)[:8]} are not {sorted(want)}")
            for k, v in fields.items():
                check_leaf_spec(v, tensors, f"{where}.{k}", refs)
    else:
        raise CheckpointError(f"{where}: unreadable structure {_show(spec, 80)}")


def _int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_format(f: Any, where: str) -> None:
    """A PackedFormat's fields are a format the format registry defines (packing.valid_format)."""
    pk = _packing()
    ok = (isinstance(f, pk.PackedFormat) and isinstance(f.kind, str) and f.kind in pk.format_kinds()
          and _int(f.bits) and _int(f.group_size) and isinstance(f.symmetric, (bool, np.bool_))
          and isinstance(f.shape, tuple) and len(f.shape) == 2 and all(_int(d) and d > 0 for d in f.shape))
    if ok:
        ok = pk.valid_format(f)
    if not ok:
        raise CheckpointError(f"{where}: not a valid packed format: {_show(f)}")


def _check_packed(pm: Any, where: str) -> tuple[int, ...]:
    """A PackedMatrix's arrays have the dtypes and shapes its format says; returns the stack axes."""
    pk = _packing()
    if not isinstance(pm, pk.PackedMatrix):
        raise CheckpointError(f"{where}: expected a packed matrix, got {type(pm).__name__}")
    f = pm.fmt
    _check_format(f, where + ".fmt")
    if not _is_array(pm.codes) or len(pm.codes.shape) not in (2, 3):
        raise CheckpointError(f"{where}.codes: not a 2-D or 3-D (stacked) array: {_show(pm.codes, 80)}")
    lead = tuple(pm.codes.shape[:-2])
    m, n = f.shape
    want = pk.array_specs(f)                      # every slot: None or (dtypes, per-matrix shape)
    for name, w in want.items():
        a = getattr(pm, name)
        if w is None:
            if a is not None:
                raise CheckpointError(f"{where}.{name}: a {f.kind} {f.bits}-bit matrix has no {name}")
            continue
        dtypes, shape = w
        if a is None or not _is_array(a):
            raise CheckpointError(f"{where}.{name}: missing (a {f.kind} {f.bits}-bit matrix needs it)")
        dt = np.dtype(a.dtype).name
        if dt not in dtypes or tuple(a.shape) != lead + shape:
            raise CheckpointError(f"{where}.{name}: {dt}{list(a.shape)}, expected {'/'.join(sorted(dtypes))}"
                                  f"{list(lead + shape)} for a {f.kind} {f.bits}-bit {m}x{n} matrix")
    return lead


def _check_qlr(w: Any, meta: dict, where: str) -> None:
    """A QLRWeight's parts fit together (Q [m, n], L [m, r], R [r, n], scale, signs)."""
    if not (isinstance(w.shape, tuple) and len(w.shape) == 2 and all(_int(d) and d > 0 for d in w.shape)):
        raise CheckpointError(f"{where}: shape {_show(w.shape)} is not (rows, columns)")
    m, n = w.shape
    lead = _check_packed(w.q, where + ": q")
    if w.q.fmt.shape != (m, n):
        raise CheckpointError(f"{where}: q is {w.q.fmt.shape}, the weight {(m, n)}")
    if (w.l is None) != (w.r is None):
        raise CheckpointError(f"{where}: has only one of the factors L, R")
    if w.l is not None:
        ll, rl = _check_packed(w.l, where + ": l"), _check_packed(w.r, where + ": r")
        (lm, lk), (rk, rn) = w.l.fmt.shape, w.r.fmt.shape
        if (lm, rn) != (m, n) or lk != rk or ll != lead or rl != lead:
            raise CheckpointError(f"{where}: factors L {list(ll + (lm, lk))}, R {list(rl + (rk, rn))} "
                                  f"do not fit the weight {list(lead + (m, n))}")
    if meta.get("rank", w.rank) != w.rank:
        raise CheckpointError(f"{where}: meta rank {_show(meta.get('rank'))} but the factors have rank {w.rank}")
    s = w.scale
    if (np.dtype(s.dtype).name != "float32" or math.prod(s.shape) != math.prod(lead)
            or tuple(s.shape[:len(lead)]) != lead):
        raise CheckpointError(f"{where}: scale is {np.dtype(s.dtype).name}{list(s.shape)}, expected "
                              f"float32 with {math.prod(lead)} value(s)")
    for name, k in (("signs_in", n), ("signs_out", m)):
        a = getattr(w, name)
        if a is not None and (np.dtype(a.dtype).name != "uint8" or tuple(a.shape) != lead + (-(-k // 8),)):
            raise CheckpointError(f"{where}: {name} is {np.dtype(a.dtype).name}{list(a.shape)}, expected "
                                  f"uint8{list(lead + (-(-k // 8),))}")


def _build_leaf(spec: Any, tensors: dict[str, np.ndarray], where: str) -> Any:
    """Builds a structure check_leaf_spec accepted; checks every object it builds."""
    import jax.numpy as jnp
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    if "__tensor__" in spec:
        return jnp.asarray(tensors[spec["__tensor__"]])
    if "__unpack__" in spec:
        pm = _build_leaf(spec["__unpack__"], tensors, where)
        try:
            return _packing().unpack(pm)
        except Exception as e:  # noqa: BLE001  (checked already; any failure is the file's)
            raise CheckpointError(f"{where}: cannot unpack ({type(e).__name__}: {e})") from e
    if "__tuple__" in spec:
        return tuple(_build_leaf(v, tensors, f"{where}.{i}") for i, v in enumerate(spec["__tuple__"]))
    if "__list__" in spec:
        return [_build_leaf(v, tensors, f"{where}.{i}") for i, v in enumerate(spec["__list__"])]
    if "__dict__" in spec:
        return {k: _build_leaf(v, tensors, f"{where}.{k}") for k, v in spec["__dict__"].items()}
    kind, _ = _leaf_kind(spec, where)
    cls = leaf_classes()[kind]
    if LEAF_LAYOUTS[kind] == "arrays":
        meta, arrays = spec["meta"], {k: tensors[t] for k, t in spec["__arrays__"].items()}
        if "scale" not in arrays or arrays["scale"].dtype.name != "float32":
            raise CheckpointError(f"{where}: the {kind}'s scale is missing or not float32 "
                                  f"({_show(spec['__arrays__'].get('scale'))})")
        try:
            obj = cls.from_arrays(arrays, meta)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{where}: cannot rebuild the {kind} ({type(e).__name__}: {e})") from e
        _check_qlr(obj, meta, where)
        return obj
    fields = {k: _build_leaf(v, tensors, f"{where}.{k}") for k, v in spec["fields"].items()}
    obj = cls(**fields)
    if kind == "packed_format":
        _check_format(obj, where)
    else:
        _check_packed(obj, where)
    return obj


def decode_leaf(spec: Any, tensors: dict[str, np.ndarray], where: str) -> Any:
    """Inverse of encode_leaf: arrays come back as jax arrays. The whole structure is checked
    (check_leaf_spec) before any object is built; `where` (file: matrix) starts every error."""
    check_leaf_spec(spec, tensors, where)
    return _build_leaf(spec, tensors, where)


def _leaf_dims(leaf: Any) -> tuple[int, ...] | None:
    """Full shape ((E,) m, n) of a quantized leaf, or None when it has none."""
    try:
        if hasattr(leaf, "q") and hasattr(leaf.q, "codes"):       # QLRWeight
            return tuple(leaf.q.codes.shape[:-2]) + tuple(leaf.shape)
        if hasattr(leaf, "fmt"):                                  # PackedMatrix
            return tuple(leaf.codes.shape[:-2]) + tuple(leaf.shape)
        return tuple(leaf.scales.shape[:-2]) + tuple(leaf.shape)  # QuantizedMatrix
    except (AttributeError, TypeError):
        return None


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


def _read_safetensors(path: str) -> tuple[dict[str, Any] | None, dict[str, np.ndarray]]:
    """(the file's "caldera" JSON or None, {name: numpy array}); any failure is a CheckpointError
    that names the file."""
    try:
        with safe_open(path, framework="numpy") as f:
            md = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (safetensors/numpy raise several types for a bad file)
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    for k, a in tensors.items():
        if not isinstance(a, np.ndarray) or a.dtype.hasobject:
            raise CheckpointError(f"{path}: tensor '{k}' is not a numeric array ({type(a).__name__})")
    raw = md.get("caldera")
    if raw is None:
        return None, tensors
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: its 'caldera' metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: its 'caldera' metadata is not {FORMAT} metadata ({_show(raw, 80)})")
    return meta, tensors


def read_layer_meta(path: str) -> dict[str, Any] | None:
    """The layer file's JSON, or None when the file is absent or unreadable (e.g. truncated)."""
    try:
        with safe_open(path, framework="numpy") as f:
            md = f.metadata() or {}
        meta = json.loads(md["caldera"])
    except Exception:  # noqa: BLE001  (unreadable, whatever the reason: the caller redoes the layer)
        return None
    return meta if isinstance(meta, dict) else None


def _str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def read_layer(path: str, dtype: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(layer JSON, {canonical name: jax array or quantized weight}) of one layer file. Every
    stored object is checked (kinds, dtypes, shapes) before any is built; errors name the file."""
    import jax.numpy as jnp
    meta, tensors = _read_safetensors(path)
    if meta is None:
        raise CheckpointError(f"{path}: no 'caldera' metadata; not a compressed-layer file")
    dense, protected, quantized = meta.get("dense"), meta.get("protected"), meta.get("quantized")
    if not (_str_list(dense) and _str_list(protected) and isinstance(quantized, dict)):
        raise CheckpointError(f"{path}: the layer JSON lacks its dense / protected / quantized lists")
    names = dense + protected + list(quantized)
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: tensor(s) listed twice in the layer JSON: "
                              f"{sorted({n for n in names if names.count(n) > 1})[:4]}")
    refs: set[str] = set()
    for n in dense + protected:
        if n not in tensors:
            raise CheckpointError(f"{path}: missing tensor '{n}' (listed in the layer JSON)")
        if tensors[n].dtype.name not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor '{n}' has dtype {tensors[n].dtype.name}, expected a "
                                  f"float dtype ({', '.join(sorted(_FLOAT_DTYPES))})")
        refs.add(n)
    for n, spec in quantized.items():            # every leaf checked before any object is built
        check_leaf_spec(spec, tensors, f"{path}: {n}", refs)
    stray = sorted(set(tensors) - refs)
    if stray:
        raise CheckpointError(f"{path}: tensor(s) {stray[:4]} are not referenced by the layer JSON")
    out: dict[str, Any] = {}
    for n in dense + protected:
        a = tensors[n]
        out[n] = jnp.asarray(a if dtype is None else a.astype(dtype))
    for n, spec in quantized.items():
        out[n] = _build_leaf(spec, tensors, f"{path}: {n}")
    return meta, out


def write_globals(out_dir: str, tensors: dict[str, np.ndarray]) -> str:
    path = os.path.join(out_dir, GLOBALS_FILE)
    atomic_save_safetensors(path, {k: np.asarray(v) for k, v in tensors.items()}, {"globals": sorted(tensors)})
    return path


def copy_tokenizer(src_dir: str | None, out_dir: str) -> list[str]:
    """Copies the source's tokenizer files (if any); returns their names."""
    from caldera_jax.checkpoints_io.hf import TOKENIZER_FILES
    import fnmatch
    if not src_dir or not os.path.isdir(src_dir):
        return []
    names = [f for f in sorted(os.listdir(src_dir)) if os.path.isfile(os.path.join(src_dir, f))
             and any(fnmatch.fnmatch(f, p) for p in TOKENIZER_FILES)]
    for f in names:
        with open(os.path.join(src_dir, f), "rb") as fh:
            atomic_write_bytes(os.path.join(out_dir, f), fh.read())
    return names


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (json_bytes) without its MANIFEST_DIGEST key."""
    return hashlib.sha256(json_bytes({k: v for k, v in manifest.items() if k != MANIFEST_DIGEST})).hexdigest()


def write_config(out_dir: str, manifest: dict[str, Any], skip_dirs: tuple[str, ...] = ("report",)) -> str:
    """caldera_config.json (last file written; records the sha256 of every other file but those
    under skip_dirs (a job's report, training state), and its own content's sha256 under
    MANIFEST_DIGEST)."""
    files = {}
    for root, _, fs in os.walk(out_dir):
        for f in fs:
            rel = os.path.relpath(os.path.join(root, f), out_dir).replace(os.sep, "/")
            if rel in (CONFIG_FILE,) or rel.split("/")[0] in skip_dirs or f.startswith("."):
                continue
            files[rel] = file_sha256(os.path.join(root, f))
    # as it reads back (tuples -> lists, int keys -> str), so the digest is that of what is read
    manifest = json.loads(json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_DIGEST}, allow_nan=True))
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION, "files": dict(sorted(files.items()))}
    manifest[MANIFEST_DIGEST] = manifest_digest(manifest)
    path = os.path.join(out_dir, CONFIG_FILE)
    atomic_write_bytes(path, json_bytes(manifest))
    return path


def read_config(ckpt_dir: str) -> dict[str, Any]:
    """The manifest, checked: format, version, (version 2) its own digest, the types of what the
    loader uses. Any problem is a CheckpointError naming the file."""
    path = os.path.join(ckpt_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        hint = (" (a job is still running or was interrupted: rerun the same command to finish it)"
                if os.path.isfile(os.path.join(ckpt_dir, JOB_FILE)) else "")
        raise CheckpointError(f"{ckpt_dir}: no {CONFIG_FILE}; not a complete compressed checkpoint{hint}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        m = json.loads(raw)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    except (ValueError, RecursionError) as e:     # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format={_show(m.get('format'), 80)})")
    version = m.get("format_version")
    if not _int(version) or version not in READ_FORMAT_VERSIONS:
        raise CheckpointError(f"{path}: format_version {_show(version, 40)} is not supported "
                              f"(this code reads {', '.join(map(str, READ_FORMAT_VERSIONS))})")
    if MANIFEST_DIGEST in m or version >= 2:
        if not isinstance(m.get(MANIFEST_DIGEST), str):
            raise CheckpointError(f"{path}: no {MANIFEST_DIGEST} (format_version {version} records one)")
        if raw != json_bytes(m) or m[MANIFEST_DIGEST] != manifest_digest(m):
            raise CheckpointError(f"{path}: its content differs from its {MANIFEST_DIGEST} (modified or corrupt)")
    files = m.get("files")
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise CheckpointError(f"{path}: 'files' is not a map of file -> sha256")
    for rel in files:
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            raise CheckpointError(f"{path}: file name {_show(rel, 80)} is not a plain path inside the checkpoint")
    if not isinstance(m.get("model_config"), dict):
        raise CheckpointError(f"{path}: 'model_config' is missing or not an object")
    return m


# ------------------------------------------------------------------ loading
def _check_layer(path: str, i: int, cfg: ModelConfig, meta: dict[str, Any], layer: dict[str, Any]) -> None:
    """Layer i's file holds exactly the tensors the config's layer i has, with their shapes."""
    if meta.get("layer") != i:
        raise CheckpointError(f"{path}: holds layer {_show(meta.get('layer'), 40)}, expected layer {i}")
    want = {layer_prefix(i) + k: s for k, s in layer_shapes(cfg, i).items()}
    missing = [n for n in want if n not in layer]
    if missing:
        raise CheckpointError(f"{path}: missing tensor '{missing[0]}'"
                              + (f" (and {missing[1:4]})" if len(missing) > 1 else "")
                              + f": layer {i} of the model ({cfg.model_type}) needs it")
    extra = sorted(n for n in layer if n not in want)
    if extra:
        raise CheckpointError(f"{path}: tensor(s) {extra[:4]} are not part of layer {i} of the model "
                              f"({cfg.model_type})")
    for n, s in want.items():
        v = layer[n]
        got = tuple(v.shape) if _is_array(v) else _leaf_dims(v)
        if got != tuple(s):
            raise CheckpointError(f"{path}: tensor '{n}' has shape {got}, expected {tuple(s)}")


def _read_globals(path: str, cfg: ModelConfig, dtype: Any) -> dict[str, Any]:
    """Embeddings, final norm and (untied) LM head, checked against the config."""
    import jax.numpy as jnp
    _, tensors = _read_safetensors(path)
    shapes = param_shapes(cfg)
    need = [n for n in GLOBAL_NAMES if n in shapes]           # lm_head only when untied
    for n in need:
        if n not in tensors:
            raise CheckpointError(f"{path}: missing tensor '{n}': the model ({cfg.model_type}"
                                  f"{', untied LM head' if n == 'lm_head.weight' else ''}) needs it")
    out = {}
    for n, a in sorted(tensors.items()):
        if n not in GLOBAL_NAMES:
            raise CheckpointError(f"{path}: tensor '{n}' is not one of the global tensors {list(GLOBAL_NAMES)}")
        if a.dtype.name not in _FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor '{n}' has dtype {a.dtype.name}, expected a float dtype")
        want = shapes.get(n, shapes["model.embed_tokens.weight"])   # a tied model's spare lm_head
        if tuple(a.shape) != tuple(want):
            raise CheckpointError(f"{path}: tensor '{n}' has shape {tuple(a.shape)}, expected {tuple(want)}")
        out[n] = jnp.asarray(a if dtype is None else a.astype(dtype))
    return out


class CompressedReader:
    """A compressed checkpoint opened for reading one layer at a time (see `open_compressed`).

    .cfg, .read_layer(i) -> layer i's params (relative to model.layers.{i}: arrays or quantized
    leaves), .read_globals() -> {embedding, final norm, (untied) LM head}: canonical name -> array."""

    def __init__(self, ckpt_dir: str, manifest: dict[str, Any], cfg: ModelConfig, dtype: Any, verify_files: bool):
        self.dir, self.manifest, self.cfg, self.dtype, self._verify = ckpt_dir, manifest, cfg, dtype, verify_files

    def _path(self, rel: str) -> str:
        p = os.path.join(self.dir, rel)
        if self._verify and rel not in self.manifest["files"]:
            raise CheckpointError(f"{p}: not listed in {CONFIG_FILE} (no recorded sha256 to check it against)")
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: missing (the model has {self.cfg.num_hidden_layers} layers)")
        return p

    def read_layer_flat(self, i: int) -> dict[str, Any]:
        """Layer i's tensors under their canonical names (model.layers.{i}....), checked."""
        path = self._path(layer_file(i))
        meta, layer = read_layer(path, self.dtype)
        _check_layer(path, i, self.cfg, meta, layer)
        return layer

    def read_layer(self, i: int) -> Params:
        pre = layer_prefix(i)
        return unflatten({n[len(pre):]: v for n, v in self.read_layer_flat(i).items()})

    def read_globals(self) -> dict[str, Any]:
        return _read_globals(self._path(GLOBALS_FILE), self.cfg, self.dtype)


def open_compressed(ckpt_dir: str | os.PathLike, source: Any = None, *, dtype: Any = np.float32,
                    verify_files: bool = True) -> CompressedReader:
    """Opens a compressed checkpoint, checking everything that can be checked before a tensor is
    read: the manifest, (when `source` is given) the source's fingerprint, and (verify_files) every
    file's sha256. Then `.read_layer(i)` reads one layer: memory grows with one layer, not the model.

    source: the original model (HF dir, .gguf, open reader or (cfg, params)); its tensors must match
    the recorded fingerprint (FingerprintMismatchError otherwise)."""
    ckpt_dir = os.fspath(ckpt_dir)
    m = read_config(ckpt_dir)
    cfg_path = os.path.join(ckpt_dir, CONFIG_FILE)
    if source is not None:
        from caldera_jax.checkpoints_io.fingerprint import verify
        if not isinstance(m.get("source_fingerprint"), dict):
            raise CheckpointError(f"{cfg_path}: no source_fingerprint to check the source against")
        verify(m["source_fingerprint"], source, what=f"the compressed checkpoint {ckpt_dir}")
    if verify_files:
        for rel, sha in m["files"].items():
            p = os.path.join(ckpt_dir, rel)
            if not os.path.isfile(p):
                raise CheckpointError(f"{p}: missing (listed in {CONFIG_FILE})")
            if file_sha256(p) != sha:
                raise CheckpointError(f"{p}: sha256 differs from the one in {CONFIG_FILE} (modified or corrupt)")
    try:
        cfg = ModelConfig.from_hf_dict(m["model_config"], source=cfg_path)
    except Exception as e:  # noqa: BLE001  (ConfigError, or int()/float() of a bad value)
        raise CheckpointError(f"{cfg_path}: model_config is not usable ({type(e).__name__}: {e})") from e
    return CompressedReader(ckpt_dir, m, cfg, dtype, verify_files)


def load_compressed(ckpt_dir: str | os.PathLike, source: Any = None, *, dtype: Any = np.float32,
                    verify_files: bool = True) -> tuple[ModelConfig, Params]:
    """(cfg, params) of a compressed checkpoint; compressed linears are quantized-weight leaves
    (QLRWeight) that `caldera_jax.linear.apply` runs, everything else jax arrays in `dtype`
    (protected matrices hold their bf16 values). Checks as `open_compressed` (source fingerprint,
    file digests) before anything is read.

    The checkpoint must be complete for its model config: every layer with every tensor the layer
    needs (shapes checked), the embeddings, the final norm and, untied, the LM head. Anything wrong
    is a CheckpointError naming the file and the tensor; no code named by a file is ever run."""
    reader = open_compressed(ckpt_dir, source, dtype=dtype, verify_files=verify_files)
    flat: dict[str, Any] = {}
    for i in range(reader.cfg.num_hidden_layers):
        flat.update(reader.read_layer_flat(i))
    flat.update(reader.read_globals())
    return reader.cfg, unflatten(flat)


def compressed_info(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """caldera_config.json of a complete checkpoint (config, fingerprint, metrics)."""
    return read_config(os.fspath(ckpt_dir))


def clear_dir(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
