"""Quantizers for CALDERA's Q, L and R: groupwise uniform and the E8P lattice codebook (QuIP#).

The API (see base.py): QuantSpec, QuantParams, QuantizedMatrix, fit, round_block, quantize,
dequantize, assemble, pad_cols, padded_n. The packed storage layout is in packing.py.
"""
from caldera_jax.caldera.quant.base import (  # noqa: F401
    QuantParams, QuantSpec, QuantizedMatrix, assemble, dequantize, fit, n_groups, pad_cols,
    padded_n, quantize, round_block)
