"""The quantizer registry: the one list of built-in kinds. Adding a quantizer = one module
(its Quantizer entry, see base.py) + one line here.

    registry.KINDS               ("uniform", "e8p", "fp4")
    registry.get(kind).bits      the widths a kind allows (MatrixBudget.validate and QuantSpec ask)
    registry.FACTOR_BITS         widths of L and R: the uniform quantizer's, or 16 (bf16, unquantized)
"""
from __future__ import annotations

from caldera_jax.formats import e8p, fp4, uniform
from caldera_jax.formats.base import get, kinds, register  # noqa: F401  (the registry's API)

BUILTIN = (uniform.QUANTIZER, e8p.QUANTIZER, fp4.QUANTIZER)
for _q in BUILTIN:
    register(_q)

KINDS = kinds()
FACTOR_KIND = uniform.KIND                     # L and R are always groupwise uniform
FACTOR_BITS = uniform.BITS + (16,)             # 16: L and R kept in bf16 (not quantized)


def bits(kind: str) -> tuple[int, ...]:
    return get(kind).bits
