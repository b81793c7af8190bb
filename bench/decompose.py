"""CALDERA decomposition: speed on one 1024x1024 matrix, and an error table on it.

    python -m bench.decompose [--size 1024] [--repeats 3] [--skip-table] [--out bench/results/decompose.json]

Speed row: E8P Q at 2 bits, 4-bit L/R, rank 64, incoherence on, 5 outer x 10 LPLR iterations,
10 re-quantization sweeps (the issue's configuration); compile time (lower + XLA compile of the
jitted core) reported separately from the median run time of `decompose()` end to end (host
checks, jitted core, packing into a QLRWeight).

Error table, same matrix and H: uniform (groupwise, group 64, symmetric) and E8P at 2/3/4 bits,
Q-only (rank 0) vs CALDERA rank 64 (4-bit factors), with and without incoherence, plus the
nearest-rounding baseline (no LDLQ) for Q-only, and two variants of the alternation (Q step first;
Q step first with the Hessian downdated by the low-rank subspace). rel_err_h = sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)) with the
calibration H (no ridge), rel_fro = ||E||_F/||W||_F, corr = Pearson(W, Ŵ), bits = stored bits per
weight (codes + fp16 scales + factors + signs).

Data (synthetic, fixed seed): W = heavy-tailed i.i.d. part + a decaying-spectrum low-rank part + a
few loud input columns; H = Xᵀ X from 4096 activations with correlated features, log-normal
per-feature scales and 8 outlier features (as LLM activations have).
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import median_time, write_report
from caldera_jax import runtime
from caldera_jax.caldera import decompose as D
from caldera_jax.caldera.spec import MatrixBudget


def make_problem(n: int = 1024, m: int | None = None, seed: int = 0):
    m = m or n
    rng = np.random.default_rng(seed)
    w = 0.02 * rng.standard_t(5, (m, n))
    q1, _ = np.linalg.qr(rng.standard_normal((m, m)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    s = 0.6 / (1.0 + np.arange(k) / 8.0)
    w += (q1[:, :k] * s) @ q2[:k] * np.sqrt(n) * 0.02
    w[:, rng.choice(n, 6, replace=False)] *= 5.0
    mix = np.eye(n) + 0.5 * rng.standard_normal((n, n)) * np.exp(-np.arange(n) / 64.0)[None, :] / np.sqrt(n)
    x = rng.standard_normal((4096, n)) @ mix
    x *= np.exp(0.8 * rng.standard_normal(n))
    x[:, rng.choice(n, 8, replace=False)] *= 20.0
    return w.astype(np.float32), (x.T @ x).astype(np.float32)


SPEED = MatrixBudget(b_q=2, quantizer="e8p", b_l=4, b_r=4, rank=64, iters=5, lplr_iters=10,
                     requant_sweeps=10, incoherence=True)


def _block(out):
    jax.block_until_ready(jax.tree.leaves(out))
    return out


def speed_row(w, h, repeats: int, budget: MatrixBudget = SPEED) -> dict:
    wj, hj = jnp.asarray(w), jnp.asarray(h)
    key = jax.random.PRNGKey(budget.seed)
    t0 = time.perf_counter()
    D._core_jit.lower(wj, hj, key, budget=budget, mode="ldlq", svd_method="auto").compile()
    compile_s = time.perf_counter() - t0
    _, met = _block(D.decompose(w, h, budget))                       # warm-up (fills the jit cache)
    cpu0 = time.process_time()
    run_s, runs = median_time(lambda: _block(D.decompose(w, h, budget)), repeats, warmup=0)
    cpu_s = (time.process_time() - cpu0) / repeats
    return dict(case=f"speed: e8p2 + 4-bit LR r{budget.rank}, inc, 5x10 iters, 10 sweeps", m=w.shape[0],
                n=w.shape[1], compile_s=round(compile_s, 2), run_s=round(run_s, 3),
                runs_s=[round(t, 3) for t in runs], cpu_s_per_run=round(cpu_s, 2),
                rel_err_h=float(met["rel_err_h"]), rel_fro=float(met["rel_fro"]),
                corr=float(met["corr"]), bits=round(float(met["bits_per_param"]), 3))


def table_rows(w, h) -> list[dict]:
    rows = []
    base = SPEED
    for quant in ("uniform", "e8p"):
        for bits in (2, 3, 4):
            for inc in (False, True):
                for rank, mode in ((0, "nearest"), (0, "ldlq"), (64, "ldlq")):
                    if mode == "nearest" and inc is False and bits != 2:
                        continue                           # keep the table small
                    b = base.replace(quantizer=quant, b_q=bits, rank=rank, incoherence=inc)
                    t0 = time.perf_counter()
                    _, met = _block(D.decompose(w, h, b, mode=mode))
                    dt = time.perf_counter() - t0
                    rows.append(dict(quantizer=quant, b_q=bits, incoherence=inc,
                                     method=("CALDERA r64" if rank else
                                             "Q-only LDLQ" if mode == "ldlq" else "Q-only nearest"),
                                     rel_err_h=round(float(met["rel_err_h"]), 4),
                                     rel_fro=round(float(met["rel_fro"]), 4),
                                     corr=round(float(met["corr"]), 4),
                                     bits=round(float(met["bits_per_param"]), 3),
                                     best_step=int(met["best_step"]),
                                     time_s=round(dt, 2)))
                    print(rows[-1], flush=True)
    # order / Hessian-downdate variants of CALDERA r64 (incoherence on)
    for quant, bits in (("uniform", 3), ("e8p", 2)):
        for label, kw in (("CALDERA r64 q_first", dict(order="q_first")),
                          ("CALDERA r64 q_first+downdate", dict(order="q_first", hessian_downdate=True))):
            b = base.replace(quantizer=quant, b_q=bits, rank=64, incoherence=True, **kw)
            t0 = time.perf_counter()
            _, met = _block(D.decompose(w, h, b))
            rows.append(dict(quantizer=quant, b_q=bits, incoherence=True, method=label,
                             rel_err_h=round(float(met["rel_err_h"]), 4),
                             rel_fro=round(float(met["rel_fro"]), 4), corr=round(float(met["corr"]), 4),
                             bits=round(float(met["bits_per_param"]), 3),
                             best_step=int(met["best_step"]), time_s=round(time.perf_counter() - t0, 2)))
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=SPEED.rank, help="rank of the speed case (the GPU goal: 4096 at 256)")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--out", default="bench/results/decompose.json")
    args = ap.parse_args(argv)
    runtime.setup(lapack_threads=1)               # one OpenBLAS thread inside jitted LAPACK calls
    w, h = make_problem(args.size)
    load0 = _load()
    speed = speed_row(w, h, args.repeats, SPEED.replace(rank=args.rank))
    print(speed, flush=True)
    rows = [] if args.skip_table else table_rows(w, h)
    cols = ["quantizer", "b_q", "incoherence", "method", "rel_err_h", "rel_fro", "corr", "bits",
            "best_step", "time_s"]
    if not rows:                                   # write_report needs at least one row
        rows = [dict(quantizer="(table skipped)")]
    write_report(args.out, "decompose", rows, cols,
                 extra=dict(speed=speed, load_avg_before=load0, load_avg_after=_load(),
                            budget=SPEED.replace(rank=args.rank).__dict__, note="time_s in the table includes XLA "
                            "compilation (one compile per configuration)"))
    print(f"speed: compile {speed['compile_s']} s, run {speed['run_s']} s "
          f"(median of {args.repeats}; CPU {speed['cpu_s_per_run']} s/run), "
          f"rel_err_h {speed['rel_err_h']:.4f}, bits {speed['bits']}")


def _load() -> list[float] | None:
    try:
        import os
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    main()
