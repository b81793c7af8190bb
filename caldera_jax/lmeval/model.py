"""Open a model for evaluation: an original model (HF directory or .gguf) or a CALDERA checkpoint,
with its tokenizer and an identity that names exactly these weights (for result caches).

    m = open_model("runs/mine", source="hf_dir")   # a compressed checkpoint, checked against its source
    m.cfg, m.params, m.tokenizer, m.identity
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax.numpy as jnp

from caldera_jax.checkpoints_io.errors import CheckpointError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EvalModel:
    cfg: Any                       # ModelConfig
    params: Any                    # parameter pytree (arrays, or QLRWeight leaves for a compressed checkpoint)
    tokenizer: Any                 # transformers tokenizer
    identity: dict[str, Any]       # kind, path, digest of the weights, dtype

    @property
    def key(self) -> str:
        """12 hex digits naming these weights in this dtype (see model_key)."""
        return model_key(self.identity)


def _files_digest(paths: list[str]) -> str:
    """sha256 over (name, size, mtime) of files: cheap, and changes when a file is rewritten."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = os.stat(p)
        h.update(f"{os.path.basename(p)} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def identity(path: str | os.PathLike, dtype: str = "float32") -> dict[str, Any]:
    """What names a model's weights without reading them: kind (compressed | hf | gguf), absolute
    path, a digest (a checkpoint's manifest digest; else the size and mtime of the weight files)
    and the dtype it runs in."""
    from caldera_jax.checkpoints_io import compressed as ck
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, ck.CONFIG_FILE)):
        m = ck.read_config(path)
        digest = m.get(ck.MANIFEST_DIGEST) or ck.file_sha256(os.path.join(path, ck.CONFIG_FILE))
        kind = "compressed"
    elif os.path.isdir(path):
        digest = _files_digest([os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".json"))])
        kind = "hf"
    else:
        digest, kind = _files_digest([path]), "gguf"
    return {"kind": kind, "path": path, "digest": digest, "dtype": dtype}


def model_key(ident: dict[str, Any]) -> str:
    """12 hex digits naming a model identity (changes when a weight file changes)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def open_model(path: str | os.PathLike, source: str | os.PathLike | None = None, dtype: str = "float32") -> EvalModel:
    """path: HF directory, .gguf file, or compressed checkpoint directory (verified: file digests
    and, with `source`, that it was built from that model). dtype: float32 or bfloat16 (the dense
    parameters; quantized leaves keep their packed form)."""
    from caldera_jax.checkpoints_io import compressed as ck
    from caldera_jax.checkpoints_io.model_source import load_model, load_tokenizer
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ident = identity(path, dtype)
    path = ident["path"]
    if ident["kind"] == "compressed":
        cfg, params = ck.load_compressed(path, source, dtype=DTYPES[dtype])
        tok = load_tokenizer(path) or (load_tokenizer(os.fspath(source)) if source and os.path.isdir(source) else None)
    else:
        cfg, params, tok = load_model(path, dtype=DTYPES[dtype])
    if tok is None:
        raise CheckpointError(f"{path}: no tokenizer files found next to the weights (evaluation needs one)")
    return EvalModel(cfg, params, tok, ident)
