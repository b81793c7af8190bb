"""Codecs: what a token's hidden state becomes before it crosses the expert-parallel all-to-all.

A codec is a frozen (hashable) dataclass with pure functions

    init(key, cfg, layer)              -> params   (a dict; {} when the codec has none)
    encode(params, x [n, H])           -> payload  (dict of arrays, each [n, ...]; dtype and width
                                                    are exactly what crosses the wire)
    decode(params, payload, stale=None) -> x̂ [n, H]   (float; the caller casts to the model dtype)
    stale_role(cfg, layer)             -> "none" | "send" | "use"
    stale(params, x, payload)          -> [n, Hs]  (only where stale_role == "send")

`encode` runs on the token's source device, `decode` on the expert's device. Every payload row is
a function of its own token only, so dispatch can move rows freely. Learned parameters live in the
model's param tree at `model.layers.{i}.mlp.codec` (see codec_params.py).

Codecs here:
    Identity(wire_dtype)                        x as is (or cast to wire_dtype)
    IntQuant(bits, scheme, group)               absmax / zero-point INT8, INT4, INT2, a scale per token
                                                or per `group` channels; INT4/INT2 codes packed 2/4
                                                per uint8
    FP8(block)                                  float8 e4m3, one float32 scale per `block` channels
    Learned(ratio, init, wire_dtype)            c = W_c x (H -> H/ratio), x̂ = W_d c (a linear decoder:
                                                the EP layer folds W_d into the experts, fold.py)
    StaleConditioned(ratio, stride, stale, ..)  reference layers (every `stride`-th MoE layer) send
                                                their state once (raw, or their code); the layers
                                                after them decode x̂ = W_d [c, stale]

Gradients: Identity/Learned/StaleConditioned are differentiable end to end. The quantizers' codes
are integers (or rounded), so gradients reach the input only through the scales: use them for
evaluation, not for training through.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from caldera_jax import linear as linear_lib
from caldera_jax.config import ModelConfig

Payload = dict[str, jax.Array]
STALE_ROLES = ("none", "send", "use")


def moe_ordinal(cfg: ModelConfig, layer: int) -> int:
    """Index of decoder layer `layer` among the MoE layers (0 for the first MoE layer)."""
    if not cfg.is_moe_layer(layer):
        raise ValueError(f"layer {layer} is not an MoE layer of this {cfg.model_type} model")
    return sum(cfg.is_moe_layer(j) for j in range(layer))


def _dtype(name: str | None, like: jax.Array):
    return like.dtype if name is None else jnp.dtype(name)


class _NoStale:
    """Mixin: a codec without stale conditioning."""

    def stale_role(self, cfg: ModelConfig, layer: int) -> str:
        return "none"

    def stale(self, params, x, payload):
        raise TypeError(f"{type(self).__name__} sends no stale state")


# --------------------------------------------------------------------------------------- identity
@dataclasses.dataclass(frozen=True)
class Identity(_NoStale):
    """x crosses the wire unchanged (wire_dtype=None) or cast, e.g. to "bfloat16"."""
    wire_dtype: str | None = None

    def init(self, key, cfg, layer) -> dict:
        return {}

    def encode(self, params, x: jax.Array) -> Payload:
        return {"x": x.astype(_dtype(self.wire_dtype, x))}

    def decode(self, params, payload: Payload, stale=None) -> jax.Array:
        return payload["x"]


# ------------------------------------------------------------------------------ integer quantizers
def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """Unsigned codes [n, H] (values < 2**bits) -> uint8 [n, H*bits/8], low bits first."""
    per = 8 // bits
    c = codes.astype(jnp.uint8).reshape(codes.shape[0], -1, per)
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int) -> jax.Array:
    """uint8 [n, H*bits/8] -> uint8 codes [n, H] (inverse of pack_bits)."""
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    mask = jnp.uint8((1 << bits) - 1)
    return ((packed[..., None] >> shifts) & mask).reshape(packed.shape[0], -1)


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))


@dataclasses.dataclass(frozen=True)
class IntQuant(_NoStale):
    """Integer quantization of the dispatched hidden state, one scale per token (group=None) or
    per `group` consecutive channels of a token (a few outlier channels then cost only their group
    its resolution).

    absmax   : q = round(x / s), s = max|x| / (2^(b-1) - 1), symmetric levels (INT2: {-1, 0, 1})
    zeropoint: q = round((x - min) / s), s = (max - min) / (2^b - 1), 2^b levels
    Codes are stored unsigned; bits < 8 are packed 8/bits per uint8 (H must be a multiple of 8/bits).
    Payload: codes uint8 [n, H*bits/8], scale float32 [n, G] (+ offset float32 [n, G] for
    zeropoint), G = 1 or H / group.
    """
    bits: int = 8
    scheme: str = "absmax"
    group: int | None = None

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ValueError(f"IntQuant bits must be 2, 4 or 8, got {self.bits}")
        if self.scheme not in ("absmax", "zeropoint"):
            raise ValueError(f"IntQuant scheme must be 'absmax' or 'zeropoint', got {self.scheme!r}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"IntQuant group must be >= 1 channels, got {self.group}")

    def init(self, key, cfg, layer) -> dict:
        if cfg.hidden_size % (8 // self.bits):
            raise ValueError(f"INT{self.bits} packing needs hidden_size % {8 // self.bits} == 0, "
                             f"got hidden_size={cfg.hidden_size}")
        if self.group is not None and cfg.hidden_size % self.group:
            raise ValueError(f"IntQuant group={self.group} must divide hidden_size={cfg.hidden_size}")
        return {}

    def encode(self, params, x: jax.Array) -> Payload:
        n, H = x.shape
        xg = x.astype(jnp.float32).reshape(n, H // (self.group or H), -1)          # [n, G, H/G]
        if self.scheme == "absmax":
            qmax = 2 ** (self.bits - 1) - 1
            scale = jnp.max(jnp.abs(xg), axis=-1, keepdims=True) / qmax
            codes = jnp.clip(jnp.round(xg / _safe(scale)), -qmax, qmax) + qmax
            out = {"scale": scale[..., 0]}
        else:
            levels = 2 ** self.bits - 1
            lo = jnp.min(xg, axis=-1, keepdims=True)
            scale = (jnp.max(xg, axis=-1, keepdims=True) - lo) / levels
            codes = jnp.clip(jnp.round((xg - lo) / _safe(scale)), 0, levels)
            out = {"scale": scale[..., 0], "offset": lo[..., 0]}
        codes = codes.astype(jnp.uint8).reshape(n, H)
        out["codes"] = codes if self.bits == 8 else pack_bits(codes, self.bits)
        return out

    def decode(self, params, payload: Payload, stale=None) -> jax.Array:
        codes = payload["codes"] if self.bits == 8 else unpack_bits(payload["codes"], self.bits)
        n, H = codes.shape
        q = codes.astype(jnp.float32).reshape(n, payload["scale"].shape[1], -1)
        scale = payload["scale"][..., None]
        if self.scheme == "absmax":
            x = (q - (2 ** (self.bits - 1) - 1)) * scale
        else:
            x = q * scale + payload["offset"][..., None]
        return x.reshape(n, H)


# ------------------------------------------------------------------------------------------- fp8
@dataclasses.dataclass(frozen=True)
class FP8(_NoStale):
    """float8 e4m3 codes with one float32 scale per `block` channels per token (as DeepEP sends).

    Payload: codes float8_e4m3fn [n, H], scale float32 [n, H/block]; s = max|x_block| / 448.
    """
    block: int = 128

    def init(self, key, cfg, layer) -> dict:
        if cfg.hidden_size % self.block:
            raise ValueError(f"FP8 block={self.block} must divide hidden_size={cfg.hidden_size}")
        return {}

    def encode(self, params, x: jax.Array) -> Payload:
        n, H = x.shape
        xb = x.astype(jnp.float32).reshape(n, H // self.block, self.block)
        scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True) / 448.0
        codes = (xb / _safe(scale)).astype(jnp.float8_e4m3fn).reshape(n, H)
        return {"codes": codes, "scale": scale[..., 0]}

    def decode(self, params, payload: Payload, stale=None) -> jax.Array:
        codes, scale = payload["codes"], payload["scale"]
        n, H = codes.shape
        x = codes.astype(jnp.float32).reshape(n, scale.shape[1], -1) * scale[..., None]
        return x.reshape(n, H)


# --------------------------------------------------------------------------------------- learned
def _bottleneck(cfg: ModelConfig, ratio: int) -> int:
    if ratio < 1 or cfg.hidden_size % ratio:
        raise ValueError(f"compression ratio {ratio} must divide hidden_size={cfg.hidden_size}")
    return cfg.hidden_size // ratio


def _linear_init(key, shape, init: str) -> jax.Array:
    """[out, in] weight: "identity" = the leading identity block, "random" = N(0, 1/in)."""
    if init == "identity":
        return jnp.eye(*shape, dtype=jnp.float32)
    if init == "random":
        return jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(shape[1])
    raise ValueError(f"codec init must be 'identity' or 'random', got {init!r}")


@dataclasses.dataclass(frozen=True)
class Learned(_NoStale):
    """Per-layer linear compressor W_c [b, H] and decompressor W_d [H, b], b = H / ratio.

    init "identity" (near-identity: W_c = first b rows of I, W_d = its transpose) or "random";
    a given initialisation (e.g. offline-trained weights) goes through codec_params.add_codec_params.
    Payload: c [n, b] in wire_dtype (None: x's dtype). Params (HF layout [out, in]):
    {"compress": {"weight": [b, H]}, "decompress": {"weight": [H, b]}}.
    """
    ratio: int = 4
    init_kind: str = "identity"
    wire_dtype: str | None = None

    def init(self, key, cfg, layer) -> dict:
        H, b = cfg.hidden_size, _bottleneck(cfg, self.ratio)
        kc, kd = jax.random.split(key)
        return {"compress": {"weight": _linear_init(kc, (b, H), self.init_kind)},
                "decompress": {"weight": _linear_init(kd, (H, b), self.init_kind)}}

    def encode(self, params, x: jax.Array) -> Payload:
        c = linear_lib.apply(x, params["compress"]["weight"])
        return {"c": c.astype(_dtype(self.wire_dtype, x))}

    def decoder_input(self, params, payload: Payload, stale=None) -> jax.Array:
        """z [n, d]: what the linear decoder multiplies (the code, and the stale state if any)."""
        z = payload["c"]
        if stale is not None:
            z = jnp.concatenate([z, stale.astype(z.dtype)], axis=-1)
        return z

    def decoder_weight(self, params) -> jax.Array:
        """W_d [H, d]: decode(payload) = z W_dᵀ, a linear map (so it folds into the experts' first
        linears: caldera_jax/moe/fold.py)."""
        return params["decompress"]["weight"]

    def decode(self, params, payload: Payload, stale=None) -> jax.Array:
        z, w = self.decoder_input(params, payload, stale), self.decoder_weight(params)
        return linear_lib.apply(z.astype(jnp.promote_types(z.dtype, w.dtype)), w)


@dataclasses.dataclass(frozen=True)
class StaleConditioned(Learned):
    """Learned codec whose decoder also sees a stale hidden state from a reference layer.

    MoE layers with ordinal % stride == 0 are reference layers: a plain Learned codec, and they send
    their state once as the stale signal (stale="raw": x itself, Hs = H; "compressed": their code c,
    Hs = b). The following stride-1 MoE layers decode x̂ = W_d [c, stale], W_d [H, b + Hs].
    Near-identity init of a conditioned layer: x̂ = [c, stale[b:]] for raw stale (the missing
    channels come from the reference layer), x̂ = [c, 0] for compressed stale.
    """
    stride: int = 12
    stale_kind: str = "raw"

    def __post_init__(self):
        if self.stale_kind not in ("raw", "compressed"):
            raise ValueError(f"stale_kind must be 'raw' or 'compressed', got {self.stale_kind!r}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")

    def stale_role(self, cfg: ModelConfig, layer: int) -> str:
        return "send" if moe_ordinal(cfg, layer) % self.stride == 0 else "use"

    def reference_layer(self, cfg: ModelConfig, layer: int) -> int:
        """The decoder layer whose stale state `layer` decodes with."""
        want = moe_ordinal(cfg, layer) // self.stride * self.stride
        return next(j for j in range(cfg.num_hidden_layers)
                    if cfg.is_moe_layer(j) and moe_ordinal(cfg, j) == want)

    def stale_width(self, cfg: ModelConfig) -> int:
        return cfg.hidden_size if self.stale_kind == "raw" else _bottleneck(cfg, self.ratio)

    def init(self, key, cfg, layer) -> dict:
        p = super().init(key, cfg, layer)
        if self.stale_role(cfg, layer) == "send":
            return p
        H, b, Hs = cfg.hidden_size, _bottleneck(cfg, self.ratio), self.stale_width(cfg)
        wd = jnp.concatenate([p["decompress"]["weight"], jnp.zeros((H, Hs), jnp.float32)], axis=1)
        if self.init_kind == "identity" and self.stale_kind == "raw":
            rows = jnp.arange(b, H)
            wd = wd.at[rows, b + rows].set(1.0)
        elif self.init_kind == "random":
            wd = _linear_init(jax.random.fold_in(key, 1), (H, b + Hs), "random")
        return {"compress": p["compress"], "decompress": {"weight": wd}}

    def stale(self, params, x: jax.Array, payload: Payload) -> jax.Array:
        return x.astype(payload["c"].dtype) if self.stale_kind == "raw" else payload["c"]


def roundtrip(codec, params, x: jax.Array, stale: jax.Array | None = None) -> jax.Array:
    """decode(encode(x)) in x's dtype: what the experts see on one device."""
    return codec.decode(params, codec.encode(params, x), stale).astype(x.dtype)


def codec_name(codec: Any) -> str:
    """A short label for tables: identity, int8-absmax, fp8, learned-4x, stale-raw-4x-s12."""
    if codec is None or isinstance(codec, Identity):
        return "identity" if codec is None or codec.wire_dtype is None else f"identity-{codec.wire_dtype}"
    if isinstance(codec, IntQuant):
        return f"int{codec.bits}-{codec.scheme}" + (f"-g{codec.group}" if codec.group else "")
    if isinstance(codec, FP8):
        return "fp8-e4m3"
    if isinstance(codec, StaleConditioned):
        return f"stale-{codec.stale_kind}-{codec.ratio}x-s{codec.stride}"
    if isinstance(codec, Learned):
        return f"learned-{codec.ratio}x"
    return type(codec).__name__
