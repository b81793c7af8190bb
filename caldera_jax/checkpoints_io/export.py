"""A CALDERA checkpoint -> a dequantized HF checkpoint that transformers (and lm-eval's hf model) load.

    export_hf("runs/mine", "runs/mine-hf", dtype="bfloat16", source="hf_dir")

Each quantized weight becomes its effective W = scale·T_outᵀ(Q + L·R)·T_in (QLRWeight.dequantize,
float32, then cast to `dtype`); protected and dense tensors are copied. One decoder layer is in
memory at a time. The checkpoint is verified first (every file's sha256 and, with `source`, that
it was built from that model: FingerprintMismatchError otherwise), and the output is written to a
temporary sibling directory renamed into place (nothing is left at `out` on failure). Tokenizer
files (chat template included) come from the checkpoint, else from `source` when it is a directory.
In bfloat16 the dequantized weights are rounded to bf16; our own forward runs the packed weights.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Any

import numpy as np

from caldera_jax.checkpoints_io.errors import CheckpointError
from caldera_jax.checkpoints_io.hf import TOKENIZER_FILES, np_dtype, save_hf_layers
from caldera_jax.params import Params

DTYPES = ("bfloat16", "float32")


def dense(params: Params) -> Params:
    """The parameter tree with every quantized leaf (anything with .dequantize()) replaced by its
    dense float32 matrix [(E,) out, in], as numpy; arrays as numpy."""
    if isinstance(params, dict):
        return {k: dense(v) for k, v in params.items()}
    if hasattr(params, "dequantize"):
        return np.asarray(params.dequantize(), np.float32)
    return np.asarray(params)


def _has_tokenizer(d: str | None) -> bool:
    return bool(d) and os.path.isdir(d) and any(
        fnmatch.fnmatch(f, p) for f in os.listdir(d) for p in TOKENIZER_FILES)


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def export_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
              source: Any = None, tokenizer_dir: str | os.PathLike | None = None,
              overwrite: bool = False) -> str:
    """Writes the dequantized HF checkpoint of compressed checkpoint `ckpt_dir` to `out_dir`;
    returns out_dir. overwrite: replace an existing out_dir (refused otherwise, as is an out_dir
    inside the checkpoint or the source model)."""
    from caldera_jax.checkpoints_io.compressed import open_compressed
    ckpt_dir, out_dir = os.fspath(ckpt_dir), os.path.abspath(os.fspath(out_dir))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for other, what in ((ckpt_dir, "the checkpoint"), (source if isinstance(source, (str, os.PathLike)) else None,
                                                       "the source model")):
        if other is not None and os.path.exists(other) and (_inside(out_dir, other) or _inside(other, out_dir)):
            raise CheckpointError(f"{out_dir}: the output must not be, contain or lie inside {what} ({other})")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    reader = open_compressed(ckpt_dir, source, dtype=np.float32)      # verified before anything is written
    src_dir = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    tok = next((d for d in (tokenizer_dir and os.fspath(tokenizer_dir), ckpt_dir, src_dir) if _has_tokenizer(d)), None)
    if tokenizer_dir is not None and tok != os.fspath(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files found (looked for {', '.join(TOKENIZER_FILES)})")
    return save_hf_layers(out_dir, reader.cfg, lambda i: dense(reader.read_layer(i)), dense(reader.read_globals()),
                          dtype=np_dtype(dtype), tokenizer_dir=tok)
