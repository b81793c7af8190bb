"""The token's own device: encode, stale bookkeeping, routing; and the single-device twin.

    source_side(codec, router_mode, name, p, cfg, x_router, x_expert, ctx, mesh=None) -> Source
        payload = codec.encode(x_expert); a stale codec's reference layer records its stale state
        in ctx.aux["moe.stale.{layer}"]["local"] ([N, Hs]) and the layers after it read it; the
        router sees x_router ("uncompressed") or decode(payload) ("compressed"); top-k with the
        family's semantics; the "{name}.routing" tap. With a mesh it runs as a token-local
        shard_map (no collectives), so it stays on each token's device.
    SimulatedMoE / simulated_hooks: the codec's semantics on one device with no collectives (the
        notes' simulation), the ground truth the expert-parallel layer (ep.py) is tested against.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from caldera_jax.config import ModelConfig
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.models.moe import combine_weights
from caldera_jax.moe.codecs import Identity
from caldera_jax.moe.routing import check_router_mode, route_tokens, router_input


def token_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes tokens are sharded over: ("dp", "ep") where present."""
    return tuple(a for a in ("dp", "ep") if a in mesh.axis_names)


def is_explicit(mesh: Mesh) -> bool:
    return any(t == AxisType.Explicit for t in mesh.axis_types)


def place(tree: Any, mesh: Mesh, spec: P) -> Any:
    """Constrains every leaf of `tree` to NamedSharding(mesh, spec) (reshard on Explicit axes)."""
    fn = jax.reshard if is_explicit(mesh) else jax.lax.with_sharding_constraint
    return jax.tree.map(lambda a: fn(a, NamedSharding(mesh, spec)), tree)


def check_pure(name: str, ctx) -> None:
    if ctx.aux:
        raise ValueError(f"{name}: linear hooks wrote {sorted(ctx.aux)} to aux inside the "
                         f"expert-parallel shard_map; hooks used with a mesh must be pure")


def layer_index(name: str) -> int:
    """"model.layers.{i}.mlp" -> i."""
    parts = name.split(".")
    try:
        return int(parts[parts.index("layers") + 1])
    except (ValueError, IndexError):
        raise ValueError(f"cannot read a layer index from MoE block name {name!r}") from None


def expert_ffn(ctx, name: str, p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU experts through ctx.linear: x [E, S, H], p["gate_proj"/"up_proj"] [E, I, H],
    p["down_proj"] [E, H, I] -> [E, S, H]."""
    g = ctx.linear(f"{name}.experts.gate_proj", x, p["gate_proj"])
    u = ctx.linear(f"{name}.experts.up_proj", x, p["up_proj"])
    return ctx.linear(f"{name}.experts.down_proj", jax.nn.silu(g) * u, p["down_proj"])


def codec_params(p: dict, codec, cfg: ModelConfig, layer: int, slot: str = "codec") -> dict:
    """The codec's params from the MoE block's params; refuses a learned codec without them."""
    if slot in p:
        return p[slot]
    if codec.init(jax.random.key(0), cfg, layer):
        raise ValueError(f"layer {layer}: {type(codec).__name__} has parameters but mlp.{slot} is "
                         f"missing: add them with caldera_jax.moe.add_codec_params")
    return {}


@dataclasses.dataclass
class Source:
    """What the source device computes before dispatch (token-sharded global arrays)."""
    payload: dict            # leaf [N, ...]
    idx: jax.Array           # [N, k] int32
    weight: jax.Array        # [N, k] float32
    role: str                # stale role: "none" | "send" | "use"
    stale: jax.Array | None  # "send": this layer's stale [N, Hs]; "use": the reference's; else None
    ref: int | None          # "use": the reference layer


@dataclasses.dataclass(frozen=True)
class _Encode:
    """Token-local source work: encode, this layer's stale state, router input, top-k.
    (x_router, x_expert [n, H], stale [n, Hs] | None, codec params, gate params) ->
    (payload, idx [n, k], weight [n, k], stale to send [n, Hs] | None)."""
    codec: Any
    router_mode: str
    role: str
    cfg: ModelConfig
    name: str
    hooks: Hooks

    def __call__(self, x_router, x_expert, stale, cp, gate, aux: dict | None = None):
        ctx = Ctx(dataclasses.replace(self.hooks, tap=None), {} if aux is None else aux)
        payload = self.codec.encode(cp, x_expert)
        send = self.codec.stale(cp, x_expert, payload) if self.role == "send" else None
        decoded = None
        if self.router_mode == "compressed":
            decoded = self.codec.decode(cp, payload, stale).astype(x_expert.dtype)
        x = router_input(self.router_mode, x_router, decoded)
        idx, weight = route_tokens(ctx, self.name, {"gate": gate}, self.cfg, x)
        if aux is None:
            check_pure(self.name, ctx)
        return payload, idx, weight, send


def source_side(codec, router_mode: str, name: str, p: dict, cfg: ModelConfig, x_router: jax.Array,
                x_expert: jax.Array, ctx, mesh: Mesh | None = None) -> Source:
    """encode + routing on the tokens' own devices (a token-local shard_map when `mesh` is given),
    the "{name}.routing" tap, and the stale bookkeeping in ctx.aux["moe.stale.{layer}"]["local"]."""
    layer = layer_index(name)
    cp = codec_params(p, codec, cfg, layer)
    role, ref, stale = codec.stale_role(cfg, layer), None, None
    if role == "use":
        ref = codec.reference_layer(cfg, layer)
        if f"moe.stale.{ref}" not in ctx.aux:
            raise ValueError(f"layer {layer} decodes with the stale state of reference layer {ref}, "
                             f"which has not run in this forward call")
        stale = ctx.aux[f"moe.stale.{ref}"]["local"]
    fn = _Encode(codec, check_router_mode(router_mode), role, cfg, name, ctx.hooks)
    args = (x_router, x_expert, stale, cp, p["gate"])
    if mesh is not None:
        tok = P(token_axes(mesh))
        specs = (tok, tok, tok, P(), P())
        args = tuple(place(a, mesh, s) for a, s in zip(args, specs))
        fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=tok)
    else:
        fn = functools.partial(fn, aux=ctx.aux)
    payload, idx, weight, send = fn(*args)
    idx, weight = ctx.tap(f"{name}.routing", (idx, weight))
    if role == "send":
        ctx.aux[f"moe.stale.{layer}"] = {"local": send}
        stale = send
    return Source(payload, idx, weight, role, stale, ref)


# ---------------------------------------------------------------------------- single-device twin
@dataclasses.dataclass(frozen=True)
class SimulatedMoE:
    """The codec's semantics on one device, no collectives (the notes' simulation): the experts see
    decode(encode(x)) (with the stale state), the router per router_mode, outputs optionally round
    trip the combine codec. The ground truth for ExpertParallelMoE with a codec."""
    codec: Any = Identity()
    router_mode: str = "compressed"
    combine_codec: Any = None

    def __call__(self, name, p, cfg, x_router, x_expert, ctx):
        src = source_side(self.codec, self.router_mode, name, p, cfg, x_router, x_expert, ctx)
        cp = codec_params(p, self.codec, cfg, layer_index(name))
        x = self.codec.decode(cp, src.payload, src.stale if src.role == "use" else None)
        x = x.astype(x_expert.dtype)
        E, (N, H) = cfg.num_experts, x.shape
        y = expert_ffn(ctx, name, p["experts"], jnp.broadcast_to(x, (E, N, H)))        # [E, N, H]
        if self.combine_codec is not None:
            ccp = codec_params(p, self.combine_codec, cfg, layer_index(name), "combine_codec")
            rows = y.reshape(E * N, H)
            y = self.combine_codec.decode(ccp, self.combine_codec.encode(ccp, rows)).astype(y.dtype)
            y = y.reshape(E, N, H)
        cw = combine_weights(src.idx, src.weight, E).astype(y.dtype)                   # [N, E]
        return jnp.einsum("enh,ne->nh", y, cw)


def simulated_hooks(*, codec: Any = None, router_mode: str = "compressed", combine_codec: Any = None,
                    base: Hooks = Hooks()) -> Hooks:
    """Hooks applying the codec on one device (no mesh): the reference for the EP layer."""
    check_router_mode(router_mode)
    return dataclasses.replace(base, moe=SimulatedMoE(Identity() if codec is None else codec,
                                                      router_mode, combine_codec))
