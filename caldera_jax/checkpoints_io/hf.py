"""HF safetensors checkpoints in and out.

Reading: `open_hf(dir)` gives a lazy `HFCheckpoint`; `read(name)` assembles one canonical tensor
(caldera_jax.params naming, HF layout [out, in]) from whichever on-disk layout the checkpoint uses,
reading only the tensors it needs. `load_hf(dir)` reads everything as jax arrays.

Writing: `save_hf(out_dir, cfg, params)` writes what transformers 5 `from_pretrained` loads with no
missing or unexpected keys, atomically (a temporary sibling directory renamed into place);
`save_hf_layers(out_dir, cfg, read_layer, globals_)` the same from a model read one layer at a time.

On-disk names (the per-expert layouts live in the family modules, caldera_jax.families; the fused
transformers-5 layout in `_FUSED`):
  dense tensors : identical to the canonical names.
  MoE router    : model.layers.{i}.mlp.gate.weight [E, H]
                  or model.layers.{i}.block_sparse_moe.gate.weight (mixtral)
  MoE experts   : canonical model.layers.{i}.mlp.experts.{gate_proj,up_proj,down_proj}.weight
                  ([E, I, H], [E, I, H], [E, H, I]) is found on disk as
    (a) per expert  model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight  (qwen3_moe)
    (b) per expert  model.layers.{i}.block_sparse_moe.experts.{j}.{w1,w3,w2}.weight        (mixtral)
                    (each family's own layout is tried first; save_hf writes it)
    (c) fused       model.layers.{i}.mlp.experts.gate_up_proj [E, 2I, H] (rows :I gate, I: up)
                    model.layers.{i}.mlp.experts.down_proj    [E, H, I]  (transformers 5 in memory)
    (d) stacked     the canonical name itself.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
from typing import Any, Callable

import ml_dtypes  # noqa: F401  (registers "bfloat16" with numpy: safetensors' numpy reader needs it)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from caldera_jax import families
from caldera_jax.config import ModelConfig
from caldera_jax.params import Params, flatten, layer_prefix, layer_shapes, param_shapes, unflatten
from caldera_jax.checkpoints_io.atomic import fsync_path, replace_dir
from caldera_jax.checkpoints_io.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# ------------------------------------------------------------------ the name table
# Per-expert layouts: each MoE family's `moe.layout` (caldera_jax.families).
# Fused transformers-5 layout: projection -> (key, half of axis 1 to take: 0 gate, 1 up, None all).
_FUSED: dict[str, tuple[str, int | None]] = {
    "gate_proj": ("mlp.experts.gate_up_proj", 0),
    "up_proj": ("mlp.experts.gate_up_proj", 1),
    "down_proj": ("mlp.experts.down_proj", None),
}
_MOE_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.(?:gate\.weight|experts\.(gate_proj|up_proj|down_proj)\.weight)$")

# Tokenizer files copied by save_hf (glob patterns on file names).
TOKENIZER_FILES = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                    "*.tiktoken", "spiece.model", "sentencepiece.bpe.model")


def np_dtype(dtype: Any) -> np.dtype | None:
    """A numpy dtype from a numpy/jax dtype, a string ("bfloat16", "bf16", "float32") or torch dtype."""
    if dtype is None:
        return None
    if not isinstance(dtype, (str, np.dtype, type)):
        dtype = str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16"
    if isinstance(dtype, str):
        dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(dtype, dtype)
    return np.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one canonical tensor is assembled from on-disk tensors.

    keys: the disk tensors; with `stack`, one per expert, stacked along a new axis 0.
    half: take this half (0 or 1) of axis 1 of the single disk tensor (fused gate_up_proj).
    """
    keys: tuple[str, ...]
    stack: bool = False
    half: int | None = None

    def disk_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Expected shape of each disk tensor, given the canonical shape."""
        if self.stack:
            return tuple(shape[1:])
        if self.half is not None:
            return (shape[0], 2 * shape[1], *shape[2:])
        return tuple(shape)


def _layouts(cfg: ModelConfig) -> list[families.ExpertLayout]:
    """Every known per-expert layout, the model's own family's first."""
    spec = families.get(cfg.model_type).moe
    own = [spec.layout] if spec is not None else []
    return own + [lay for lay in families.expert_layouts() if lay not in own]


def _candidates(name: str, cfg: ModelConfig) -> list[_Recipe]:
    """Every way canonical `name` may be stored, in order of preference."""
    out = [_Recipe((name,))]
    m = _MOE_NAME.match(name)
    if not m:
        return out
    pre, proj = layer_prefix(int(m[1])), m[2]
    for lay in _layouts(cfg):
        if proj is None:
            if pre + lay.router != name:
                out.append(_Recipe((pre + lay.router,)))
        else:
            out.append(_Recipe(tuple(pre + lay.expert_key(proj, j) for j in range(cfg.num_experts)),
                               stack=True))
    if proj is not None:
        key, half = _FUSED[proj]
        out.append(_Recipe((pre + key,), half=half))
    return out


def _disk_names(name: str, cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """On-disk names save_hf writes for canonical `name`: [(disk name, expert index or None)]."""
    m = _MOE_NAME.match(name)
    if not m:
        return [(name, None)]
    lay = families.get(cfg.model_type).moe.layout   # what transformers 5 save_pretrained writes
    pre, proj = layer_prefix(int(m[1])), m[2]
    if proj is None:
        return [(pre + lay.router, None)]
    return [(pre + lay.expert_key(proj, j), j) for j in range(cfg.num_experts)]


# ------------------------------------------------------------------ reading
class HFCheckpoint:
    """A lazy reader of one HF checkpoint directory (config.json + safetensors).

    Opening reads only config.json, the index and the safetensors headers; tensors are read on demand.
    Use `open_hf(path)` to create one; `close()` (or a `with` block) releases the file handles.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.path.abspath(os.fspath(path))
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: checkpoint directory does not exist")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory (expected a HF checkpoint directory)")
        if not os.path.exists(os.path.join(path, CONFIG_FILE)):
            raise CheckpointError(f"{os.path.join(path, CONFIG_FILE)}: not found "
                                  f"({path} is not a HF checkpoint directory)")
        self.dir = path
        self.cfg = ModelConfig.from_json(os.path.join(path, CONFIG_FILE))
        self._shapes = param_shapes(self.cfg)
        self._where: dict[str, str] = {}   # disk tensor name -> file path
        single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
        if os.path.exists(single):
            self.source, files = single, [single]
        elif os.path.exists(index):
            self.source, weight_map = index, self._read_index(index)
            files = sorted({os.path.join(path, f) for f in weight_map.values()})
        else:
            other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".safetensors"))]
            hint = f" (found {', '.join(sorted(other))}; only {SINGLE_FILE} or a sharded " \
                   f"{INDEX_FILE} checkpoint is read)" if other else ""
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        for f in files:
            with self._handle(f) as h:
                keys = h.keys()
            for key in keys:
                if key in self._where:
                    raise CheckpointError(f"{f}: tensor '{key}' also stored in {self._where[key]}")
                self._where[key] = f
        if self.source == index:
            for key, f in weight_map.items():
                if self._where.get(key) != os.path.join(path, f):
                    raise CheckpointError(f"{index}: tensor '{key}' is mapped to {f}, which does not "
                                          f"contain it")

    def _read_index(self, index: str) -> dict[str, str]:
        """The index's weight_map {tensor: shard file name}; every shard must exist."""
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        for key, f in weight_map.items():
            if not os.path.exists(os.path.join(self.dir, f)):
                raise CheckpointError(f"{index}: shard file {os.path.join(self.dir, f)} "
                                      f"(holding tensor '{key}') does not exist")
        return weight_map

    def _handle(self, file: str):
        """A safetensors handle of `file`, opened for one read: closing it unmaps the file, so the
        pages a read touched do not stay in this process's resident memory (reading every layer
        of a 3 GB model would otherwise leave 3 GB of it mapped)."""
        try:
            return safe_open(file, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e

    # -------------------------------------------------------------- queries
    def close(self) -> None:
        """Nothing stays open between reads (kept for `with open_hf(...)`)."""

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def source_tensor_names(self) -> list[str]:
        """Every tensor name stored on disk, sorted."""
        return sorted(self._where)

    def _recipe(self, name: str) -> _Recipe | None:
        return next((r for r in _candidates(name, self.cfg)
                     if any(k in self._where for k in r.keys)), None)

    def names(self) -> list[str]:
        """Canonical names (of `param_shapes(cfg)`) present in this checkpoint, in HF order."""
        return [n for n in self._shapes if self._recipe(n) is not None]

    def read(self, name: str, dtype: Any = None) -> np.ndarray:
        """One canonical tensor as numpy (file dtype, or cast to `dtype`); checked against param_shapes."""
        rec = self._recipe(name)
        if rec is None:
            tried = [r.keys[0] for r in _candidates(name, self.cfg)][1:]
            hint = f" (nor {', '.join(repr(k) for k in tried)})" if tried else ""
            raise CheckpointError(f"{self.source}: missing tensor '{name}'{hint}")
        want = self._shapes.get(name)
        parts = []
        for key in rec.keys:
            if key not in self._where:
                raise CheckpointError(f"{self.source}: missing tensor '{key}' (needed for '{name}')")
            file = self._where[key]
            try:
                with self._handle(file) as h:
                    sl = h.get_slice(key)
                    got = tuple(sl.get_shape())
                    if want is not None and got != rec.disk_shape(want):
                        raise CheckpointError(f"{file}: tensor '{key}' has shape {got}, "
                                              f"expected {rec.disk_shape(want)}")
                    if rec.half is None:
                        parts.append(h.get_tensor(key))
                    else:
                        n = got[1] // 2
                        parts.append(np.array(sl[:, rec.half * n:(rec.half + 1) * n]))
            except (SafetensorError, OSError, TypeError) as e:
                raise CheckpointError(f"{file}: cannot read tensor '{key}' ({e})") from e
        arr = np.stack(parts) if rec.stack else parts[0]
        dt = np_dtype(dtype)
        return arr.astype(dt) if dt is not None and arr.dtype != dt else arr

    def read_layer(self, i: int, dtype: Any = None) -> Params:
        """Decoder layer i's params, nested, relative to "model.layers.{i}." (as params.layer_shapes)."""
        if not 0 <= i < self.cfg.num_hidden_layers:
            raise IndexError(f"{self.dir}: layer {i} out of range [0, {self.cfg.num_hidden_layers})")
        pre = layer_prefix(i)
        return unflatten({k: self.read(pre + k, dtype) for k in layer_shapes(self.cfg, i)})

    def read_all(self, dtype: Any = None) -> Params:
        """Every canonical tensor of `param_shapes(cfg)`, nested. Extra disk tensors are ignored."""
        return unflatten({n: self.read(n, dtype) for n in self._shapes})

    def tensor_sha256(self, name: str) -> str:
        """sha256 hex digest of canonical tensor `name`'s bytes (C order, file dtype)."""
        return hashlib.sha256(np.ascontiguousarray(self.read(name)).tobytes()).hexdigest()


def open_hf(path: str | os.PathLike) -> HFCheckpoint:
    """Opens a HF checkpoint directory lazily (see HFCheckpoint)."""
    return HFCheckpoint(path)


def load_hf(path: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, Params]:
    """(config, params) with jax array leaves; `dtype` None keeps the file's dtype."""
    import jax
    import jax.numpy as jnp
    with open_hf(path) as ck:
        params = ck.read_all(dtype)
        return ck.cfg, jax.tree.map(jnp.asarray, params)


# ------------------------------------------------------------------ writing
@dataclasses.dataclass
class _DiskTensor:
    name: str                       # on-disk name
    shape: tuple[int, ...]
    dtype: np.dtype
    # materialises the array (numpy, final dtype) in C order: safetensors.numpy.save_file writes
    # the wrong bytes for a non-contiguous view, silently (safetensors 0.8)
    get: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _as_leaf(name: str, leaf: Any, out_dir: str) -> Any:
    """Checks that a params leaf is an array (not a quantized weight)."""
    if hasattr(leaf, "apply") and not hasattr(leaf, "__array__"):
        raise CheckpointError(f"{out_dir}: tensor '{name}' is a quantized weight "
                              f"({type(leaf).__name__}); quantized weights need the "
                              f"compressed-checkpoint writer, save_hf writes dense arrays only")
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        raise CheckpointError(f"{out_dir}: tensor '{name}' is not an array ({type(leaf).__name__})")
    return leaf


def _plan(cfg: ModelConfig, params: Params, dtype: np.dtype | None, out_dir: str,
          want: dict[str, tuple[int, ...]] | None = None) -> list[_DiskTensor]:
    """Validates params against `want` (default param_shapes(cfg): the whole model; or a part of
    it, with canonical names) and lists the disk tensors to write, in HF order."""
    flat = flatten(params)
    if cfg.tie_word_embeddings:
        flat.pop("lm_head.weight", None)
    want = param_shapes(cfg) if want is None else want
    out: list[_DiskTensor] = []
    cache: dict[str, np.ndarray] = {}   # the last materialised stacked leaf (experts are consecutive)

    def getter(name: str, leaf: Any, j: int | None, dt: np.dtype) -> Callable[[], np.ndarray]:
        def get() -> np.ndarray:
            if name not in cache:
                cache.clear()
                cache[name] = np.asarray(leaf)
            a = cache[name] if j is None else cache[name][j]
            return np.ascontiguousarray(a.astype(dt, copy=False))
        return get

    for name, shape in want.items():
        if name not in flat:
            raise CheckpointError(f"{out_dir}: params has no tensor '{name}' (expected shape {shape})")
        leaf = _as_leaf(name, flat.pop(name), out_dir)
        if tuple(leaf.shape) != shape:
            raise CheckpointError(f"{out_dir}: tensor '{name}' has shape {tuple(leaf.shape)}, "
                                  f"expected {shape}")
        dt = dtype if dtype is not None else np.dtype(leaf.dtype)
        for disk, j in _disk_names(name, cfg):
            out.append(_DiskTensor(disk, shape if j is None else shape[1:], dt, getter(name, leaf, j, dt)))
    if flat:
        raise CheckpointError(f"{out_dir}: params has tensors that are not part of a {cfg.model_type} "
                              f"model: {', '.join(sorted(flat)[:5])}{' ...' if len(flat) > 5 else ''}")
    return out


def _shards(tensors: list[_DiskTensor], max_shard_bytes: int) -> list[list[_DiskTensor]]:
    """Greedy packing in order; a tensor larger than max_shard_bytes gets a shard of its own."""
    shards: list[list[_DiskTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_weights(tmp: str, tensors: list[_DiskTensor], max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    shards = _shards(tensors, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        fname = SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file({t.name: t.get() for t in shard}, os.path.join(tmp, fname), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, fname), 0o644)   # safetensors creates files 0600
        fsync_path(os.path.join(tmp, fname))
        weight_map.update({t.name: fname for t in shard})
    if n > 1:
        _write_json(os.path.join(tmp, INDEX_FILE), {
            "metadata": {"total_size": sum(t.nbytes for t in tensors),
                         "total_parameters": sum(math.prod(t.shape) for t in tensors)},
            "weight_map": dict(sorted(weight_map.items()))})


def _copy_tokenizer(tokenizer_dir: str, tmp: str) -> None:
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir}: tokenizer directory does not exist")
    names = [f for f in sorted(os.listdir(tokenizer_dir))
             if os.path.isfile(os.path.join(tokenizer_dir, f))
             and any(fnmatch.fnmatch(f, p) for p in TOKENIZER_FILES)]
    if not names:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files found "
                              f"(looked for {', '.join(TOKENIZER_FILES)})")
    for f in names:
        shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
        fsync_path(os.path.join(tmp, f))


def _hf_config(cfg: ModelConfig, saved_dtype: str) -> dict[str, Any]:
    d = cfg.to_hf_dict()
    d.pop("torch_dtype", None)
    d["dtype"] = saved_dtype
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    d.setdefault("architectures", [families.get(cfg.model_type).architecture])
    return d


def _generation_config(cfg: ModelConfig) -> dict[str, Any]:
    d = {"bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
         "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id}
    return {k: v for k, v in d.items() if v is not None}


def save_hf(out_dir: str | os.PathLike, cfg: ModelConfig, params: Params, *,
            tokenizer_dir: str | os.PathLike | None = None, max_shard_bytes: int = 2 * 1024**3,
            dtype: Any = None, generation_config: dict[str, Any] | None = None) -> str:
    """Writes a HF checkpoint that transformers 5 `from_pretrained` loads; returns out_dir.

    params: canonical nested dict (jax or numpy leaves) matching param_shapes(cfg); a tied model's
    lm_head is not written. dtype: cast every tensor (default: keep each leaf's dtype). Files:
    safetensors weights (sharded at max_shard_bytes), config.json, generation_config.json and the
    tokenizer files of tokenizer_dir. Atomic: written into "<out_dir>.tmp-<pid>" and renamed into
    place; on failure an existing out_dir is left untouched and the temporary directory removed.
    """
    out_dir = os.path.abspath(os.fspath(out_dir)).rstrip(os.sep)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    tensors = _plan(cfg, params, np_dtype(dtype), out_dir)
    by_size: dict[str, int] = {}
    for t in tensors:
        by_size[t.dtype.name] = by_size.get(t.dtype.name, 0) + t.nbytes
    saved_dtype = max(by_size, key=by_size.get)   # the dtype holding most bytes
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    try:
        os.makedirs(tmp)
        _write_weights(tmp, tensors, max_shard_bytes)
        _write_json(os.path.join(tmp, CONFIG_FILE), _hf_config(cfg, saved_dtype))
        _write_json(os.path.join(tmp, GENERATION_CONFIG_FILE),
                    generation_config if generation_config is not None else _generation_config(cfg))
        if tokenizer_dir is not None:
            _copy_tokenizer(os.fspath(tokenizer_dir), tmp)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return out_dir


def save_hf_layers(out_dir: str | os.PathLike, cfg: ModelConfig, read_layer: Callable[[int], Params],
                   globals_: dict[str, Any], *, dtype: Any = np.float32, tokenizer_dir: str | os.PathLike | None = None,
                   generation_config: dict[str, Any] | None = None) -> str:
    """save_hf for a model read one decoder layer at a time: memory holds one layer (plus the
    globals). read_layer(i) -> layer i's params relative to model.layers.{i} (dense arrays);
    globals_: {canonical name: array} of the embedding, final norm and (untied) LM head. Writes one
    safetensors shard per layer plus one for the globals, with model.safetensors.index.json, in
    `dtype`; same files otherwise, same atomicity (a temporary sibling renamed into place)."""
    out_dir = os.path.abspath(os.fspath(out_dir)).rstrip(os.sep)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    dt = np_dtype(dtype)
    shapes = param_shapes(cfg)
    glob_want = {n: s for n, s in shapes.items() if not n.startswith("model.layers.")}
    glob_plan = _plan(cfg, unflatten(dict(globals_)), dt, out_dir, glob_want)
    L = cfg.num_hidden_layers
    n = L + 1
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    try:
        os.makedirs(tmp)
        weight_map: dict[str, str] = {}
        total = [0, 0]

        def write(k: int, plan: list[_DiskTensor]) -> None:
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            save_file({t.name: t.get() for t in plan}, os.path.join(tmp, fname), metadata={"format": "pt"})
            os.chmod(os.path.join(tmp, fname), 0o644)   # safetensors creates files 0600
            fsync_path(os.path.join(tmp, fname))
            weight_map.update({t.name: fname for t in plan})
            total[0] += sum(t.nbytes for t in plan)
            total[1] += sum(math.prod(t.shape) for t in plan)

        for i in range(L):
            pre = layer_prefix(i)
            want = {pre + k: s for k, s in layer_shapes(cfg, i).items()}
            write(i + 1, _plan(cfg, {"model": {"layers": {str(i): read_layer(i)}}}, dt, out_dir, want))
        write(n, glob_plan)
        _write_json(os.path.join(tmp, INDEX_FILE), {
            "metadata": {"total_size": total[0], "total_parameters": total[1]},
            "weight_map": dict(sorted(weight_map.items()))})
        _write_json(os.path.join(tmp, CONFIG_FILE), _hf_config(cfg, dt.name))
        _write_json(os.path.join(tmp, GENERATION_CONFIG_FILE),
                    generation_config if generation_config is not None else _generation_config(cfg))
        if tokenizer_dir is not None:
            _copy_tokenizer(os.fspath(tokenizer_dir), tmp)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return out_dir
