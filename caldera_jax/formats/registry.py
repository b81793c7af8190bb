"""The quantizer registry: the one list of built-in kinds. Adding a quantizer = one module
(its Quantizer entry, see base.py) + one line here.

    registry.KINDS               ("uniform", "e8p", "fp4")
    registry.get(kind).bits      the widths a kind allows (MatrixBudget.validate and QuantSpec ask)
    registry.FACTOR_KINDS        kinds L and R may use: "uniform" (the default) and "e8p"
    registry.factor_bits(kind)   widths of L and R in that kind, or 16 (bf16, unquantized)
"""
from __future__ import annotations

from caldera_jax.formats import e8p, fp4, uniform
from caldera_jax.formats.base import get, kinds, register  # noqa: F401  (the registry's API)

BUILTIN = (uniform.QUANTIZER, e8p.QUANTIZER, fp4.QUANTIZER)
for _q in BUILTIN:
    register(_q)

KINDS = kinds()
FACTOR_KIND = uniform.KIND                     # L and R by default: groupwise uniform
FACTOR_KINDS = (uniform.KIND, e8p.KIND)        # e8p: the lattice codebook (MatrixBudget.factor_quantizer)
FACTOR_BITS = uniform.BITS + (16,)             # 16: L and R kept in bf16 (not quantized)


def factor_bits(kind: str = FACTOR_KIND) -> tuple[int, ...]:
    """Widths L and R may have with factors of `kind` (16: bf16, not quantized)."""
    return get(kind).bits + (16,)


def bits(kind: str) -> tuple[int, ...]:
    return get(kind).bits
