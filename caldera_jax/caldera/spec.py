"""MatrixBudget: how one matrix is compressed (after the job config's pattern overrides).

Shared by the decomposition (caldera_jax.caldera.decompose), the job config (YAML) and the
compressed checkpoint. Frozen and hashable, so it can be a jit static argument.
"""
from __future__ import annotations

import dataclasses

from caldera_jax.formats import registry


class BudgetError(ValueError):
    """An impossible budget (rank, bits, group size); the message names the field."""


@dataclasses.dataclass(frozen=True)
class MatrixBudget:
    b_q: int = 2                 # bits of Q
    quantizer: str = "e8p"       # Q quantizer: a registered kind (formats.registry.KINDS): "uniform"
                                 # (groupwise scalar), "e8p" (E8 lattice), "fp4" (NVFP4-like)
    b_l: int = 4                 # bits of L [m, rank]; 16 = bf16
    b_r: int = 4                 # bits of R [rank, n]; 16 = bf16
    rank: int = 64               # 0 = Q only
    group_size: int = 64         # uniform: consecutive input columns sharing a scale (e8p, fp4: fixed)
    symmetric: bool = True       # uniform: symmetric (absmax) or asymmetric (zero point)
    factor_group_size: int = 64  # uniform quantization of L and R
    factor_quantizer: str = "uniform"   # L and R: "uniform" (groupwise scalar) or "e8p" (E8 lattice,
                                 # + a residual stage at 3-4 bits, as the reference CALDERA's factors)
    iters: int = 5               # outer alternations (LR step, Q step)
    lplr_iters: int = 10         # alternating quantized-L/R rounds inside one LR step
    requant_sweeps: int = 10     # LDLQ re-quantization sweeps inside one Q step
    order: str = "q_first"       # "q_first" or "lr_first" (q_first: lower H-error and perplexity on
                                 # SmolLM2 at E8P 2-bit and uniform 3-bit, BENCHMARKS.md)
    incoherence: bool = True     # random signs + Walsh-Hadamard on both sides
    hessian_downdate: bool = True    # LDLQ on H with the low-rank subspace projected out (acts from
                                 # the second outer iteration; with q_first the best long schedule)
    sigma_reg: float = 1e-2      # H <- H / mean(diag H) + sigma_reg * I
    seed: int = 0                # incoherence signs / randomized parts

    def validate(self, shape: tuple[int, int] | None = None, where: str = "budget") -> "MatrixBudget":
        """Raises BudgetError naming `where` and the field; returns self."""
        def bad(field, msg):
            raise BudgetError(f"{where}: {field}={getattr(self, field)!r} {msg}")
        if self.quantizer not in registry.KINDS:
            bad("quantizer", f"is not one of {registry.KINDS}")
        allowed = registry.bits(self.quantizer)
        if self.b_q not in allowed:
            bad("b_q", f"is not supported by the {self.quantizer} quantizer (allowed: {allowed})")
        if self.factor_quantizer not in registry.FACTOR_KINDS:
            bad("factor_quantizer", f"is not one of {registry.FACTOR_KINDS}")
        for f in ("b_l", "b_r"):
            if getattr(self, f) not in registry.factor_bits(self.factor_quantizer):
                bad(f, f"must be one of {registry.factor_bits(self.factor_quantizer)} "
                       f"({self.factor_quantizer} factors; 16 = bf16)")
        for f in ("group_size", "factor_group_size"):
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")
        for f in ("rank", "lplr_iters", "requant_sweeps"):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if self.iters < 1:
            bad("iters", "must be >= 1 (each iteration is one LR step and one Q step)")
        if self.order not in ("lr_first", "q_first"):
            bad("order", "must be 'lr_first' or 'q_first'")
        if not self.sigma_reg >= 0:
            bad("sigma_reg", "must be >= 0")
        if shape is not None and self.rank > min(shape):
            bad("rank", f"exceeds min(m, n) = {min(shape)} of the {shape[0]}x{shape[1]} matrix")
        return self

    def replace(self, **kw) -> "MatrixBudget":
        return dataclasses.replace(self, **kw)
