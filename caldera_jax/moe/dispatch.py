"""Moving payload rows from token shards to expert shards along the mesh axis "ep", and back.

Runs inside `jax.shard_map`. Every device holds n tokens with top-k choices idx [n, k] over E
experts; expert e lives on ep-device e // E_loc (E_loc = E / ep). Two mechanisms, chosen as data:

    Capacity(factor)  dense all_to_all of an [E, C, ...] slot buffer per device. C = ceil(factor *
                      n * k / E) slots per (source, expert); assignments over C are dropped and
                      counted (first choices before second choices). factor=None sizes C for the
                      worst case (C = n): nothing is ever dropped. Works on every backend.
    Ragged()          dropless ragged_all_to_all of exactly the n*k assignment rows (GPU/TPU; XLA:CPU
                      has no ragged-all-to-all: `for_platform` falls back to Capacity(None) with a
                      one-line notice). Ragged(emulate=True) replaces the collective by a dense
                      all_to_all with the same semantics, to test the offset logic on CPU.

`dispatch(...)` returns a `Dispatched`: the rows on the expert device ([R, ...] per payload leaf),
their source device and token, and closures that lay rows out per local expert ([E_loc, S, H], the
batched-einsum layout the expert linears take through ctx.linear) and carry rows back to the source
(`combine`). Capacity: R = ep*E_loc*C rows, S = ep*C. Ragged: R = ep*n*min(k, E_loc) receive rows
(worst case), S = ep*n slots per expert, so the wire is dropless and exact but the expert einsum
runs over padded slots (a grouped matmul, jax.lax.ragged_dot, needs a grouped form of
caldera_jax.linear.apply first).

Float leaves cross the wire bitcast to same-width unsigned integers (`a2a`), so the collective moves
exactly the payload's bytes on every backend (XLA:CPU otherwise widens bf16/fp8 collectives) and
the compiled HLO shows them; gradients flow through a custom VJP that moves the cotangent back the
same way. Collectives sit in named scopes (moe_dispatch, moe_token_ids, moe_combine, moe_counts) that
caldera_jax.moe.wire reads from the compiled HLO.
"""
from __future__ import annotations

import dataclasses
import warnings
import math
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp



# ------------------------------------------------------------------------------------- transport
def _uint_of(dtype) -> Any:
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(dtype).itemsize]


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _a2a_float(x: jax.Array, axis: str) -> jax.Array:
    u = jax.lax.bitcast_convert_type(x, _uint_of(x.dtype))
    return jax.lax.bitcast_convert_type(jax.lax.all_to_all(u, axis, 0, 0), x.dtype)


def _a2a_fwd(x, axis):
    return _a2a_float(x, axis), None


def _a2a_bwd(axis, _, g):
    return (_a2a_float(g, axis),)     # all_to_all along axis 0 is its own inverse


_a2a_float.defvjp(_a2a_fwd, _a2a_bwd)


def a2a(x: jax.Array, axis: str) -> jax.Array:
    """all_to_all along `axis`, split and concat on dim 0: x [ep, ...] (block j goes to peer j) ->
    [ep, ...] (block j came from peer j). Exactly x's bytes cross the wire."""
    return _a2a_float(x, axis) if _is_float(x) else jax.lax.all_to_all(x, axis, 0, 0)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_float(x: jax.Array, axis: str) -> jax.Array:
    u = jax.lax.bitcast_convert_type(x, _uint_of(x.dtype))
    return jax.lax.bitcast_convert_type(jax.lax.all_gather(u, axis), x.dtype)


def _gather_fwd(x, axis):
    return _gather_float(x, axis), None


def _gather_bwd(axis, _, g):
    return (jax.lax.psum_scatter(g, axis, scatter_dimension=0, tiled=False),)


_gather_float.defvjp(_gather_fwd, _gather_bwd)


def all_gather(x: jax.Array, axis: str) -> jax.Array:
    """x [n, ...] on every peer -> [ep, n, ...] on every peer, exactly x's bytes on the wire."""
    return _gather_float(x, axis) if _is_float(x) else jax.lax.all_gather(x, axis)


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _pad_row(leaf: jax.Array) -> jax.Array:
    """[n, ...] -> [n + 1, ...] with a zero row at index n (the 'empty slot' row)."""
    return jnp.concatenate([leaf, jnp.zeros((1,) + leaf.shape[1:], leaf.dtype)])


# ------------------------------------------------------------------------------------- dispatched
@dataclasses.dataclass
class Dispatched:
    """The expert device's view after dispatch (R rows; S slots per local expert)."""
    payload: dict                                       # leaf [R, ...]
    src: jax.Array                                      # [R] int32 source index along ep
    token: jax.Array | None                             # [R] int32 token on the source (n: empty)
    to_layout: Callable[[jax.Array], jax.Array]         # [R, H] -> [E_loc, S, H]
    from_layout: Callable[[jax.Array], jax.Array]       # [E_loc, S, H] -> [R, H]
    combine: Callable[[dict], tuple[dict, jax.Array]]   # rows {leaf [R, ...]} -> ({[n, k, ...]}, kept [n, k])
    dropped: jax.Array                                  # scalar int32: assignments not served


# --------------------------------------------------------------------------------------- capacity
@dataclasses.dataclass(frozen=True)
class Capacity:
    """Capacity-bounded dense all_to_all; factor=None: C = n (worst case, never drops)."""
    factor: float | None = None

    def slots(self, n: int, k: int, num_experts: int) -> int:
        if self.factor is None:
            return n
        return max(1, min(n, math.ceil(self.factor * n * k / num_experts)))

    def dispatch(self, payload: dict, idx: jax.Array, *, num_experts: int, ep: int, axis: str,
                 with_tokens: bool) -> Dispatched:
        n, k = idx.shape
        E, E_loc, C = num_experts, num_experts // ep, self.slots(*idx.shape, num_experts)
        R = ep * E_loc * C
        # slot of each assignment within its expert, first choices before second choices
        e_kmajor = idx.T.reshape(-1)
        onehot = jax.nn.one_hot(e_kmajor, E, dtype=jnp.int32)
        pos = (jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1).reshape(k, n).T   # [n, k]
        kept = pos < C
        tokens = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, k))
        slot_token = jnp.full((E, C), n, jnp.int32).at[idx, pos].set(tokens, mode="drop")   # [E, C]

        def send(leaf):
            buf = _pad_row(leaf)[slot_token].reshape((ep, E_loc, C) + leaf.shape[1:])
            return a2a(buf, axis).reshape((R,) + leaf.shape[1:])            # rows (src, e_loc, c)

        with jax.named_scope("moe_dispatch"):
            rows = {k_: send(v) for k_, v in payload.items()}
        token = None
        if with_tokens:
            with jax.named_scope("moe_token_ids"):
                token = a2a(slot_token.reshape(ep, E_loc, C), axis).reshape(R)

        def to_layout(x):
            return x.reshape((ep, E_loc, C) + x.shape[1:]).swapaxes(0, 1).reshape((E_loc, ep * C) + x.shape[1:])

        def from_layout(y):
            return y.reshape((E_loc, ep, C) + y.shape[2:]).swapaxes(0, 1).reshape((R,) + y.shape[2:])

        def combine(back: dict):
            out = {}
            with jax.named_scope("moe_combine"):
                for key, leaf in back.items():
                    got = a2a(leaf.reshape((ep, E_loc, C) + leaf.shape[1:]), axis)   # [E, C, ...] by expert
                    out[key] = got.reshape((E, C) + leaf.shape[1:])[idx, jnp.minimum(pos, C - 1)]
            return out, kept

        src = jnp.repeat(jnp.arange(ep, dtype=jnp.int32), E_loc * C)
        return Dispatched(rows, src, token, to_layout, from_layout, combine,
                          jnp.sum(~kept).astype(jnp.int32))


# ----------------------------------------------------------------------------------------- ragged
def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all's semantics (one slice per peer) from a dense all_to_all of
    [ep, rows(operand), ...] chunks: for CPU tests of the ragged path's offsets."""
    ep, M = send_sizes.shape[0], operand.shape[0]
    m = jnp.arange(M, dtype=jnp.int32)
    src = jnp.clip(input_offsets[:, None] + m[None, :], 0, M - 1)                   # [ep, M]
    ok = (m[None, :] < send_sizes[:, None]).reshape((ep, M) + (1,) * (operand.ndim - 1))
    chunks = jnp.where(ok, operand[src], jnp.zeros((), operand.dtype))
    recv = a2a(chunks, axis_name)                                                   # [ep(src), M, ...]
    offs = a2a(output_offsets.reshape(ep, 1), axis_name).reshape(ep)                # where mine land
    dest = jnp.where(m[None, :] < recv_sizes[:, None], offs[:, None] + m[None, :], output.shape[0])
    return output.at[dest.reshape(-1)].set(recv.reshape((ep * M,) + operand.shape[1:]), mode="drop")


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Dropless ragged_all_to_all of the n*k assignment rows (GPU/TPU)."""
    emulate: bool = False

    def dispatch(self, payload: dict, idx: jax.Array, *, num_experts: int, ep: int, axis: str,
                 with_tokens: bool) -> Dispatched:
        collective = (partial(emulated_ragged_all_to_all, axis_name=axis) if self.emulate
                      else partial(jax.lax.ragged_all_to_all, axis_name=axis))
        n, k = idx.shape
        E, E_loc = num_experts, num_experts // ep
        R, S = ep * n * min(k, E_loc), ep * n          # receive rows (worst case), slots per expert
        flat = idx.reshape(-1)                          # assignments, token-major
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)   # rows sorted by expert (so by device)
        tok_sorted = order // k
        counts = jnp.bincount(flat, length=E).astype(jnp.int32)
        send_sizes = counts.reshape(ep, E_loc).sum(1)
        in_off = _exclusive_cumsum(send_sizes)
        me = jax.lax.axis_index(axis)
        with jax.named_scope("moe_counts"):
            sizes = jax.lax.all_gather(send_sizes, axis)                 # [ep(src), ep(dst)]
            recv_counts = a2a(counts.reshape(ep, E_loc), axis)           # [ep(src), E_loc]
        out_off = _exclusive_cumsum(sizes, 0)[me]                        # my slice's offset at each dst
        recv_sizes = sizes[:, me]
        recv_off = _exclusive_cumsum(recv_sizes)
        back_off = _exclusive_cumsum(sizes, 1)[:, me]                    # where my rows sit at each src

        def send(leaf):
            out = jnp.zeros((R,) + leaf.shape[1:], leaf.dtype)
            return collective(leaf[tok_sorted], out, in_off, send_sizes, out_off, recv_sizes)

        with jax.named_scope("moe_dispatch"):
            rows = {key: send(v) for key, v in payload.items()}
        token = None
        if with_tokens:
            with jax.named_scope("moe_token_ids"):
                token = collective(tok_sorted, jnp.full((R,), n, jnp.int32), in_off, send_sizes,
                                   out_off, recv_sizes)

        # row r -> (source s, local expert e, slot): rows arrive grouped by source, then by expert
        seg_start = recv_off[:, None] + _exclusive_cumsum(recv_counts, 1)          # [ep, E_loc]
        seg_end = (seg_start + recv_counts).reshape(-1)
        r = jnp.arange(R, dtype=jnp.int32)
        j = jnp.minimum(jnp.sum(seg_end[None, :] <= r[:, None], axis=1), ep * E_loc - 1)
        s, e = j // E_loc, j % E_loc
        valid = r < jnp.sum(recv_sizes)
        slot = _exclusive_cumsum(recv_counts, 0)[s, e] + r - seg_start.reshape(-1)[j]
        slot = jnp.where(valid, slot, S)                                           # S: out of range

        def to_layout(x):
            return jnp.zeros((E_loc, S) + x.shape[1:], x.dtype).at[e, slot].set(x, mode="drop")

        def from_layout(y):
            got = y[e, jnp.minimum(slot, S - 1)]
            return jnp.where(valid.reshape((R,) + (1,) * (got.ndim - 1)), got, jnp.zeros((), got.dtype))

        def combine(back: dict):
            out = {}
            with jax.named_scope("moe_combine"):
                for key, leaf in back.items():
                    buf = jnp.zeros((n * k,) + leaf.shape[1:], leaf.dtype)
                    got = collective(leaf, buf, recv_off, recv_sizes, back_off, send_sizes)
                    inv = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
                    out[key] = got[inv].reshape((n, k) + leaf.shape[1:])
            return out, jnp.ones((n, k), bool)

        src = jnp.where(valid, s, 0).astype(jnp.int32)
        return Dispatched(rows, src, token, to_layout, from_layout, combine, jnp.zeros((), jnp.int32))


class RaggedFallbackWarning(UserWarning):
    """Ragged dispatch asked for on a platform without ragged-all-to-all (XLA:CPU)."""


def for_platform(dispatch, platform: str):
    """The dispatch to use on `platform`: Ragged falls back to Capacity(None) (same results, never
    drops) on CPU, where XLA has no ragged-all-to-all; a one-line RaggedFallbackWarning says so
    (Python's warning filters show it once per call site, no state of ours)."""
    if isinstance(dispatch, Ragged) and not dispatch.emulate and platform == "cpu":
        warnings.warn("caldera_jax.moe: ragged_all_to_all is not implemented by XLA:CPU; "
                      "using the capacity all_to_all sized for no drops instead", RaggedFallbackWarning,
                      stacklevel=2)
        return Capacity(None)
    return dispatch
