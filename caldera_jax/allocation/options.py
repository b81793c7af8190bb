"""The choices for one matrix and what each costs, counted exactly from the packed format.

An Option is (b_q, rank) over a base MatrixBudget (quantizer, factor bits, group sizes, ... kept),
or protection (kept in bf16: 16 bits per parameter, no error). Costs are integer bits of every stored
array of the compressed matrix (codes, scales, factors, signs, global scale: QLRWeight.nbytes · 8),
computed from shapes only (caldera.decompose.bits_per_param, jax.eval_shape).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

from caldera_jax.caldera.decompose import bits_per_param
from caldera_jax.caldera.spec import BudgetError, MatrixBudget
from caldera_jax.formats import incoherence

PROTECT_BITS = 16          # a protected matrix is stored in bf16


class GridError(ValueError):
    """A grid / option specification that cannot be used; the message names the field."""


@dataclasses.dataclass(frozen=True, order=True)
class Option:
    """b_q: bits of Q (None: protected, kept in bf16); rank: of L·R (0: Q only)."""
    b_q: int | None
    rank: int = 0

    @property
    def protected(self) -> bool:
        return self.b_q is None

    @property
    def label(self) -> str:
        return "bf16" if self.protected else f"b{self.b_q}r{self.rank}"


PROTECT = Option(None, 0)


def proj_of(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj' (experts: 'experts.gate_proj')."""
    m = re.match(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.(.+?)(?:\.weight)?$", name)
    return m[1] if m else name


def parse_grid(spec: str | Sequence[str]) -> dict[str, tuple[int, ...]]:
    """'bits=2,3,4 rank=0,32,64' (or the two parts as a list) -> {'bits': (2, 3, 4), 'rank': (0, 32, 64)}."""
    parts = spec.split() if isinstance(spec, str) else list(spec)
    out: dict[str, tuple[int, ...]] = {}
    for p in parts:
        key, _, vals = p.partition("=")
        if key not in ("bits", "rank") or not vals or key in out:
            raise GridError(f"--grid {' '.join(parts)!r}: expected 'bits=B1,B2,.. rank=R1,R2,..', got {p!r}")
        try:
            v = tuple(sorted({int(x) for x in vals.split(",") if x.strip()}))
        except ValueError:
            raise GridError(f"--grid: {key}={vals!r} must be comma-separated integers") from None
        if not v or min(v) < 0:
            raise GridError(f"--grid: {key}={vals!r} must be non-negative integers")
        out[key] = v
    for k in ("bits", "rank"):
        if k not in out:
            raise GridError(f"--grid {' '.join(parts)!r}: missing '{k}=...'")
    return out


def grid_options(bits: Iterable[int], ranks: Iterable[int]) -> tuple[Option, ...]:
    return tuple(Option(int(b), int(r)) for b in sorted(set(bits)) for r in sorted(set(ranks)))


def budget_of(base: MatrixBudget, opt: Option) -> MatrixBudget:
    """The MatrixBudget of a (non-protected) option over the matrix's base budget."""
    return base.replace(b_q=opt.b_q, rank=opt.rank)


def is_feasible(base: MatrixBudget, opt: Option, shape: tuple[int, ...]) -> bool:
    """The option is a valid budget for a matrix of `shape` ([m, n] or [E, m, n])."""
    if opt.protected:
        return True
    m, n = shape[-2:]
    try:
        budget_of(base, opt).validate((m, n))
    except BudgetError:
        return False
    return not base.incoherence or (incoherence.is_supported(int(m)) and incoherence.is_supported(int(n)))


def cost_bits(base: MatrixBudget, opt: Option, shape: tuple[int, ...]) -> int:
    """Exact stored bits of the matrix ([m, n], or [E, m, n]: E times one expert) under `opt`."""
    m, n = (int(x) for x in shape[-2:])
    e = int(shape[0]) if len(shape) == 3 else 1
    if opt.protected:
        return PROTECT_BITS * e * m * n
    bpp = bits_per_param(budget_of(base, opt), (m, n))          # 8·nbytes / (m·n)
    return e * int(round(bpp * m * n))


def params_of(shape: Sequence[int]) -> int:
    return int(math.prod(shape))
