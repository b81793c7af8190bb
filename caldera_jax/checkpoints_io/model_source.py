"""Open whatever a user points at: a HF directory or a GGUF file -> (cfg, params, tokenizer)."""
from __future__ import annotations

import os

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
