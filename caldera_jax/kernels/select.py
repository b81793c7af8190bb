"""Backend choice for qlr_linear(..., backend="auto").

    choose(x, w) -> "xla" | "pallas" | "triton"

This is what "auto" means; nothing here reads the environment. To force a backend, pass it:
qlr_linear(x, w, backend=name), or set it on the weight (QLRWeight.with_backend(name), or
caldera_jax.linear.with_backend(params, name) for every QLRWeight of a parameter tree).

Rules, in order:
  1. Not on a GPU -> "xla" (Pallas runs there only in interpret mode: correct, far too slow).
  2. On a GPU: the measured table (qlr_select.json beside this file; bench/qlr_linear.py --write-table
     writes it) is looked up for this device kind and format key; among the entries of the nearest
     shape (log m·n) the nearest row count (log rows) wins, and its fastest *available* backend is
     used. Only backends that passed the benchmark's correctness check are ever recorded.
  3. No measurement for this device / format -> "xla": the kernels have not been timed (or checked)
     on that device, and the dequantize+matmul path is correct everywhere. This is the sane default
     until a GPU run fills the table; it is a deliberate, safe one, not the fast one.

Table format:  {"entries": [{"device": "NVIDIA H100 80GB HBM3", "format": "e8p2+u4r64",
                              "m": 4096, "n": 4096, "rows": 1, "us": {"xla": 41.0, "pallas": 9.1}}]}
"""
from __future__ import annotations

import functools
import json
import math
import pathlib

import jax

from caldera_jax.formats import packing

TABLE_PATH = pathlib.Path(__file__).with_name("qlr_select.json")


def format_key(w) -> str:
    """e.g. "e8p2+u4g64r64", "u3g128", "u4g64a+bf16r32" (a: asymmetric), "fp4": packing.format_key
    of Q, then of the factors, and the rank."""
    key = packing.format_key(w.q.fmt)
    if w.l is not None:
        key += f"+{packing.format_key(w.l.fmt)}r{w.rank}"
    return key


def device_kind() -> str:
    d = jax.devices()[0]
    return d.device_kind if d.platform == "gpu" else d.platform


def available(name: str) -> tuple[bool, str]:
    """(usable here at full speed, reason if not)."""
    plat = jax.default_backend()
    if name == "xla":
        return True, ""
    if name == "pallas":
        if plat != "gpu":
            return False, f"pallas compiles for GPU only; on {plat} it runs in interpret mode (tests only)"
        return True, ""
    if name == "triton":
        from caldera_jax.kernels import qlr_triton      # heavy, optional: only when asked (see qlr.py)
        return qlr_triton.available()
    return False, f"unknown backend {name!r}"


@functools.lru_cache(maxsize=4)
def _load_table(path: str, mtime: float) -> tuple[dict, ...]:
    with open(path) as f:
        return tuple(json.load(f).get("entries", []))


def table(path: pathlib.Path | str = TABLE_PATH) -> tuple[dict, ...]:
    p = pathlib.Path(path)
    if not p.exists():
        return ()
    return _load_table(str(p), p.stat().st_mtime)


def lookup(device: str, fmt: str, m: int, n: int, rows: int, entries=None) -> dict | None:
    """The nearest measured entry (same device and format; nearest shape, then nearest rows)."""
    entries = [e for e in (table() if entries is None else entries)
               if e.get("device") == device and e.get("format") == fmt]
    if not entries:
        return None
    def dist(e):
        return (abs(math.log(e["m"] * e["n"]) - math.log(m * n)),
                abs(math.log(max(e["rows"], 1)) - math.log(max(rows, 1))))
    return min(entries, key=dist)


def choose(x, w, entries=None) -> str:
    """The backend "auto" resolves to for x and w (called while tracing; reads no environment)."""
    if jax.default_backend() != "gpu":
        return "xla"
    m, n = w.shape
    rows = math.prod(x.shape[:-1]) if x.ndim > 1 else 1
    if w.stacked:                                    # x [E, ..., n]: rows per expert
        rows = max(1, rows // x.shape[0])
    e = lookup(device_kind(), format_key(w), m, n, rows, entries)
    if e is None:
        return "xla"
    for name, _ in sorted(e["us"].items(), key=lambda kv: kv[1]):
        if available(name)[0]:
            return name
    return "xla"
