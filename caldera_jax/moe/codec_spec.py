"""A codec named on a command line: a fixed codec by name, or a trained one from its directory.

    spec = load_codec("int4", cfg)               # fixed: none, identity, bf16, int8, int4, int2
                                                 #        (one scale per token), int4-zp, int2-zp,
                                                 #        int8-g128, int4-g128, int2-g128, fp8 (scales per
                                                 #        128 channels, or 64/32/16 where 128 does not divide H)
    spec = load_codec("runs/codec-4x", cfg)      # trained: codec.json + codec.safetensors, as
                                                 # train_compressors / offline_codecs fit write them
    params, hooks = attach(spec, cfg, params, router_mode=None)   # None: the codec's own router mode

`spec.codec` is None only for "none" (the model as it is, no expert-parallel hooks); every other
spec runs the MoE layers through the expert-parallel layer on a one-device mesh (ep=1, dropless),
the codec around its all-to-all. A trained codec is checked against the model (model type, hidden
size, MoE layers, tensor shapes) and the error names its file. `spec.identity` names the codec's
weights for result caches (the file's sha256).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from safetensors.numpy import load_file

from caldera_jax.config import ModelConfig
from caldera_jax.moe.codec_params import add_codec_params
from caldera_jax.moe.codecs import FP8, Identity, IntQuant, Learned, StaleConditioned, codec_name
from caldera_jax.moe.routing import check_router_mode
from caldera_jax.params import unflatten

CODEC_FILE, CODEC_JSON = "codec.safetensors", "codec.json"
FIXED: dict[str, Any] = {
    "none": None, "identity": Identity(), "bf16": Identity("bfloat16"),
    "int8": IntQuant(8), "int4": IntQuant(4), "int2": IntQuant(2),
    "int4-zp": IntQuant(4, "zeropoint"), "int2-zp": IntQuant(2, "zeropoint"), "fp8": FP8(),
    "int8-g128": IntQuant(8, group=128), "int4-g128": IntQuant(4, group=128), "int2-g128": IntQuant(2, group=128),
}
BLOCK_FALLBACK = (64, 32, 16)      # channels per scale where the named 128 does not divide hidden_size
STALE_KINDS = {"none": None, "compressed": "compressed", "uncompressed": "raw"}


class CodecSpecError(ValueError):
    """A codec that cannot be used with this model; the message names the spec or file."""


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    name: str                                  # codec_name(codec), or "none"
    codec: Any                                 # a codecs.py codec; None: no expert-parallel hooks
    given: Mapping[int, dict] | None           # trained parameters per MoE layer (None: fixed codec)
    router_mode: str                           # the mode it was trained with ("compressed" if fixed)
    identity: dict[str, Any]                   # spec, and the weights' sha256 for a trained codec


def codec_from_description(desc: Mapping[str, Any], where: str = "codec.json") -> Any:
    """The Learned / StaleConditioned codec a codec.json describes (init kind irrelevant: params given)."""
    try:
        ratio, stale = int(desc["ratio"]), desc.get("stale") or "none"
    except (KeyError, TypeError, ValueError):
        raise CodecSpecError(f"{where}: no integer 'ratio'") from None
    if stale not in STALE_KINDS:
        raise CodecSpecError(f"{where}: stale must be one of {list(STALE_KINDS)}, got {stale!r}")
    wire = desc.get("wire_dtype", "bfloat16")
    if STALE_KINDS[stale] is None:
        return Learned(ratio, "identity", wire_dtype=wire)
    return StaleConditioned(ratio, "identity", wire_dtype=wire, stride=int(desc.get("stride") or 12),
                            stale_kind=STALE_KINDS[stale])


def read_trained(directory: str, cfg: ModelConfig) -> tuple[Any, dict[int, dict], dict[str, Any]]:
    """(codec, params per MoE layer, codec.json) of a trained codec directory, checked against cfg."""
    jpath, wpath = os.path.join(directory, CODEC_JSON), os.path.join(directory, CODEC_FILE)
    for p in (jpath, wpath):
        if not os.path.isfile(p):
            raise CodecSpecError(f"codec {directory!r}: {p} does not exist (a train_compressors or "
                                 f"offline_codecs fit output directory holds {CODEC_JSON} and {CODEC_FILE})")
    try:
        with open(jpath) as f:
            desc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CodecSpecError(f"{jpath}: unreadable: {e}") from None
    codec = codec_from_description(desc, jpath)
    for field, want in (("model_type", cfg.model_type), ("hidden_size", cfg.hidden_size)):
        if field in desc and desc[field] != want:
            raise CodecSpecError(f"{jpath}: trained for {field}={desc[field]!r}, this model has {want!r}")
    try:
        tree = unflatten(load_file(wpath))
    except Exception as e:                                    # safetensors raises its own types
        raise CodecSpecError(f"{wpath}: unreadable safetensors file: {e}") from None
    layers = tree.get("model", {}).get("layers", {})
    try:
        given = {int(i): {k: jax.tree.map(jnp.asarray, v) for k, v in p["mlp"]["codec"].items()}
                 for i, p in layers.items()}
    except (KeyError, TypeError, ValueError):
        raise CodecSpecError(f"{wpath}: tensors must be named model.layers.<i>.mlp.codec.*") from None
    try:
        add_codec_params({}, cfg, codec, jax.random.key(0), given=given)    # layers and shapes checked
    except ValueError as e:
        raise CodecSpecError(f"{wpath}: {e}") from None
    # a learned codec has parameters at every MoE layer
    missing = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i) and i not in given]
    if missing:
        raise CodecSpecError(f"{wpath}: no parameters for MoE layers {missing}")
    return codec, given, desc


def codec_identity(spec: str) -> dict[str, Any]:
    """What names a codec for result caches, without reading the model: the fixed codec's name,
    or a trained codec's absolute directory and the sha256 of its weights."""
    if spec in FIXED:
        return {"codec": spec}
    path = os.path.join(spec, CODEC_FILE)
    if not os.path.isfile(path):
        raise CodecSpecError(f"codec {spec!r}: neither a fixed codec ({', '.join(FIXED)}) nor a directory "
                             f"holding {CODEC_FILE}")
    with open(path, "rb") as f:
        return {"codec": os.path.abspath(spec), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _fitting_block(block: int, hidden: int) -> int:
    """Channels per scale: `block` if it divides hidden, else the first BLOCK_FALLBACK that does
    (else `block`, which the codec's init then refuses)."""
    return block if hidden % block == 0 else next((b for b in BLOCK_FALLBACK if hidden % b == 0), block)


def load_codec(spec: str, cfg: ModelConfig) -> CodecSpec:
    """A fixed codec name (FIXED) or a trained codec directory; see the module doc."""
    if spec in FIXED:
        codec = FIXED[spec]
        if isinstance(codec, FP8):                                        # e.g. H = 576: 64-channel blocks
            codec = FP8(block=_fitting_block(codec.block, cfg.hidden_size))
        if isinstance(codec, IntQuant) and codec.group:
            codec = dataclasses.replace(codec, group=_fitting_block(codec.group, cfg.hidden_size))
        if codec is not None:
            try:
                add_codec_params({}, cfg, codec, jax.random.key(0))         # codec.init at every MoE layer
            except ValueError as e:
                raise CodecSpecError(f"codec {spec!r}: {e}") from None
        return CodecSpec("none" if codec is None else codec_name(codec), codec, None, "compressed",
                         codec_identity(spec))
    ident = codec_identity(spec)
    codec, given, desc = read_trained(spec, cfg)
    return CodecSpec(codec_name(codec), codec, given, desc.get("router_mode", "compressed"), ident)


def attach(spec: CodecSpec, cfg: ModelConfig, params: dict, router_mode: str | None = None,
           base=None) -> tuple[dict, Any]:
    """(params with the codec's parameters, Hooks running the MoE layers expert-parallel on one
    device with the codec). "none": (params, base hooks) unchanged. router_mode None: the spec's."""
    from caldera_jax.models.hooks import Hooks
    from caldera_jax.moe.ep import expert_parallel_hooks, make_mesh
    base = Hooks() if base is None else base
    if spec.codec is None:
        return params, base
    if not any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise CodecSpecError(f"codec {spec.name}: this {cfg.model_type} model has no MoE layer")
    mode = check_router_mode(router_mode or spec.router_mode)
    params = add_codec_params(params, cfg, spec.codec, jax.random.key(0), given=spec.given)
    return params, expert_parallel_hooks(make_mesh(ep=1), codec=spec.codec, router_mode=mode, base=base)
