"""Quantized low-rank linear y = x·Wᵀ, W = scale·T_outᵀ(Q + L·R)T_in: time, GB/s, TFLOP/s per backend,
against dense bf16 jnp.dot on the dequantized matrix in the same run; plus the memory check.

    python -m bench.qlr_linear                       # GPU: the issue's full grid; CPU: reduced (see below)
    python -m bench.qlr_linear --shapes 4096x4096 --rows 1,16 --backends xla,pallas,triton
    python -m bench.qlr_linear --write-table         # GPU: record winners in kernels/qlr_select.json

Grid of the issue (GPU): shapes (m x n) 4096x4096, 11008x4096, 4096x11008, 14336x4096, 768x2048;
rows 1, 4, 16, 64, 512, 4096; formats e8p2+u4g64r64 (2-bit E8P Q + rank-64 4-bit L/R),
u3g64+u4g64r64, u4g64+u4g64r64 (3-/4-bit uniform Q, group 64, + rank 64); bf16 activations.
On a CPU the defaults shrink to what the CPU can show: the xla backend only (Pallas runs in
interpret mode there, Triton not at all), shapes divided by 4 (768x2048 kept), rows 1, 4, 16, 64.
The memory check always runs at the full shapes (random codes are cheap to build).

Columns: us = median time per call (calls dispatched back to back, 4 rotating inputs, one block
at the end of each batch); GB/s = bytes the format must move (packed weight + x + y) / time, and
its fraction of the measured copy bandwidth (a large x+1 over float32: bytes read + written);
TFLOP/s = 2·rows·(m·n + r·(m+n)) / time; vs_dense = dense time / this time. Every backend's output
is checked against the dense float32 product before it is timed (bf16 tolerance 2e-2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import device_description, write_report

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (768, 2048)]
CPU_SHAPES = [(1024, 1024), (2752, 1024), (1024, 2752), (3584, 1024), (768, 2048)]
FULL_ROWS = [1, 4, 16, 64, 512, 4096]
CPU_ROWS = [1, 4, 16, 64]
FORMATS = {"e8p2+u4g64r64": ("e8p2", 64, "u4g64"),
           "u3g64+u4g64r64": ("u3g64", 64, "u4g64"),
           "u4g64+u4g64r64": ("u4g64", 64, "u4g64")}


def _parse_shapes(s):
    return [tuple(int(v) for v in p.split("x")) for p in s.split(",")]


def time_calls(fn, inputs, repeats: int, inner: int) -> float:
    """Median seconds per call: `inner` calls dispatched back to back (rotating over inputs), one
    block at the end, repeated `repeats` times after a warm-up batch."""
    jax.block_until_ready(fn(inputs[0]))
    for i in range(inner):
        out = fn(inputs[i % len(inputs)])
    jax.block_until_ready(out)
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(inputs[i % len(inputs)])
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t0) / inner)
    return statistics.median(per)


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """Bytes/s of a large float32 x+1 (read + write)."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t = time_calls(f, [a], repeats, 4)
    return 2 * nbytes / t


def memory_rows(shapes, formats, rng) -> list[dict]:
    from caldera_jax.kernels.qlr_random import random_qlr, theoretical_bits
    rows = []
    for (m, n) in shapes:
        for fname, (q, r, f) in formats.items():
            w = random_qlr(rng, m, n, q, rank=r, factors=f, incoherent=True)
            measured, theory = w.bits_per_param(), theoretical_bits(w)
            rows.append({"shape": f"{m}x{n}", "format": fname, "packed_MB": w.nbytes() / 1e6,
                         "bits_param": measured, "theory_bits": theory,
                         "q_bits": w.q.bits_per_param(),
                         "dev_pct": 100 * (measured / theory - 1),
                         "within_2pct": abs(measured / theory - 1) <= 0.02,
                         "bf16_MB": 2 * m * n / 1e6})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="m x n list, e.g. 4096x4096,768x2048")
    ap.add_argument("--rows", default=None)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--backends", default=None, help="default: every backend available at full speed")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None, help="calls per timed batch")
    ap.add_argument("--out", default="bench/results/qlr_linear.json")
    ap.add_argument("--write-table", action="store_true", help="record timings in kernels/qlr_select.json")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)

    from caldera_jax.kernels import select
    from caldera_jax.kernels.qlr import qlr_linear
    from caldera_jax.kernels.qlr_random import random_qlr

    on_gpu = jax.default_backend() == "gpu"
    shapes = _parse_shapes(args.shapes) if args.shapes else (FULL_SHAPES if on_gpu else CPU_SHAPES)
    rows_list = [int(r) for r in args.rows.split(",")] if args.rows else (FULL_ROWS if on_gpu else CPU_ROWS)
    formats = {k: FORMATS[k] for k in args.formats.split(",")}
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in ("xla", "pallas", "triton") if select.available(b)[0]]
    skipped = {b: select.available(b)[1] for b in ("xla", "pallas", "triton") if b not in backends}
    repeats = args.repeats or (20 if on_gpu else 5)
    inner = args.inner or (20 if on_gpu else 3)
    rng = np.random.default_rng(0)

    print(f"device: {device_description()}")
    bw = copy_bandwidth(1 << 28 if on_gpu else 1 << 26)
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s (float32 x+1, read+write)")
    for b, why in skipped.items():
        print(f"backend {b} not timed: {why}")

    rows_out = []
    table_entries = []
    for (m, n) in shapes:
        for fname, (q, r, f) in formats.items():
            w = random_qlr(rng, m, n, q, rank=r, factors=f, incoherent=True)
            Wd = jax.block_until_ready(w.dequantize().astype(jnp.bfloat16))        # the dense reference
            wbytes = w.nbytes()
            flops_q = lambda R: 2 * R * (m * n + r * (m + n))
            for R in rows_list:
                xs = [jnp.asarray(rng.standard_normal((R, n)), jnp.bfloat16) for _ in range(4)]
                ref = np.asarray(jnp.dot(xs[0].astype(jnp.float32), Wd.astype(jnp.float32).T,
                                         precision=jax.lax.Precision.HIGHEST), np.float64)
                io = 2 * R * (n + m)
                # weights are arguments, never closure constants (XLA would fold the dequantization)
                dense_jit = jax.jit(lambda x, W: jnp.dot(x, W.T))
                t_dense = time_calls(lambda x: dense_jit(x, Wd), xs, repeats, inner)
                rows_out.append({"shape": f"{m}x{n}", "format": fname, "rows": R, "backend": "dense-bf16",
                                 "us": t_dense * 1e6, "GB/s": (2 * m * n + io) / t_dense / 1e9,
                                 "bw_frac": (2 * m * n + io) / t_dense / bw,
                                 "TFLOP/s": 2 * R * m * n / t_dense / 1e12, "vs_dense": 1.0})
                us = {}
                for b in backends:
                    fn_jit = jax.jit(lambda x, w, b=b: qlr_linear(x, w, backend=b))
                    fn = lambda x: fn_jit(x, w)
                    y = np.asarray(fn(xs[0]), np.float64)
                    err = np.abs(y - ref).max() / np.abs(ref).max()
                    ok = bool(np.isfinite(err) and err < 2e-2)
                    t = time_calls(fn, xs, repeats, inner) if ok else float("nan")
                    if ok:
                        us[b] = t * 1e6
                    rows_out.append({"shape": f"{m}x{n}", "format": fname, "rows": R, "backend": b,
                                     "us": t * 1e6, "GB/s": (wbytes + io) / t / 1e9,
                                     "bw_frac": (wbytes + io) / t / bw, "TFLOP/s": flops_q(R) / t / 1e12,
                                     "vs_dense": t_dense / t, "rel_err": float(err), "ok": ok})
                if us:
                    table_entries.append({"device": select.device_kind(), "format": select.format_key(w),
                                          "m": m, "n": n, "rows": R, "us": us})
                print(f"  {m}x{n} {fname} rows={R}: dense {t_dense * 1e6:.1f} us; "
                      + ", ".join(f"{b} {v:.1f} us" for b, v in us.items()), flush=True)

    cols = ["shape", "format", "rows", "backend", "us", "GB/s", "bw_frac", "TFLOP/s", "vs_dense"]
    extra = {"copy_GBps": bw / 1e9, "backends": backends, "not_timed": skipped,
             "shapes": [f"{m}x{n}" for m, n in shapes], "rows_list": rows_list,
             "command": "python -m bench.qlr_linear " + " ".join(argv if argv is not None else os.sys.argv[1:])}
    if not on_gpu:
        extra["note"] = ("CPU run: xla backend only, shapes /4 (768x2048 kept), rows 1-64. The GPU rows "
                         "(pallas, triton, full shapes, rows 512/4096) come from the same command on a GPU "
                         "(bench/gpu_check.sh).")
    mem = []
    if not args.skip_memory:
        mem = memory_rows(FULL_SHAPES, formats, rng)
        extra["memory"] = mem
    write_report(args.out, "qlr_linear", rows_out, cols, extra)
    if mem:
        print("\nmemory at the full shapes (packed bytes vs theoretical bits/param):")
        mcols = ["shape", "format", "packed_MB", "bf16_MB", "q_bits", "bits_param", "theory_bits", "dev_pct",
                 "within_2pct"]
        widths = [max(len(c), *(len(_f(r[c])) for r in mem)) for c in mcols]
        print("  ".join(c.ljust(w) for c, w in zip(mcols, widths)))
        for r in mem:
            print("  ".join(_f(r[c]).ljust(w) for c, w in zip(mcols, widths)))
    if not on_gpu:
        print("\nGPU rows missing: pallas (compiled, Triton lowering) and triton (jax-triton) backends, the "
              "full shapes and rows 512/4096 need the lent H100/H200; this CPU run times the xla backend "
              "only, at reduced shapes.")
    if args.write_table and table_entries:
        path = select.TABLE_PATH
        old = json.loads(path.read_text()).get("entries", []) if path.exists() else []
        keys = {(e["device"], e["format"], e["m"], e["n"], e["rows"]) for e in table_entries}
        merged = [e for e in old if (e["device"], e["format"], e["m"], e["n"], e["rows"]) not in keys] + table_entries
        path.write_text(json.dumps({"entries": merged}, indent=1) + "\n")
        print(f"wrote {len(table_entries)} entries to {path}")


def _f(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
