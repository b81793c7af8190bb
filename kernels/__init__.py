"""Kernels for quantized low-rank linears; `qlr_linear` dispatches to a backend."""
from kernels.qlr import qlr_linear, register_backend  # noqa: F401
