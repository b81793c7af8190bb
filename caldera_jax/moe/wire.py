"""Bytes on the wire, read from the compiled HLO's collectives.

    text = compiled_hlo(fn, *args)                # jax.jit(fn).lower(*args).compile().as_text()
    ops = collectives(text)                        # every all-to-all / all-gather / ... instruction
    by = bytes_by_scope(ops, layer=3)              # {"moe_dispatch": bytes, "moe_combine": ..., ...}

Each `Collective` carries the per-device operand bytes (what one device hands to the collective)
and `sent_bytes`, the part that leaves the device: all-to-all (g-1)/g of the operand, all-gather
(g-1) x the operand (every peer gets a copy), for a replica group of g devices. The scope is the
`moe_*` named scope the instruction was traced in (caldera_jax.moe.dispatch / ep), "other" when none.

The EP layer bitcasts float payloads to same-width unsigned integers before the collective, so
these byte counts are the payload's real width on every backend (XLA:CPU would otherwise widen
bf16 and fp8 collectives to f32/f16). Async GPU forms (`all-to-all-start` …) are read as the
tuple of their operands (first half of the result tuple); not checked on a GPU yet.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import jax

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                 "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5, "u4": 0.5}
KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute",
         "ragged-all-to-all")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<result>.+?)\s+(?P<op>" +
                    "|".join(re.escape(k) for k in sorted(KINDS, key=len, reverse=True)) +
                    r")(?P<start>-start)?\(")
_TYPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_SCOPE = re.compile(r'op_name="[^"]*?\b(moe_(?!layer)\w+)/')
_LAYER = re.compile(r'op_name="[^"]*?\bmoe_layer(\d+)/')
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str                      # "all-to-all", "all-gather", ...
    scope: str                     # "moe_dispatch", "moe_combine", "moe_stale", "moe_token_ids", … or "other"
    dtypes: tuple[str, ...]        # element types of the operands
    shapes: tuple[tuple[int, ...], ...]
    operand_bytes: float           # per device
    group_size: int
    layer: int | None = None       # decoder layer (the EP layer's "moe_layer{i}" scope)

    @property
    def sent_bytes(self) -> float:
        """Bytes leaving one device."""
        g = self.group_size
        if self.kind == "all-gather":
            return self.operand_bytes * (g - 1)
        if self.kind in ("all-to-all", "ragged-all-to-all"):
            return self.operand_bytes * (g - 1) / g
        return self.operand_bytes


def _elem_bytes(dtype: str) -> float:
    if dtype.startswith("f8"):
        return 1
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return ELEMENT_BYTES[dtype]


def _group_size(line: str) -> int:
    m = _GROUPS_LIST.search(line)
    if m:
        return len([v for v in m.group(1).split(",") if v])
    m = _GROUPS_IOTA.search(line)
    return int(m.group(2)) if m else 1


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of a compiled HLO module, with its per-device operand bytes."""
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        types = [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _TYPE.findall(m.group("result"))]
        if m.group("start"):
            types = types[: max(1, len(types) // 2)]
        nbytes = sum(_elem_bytes(t) * _prod(s) for t, s in types)
        g = _group_size(line)
        kind = m.group("op")
        if kind == "all-gather":
            nbytes /= max(g, 1)          # the result holds g operands
        scope, layer = _SCOPE.search(line), _LAYER.search(line)
        out.append(Collective(kind, scope.group(1) if scope else "other", tuple(t for t, _ in types),
                              tuple(s for _, s in types), nbytes, g, int(layer.group(1)) if layer else None))
    return out


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bytes_by_scope(ops: list[Collective], *, layer: int | None = None, sent: bool = False) -> dict[str, float]:
    """Total per-device operand bytes (or bytes leaving the device) per scope, of one decoder
    layer's collectives when `layer` is given."""
    acc: dict[str, float] = defaultdict(float)
    for op in ops:
        if layer is not None and op.layer != layer:
            continue
        acc[op.scope] += op.sent_bytes if sent else op.operand_bytes
    return dict(acc)


def compiled_hlo(fn, *args, **kwargs) -> str:
    """The optimized HLO text of jax.jit(fn) for these arguments (compiles, does not run)."""
    return jax.jit(fn, **kwargs).lower(*args).compile().as_text()
