"""Fingerprints of source models: which exact tensors an artifact was built from.

    fp = fingerprint("path/to/hf_dir")          # or a .gguf file, an open_source() reader, a params dict
    fp["digest"]                                 # one sha256 over every tensor entry
    verify(fp, "path/to/hf_dir")                 # FingerprintMismatchError naming the differing tensors

A fingerprint is {"format": 1, "model_type", "tensors": {canonical name: {"sha256", "dtype",
"shape"}}, "digest"}. Each tensor's sha256 is over its bytes in C order, in the dtype the source
stores (a bf16 and a float32 copy of the same model differ, as they should). The combined digest
hashes the sorted "name dtype shape sha256" lines. The research notes lost days to artifacts built
from a different model (weight correlation -0.013 instead of 0.96): every compressed checkpoint
records its source's fingerprint and loading against another source is refused.

`open_source(path)` is the one streaming reader of a model source used by the compression job:
a HF directory is read lazily (one tensor or one layer at a time); a GGUF file is dequantized once
into memory (the GGUF models here are small).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable

import numpy as np

from caldera_jax.config import ModelConfig
from caldera_jax.params import MemorySource, Params, flatten, layer_prefix, layer_shapes, param_shapes, unflatten  # noqa: F401
from caldera_jax.checkpoints_io.errors import CheckpointError

FORMAT = 1


class FingerprintMismatchError(CheckpointError):
    """The model source differs from the one an artifact was built from."""


# ------------------------------------------------------------------ sources
def open_source(path_or_source: Any):
    """A streaming reader (.cfg, .names(), .read(name), .read_layer(i), .path, .tokenizer_dir) for a
    HF directory, a .gguf file, or an already open reader (returned as is)."""
    if hasattr(path_or_source, "read") and hasattr(path_or_source, "cfg"):
        return path_or_source
    path = os.fspath(path_or_source)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if path.endswith(".gguf"):
        from caldera_jax.checkpoints_io.gguf import load_gguf
        cfg, params = load_gguf(path)
        return MemorySource(cfg, params, path=os.path.abspath(path),
                            tokenizer_dir=os.path.dirname(os.path.abspath(path)),
                            tokenizer_kwargs={"gguf_file": os.path.basename(path)})
    from caldera_jax.checkpoints_io.hf import open_hf
    ck = open_hf(path)
    ck.path, ck.tokenizer_dir, ck.tokenizer_kwargs = ck.dir, ck.dir, {}
    return ck


# ------------------------------------------------------------------ fingerprints
def tensor_entry(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"sha256": hashlib.sha256(a.tobytes()).hexdigest(), "dtype": a.dtype.name,
            "shape": list(a.shape)}


def combined_digest(tensors: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name} {t['dtype']} {'x'.join(map(str, t['shape']))} {t['sha256']}\n".encode())
    return h.hexdigest()


def _entries(src, names: Iterable[str]):
    for n in names:
        yield n, tensor_entry(src.read(n))


def fingerprint(source: Any) -> dict[str, Any]:
    """The fingerprint of a model source (HF dir, .gguf, open reader, or (cfg, params) tuple)."""
    src = MemorySource(*source) if isinstance(source, tuple) else open_source(source)
    tensors = dict(_entries(src, src.names()))
    return {"format": FORMAT, "model_type": src.cfg.model_type, "tensors": tensors,
            "digest": combined_digest(tensors)}


def verify(fp: dict[str, Any], source: Any, *, what: str = "this artifact", max_report: int = 5) -> None:
    """Raises FingerprintMismatchError unless `source`'s tensors are exactly those of `fp`.

    Names, dtypes and shapes are compared first (no tensor read); then tensors are hashed in model
    order, stopping once `max_report` mismatches are found. The message names them."""
    src = MemorySource(*source) if isinstance(source, tuple) else open_source(source)
    where = getattr(src, "path", "<source>")
    want = fp.get("tensors") or {}
    if fp.get("format") != FORMAT or not want:
        raise FingerprintMismatchError(f"{what}: the recorded fingerprint is missing or of an unknown format")
    have_names = src.names()
    missing = [n for n in want if n not in set(have_names)]
    extra = [n for n in have_names if n not in want]
    head = (f"{where} is not the model {what} was built from (recorded digest "
            f"{fp.get('digest', '?')[:16]}…)")
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the source, first: {', '.join(missing[:max_report])}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) not in the recorded model, first: {', '.join(extra[:max_report])}")
        raise FingerprintMismatchError(f"{head}: {'; '.join(parts)}")
    bad = []
    for n in have_names:
        a = src.read(n)
        w = want[n]
        if a.dtype.name != w["dtype"] or list(a.shape) != list(w["shape"]):
            bad.append(f"{n} ({a.dtype.name}{list(a.shape)} != recorded {w['dtype']}{list(w['shape'])})")
        else:
            got = tensor_entry(a)["sha256"]
            if got != w["sha256"]:
                bad.append(f"{n} (sha256 {got[:12]}… != recorded {w['sha256'][:12]}…)")
        if len(bad) >= max_report:
            break
    if bad:
        more = " (stopped checking)" if len(bad) >= max_report else ""
        raise FingerprintMismatchError(f"{head}: tensors differ, first {len(bad)}{more}: " + "; ".join(bad))
