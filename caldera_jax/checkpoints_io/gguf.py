"""GGUF (llama.cpp) checkpoints in: dequantize to numpy, rename to HF canonical names, write HF dirs.

    cfg, params = load_gguf("model.gguf")                  # params: nested dict of numpy arrays
    gguf_to_hf("model.gguf", "out/", dtype="bfloat16")     # safetensors + config + tokenizer + chat template

Supported `general.architecture`s: llama, qwen2, qwen3 (dense). Every tensor type gguf-py can
dequantize is accepted (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ*).

Conventions undone here:
- GGUF lists a tensor's dims fastest-first (ggml `ne` order); gguf-py's reader already gives numpy
  arrays in row-major order, so a linear weight comes out as HF's [out, in] (checked against the
  metadata-derived shapes of `caldera_jax.params.param_shapes`).
- llama.cpp's converter permutes the rows of llama's q/k projections (interleaved rotary pairs);
  the family's `gguf_tensor_to_hf` (caldera_jax.families.llama.unpermute_qk) restores HF's half-split
  layout (transformers' LlamaTensorProcessor does the same). qwen2/qwen3 are stored unpermuted.
- Which architectures, tensor names and extra config.json entries: the family modules
  (caldera_jax.families: `gguf_arch`, `gguf_global_names`, `gguf_layer_names`, `gguf_hf_config`).

Note: a GGUF model is normally already quantized (4-6 bits); its dequantized weights are the
"original" for everything downstream, and results at >= 4 bits must say so.
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from caldera_jax import families
from caldera_jax.config import ConfigError, ModelConfig
from caldera_jax.families.llama import permute_qk as _permute_qk, unpermute_qk as _unpermute_qk  # noqa: F401
from caldera_jax.params import param_shapes, unflatten
from caldera_jax.checkpoints_io.errors import CheckpointError

__all__ = ["load_gguf", "gguf_to_hf", "read_gguf_metadata", "gguf_hf_config", "gguf_name_to_hf",
           "SUPPORTED_ARCHITECTURES"]

# GGUF architecture -> HF model_type
SUPPORTED_ARCHITECTURES = families.gguf_architectures()

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@functools.lru_cache(maxsize=None)
def _name_tables(model_type: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(global, layer) llama.cpp -> HF name tables of one family, or of every GGUF family (None)."""
    fams = ([families.get(model_type)] if model_type is not None
            else [families.get(mt) for mt in SUPPORTED_ARCHITECTURES.values()])
    glob: dict[str, str] = {}
    layer: dict[str, str] = {}
    for f in fams:
        glob.update(f.gguf_global_names)
        layer.update(f.gguf_layer_names)
    return glob, layer


def gguf_name_to_hf(name: str, model_type: str | None = None) -> str | None:
    """llama.cpp tensor name -> HF canonical name (None when the name is not one we know), for
    `model_type`'s family (default: any GGUF family)."""
    glob, layer = _name_tables(model_type)
    if name in glob:
        return glob[name]
    m = _BLK.match(name)
    if m and m.group(2) in layer:
        return f"model.layers.{m.group(1)}.{layer[m.group(2)]}"
    return None


def hf_name_to_gguf(name: str, model_type: str | None = None) -> str:
    glob, layer = _name_tables(model_type)
    glob, layer = {v: k for k, v in glob.items()}, {v: k for k, v in layer.items()}
    if name in glob:
        return glob[name]
    m = _HF_LAYER.match(name)
    if m and m.group(2) in layer:
        return f"blk.{m.group(1)}.{layer[m.group(2)]}"
    return "?"


# ---------------------------------------------------------------------------------------- reading
class _BadGGUF(Exception):
    pass


def _checked_reader_class():
    import gguf

    class _CheckedReader(gguf.GGUFReader):
        """GGUFReader that names the tensor when the file is too short to hold it."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _nl, name_data, _nd, dims, raw_dtype, off = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qt = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise _BadGGUF(f"tensor '{name}' has unknown ggml type {int(raw_dtype[0])}") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qt]
                n = int(np.prod(dims)) * type_size // block
                start = int(start_offs + off[0])
                if start + n > size:
                    raise _BadGGUF(f"truncated GGUF file: tensor '{name}' needs bytes [{start}, "
                                   f"{start + n}) but the file has {size}")
            super()._build_tensors(start_offs, fields)

    return _CheckedReader


def _open(path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a .gguf file")
    size = os.path.getsize(path)
    try:
        reader = _checked_reader_class()(path)
    except _BadGGUF as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # gguf-py raises ValueError / IndexError / struct errors on bad input
        raise CheckpointError(f"{path}: not a readable GGUF file ({size} bytes; truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    for t in reader.tensors:
        start = int(t.data_offset)  # absolute file offset
        if start + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path}: truncated GGUF file: tensor '{t.name}' needs bytes "
                                  f"[{start}, {start + int(t.n_bytes)}) but the file has {size}")
    return reader


def _field_value(field) -> Any:
    import gguf

    v = field.contents()
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every key/value of the GGUF header as Python values (token lists included)."""
    reader = _open(path)
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def gguf_hf_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                   source: str = "model.gguf") -> dict[str, Any]:
    """HF config.json dict from GGUF metadata and the (numpy-order) shapes of the file's tensors."""
    arch = meta.get("general.architecture")
    try:
        fam = families.by_gguf_arch(arch)
    except families.UnknownFamilyError as e:
        raise CheckpointError(f"{source}: {e}") from None

    def need(key: str) -> Any:
        full = f"{arch}.{key}"
        if meta.get(full) is None:
            raise CheckpointError(f"{source}: required GGUF metadata '{full}' is missing")
        return meta[full]

    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{source}: tensor 'token_embd.weight' (model.embed_tokens.weight) "
                              "is missing")
    if "rope_freqs.weight" in tensor_shapes:
        raise CheckpointError(f"{source}: tensor 'rope_freqs.weight' (llama3-style RoPE frequency "
                              "factors) is not supported")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv = meta.get(f"{arch}.attention.head_count_kv")
    kv_heads = int(kv if kv is not None else heads)
    vocab = int(tensor_shapes["token_embd.weight"][0])
    tokens = meta.get("tokenizer.ggml.tokens")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden // heads
    if f"{arch}.attention.value_length" in meta and int(meta[f"{arch}.attention.value_length"]) != head_dim:
        raise CheckpointError(f"{source}: attention.key_length != attention.value_length is not supported")
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise CheckpointError(f"{source}: partial rotary embeddings (rope.dimension_count={rope_dims} "
                              f"< head_dim={head_dim}) are not supported")

    rope: dict[str, Any] = {"rope_type": "default",
                            "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0))}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling not in ("linear", "yarn"):
            raise CheckpointError(f"{source}: unsupported rope scaling type '{scaling}'")
        rope["rope_type"] = scaling
        rope["factor"] = float(meta[f"{arch}.rope.scaling.factor"])
        orig = meta.get(f"{arch}.rope.scaling.original_context_length")
        if scaling == "yarn" or orig is not None:
            rope["original_max_position_embeddings"] = int(orig)

    d: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": rope,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length") or 2048),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if fam.gguf_hf_config is not None:
        d.update(fam.gguf_hf_config(d, tensor_shapes))
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                         ("pad_token_id", "padding_token_id")):
        v = meta.get(f"tokenizer.ggml.{theirs}")
        d[ours] = int(v) if v is not None else None
    if tokens is not None and len(tokens) > vocab:
        raise CheckpointError(f"{source}: tokenizer has {len(tokens)} tokens but token_embd.weight "
                              f"has only {vocab} rows")
    return d


def _resolve_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype.lower() in ("bfloat16", "bf16"):
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if isinstance(dtype, str) and dtype.lower() in ("fp32", "f32"):
        return np.dtype(np.float32)
    if isinstance(dtype, str) and dtype.lower() in ("fp16", "f16"):
        return np.dtype(np.float16)
    return np.dtype(dtype)


def load_gguf(path: str | os.PathLike, dtype: Any = np.float32, *, progress: bool = False,
              ) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads a GGUF file: (ModelConfig, nested dict of numpy arrays with HF names, HF [out,in] layout).

    Every tensor is dequantized with gguf-py (float32) and then cast to `dtype` one at a time.
    Raises CheckpointError (naming the file and the tensor) on unreadable files, unknown
    architectures, unexpected / missing tensors and shape mismatches.
    """
    from gguf.quants import dequantize

    path = os.fspath(path)
    reader = _open(path)
    # every key but the big tokenizer arrays (only the token count is needed here)
    meta = {k: _field_value(f) for k, f in reader.fields.items()
            if not k.startswith("GGUF.") and (not k.startswith("tokenizer.ggml.") or k.endswith("_token_id"))}
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    tensors = {t.name: t for t in reader.tensors}
    # numpy-order shapes (ggml ne reversed)
    shapes = {n: tuple(int(s) for s in reversed(t.shape.tolist())) for n, t in tensors.items()}
    if n_tokens is not None:
        meta["tokenizer.ggml.tokens"] = range(n_tokens)  # only len() is used
    hf = gguf_hf_config(meta, shapes, source=path)
    try:
        cfg = ModelConfig.from_hf_dict(hf, source=path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    expected = param_shapes(cfg)
    out_dtype = _resolve_dtype(dtype)

    fam = families.get(cfg.model_type)
    names: dict[str, str] = {}  # hf -> gguf
    for gname in tensors:
        hname = gguf_name_to_hf(gname, cfg.model_type)
        if hname is None or hname not in expected:
            raise CheckpointError(f"{path}: unexpected tensor '{gname}' for a {cfg.model_type} model "
                                  f"with {cfg.num_hidden_layers} layers")
        names[hname] = gname
    for hname in expected:
        if hname not in names:
            raise CheckpointError(f"{path}: tensor '{hf_name_to_gguf(hname, cfg.model_type)}' ({hname}) "
                                  f"is missing")

    it = list(expected)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"dequantizing {os.path.basename(path)}", unit="tensor")
    flat: dict[str, np.ndarray] = {}
    for hname in it:
        t = tensors[names[hname]]
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor '{t.name}' of type "
                                  f"{t.tensor_type.name} ({type(e).__name__}: {e})") from e
        w = np.asarray(w, dtype=np.float32).reshape(shapes[t.name])
        if tuple(w.shape) != tuple(expected[hname]):
            raise CheckpointError(f"{path}: tensor '{t.name}' ({hname}) has shape {tuple(w.shape)}, "
                                  f"expected {tuple(expected[hname])} from the metadata")
        if fam.gguf_tensor_to_hf is not None:
            w = fam.gguf_tensor_to_hf(hname, w, cfg.num_attention_heads, cfg.num_key_value_heads)
        flat[hname] = np.ascontiguousarray(w.astype(out_dtype, copy=False))
    return cfg, unflatten(flat)


# ---------------------------------------------------------------------------------------- to HF
def save_gguf_tokenizer(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Builds the HF tokenizer from the GGUF metadata (transformers' converter) and saves it.

    The chat template (`tokenizer.chat_template`) is kept. Returns a small summary dict.
    """
    import transformers
    from transformers import AutoTokenizer

    path = Path(path)
    meta_tmpl = None
    reader = _open(path)
    if "tokenizer.chat_template" in reader.fields:
        meta_tmpl = _field_value(reader.fields["tokenizer.chat_template"])
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise CheckpointError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
    del reader
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"{path}: transformers cannot build a tokenizer from this GGUF "
                              f"({type(e).__name__}: {e})") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if meta_tmpl and not tok.chat_template:
        tok.chat_template = meta_tmpl
    tok.save_pretrained(os.fspath(out_dir))
    return {"tokenizer_class": type(tok).__name__, "vocab": len(tok),
            "chat_template": bool(tok.chat_template)}


def gguf_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16", *,
               progress: bool = True, max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Converts a GGUF file into a complete HF directory (atomic, via caldera_jax.checkpoints_io.hf.save_hf).

    Writes model*.safetensors (+ index), config.json, generation_config.json and the tokenizer
    (tokenizer.json, tokenizer_config.json, chat template). Returns a summary dict
    (config, tensor types found in the GGUF, parameter count, tokenizer info).
    """
    from caldera_jax.checkpoints_io.hf import save_hf

    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be 'bfloat16', 'float32' or 'float16', got {dtype!r}")
    path = Path(path)
    cfg, params = load_gguf(path, dtype=dtype, progress=progress)
    hf = json.loads(cfg.raw_json)
    hf["dtype"] = dtype
    cfg = ModelConfig.from_hf_dict(hf, source=str(path))
    gen = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}
    reader = _open(path)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    general = {k: _field_value(f) for k, f in reader.fields.items() if k.startswith("general.")}
    del reader
    n_params = sum(int(np.prod(v.shape)) for v in _leaves(params))
    with tempfile.TemporaryDirectory(prefix="gguf_tok_") as tdir:
        tok_info = save_gguf_tokenizer(path, tdir)
        kwargs: dict[str, Any] = dict(tokenizer_dir=tdir, dtype=dtype, generation_config=gen)
        if max_shard_bytes is not None:
            kwargs["max_shard_bytes"] = max_shard_bytes
        save_hf(out_dir, cfg, params, **kwargs)
    return {"config": hf, "gguf_tensor_types": types, "gguf_general": general,
            "num_parameters": n_params, "tokenizer": tok_info}


def _leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Convert a GGUF file into a HF safetensors directory.")
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    a = ap.parse_args(argv)
    info = gguf_to_hf(a.gguf, a.out_dir, dtype=a.dtype)
    print(json.dumps({k: info[k] for k in ("gguf_tensor_types", "num_parameters", "tokenizer")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
