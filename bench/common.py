"""Shared benchmark plumbing: timing medians, the machine description, table + JSON output."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import jax


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time (s) of fn() over `repeats` runs after `warmup` runs; fn must block."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def device_description() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU {_cpu_model()} x{os.cpu_count()} cores"
    return f"{d.platform.upper()} {d.device_kind}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(path: str, name: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> None:
    """Prints rows as a table and writes {meta, rows} to `path` as JSON."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    meta = {"benchmark": name, "date": datetime.date.today().isoformat(), "device": device_description(),
            "jax": jax.__version__, "python": platform.python_version(), **(extra or {})}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
