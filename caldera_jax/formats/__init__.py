"""The format layer: how a matrix is quantized, packed and stored, under both the decomposition
(caldera_jax.caldera) and the kernels (caldera_jax.kernels). Imports nothing above it.

    registry.py   the quantizer kinds (uniform, e8p, fp4): one Quantizer entry per kind (base.py)
    quant.py      QuantSpec, QuantParams, QuantizedMatrix; fit / round_block / quantize /
                  dequantize / assemble dispatching on the kind; ldlq_params / ldlq_round
    packing.py    PackedFormat, PackedMatrix; pack / unpack / dequantize / accounting; bitpack.py
    uniform.py, e8p.py, fp4.py   the quantizers (math, packed layout, LDLQ rounding, random codes)
    incoherence.py  the Hadamard rotation T(s) the stored weight is defined with
    qlr_weight.py   QLRWeight: W = scale · T_outᵀ (Q + L·R) T_in, the stored compressed linear
"""
from caldera_jax.formats import registry  # noqa: F401  (first: fills the registry)
from caldera_jax.formats.packing import PackedFormat, PackedMatrix  # noqa: F401
from caldera_jax.formats.qlr_weight import QLRWeight  # noqa: F401
from caldera_jax.formats.quant import (  # noqa: F401
    QuantParams, QuantSpec, QuantizedMatrix, assemble, dequantize, fit, n_groups, pad_cols, padded_n,
    quantize, round_block)
