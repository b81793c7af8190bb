"""The expert-parallel MoE layer: `jax.shard_map` over mesh axes "ep" (experts), "dp" (data) and
optionally "tp" (each expert's intermediate dimension), with a codec around the all-to-all.

    mesh = make_mesh(ep=4, dp=2)
    hooks = expert_parallel_hooks(mesh, codec=Learned(ratio=4), router_mode="uncompressed")
    logits = forward(params, cfg, tokens, hooks=hooks)        # whole model, experts in parallel

One MoE layer, tokens x [N, H] sharded over (dp, ep), n = N / (dp*ep) per device:
    source device : payload = encode(x); route (family top-k) on x or on decode(payload) per
                    router mode; reference layers of a stale codec all_gather their stale state
                    over ep once (every ep peer may serve those tokens in the following layers)
    shard_map     : dispatch payload rows to the experts' devices (all_to_all along ep), decode
                    there (with the token's stale state; a learned codec's linear decoder is
                    folded into the experts' gate/up weights instead, fold.py), run the local experts through
                    ctx.linear on [E_loc, S, H], psum over tp, carry the outputs back (optionally
                    through a combine codec), weight by the router probabilities, sum over k.
The source side (source.py) is token-local and runs as its own collective-free shard_map; the
single-device twin `SimulatedMoE` (source.py) shares it and is the reference for the tests.

Experts are [E, ...] sharded over ep (and tp); codec params are replicated. aux entries written:
    "{name}.dropped"          assignments dropped for capacity (scalar int32)
    "moe.stale.{layer}"       a reference layer's stale state: {"local": [N, Hs] token-sharded,
                              "gathered": [dp*ep, ep, n, Hs] each device's copy of its ep group}
Linear hooks run inside the shard_map on per-device values: they must be pure (no aux writes).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from caldera_jax.config import ModelConfig
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.moe.codecs import Identity
from caldera_jax.moe.dispatch import Capacity, Ragged, all_gather, for_platform
from caldera_jax.moe.fold import can_fold, fold_experts, fold_is_cheaper
from caldera_jax.moe.routing import check_router_mode
from caldera_jax.moe.source import (check_pure, codec_params, expert_ffn, is_explicit, layer_index, place,
                                    source_side, token_axes)

AXES = ("dp", "ep", "tp")
DECODERS = ("auto", "fold", "rows")   # fold a linear decoder into the experts (fold.py), decode
                                      # every row, or whichever costs fewer FLOPs at the shapes


# ------------------------------------------------------------------------------------------ mesh
def make_mesh(ep: int, dp: int = 1, tp: int = 1, *, devices=None, explicit: bool = False) -> Mesh:
    """A (dp, ep, tp) mesh on the first dp*ep*tp devices (Auto axes unless explicit)."""
    n = dp * ep * tp
    devices = list(devices if devices is not None else jax.devices())
    if n > len(devices):
        raise ValueError(f"mesh dp={dp} x ep={ep} x tp={tp} needs {n} devices, have {len(devices)}")
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((dp, ep, tp), AXES, axis_types=(kind,) * 3, devices=devices[:n])


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """{"dp", "ep", "tp"} -> size (1 where the mesh has no such axis)."""
    if "ep" not in mesh.axis_names:
        raise ValueError(f"expert parallelism needs a mesh axis named 'ep', got axes {mesh.axis_names}")
    return {a: int(mesh.shape[a]) if a in mesh.axis_names else 1 for a in AXES}


def expert_specs(mesh: Mesh) -> dict[str, P]:
    """How the stacked expert weights lie on the mesh: gate/up [E, I, H] and down [E, H, I], the
    experts along ep, the intermediate dimension along tp (when the mesh has tp > 1)."""
    tp = "tp" if mesh_sizes(mesh)["tp"] > 1 else None
    return {"gate_proj": P("ep", tp, None), "up_proj": P("ep", tp, None), "down_proj": P("ep", None, tp)}


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A NamedSharding per leaf of a model's params (same tree): every MoE layer's experts as the
    expert-parallel layer reads them (`expert_specs`), everything else replicated. Place the frozen
    weights once with caldera_jax.train.placement.place; the layer's constraints then move nothing."""
    specs, rep = expert_specs(mesh), NamedSharding(mesh, P())

    def walk(node, key):
        if isinstance(node, dict):
            return {k: (jax.tree.map(lambda _, s=specs[k]: NamedSharding(mesh, s), v)
                        if key == "experts" and k in specs else walk(v, k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, key) for v in node)
        return jax.tree.map(lambda _: rep, node)
    return walk(params, None)


def check_mesh(mesh: Mesh, cfg: ModelConfig, num_tokens: int) -> dict[str, int]:
    """Refuses a mesh that does not divide the experts, tokens or expert width; returns sizes."""
    s = mesh_sizes(mesh)
    where = f"mesh dp={s['dp']} x ep={s['ep']} x tp={s['tp']}"
    if cfg.num_experts % s["ep"]:
        raise ValueError(f"{where}: num_experts={cfg.num_experts} is not divisible by ep={s['ep']}")
    if num_tokens % (s["dp"] * s["ep"]):
        raise ValueError(f"{where}: {num_tokens} tokens (batch x sequence) are not divisible by "
                         f"dp*ep={s['dp'] * s['ep']}")
    if cfg.moe_intermediate_size % s["tp"]:
        raise ValueError(f"{where}: moe_intermediate_size={cfg.moe_intermediate_size} is not "
                         f"divisible by tp={s['tp']}")
    return s


# ---------------------------------------------------------------------------------- the EP layer
@dataclasses.dataclass(frozen=True)
class ExpertParallelMoE:
    """The `moe` hook running the block expert-parallel on `mesh` (see the module docstring)."""
    mesh: Mesh
    codec: Any = Identity()
    router_mode: str = "compressed"
    dispatch: Any = Capacity()
    combine_codec: Any = None
    decoder: str = "auto"

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")

    def __call__(self, name: str, p: dict, cfg: ModelConfig, x_router: jax.Array,
                 x_expert: jax.Array, ctx) -> jax.Array:
        with jax.named_scope(f"moe_layer{layer_index(name)}"):     # wire.py attributes bytes by it
            return self._layer(name, p, cfg, x_router, x_expert, ctx)

    def _layer(self, name, p, cfg, x_router, x_expert, ctx):
        mesh, layer = self.mesh, layer_index(name)
        sizes = check_mesh(mesh, cfg, x_expert.shape[0])
        entry = jax.typeof(x_expert).sharding.spec if is_explicit(mesh) else None
        dispatch = for_platform(self.dispatch, mesh.devices.flat[0].platform)
        tok, tp = P(token_axes(mesh)), ("tp" if sizes["tp"] > 1 else None)
        x_router, x_expert = place((x_router, x_expert), mesh, tok)
        src = source_side(self.codec, self.router_mode, name, p, cfg, x_router, x_expert, ctx, mesh)
        cp = codec_params(p, self.codec, cfg, layer)
        ccp = {}
        if self.combine_codec is not None:
            if self.combine_codec.stale_role(cfg, layer) != "none":
                raise ValueError(f"{name}: a combine codec cannot use stale conditioning")
            ccp = codec_params(p, self.combine_codec, cfg, layer, "combine_codec")
        stale_in = None
        if src.role == "send":
            stale_in = src.stale
        elif src.role == "use":
            stale_in = ctx.aux[f"moe.stale.{src.ref}"]["gathered"]
        experts = p["experts"]
        specs = expert_specs(mesh)
        ex_specs = {k: jax.tree.map(lambda _: specs[k], v) for k, v in experts.items()}
        args = (src.payload, src.idx, src.weight, experts, cp, ccp, stale_in)
        in_specs = (tok, tok, tok, ex_specs, P(), P(), tok)
        args = tuple(jax.tree.map(lambda a, s: place(a, mesh, s), arg, spec)
                     if isinstance(spec, dict) else place(arg, mesh, spec)
                     for arg, spec in zip(args, in_specs))
        out_specs = (tok, tok, tok if src.role == "send" else P())
        body = _Body(self, cfg, name, ctx.hooks, sizes["ep"], src.role, tp, x_expert.dtype, dispatch)
        y, dropped, gathered = jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                                             out_specs=out_specs)(*args)
        if src.role == "send":
            ctx.aux[f"moe.stale.{layer}"]["gathered"] = gathered
        ctx.aux[f"{name}.dropped"] = jnp.sum(dropped)
        return y if entry is None else jax.reshard(y, NamedSharding(mesh, entry))


@dataclasses.dataclass(frozen=True)
class _Body:
    """The per-device part of one EP MoE layer (traced inside shard_map)."""
    moe: ExpertParallelMoE
    cfg: ModelConfig
    name: str
    hooks: Hooks
    ep: int
    role: str
    tp: str | None
    dtype: Any
    dispatch: Any

    def _fold(self, codec, cp, experts, d) -> bool:
        """Fold the codec's decoder into the experts (fold.py): when asked, or ("auto") when fewer FLOPs."""
        if self.moe.decoder == "rows" or not can_fold(codec, experts):
            return False
        if self.moe.decoder == "fold":
            return True
        rows = jax.tree.leaves(d.payload)[0].shape[0]
        e_loc, inter, hidden = experts["gate_proj"]["weight"].shape
        slots = d.to_layout(jnp.zeros((rows, 1), jnp.int8)).shape[1]
        return fold_is_cheaper(rows, slots, e_loc, inter, hidden, codec.decoder_weight(cp).shape[1])

    def __call__(self, payload, idx, weight, experts, cp, ccp, stale):
        codec, cc, name = self.moe.codec, self.moe.combine_codec, self.name
        ctx = Ctx(self.hooks, {})
        n = idx.shape[0]
        gathered = jnp.zeros((), jnp.int32)
        if self.role == "send":
            with jax.named_scope("moe_stale"):
                gathered = all_gather(stale, "ep")[None]                 # [1, ep, n, Hs]
        d = self.dispatch.dispatch(payload, idx, num_experts=self.cfg.num_experts, ep=self.ep,
                                   axis="ep", with_tokens=self.role == "use")
        row_stale = None
        if self.role == "use":
            table = jnp.concatenate([stale[0], jnp.zeros_like(stale[0][:, :1])], axis=1)  # [ep, n+1, Hs]
            row_stale = table[d.src, jnp.minimum(d.token, n)]
        if self._fold(codec, cp, experts, d):                             # gate/up read z directly
            with jax.named_scope("moe_codec_fold"):
                experts = fold_experts(experts, codec.decoder_weight(cp))             # [E_loc, I, d]
            z = codec.decoder_input(cp, d.payload, row_stale).astype(self.dtype)     # [R, d]
            y = expert_ffn(ctx, name, experts, d.to_layout(z))                         # [E_loc, S, H]
        else:
            x = codec.decode(cp, d.payload, row_stale).astype(self.dtype)              # [R, H]
            y = expert_ffn(ctx, name, experts, d.to_layout(x))                         # [E_loc, S, H]
        if self.tp is not None:
            y = jax.lax.psum(y, self.tp)
        rows = d.from_layout(y)
        back = {"x": rows} if cc is None else cc.encode(ccp, rows)
        got, kept = d.combine(back)                                                # [n, k, ...]
        k = idx.shape[1]
        if cc is None:
            yk = got["x"]
        else:
            flat = jax.tree.map(lambda a: a.reshape((n * k,) + a.shape[2:]), got)
            yk = cc.decode(ccp, flat).astype(self.dtype).reshape(n, k, -1)
        yk = jnp.where(kept[..., None], yk, jnp.zeros((), yk.dtype))
        out = jnp.einsum("nk,nkh->nh", weight.astype(yk.dtype), yk)
        check_pure(name, ctx)
        return out, d.dropped[None], gathered


# ------------------------------------------------------------------------------------------ hooks
def expert_parallel_hooks(mesh: Mesh, *, codec: Any = None, router_mode: str = "compressed",
                          dispatch: str | Any = "capacity", capacity_factor: float | None = None,
                          combine_codec: Any = None, decoder: str = "auto", base: Hooks = Hooks()) -> Hooks:
    """Hooks running every MoE layer expert-parallel on `mesh` (axes ep, optional dp and tp).

    codec: a caldera_jax.moe.codecs codec (None: Identity); router_mode: "compressed" |
    "uncompressed"; dispatch: "capacity" | "ragged" (or a Capacity / Ragged instance);
    capacity_factor: slots per (device, expert) = ceil(factor * n * k / E), None = never drop;
    combine_codec: optional codec on the way back (off by default); decoder: "fold" (a learned
    codec's linear decoder is folded into the experts' gate/up weights, caldera_jax/moe/fold.py;
    other codecs and quantized experts decode rows) | "rows" (decode every received row) |
    "auto" (whichever costs fewer FLOPs at the traced shapes: fold for many tokens per device);
    base: other hooks (linear, tap) to keep.
    """
    if isinstance(dispatch, str):
        if dispatch not in ("capacity", "ragged"):
            raise ValueError(f"dispatch must be 'capacity' or 'ragged', got {dispatch!r}")
        dispatch = Capacity(capacity_factor) if dispatch == "capacity" else Ragged()
    check_router_mode(router_mode)
    mesh_sizes(mesh)
    moe = ExpertParallelMoE(mesh, Identity() if codec is None else codec, router_mode, dispatch,
                            combine_codec, decoder)
    return dataclasses.replace(base, moe=moe)
