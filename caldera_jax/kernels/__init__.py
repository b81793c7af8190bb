"""Kernels for quantized low-rank linears; `qlr_linear` dispatches to a backend."""
from caldera_jax.kernels.qlr import qlr_linear, register_backend  # noqa: F401
