"""How a Pallas kernel is lowered, shared by qlr_pallas.py and hadamard.py (the one flag between
CPU-interpret and the GPU Triton lowering)."""
from __future__ import annotations

import jax
from jax.experimental.pallas import triton as plgpu


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> interpret everywhere but on a GPU."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 3):
    """None in interpret mode; on a GPU `plgpu.CompilerParams`, which selects Pallas' Triton lowering."""
    if interpret:
        return None
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
