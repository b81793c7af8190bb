"""Fine-tuning after decomposition: Q stays frozen in its packed codes; the low-rank factors L and R,
a per-row scale of Q and the RMSNorm weights are trained end to end, against the uncompressed
model's next-token distribution (KL distillation), then written back into the same formats, so the
checkpoint's bits/param do not change.

    ft = FinetuneConfig(steps=300, factors="ste")
    trainable, frozen = split(params, ft)              # params: a compressed model (QLRWeight leaves)
    model = assemble(trainable, frozen, ft)            # inside the loss: the trainable model
    loss_sum, tokens, metrics = distill_loss(model, teacher, cfg, batch, ft)
    new_params = finalize(trainable, params, ft)       # QLRWeight leaves again, same formats

What is trained, per compressed matrix W = scale · T_outᵀ (Q + L·R) T_in (T: the incoherence
rotations, fixed):
    l [(E,) m, r], r [(E,) r, n]   float32 copies of the dequantized factors;
    row_scale [(E,) m]             multiplies Q's rows (init 1); folded into Q's stored per-row /
                                   per-group scales (and zero points) at the end: Q's codes are
                                   bit-identical before and after. Only for kinds whose scales are
                                   float16 (uniform, e8p): fp4's e4m3 scales would round.
and every `*norm.weight` (input / post-attention layer norms, the final norm).

factors = "requant": L, R trained in float, rounded to their format once at the end (round to
nearest with the format's own fit). "ste": quantization-aware: the forward pass uses L, R rounded
to their format, the gradient passes straight through (L + stop_gradient(round(L) − L)), so the
final rounding changes nothing the loss has not seen. Factors kept at 16 bits (bf16) are trained
as floats either way and stored in bf16.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from caldera_jax.config import ModelConfig
from caldera_jax.formats import incoherence, packing, quant
from caldera_jax.formats.qlr_weight import QLRWeight
from caldera_jax.models.decoder import forward
from caldera_jax.params import Params, flatten, unflatten

FACTOR_MODES = ("requant", "ste")
ROW_SCALE_KINDS = ("uniform", "e8p")         # kinds whose scales are float16, so a fold is exact to fp16


class FinetuneError(ValueError):
    """A setting or a model fine-tuning cannot use; the message names the field."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Every setting that decides the fine-tuned checkpoint's bytes."""
    steps: int = 150
    batch: int = 4                  # windows per micro-batch
    accum: int = 1                  # micro-batches per optimizer step
    seq_len: int = 256
    samples: int = 800              # distinct calibration windows for training
    val_samples: int = 8            # further windows of the calibration text, never trained on
    lr: float = 1e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    factors: str = "ste"            # "requant" | "ste" (see the module docstring)
    train_row_scales: bool = True
    train_norms: bool = True
    temperature: float = 1.0        # of both distributions in the KL
    val_every: int = 25
    ckpt_every: int = 25
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FinetuneError(f"unknown finetune setting(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v, typ = d[f.name], type(f.default)
            if typ is float and isinstance(v, str):       # YAML reads 1e-3 (no dot) as a string
                try:
                    v = float(v)
                except ValueError:
                    pass
            if typ is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise FinetuneError(f"finetune.{f.name}={v!r}: must be {typ.__name__}")
            kw[f.name] = v
        return cls(**kw).check()

    def check(self) -> "FinetuneConfig":
        for n in ("steps", "batch", "accum", "seq_len", "samples", "val_samples", "val_every", "ckpt_every"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise FinetuneError(f"finetune.{n}={v!r}: must be an integer >= 1")
        if self.seq_len < 2:
            raise FinetuneError(f"finetune.seq_len={self.seq_len}: a window needs at least 2 tokens")
        for n in ("lr", "temperature", "clip_norm"):
            if not getattr(self, n) > 0:
                raise FinetuneError(f"finetune.{n}={getattr(self, n)!r}: must be > 0")
        if not self.weight_decay >= 0:
            raise FinetuneError(f"finetune.weight_decay={self.weight_decay!r}: must be >= 0")
        if not 0 <= self.warmup_frac < 1:
            raise FinetuneError(f"finetune.warmup_frac={self.warmup_frac!r}: must be in [0, 1)")
        if self.factors not in FACTOR_MODES:
            raise FinetuneError(f"finetune.factors={self.factors!r}: must be one of {', '.join(FACTOR_MODES)}")
        return self


# ------------------------------------------------------------------ the trainable weight
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainableQLR:
    """A compressed matrix during fine-tuning, applied as scale · T_out(T_in(x)·(diag(row_scale)·Q
    + L·R)ᵀ) in float32 (caldera_jax.linear.apply calls `apply`). q0: Q dequantized [(E,) m, n];
    signs: ±1 float32 or None."""
    q0: jax.Array
    row_scale: jax.Array
    l: jax.Array | None
    r: jax.Array | None
    scale: jax.Array
    signs_in: jax.Array | None
    signs_out: jax.Array | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q0.shape[-2:])

    def apply(self, x: jax.Array) -> jax.Array:
        if self.q0.ndim == 3:                            # stacked experts: x [E, ..., n]
            return jax.vmap(lambda xe, we: we.apply(xe))(x, self)
        u = x.astype(jnp.float32)
        if self.signs_in is not None:
            u = incoherence.transform_in(u, self.signs_in)
        # the row scale on Q's outputs, not on Q: its gradient is then a reduction over tokens,
        # not a weight-sized product per step
        y = jnp.einsum("...k,ok->...o", u, self.q0) * self.row_scale
        if self.l is not None:
            y = y + jnp.einsum("...r,or->...o", jnp.einsum("...k,rk->...r", u, self.r), self.l)
        if self.signs_out is not None:
            y = incoherence.transform_out(y, self.signs_out)
        return (y * self.scale).astype(x.dtype)


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _fake_quant(f: jax.Array, fmt: packing.PackedFormat) -> jax.Array:
    """f rounded to fmt (nearest, the format's own fit), as float32; the gradient passes through."""
    if fmt.kind == packing.DENSE:
        return f
    fq = (jax.vmap(lambda a: quant.dequantize(quant.quantize(a, fmt.spec)))(f) if f.ndim == 3
          else quant.dequantize(quant.quantize(f, fmt.spec)))
    return f + jax.lax.stop_gradient(fq - f)


def split(params: Params, ft: FinetuneConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen), both flat {canonical name: …}. trainable[name] = {"l", "r",
    ("row_scale")} for every QLRWeight, the array for every norm (ft.train_norms); frozen holds
    every other leaf as it is, and for a QLRWeight {"q0", "scale", "signs_in", "signs_out"} plus
    its formats (static, "fmt_l"/"fmt_r") through the original weight ("w")."""
    ft.check()
    trainable: dict[str, Any] = {}
    frozen: dict[str, Any] = {}
    for name, leaf in flatten(params).items():
        if isinstance(leaf, QLRWeight):
            so, si = leaf.signs()
            t = {}
            if leaf.l is not None:
                t["l"] = packing.dequantize(leaf.l).astype(jnp.float32)
                t["r"] = packing.dequantize(leaf.r).astype(jnp.float32)
            if ft.train_row_scales and leaf.q.fmt.kind in ROW_SCALE_KINDS:
                t["row_scale"] = jnp.ones(leaf.q.codes.shape[:-1], jnp.float32)
            trainable[name] = t
            frozen[name] = {"q0": packing.dequantize(leaf.q).astype(jnp.float32), "scale": leaf.scale,
                            "signs_in": si, "signs_out": so}
        elif ft.train_norms and _is_norm(name):
            trainable[name] = jnp.asarray(leaf, jnp.float32)
        else:
            frozen[name] = leaf
    if not any(isinstance(v, dict) for v in trainable.values()):
        raise FinetuneError("the model has no compressed (QLRWeight) matrices: nothing to fine-tune")
    return trainable, frozen


def factor_formats(params: Params) -> dict[str, tuple[packing.PackedFormat, packing.PackedFormat] | None]:
    """name -> (L's format, R's format) of every QLRWeight (None: rank 0); static, for `assemble`."""
    return {n: (None if w.l is None else (w.l.fmt, w.r.fmt)) for n, w in flatten(params).items()
            if isinstance(w, QLRWeight)}


def assemble(trainable: dict[str, Any], frozen: dict[str, Any], ft: FinetuneConfig,
             formats: dict[str, Any]) -> Params:
    """The model's parameter tree for a forward pass: every compressed matrix a TrainableQLR
    (with L, R rounded to their formats under ft.factors == "ste"), norms from `trainable`."""
    flat = dict(frozen)
    for name, t in trainable.items():
        if not isinstance(t, dict):
            flat[name] = t
            continue
        f = frozen[name]
        l, r = t.get("l"), t.get("r")
        if l is not None and ft.factors == "ste":
            fl, fr = formats[name]
            l, r = _fake_quant(l, fl), _fake_quant(r, fr)
        rs = t.get("row_scale", jnp.ones(f["q0"].shape[:-1], jnp.float32))
        flat[name] = TrainableQLR(f["q0"], rs, l, r, f["scale"], f["signs_in"], f["signs_out"])
    return unflatten(flat)


def distill_loss(student: Params, teacher: Params, cfg: ModelConfig, batch: dict, ft: FinetuneConfig):
    """KL(teacher ‖ student) of next-token distributions, summed over the real positions of
    batch["input_ids"] [B, T] (attention_mask [B, T]; the last position predicts nothing) ->
    (KL sum, positions, {"nll": the student's next-token NLL sum, "teacher_nll": the teacher's})."""
    tokens, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
    s_logits = forward(student, cfg, tokens, mask)[:, :-1].astype(jnp.float32)
    t_logits = jax.lax.stop_gradient(forward(teacher, cfg, tokens, mask)[:, :-1].astype(jnp.float32))
    ok = mask[:, 1:] & mask[:, :-1]
    t_logp = jax.nn.log_softmax(t_logits / ft.temperature, axis=-1)
    s_logp = jax.nn.log_softmax(s_logits / ft.temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    nxt = tokens[:, 1:, None]
    s_nll = -jnp.take_along_axis(jax.nn.log_softmax(s_logits, axis=-1), nxt, axis=-1)[..., 0]
    t_nll = -jnp.take_along_axis(jax.nn.log_softmax(t_logits, axis=-1), nxt, axis=-1)[..., 0]
    z = lambda a: jnp.sum(jnp.where(ok, a, 0.0))          # noqa: E731
    return z(kl), jnp.sum(ok).astype(jnp.float32), {"nll": z(s_nll), "teacher_nll": z(t_nll)}


# ------------------------------------------------------------------ back to the stored formats
def _requantized(f: jax.Array, like: packing.PackedMatrix) -> packing.PackedMatrix:
    """Float factor f in `like`'s format (nearest rounding, the format's fit; dense: cast)."""
    fmt = like.fmt
    if fmt.kind == packing.DENSE:
        return packing.PackedMatrix(f.astype(like.codes.dtype), None, None, None, fmt)
    one = lambda a: packing.pack(quant.quantize(a, fmt.spec))   # noqa: E731
    if f.ndim == 3:
        parts = [one(f[e]) for e in range(f.shape[0])]
        return jax.tree.map(lambda *a: jnp.stack(a), *parts)
    return one(f)


def _with_row_scale(pm: packing.PackedMatrix, row_scale: jax.Array) -> packing.PackedMatrix:
    """Q with its rows multiplied by row_scale [(E,) m]: scales (and zero points) per row / group
    scaled, in their stored dtype; codes untouched."""
    rs = row_scale[..., :, None]
    scale = lambda a: None if a is None else (a.astype(jnp.float32) * rs).astype(a.dtype)   # noqa: E731
    return dataclasses.replace(pm, scales=scale(pm.scales), zeros=scale(pm.zeros))


def finalize(trainable: dict[str, Any], params: Params, ft: FinetuneConfig) -> Params:
    """The compressed model with the trained values written into the original formats: every
    QLRWeight keeps Q's codes, its signs, scale and formats; L, R re-quantized; row scales folded;
    norms in their original dtype."""
    flat = flatten(params)
    out = dict(flat)
    for name, t in trainable.items():
        w = flat[name]
        if not isinstance(t, dict):
            out[name] = jnp.asarray(t).astype(w.dtype)
            continue
        q = w.q if "row_scale" not in t else _with_row_scale(w.q, t["row_scale"])
        l = r = None
        if w.l is not None:
            l, r = _requantized(t["l"], w.l), _requantized(t["r"], w.r)
        out[name] = dataclasses.replace(w, q=q, l=l, r=r)
    return unflatten(out)
