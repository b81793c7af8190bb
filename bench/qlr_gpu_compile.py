"""Offline GPU compile check of the QLR kernels (no GPU needed): does every kernel build for sm_90,
and what do registers, spills, shared memory and the instruction mix look like?

    python -m bench.qlr_gpu_compile [--shape 4096x4096,11008x4096] [--formats e8p2,u3g64,u4g64] [--rows 1,4,16,64]

Pallas: each pallas_call of qlr_pallas.qlr_forward / qlr_transpose (and the Hadamard kernels) is
lowered for the "cuda" platform on this CPU (jax's Pallas->Triton lowering runs; its TTIR is captured
from jax._src.pallas.triton.lowering, a private hook) and that TTIR is compiled by the pip `triton`
(3.6) for sm_90 down to a cubin. Triton: the raw qlr_triton.qlr_kernel is compiled the same way from
its source. Registers/spills come from cuobjdump --dump-resource-usage, the instruction mix from
cuobjdump -sass (both ship in the triton wheel).

Caveats: XLA compiles the Pallas TTIR with its own bundled Triton, not the pip one, so this is a
close proxy, not the exact GPU build; nothing here runs a kernel.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import write_report

OPS = ("HGMMA", "HMMA", "FFMA", "LDL", "STL", "LDG.E.128", "LDG.E.64")


def _cubin_stats(kernel) -> dict:
    import triton
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", path],
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    out = {"smem": kernel.metadata.shared}
    for line in res.splitlines():
        if "REG:" in line:
            for tok in line.split():
                k, _, v = tok.partition(":")
                if k in ("REG", "STACK"):
                    out[k.lower()] = int(v)
    for op in OPS:
        out[op] = sass.count(op)
    return out


def _compile_ttir(asm: str, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as f:
        f.write(asm)
        path = f.name
    try:
        return triton.compile(path, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    finally:
        os.unlink(path)


def pallas_rows(w, rows_list, tiles) -> list[dict]:
    from jax._src.pallas.triton import pallas_call_registration as reg
    from caldera_jax.kernels import qlr_pallas as P
    captured = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        r = orig(*a, **k)
        captured.append(r.module.operation.get_asm(enable_debug_info=False))
        return r
    reg.lowering.lower_jaxpr_to_triton_module = spy
    out = []
    m, n = w.shape
    try:
        for R in rows_list:
            for tr in (False, True):
                captured.clear()
                x = jnp.ones((R, m if tr else n), jnp.bfloat16)
                fn = P.qlr_transpose if tr else P.qlr_forward
                jax.jit(lambda x, w: fn(x, w, tiles=tiles, interpret=False)).trace(x, w).lower(
                    lowering_platforms=("cuda",))
                for asm in captured:
                    name = asm.split("tt.func public @")[1].split("(")[0] if "tt.func public @" in asm else "?"
                    row = {"impl": "pallas", "rows": R, "dir": "bwd" if tr else "fwd", "kernel": name}
                    stages = 1 if name.startswith("fwht") else tiles.num_stages     # as hadamard.py sets
                    try:
                        row.update(_cubin_stats(_compile_ttir(asm, tiles.num_warps, stages)), ok=True)
                    except Exception as e:          # report, keep going
                        row.update(ok=False, error=str(e).splitlines()[0][:200])
                    out.append(row)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    return out


def triton_rows(w, rows_list, tiles) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from caldera_jax.kernels import qlr_triton as T
    ptr = {np.dtype(np.float32): "*fp32", np.dtype(np.float16): "*fp16", np.dtype(np.uint32): "*i32",
           np.dtype(np.uint16): "*i16", np.dtype(np.uint8): "*u8"}

    def ty(a):
        if a is None:
            return "*fp32"
        return "*bf16" if a.dtype == jnp.bfloat16 else ptr[np.dtype(a.dtype)]
    out = []
    names = list(T.qlr_kernel.arg_names)
    for R in rows_list:
        gemv = R <= tiles.gemv_max_rows
        act = "*fp32" if gemv else "*bf16"
        for tr in (False, True):
            for main in (False, True):
                if not main and w.l is None:
                    continue
                pm = w.q if main else (w.l if tr else w.r)
                f = (w.r if tr else w.l) if (main and w.l is not None) else None
                epi = None if f is None else (np.zeros((R, w.rank), np.float32), f)
                L = T.plan(R, pm, transpose=tr, epi=epi, tiles=tiles, dot_f32=gemv)
                arrays = [None, *T.mat_arrays(pm, None), None, None, None, *T.mat_arrays(f, None), None, None]
                n_ptr = names.index("ROWS")                  # pointer arguments come first
                assert len(arrays) == n_ptr, (len(arrays), n_ptr)
                sig = {nm: ty(arrays[i]) for i, nm in enumerate(names[:n_ptr])}
                sig.update(x_ptr=act, t_ptr=act if f is not None else "*fp32",
                           out_ptr="*fp32" if (gemv or main and (w.signs_out is not None)) else "*bf16")
                sig.update({nm: "constexpr" for nm in names[n_ptr:]})
                row = {"impl": "triton", "rows": R, "dir": "bwd" if tr else "fwd",
                       "kernel": "main" if main else "lowrank"}
                try:
                    k = triton.compile(ASTSource(T.qlr_kernel, sig, constexprs=dict(L.constexprs)),
                                       target=GPUTarget("cuda", 90, 32),
                                       options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
                    row.update(_cubin_stats(k), ok=True)
                except Exception as e:
                    row.update(ok=False, error=str(e).splitlines()[0][:200])
                out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096,11008x4096", help="m x n list")
    ap.add_argument("--formats", default="e8p2,u3g64,u4g64")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--impl", default="pallas,triton")
    ap.add_argument("--out", default="bench/results/qlr_gpu_compile.json")
    args = ap.parse_args(argv)
    from caldera_jax.kernels.qlr_pallas import DEFAULT_TILES
    from caldera_jax.kernels.qlr_random import random_qlr
    rows_list = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shape.split(","):
        m, n = (int(v) for v in shape.split("x"))
        for q in args.formats.split(","):
            w = random_qlr(rng, m, n, q, rank=args.rank, factors="u4g64", incoherent=True)
            got = []
            if "pallas" in args.impl:
                got += pallas_rows(w, rows_list, DEFAULT_TILES)
            if "triton" in args.impl:
                got += triton_rows(w, rows_list, DEFAULT_TILES)
            for r in got:
                r.update(format=q, shape=shape)
            rows += got
    cols = ["shape", "format", "impl", "rows", "dir", "kernel", "ok", "reg", "stack", "smem", *OPS]
    write_report(args.out, "qlr_gpu_compile", rows, cols,
                 {"target": "sm_90 (triton pip compiler, offline)", "note": __doc__.split("\n\n")[2]})
    bad = [r for r in rows if not r.get("ok") or r.get("stack", 0) > 0]
    print(f"{len(rows)} kernels compiled for sm_90; {sum(not r.get('ok') for r in rows)} failed; "
          f"{sum(r.get('stack', 0) > 0 for r in rows if r.get('ok'))} with a stack frame (spills)")
    if bad:
        for r in bad:
            print("  ", r)


if __name__ == "__main__":
    main()
