"""Open whatever a user points at.

    cfg, params, tokenizer = load_model("hf_dir" | "model.gguf")          # the whole model in memory
    m = open_layers("hf_dir" | "model.gguf" | "compressed_dir")          # one layer at a time
    m.cfg, m.read_layer(i), m.read_globals(), m.tokenizer
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

import jax.numpy as jnp

from caldera_jax.checkpoints_io.errors import CheckpointError


def load_model(path: str | os.PathLike, dtype=jnp.float32):
    """Returns (ModelConfig, params of jnp arrays in `dtype`, transformers tokenizer or None)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if path.endswith(".gguf"):
        from caldera_jax.checkpoints_io.gguf import load_gguf
        cfg, params = load_gguf(path)
        import jax
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        tok_src = (os.path.dirname(path) or ".", {"gguf_file": os.path.basename(path)})
    else:
        from caldera_jax.checkpoints_io.hf import load_hf
        cfg, params = load_hf(path, dtype=dtype)
        tok_src = (path, {})
    return cfg, params, load_tokenizer(*tok_src)


def load_tokenizer(directory: str, kwargs: dict | None = None):
    """The checkpoint's tokenizer (with its chat template), or None when it ships none."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **(kwargs or {}))
    except (OSError, ValueError):
        return None


@dataclasses.dataclass(frozen=True)
class LayerReader:
    """A model read one decoder layer at a time. read_layer(i): layer i's params relative to
    model.layers.{i} (float32 arrays, or quantized leaves of a compressed checkpoint);
    read_globals(): {canonical name: array} of the embedding, final norm and (untied) LM head."""
    cfg: Any
    read_layer: Callable[[int], Any]
    read_globals: Callable[[], dict[str, Any]]
    tokenizer: Any
    kind: str                       # "source" (HF directory or GGUF) or "compressed"


def open_layers(path: Any, source: Any = None) -> LayerReader:
    """A HF directory, a .gguf file, an open source reader (`fingerprint.open_source`), or a
    compressed checkpoint (checked as `open_compressed`: manifest, file digests and, when `source`
    is given, the source's fingerprint)."""
    from caldera_jax.checkpoints_io import compressed as ck
    from caldera_jax.checkpoints_io.fingerprint import open_source
    path = path if hasattr(path, "read_layer") else os.fspath(path)
    if isinstance(path, str) and os.path.isdir(path) and os.path.isfile(os.path.join(path, ck.CONFIG_FILE)):
        r = ck.open_compressed(path, source)
        return LayerReader(r.cfg, r.read_layer, r.read_globals, load_tokenizer(path), "compressed")
    src = open_source(path)
    names = [n for n in ck.GLOBAL_NAMES if n in src.names()]
    return LayerReader(src.cfg, lambda i: src.read_layer(i, np.float32), lambda: {n: src.read(n) for n in names},
                       load_tokenizer(src.tokenizer_dir, src.tokenizer_kwargs), "source")
