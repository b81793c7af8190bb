"""The quantizer registry's entry type and its storage (the bottom of the format layer).

One `Quantizer` per kind ("uniform", "e8p", "fp4", ...) owns everything a kind means:

    kind, bits (allowed widths), block (LDLQ block width = column padding unit), vector (columns
    per code entry), code_ndim, normalize (fields the kind fixes, e.g. group_size)
    fit / round_block / dequantize                      the unpacked quantizer (QuantizedMatrix)
    ldlq_params / ldlq_round                            the fast rounding LDLQ calls per block
    pack / unpack / array_specs / theoretical_bits      its packed layout (PackedMatrix slots)
    kernel_id, code_chunk                               what the kernels dispatch on
    format_key / parse_key / random_packed              the short format names (select table,
                                                        benchmarks) and random codes for tests

Entries are registered by formats/registry.py (the list of built-in kinds); everything else asks
`get(kind)`. Importing any module of caldera_jax.formats runs the package __init__, which imports
registry.py first, so the registry is complete before any QuantSpec can be built.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True, eq=False)
class Quantizer:
    """One registry entry (see the module docstring). Hooks are plain functions:

    normalize(spec) -> dict           fields of QuantSpec this kind fixes ({} if none)
    fit(w [m, n] f32, spec) -> QuantParams
    round_block(w_block [m, b], params, col0, spec) -> (ŵ_block, codes_block)
    dequantize(qm) -> [..., m, n] f32
    ldlq_params(params) -> pytree of per-row arrays (leading axis m)
    ldlq_round(block [rows, g], col0, prm, spec, n) -> (ŵ_block, codes_block)
    pack(qm) -> PackedMatrix;  unpack(pm) -> QuantizedMatrix
    array_specs(fmt) -> {slot: None | (allowed dtype names, per-matrix shape)}
    theoretical_bits(fmt) -> bits per weight for n a multiple of every chunk / group
    code_chunk(fmt) -> columns per independently addressable unit of the packed codes
    format_key(fmt) -> short name ("u4g64a", "e8p2", "fp4");  parse_key(s) -> PackedFormat
    fields dict or None;  random_packed(rng, fmt, magnitude) -> PackedMatrix (every code valid)
    """
    kind: str
    bits: tuple[int, ...]
    block: int
    vector: int
    code_ndim: int
    kernel_id: int
    normalize: Callable[[Any], dict]
    fit: Callable
    round_block: Callable
    dequantize: Callable
    ldlq_params: Callable
    ldlq_round: Callable
    pack: Callable
    unpack: Callable
    array_specs: Callable
    theoretical_bits: Callable
    code_chunk: Callable
    format_key: Callable
    parse_key: Callable
    random_packed: Callable


_REGISTRY: dict[str, Quantizer] = {}


def register(q: Quantizer) -> Quantizer:
    if q.kind in _REGISTRY and _REGISTRY[q.kind] is not q:
        raise ValueError(f"quantizer kind {q.kind!r} is already registered")
    _REGISTRY[q.kind] = q
    return q


def kinds() -> tuple[str, ...]:
    """The registered quantizer kinds, in registration order."""
    return tuple(_REGISTRY)


def get(kind: str) -> Quantizer:
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantizer kind {kind!r} (registered: {kinds()})") from None
