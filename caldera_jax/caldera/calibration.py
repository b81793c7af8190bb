"""Calibration: run the model on calibration sequences, accumulate H = Σ xᵀx per linear input.

    tokens, mask = calibration_tokens("train.txt", tokenizer, samples=64, seq_len=256)
    cal = Calibrator(source, tokens, mask, batch_size=8, mesh=mesh)   # embeds the tokens
    for i in range(cfg.num_hidden_layers):
        p = source.read_layer(i)                   # one decoder layer's weights in memory
        stats, h_next = cal.run_layer(i, p)        # LayerStats: Hessians + token counts of layer i
        ...compress layer i with stats...
        cal.advance(h_next)                        # or cal.advance(cal.run_layer(i, compressed)[1])

Hessian groups of layer i (`hessian_key(param name)` maps a matrix to its group):
    model.layers.{i}.self_attn.qkv         [H, H]      input of q_proj, k_proj, v_proj (shared)
    model.layers.{i}.self_attn.o_proj      [nq, nq]    input of o_proj
    model.layers.{i}.mlp.gate_up           [H, H]      input of gate_proj, up_proj (shared)
    model.layers.{i}.mlp.down_proj         [I, I]      input of down_proj
    model.layers.{i}.mlp.experts.gate_up   [E, H, H]   expert e: Σ over tokens routed to e
    model.layers.{i}.mlp.experts.down_proj [E, I, I]   expert e: its intermediate activations of
                                                       the tokens routed to it
The router is not compressed and has no Hessian. Each Hessian is Σ_t m_t x_t x_tᵀ with m_t = 0
for padding tokens (and, for experts, for tokens not routed to the expert: the routing mask, not
the routing weight); `counts` holds Σ_t m_t (an int, or [E] for experts).

Precision: the jitted layer returns each linear's (masked) float32 inputs and the Grams are
accumulated on the host in float64 (numpy `xᵀ @ x`, a BLAS syrk: exactly symmetric), then rounded
once to float32. Measured on Qwen2.5-Coder-1.5B layer 1 down_proj (8192 tokens < 8960 features, so
H has a 768-dim null space; one outlier channel puts λmax at 3369 x mean(diag H)): the former
float32 accumulation inside jit gave a smallest eigenvalue of H / mean(diag) of -4.1e-4 (=
eps32 · λmax: a float32 sum cannot resolve the null space under such an outlier); float64
accumulation gives -2.7e-13 before and -3.5e-5 after the final float32 rounding (the
representation limit). Deterministic: a fixed summation order (batches in order, BLAS splits
only the output), independent of the dp mesh (the host sees the gathered rows).

Streaming: one decoder layer's weights are in memory at a time; the hidden states of all
calibration sequences ([N, T, H] float32) are kept between layers. Data parallel: with a mesh that
has a `dp` axis, every batch is sharded along `dp` (shard_map); the host gathers the rows.
Non-finite activations raise CalibrationError naming the layer and the linear.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from caldera_jax import linear as linear_lib
from caldera_jax.config import ModelConfig
from caldera_jax.families.base import ATTENTION_INPUT_GROUPS, DENSE_MLP_INPUT_GROUPS, EXPERT_INPUT_GROUPS
from caldera_jax.models.decoder import default_positions, representative_layer, standalone_layer
from caldera_jax.models.hooks import Ctx, Hooks
from caldera_jax.params import MemorySource


class CalibrationError(ValueError):
    """Bad calibration data or activations; the message names the layer (and file)."""


# ------------------------------------------------------------------ which Hessian each matrix uses
# linear (relative to the layer) -> Hessian group: the families' input groups (one table for all)
_GROUPS = dict(ATTENTION_INPUT_GROUPS + DENSE_MLP_INPUT_GROUPS + EXPERT_INPUT_GROUPS)
_LAYER_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(.+?)(?:\.weight)?$")


def hessian_key(name: str) -> str | None:
    """'model.layers.3.self_attn.k_proj.weight' -> 'model.layers.3.self_attn.qkv' (None: no Hessian)."""
    m = _LAYER_LINEAR.match(name)
    if not m or m[2] not in _GROUPS:
        return None
    return f"model.layers.{m[1]}.{_GROUPS[m[2]]}"


def hessian_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    H, nq = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    pre = f"model.layers.{i}."
    s = {pre + "self_attn.qkv": (H, H), pre + "self_attn.o_proj": (nq, nq)}
    if cfg.is_moe_layer(i):
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        s.update({pre + "mlp.experts.gate_up": (E, H, H), pre + "mlp.experts.down_proj": (E, I, I)})
    else:
        I = cfg.intermediate_size
        s.update({pre + "mlp.gate_up": (H, H), pre + "mlp.down_proj": (I, I)})
    return s


# ------------------------------------------------------------------ hooks (inside jit)
def _group(name: str) -> str | None:
    m = _LAYER_LINEAR.match(name)
    return _GROUPS.get(m[2]) if m else None


def gram64(x: np.ndarray) -> np.ndarray:
    """xᵀx in float64 for x [N, n] (any float dtype): numpy hands `a.T @ a` to BLAS syrk, so the
    result is exactly symmetric and, up to float64 rounding (~1e-16 relative), PSD."""
    x = np.asarray(x, np.float64)
    return x.T @ x


def _accumulating_linear(name, x, w, bias, aux):
    """Default linear, plus its (masked) input into aux (once per shared input): the host
    accumulates Σ m xᵀx from it in float64."""
    g = _group(name)
    if g is not None and g not in aux["X"]:
        m = aux["_mask"]                                             # [N] float32, 0 = padding
        x32 = x.astype(jnp.float32)
        if g.startswith("mlp.experts."):                             # x: [E, N, in]
            E = x.shape[0]
            routed = jnp.max(jax.nn.one_hot(aux["_routing"], E, dtype=jnp.float32), axis=1)  # [N, E]
            wgt = routed * m[:, None]                                # [N, E]
            aux["X"][g] = jnp.where(wgt[..., None] > 0, jnp.swapaxes(x32, 0, 1), 0.0)  # [N, E, in]
            aux["W"][g] = wgt
            aux["count"][g] = jnp.sum(wgt, axis=0)
            ok = jnp.isfinite(x32) | (wgt.T[..., None] == 0)
        else:
            x32 = x32.reshape(-1, x.shape[-1])                       # [N, in]
            aux["X"][g] = jnp.where(m[:, None] > 0, x32, 0.0)
            aux["count"][g] = jnp.sum(m)
            ok = jnp.isfinite(x32) | (m[:, None] == 0)
        aux["finite"][g] = jnp.all(ok)
    return linear_lib.apply(x, w, bias)


def _routing_tap(name, value, aux):
    if name.endswith(".mlp.routing"):
        aux["_routing"] = value[0]                                   # top-k expert ids [N, k]
    return value


COLLECT_HOOKS = Hooks(linear=_accumulating_linear, tap=_routing_tap)


def _layer_body(cfg: ModelConfig, rep: int, collect: bool, p, h, mask, positions):
    """One decoder layer on a batch; returns (h_out, X dict (masked linear inputs, token-major),
    W dict (experts: routed·mask weights [N, E]), count dict, finite dict)."""
    aux = {"_mask": mask.reshape(-1).astype(jnp.float32), "X": {}, "W": {}, "count": {}, "finite": {}}
    ctx = Ctx(COLLECT_HOOKS if collect else Hooks(), aux)
    out = standalone_layer(ctx, rep, p, cfg, h, mask, positions)
    return out, aux["X"], aux["W"], aux["count"], aux["finite"]


@functools.lru_cache(maxsize=None)
def _layer_fn(cfg: ModelConfig, rep: int, collect: bool, mesh):
    body = functools.partial(_layer_body, cfg, rep, collect)
    if mesh is None or "dp" not in mesh.axis_names:
        return jax.jit(body)

    def sharded(p, h, mask, positions):
        out, X, W, cnt, fin = body(p, h, mask, positions)
        cnt = jax.lax.psum(cnt, "dp")
        fin = jax.tree.map(lambda f: jax.lax.pmin(f.astype(jnp.int32), "dp") > 0, fin)
        return out, X, W, cnt, fin

    # X and W are token-major: their dp shards concatenate back in batch-row order
    return jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P("dp"), P("dp"), P("dp")),
                                 out_specs=(P("dp"), P("dp"), P("dp"), P(), P()), check_vma=False))


# ------------------------------------------------------------------ the streaming driver
class LayerStats(dict):
    """{hessian key: H (numpy float32)} with `.counts` {key: tokens (float, or [E] array)}."""

    def __init__(self, hessians: dict[str, np.ndarray], counts: dict[str, Any]):
        super().__init__(hessians)
        self.counts = counts


class Calibrator:
    """Holds the calibration hidden states between layers and runs one layer at a time.

    tokens [N, T] int and mask [N, T] (1 = real token). Batches of `batch_size` sequences; with a
    mesh that has a `dp` axis the batch is padded (with fully masked rows) to a multiple of dp and
    sharded along it. Every batch's layer input is kept as a jax array."""

    def __init__(self, source, tokens: np.ndarray, mask: np.ndarray | None = None, *,
                 batch_size: int = 8, mesh=None):
        self.cfg: ModelConfig = source.cfg
        tokens = np.asarray(tokens)
        mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask).astype(bool)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise CalibrationError(f"calibration tokens must be [N, T] with a mask of the same shape, "
                                   f"got {tokens.shape} and {mask.shape}")
        if not mask.any():
            raise CalibrationError("calibration data has no (unpadded) tokens")
        if tokens[mask].min() < 0 or tokens[mask].max() >= self.cfg.vocab_size:
            raise CalibrationError(f"calibration token ids outside [0, {self.cfg.vocab_size})")
        self.mesh = mesh
        dp = mesh.shape["dp"] if mesh is not None and "dp" in mesh.axis_names else 1
        bs = -(-batch_size // dp) * dp
        tokens = np.where(mask, tokens, 0)
        embed = np.asarray(source.read("model.embed_tokens.weight"), np.float32)
        self.batches: list[tuple[int, jax.Array, jax.Array]] = []  # (first row, mask, positions)
        self.h: list[jax.Array] = []
        for s in range(0, len(tokens), bs):
            tk, mk = tokens[s:s + bs], mask[s:s + bs]
            if len(tk) < bs:   # pad with fully masked rows (contribute nothing)
                pad = bs - len(tk)
                tk = np.concatenate([tk, np.zeros((pad, tk.shape[1]), tk.dtype)])
                mk = np.concatenate([mk, np.zeros((pad, mk.shape[1]), bool)])
            m = self._put(jnp.asarray(mk))
            self.batches.append((s, m, self._put(default_positions(m))))
            self.h.append(self._put(jnp.asarray(embed[tk])))
        self.tokens_total = int(mask.sum())

    def _put(self, x):
        if self.mesh is None or "dp" not in self.mesh.axis_names:
            return x
        return jax.device_put(x, NamedSharding(self.mesh, P("dp")))

    def run_layer(self, i: int, layer_params, collect: bool = True) -> tuple[LayerStats | None, list]:
        """Runs layer i (params relative to the layer; arrays or quantized leaves) on every batch.
        Returns (its LayerStats if collect, else None; the next hidden states)."""
        cfg = self.cfg
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32) if isinstance(a, np.ndarray) else a,
                         layer_params)
        fn = _layer_fn(cfg, representative_layer(cfg, i), collect, self.mesh)
        shapes = hessian_shapes(cfg, i)
        acc: dict[str, np.ndarray] = {}                   # float64 Σ m xᵀx
        cnt: dict[str, np.ndarray] = {}
        out = []

        def accumulate(b, start, mask, X, W, c, fin):
            for g, ok in fin.items():
                if not bool(ok):
                    raise CalibrationError(
                        f"non-finite activations (NaN/Inf) at the input of model.layers.{i}."
                        f"{g.replace('qkv', 'q_proj/k_proj/v_proj').replace('gate_up', 'gate_proj/up_proj')}"
                        f" (layer {i}), calibration batch {b} (sequences {start}..{start + len(mask) - 1})")
            rows = np.asarray(mask).reshape(-1)                # padding rows (all zero) are skipped
            for g in X:
                x = np.asarray(X[g])
                if g in W:                                     # experts: each its routed tokens
                    wgt = np.asarray(W[g])                     # [N, E]
                    grams = np.stack([gram64(x[wgt[:, e] > 0, e]) for e in range(x.shape[1])])
                else:
                    grams = gram64(x[rows])
                if g in acc:
                    acc[g] += grams
                    cnt[g] = cnt[g] + np.asarray(c[g], np.float64)
                else:
                    acc[g], cnt[g] = grams, np.asarray(c[g], np.float64)

        pending = None                     # one batch ahead: the device runs batch b+1 while the
        for b, ((start, mask, pos), h) in enumerate(zip(self.batches, self.h)):  # host sums batch b
            h2, X, W, c, fin = fn(p, h, mask, pos)
            out.append(h2)
            if not collect:
                continue
            if pending is not None:
                accumulate(*pending)
            pending = (b, start, mask, X, W, c, fin)
        if not collect:
            return None, out
        accumulate(*pending)
        del pending
        pre = f"model.layers.{i}."
        hess, counts = {}, {}
        for g in list(acc):
            key = pre + g
            a64 = acc.pop(g)
            a64 += np.swapaxes(a64, -1, -2)                    # exactly symmetric (syrk already is)
            a64 *= 0.5
            with np.errstate(over="ignore"):
                a = a64.astype(np.float32)
            del a64
            if not np.isfinite(a).all():
                raise CalibrationError(f"the Hessian of {key} (layer {i}) overflowed float32")
            if a.shape != shapes[key]:
                raise AssertionError(f"{key}: Hessian shape {a.shape} != {shapes[key]}")
            hess[key] = a
            c = cnt[g]
            counts[key] = c if c.ndim else float(c)
        return LayerStats(hess, counts), out

    def advance(self, h_next: list) -> None:
        """The next layer's inputs (from run_layer with original or compressed weights)."""
        self.h = h_next


def calibrate(source, tokens, mask=None, *, batch_size: int = 8, mesh=None) -> dict[str, LayerStats]:
    """Every layer's stats, streaming through the original layers (`source`: an open_source reader
    or (cfg, params))."""
    if isinstance(source, tuple):
        source = MemorySource(*source)
    cal = Calibrator(source, tokens, mask, batch_size=batch_size, mesh=mesh)
    out = {}
    for i in range(source.cfg.num_hidden_layers):
        out[i], h = cal.run_layer(i, source.read_layer(i))
        cal.advance(h)
    return out


# ------------------------------------------------------------------ calibration data
def _jsonl_text(path: str, ln: int, line: str, tokenizer) -> str:
    """One calibration .jsonl line -> its text: "text" as is, "messages" through the chat template."""
    from caldera_jax.data.chat import BadRecord, render_chat
    try:
        row = json.loads(line)
        if "text" in row:
            if not isinstance(row["text"], str):
                raise TypeError(f"\"text\" is {type(row['text']).__name__}, not a string")
            return row["text"]
        if "messages" in row:
            return render_chat(tokenizer, row["messages"])
        raise KeyError("neither \"text\" nor \"messages\"")
    except (json.JSONDecodeError, KeyError, TypeError, BadRecord) as e:
        raise CalibrationError(f"{path}: line {ln}: expected {{\"text\": ...}} or {{\"messages\": [...]}} "
                               f"({e!r})") from e


def calibration_tokens(path: str, tokenizer=None, *, samples: int, seq_len: int,
                       vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, seq_len] int32, mask [N, seq_len] bool) from a calibration file:

    - .txt: `samples` windows of seq_len tokens, from evenly spaced places in the text (each starts
      at a line start); no padding.
    - .jsonl: one sequence per line (first `samples` lines), truncated to seq_len and right-padded
      (mask 0): a "text" field as plain text, or a "messages" conversation (experiments.selfchat's
      rows) rendered with the tokenizer's chat template, system prompt and turn markers included.
    - .npy: an int array [N, T] of token ids (negative = padding); first `samples` rows, T cut to
      seq_len. Needs no tokenizer.
    Deterministic. Errors name the file."""
    if not os.path.isfile(path):
        raise CalibrationError(f"{path}: calibration file not found")
    if path.endswith(".npy"):
        a = np.load(path)
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
            raise CalibrationError(f"{path}: expected an integer array [N, T], got {a.dtype}{a.shape}")
        a = a[:samples, :seq_len]
        mask = a >= 0
        toks = np.where(mask, a, 0).astype(np.int32)
    else:
        if tokenizer is None:
            raise CalibrationError(f"{path}: text calibration data needs the model's tokenizer "
                                   f"(none found next to the model; pass token ids as .npy)")

        def enc(s: str) -> list[int]:
            return list(tokenizer(s, add_special_tokens=False)["input_ids"])

        if path.endswith(".jsonl"):
            docs = []
            with open(path, encoding="utf-8") as f:
                for ln, line in enumerate(f, 1):
                    if len(docs) >= samples:
                        break
                    if line.strip():
                        docs.append(_jsonl_text(path, ln, line, tokenizer))
            rows = [enc(d)[:seq_len] for d in docs]
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            rows = []
            span = len(text) / samples
            for k in range(samples):
                start = int(k * span)
                if k:
                    nl = text.find("\n", start)
                    start = nl + 1 if 0 <= nl < start + span else start
                chars = seq_len * 6
                while True:
                    ids = enc(text[start:start + chars])
                    if len(ids) > seq_len or start + chars >= len(text):
                        break
                    chars *= 2
                rows.append(ids[:seq_len])
        rows = [r for r in rows if r]
        if not rows:
            raise CalibrationError(f"{path}: no calibration text found")
        toks = np.zeros((len(rows), seq_len), np.int32)
        mask = np.zeros((len(rows), seq_len), bool)
        for r, ids in enumerate(rows):
            toks[r, :len(ids)], mask[r, :len(ids)] = ids, True
    if not mask.any():
        raise CalibrationError(f"{path}: no calibration tokens")
    if vocab_size is not None and toks[mask].max() >= vocab_size:
        raise CalibrationError(f"{path}: token id {int(toks[mask].max())} >= the model's vocab size {vocab_size}")
    return toks, mask
