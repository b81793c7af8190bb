"""The allocation as a library call: read the model's shapes, the base config, the error model
(and a sensitivity file), solve the exact knapsack, write the compress config YAML and a report.

    rep = run(AllocateJob(model="hf_dir", error_model="runs/fit/error_model.json",
                          config="configs/smollm2_default.yaml", avg_bits=3.0, out="alloc.yaml"))
    # alloc.yaml (python -m experiments.compress --config alloc.yaml), alloc.json (the report)
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from caldera_jax.allocation import error_model as em
from caldera_jax.allocation import plan
from caldera_jax.allocation.options import Option, grid_options
from caldera_jax.caldera.config import JobConfig, load_job_config
from caldera_jax.checkpoints_io.fingerprint import open_source
from caldera_jax.pipeline.error_sweep import write_json_atomic, write_text_atomic


@dataclasses.dataclass(frozen=True)
class AllocateJob:
    model: str                              # HF directory or .gguf (only its config / shapes are used)
    error_model: str                        # error_model.json of the fit
    config: str | JobConfig                 # base job config: every field but b_q / rank, calibration
    out: str                                # the YAML to write (a report goes beside it: .json)
    avg_bits: float | None = None           # bits per parameter of the compressible linears
    budget_gb: float | None = None          # or their size in GB (1e9 bytes)
    sensitivity: str | None = None          # weights JSON ({"weights": {glob: w}} or the sensitivity job's)
    bits: tuple[int, ...] | None = None     # options (default: the error model's grid)
    ranks: tuple[int, ...] | None = None
    allow_protect: bool = True              # bf16 is an option for every matrix
    power: float = 2.0                      # objective Σ w_i E_i^power
    max_cells: int = 1 << 18
    command: str = ""


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise plan.AllocationError(f"{path}: {what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise plan.AllocationError(f"{path}: {what} is not valid JSON ({e})") from None


def run(job: AllocateJob) -> dict[str, Any]:
    t0 = time.perf_counter()
    if not job.out.endswith((".yaml", ".yml")):
        raise plan.AllocationError(f"--out {job.out}: must be a .yaml file path")
    cfg = open_source(job.model).cfg
    base = job.config if isinstance(job.config, JobConfig) else load_job_config(job.config)
    model = em.ErrorModel.from_json(_read_json(job.error_model, "error model"), source=job.error_model)
    gb, gr = model.grid()
    options = grid_options(job.bits or gb, job.ranks if job.ranks is not None else gr)
    mats = plan.matrix_choices(base, cfg, options, allow_protect=job.allow_protect)
    weights = None
    if job.sensitivity:
        weights = plan.weights_from_sensitivity(_read_json(job.sensitivity, "sensitivity"), mats, model,
                                                job.power, source=job.sensitivity)
    budget = plan.budget_bits(mats, avg_bits=job.avg_bits, gb=job.budget_gb)
    t1 = time.perf_counter()
    alloc = plan.allocate(mats, model, budget, weights, power=job.power, max_cells=job.max_cells)
    solve_s = time.perf_counter() - t1
    # the base config applied uniformly (no allocation), for comparison
    uni = []
    for m in mats:
        o = Option(m.base.b_q, m.base.rank) if m.base is not None else m.options[0]
        uni.append(o if o in m.options else None)
    uniform = None
    if all(o is not None for o in uni):
        u = plan.evaluate(mats, uni, model, weights, power=job.power)
        uniform = {"bits_per_param": u.bits_per_param, "total_bits": u.total_bits, "objective": u.objective,
                   "mean_predicted_error": sum(u.errors) / len(u.errors)}
    d = plan.config_dict(base, cfg, alloc)
    s = alloc.summary()
    header = [f"Allocated by caldera_jax.allocation ({job.command or 'pipeline.allocate.run'})",
              f"error model {job.error_model} ({model.kind}); sensitivity {job.sensitivity or 'none (weights 1)'}",
              f"predicted: {s['bits_per_param']:.4f} bits/param over {s['linear_params']} linear params, "
              f"{s['bytes'] / 1e6:.3f} MB; objective sum w*E^{job.power:g} = {s['objective']:.6g}",
              f"budget {budget} bits; DP unit {s['dp_unit_bits']} bits ({'exact' if s['dp_exact'] else 'rounded up'}), "
              f"optimality gap <= {s['optimality_gap']:.3g}",
              f"options chosen: {s['options']}"]
    os.makedirs(os.path.dirname(os.path.abspath(job.out)), exist_ok=True)
    write_text_atomic(job.out, plan.config_yaml(d, header))
    load_job_config(job.out, cfg)                                     # it loads and checks
    rep = {"command": job.command, "model": job.model, "error_model": job.error_model,
           "sensitivity": job.sensitivity, "config": job.out, "summary": s, "uniform_base": uniform,
           "solve_seconds": solve_s, "seconds": time.perf_counter() - t0,
           "matrices": [{"name": n, "option": o.label, "b_q": o.b_q, "rank": o.rank, "cost_bits": c,
                         "predicted_error": e, "weight": w}
                        for n, o, c, e, w in zip(alloc.names, alloc.options, alloc.costs, alloc.errors,
                                                 alloc.weights)]}
    write_json_atomic(os.path.splitext(job.out)[0] + ".json", rep)
    return rep
