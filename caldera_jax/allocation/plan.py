"""One allocation: per matrix, the option (bits, rank) or protection minimising the predicted
sensitivity-weighted error under a memory budget, and the compress job config that applies it.

    mats = matrix_choices(job, cfg, grid_options(bits, ranks))           # options + exact costs
    alloc = allocate(mats, model, budget_bits(mats, avg_bits=3.0), weights)
    text = config_yaml(config_dict(job, cfg, alloc), header)             # for experiments.compress

Objective: Σ_i w_i · E_i(b_i, r_i)^p (p = `power`, default 2: independent weight errors add in
variance, and a KL divergence grows with the square of a small logit perturbation); a protected
matrix has error 0. Budget: bits of the compressible linears only (embeddings, norms, LM head are
not part of it), exactly as the checkpoint stores them (options.cost_bits).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections import Counter
from typing import Any, Sequence

from caldera_jax.allocation import knapsack
from caldera_jax.allocation.error_model import ErrorModel
from caldera_jax.allocation.options import (PROTECT, Option, cost_bits, is_feasible, params_of, proj_of)
from caldera_jax.caldera.config import JobConfig, compressible
from caldera_jax.caldera.spec import MatrixBudget
from caldera_jax.config import ModelConfig


class AllocationError(ValueError):
    """An allocation that cannot be made; the message names the field, matrix or file."""


@dataclasses.dataclass(frozen=True)
class MatrixChoices:
    """A matrix ([m, n] or stacked [E, m, n]), its base budget (None: protected by the base config)
    and its feasible options with their exact costs in bits."""
    name: str
    shape: tuple[int, ...]
    base: MatrixBudget | None
    options: tuple[Option, ...]
    costs: tuple[int, ...]

    @property
    def params(self) -> int:
        return params_of(self.shape)


def matrix_choices(job: JobConfig, cfg: ModelConfig, options: Sequence[Option], *,
                   allow_protect: bool = True) -> list[MatrixChoices]:
    """Every compressible matrix of the model with the options valid for its shape (rank ≤ min(m, n),
    bits the quantizer supports), each option's budget = the matrix's budget under `job` (defaults +
    pattern overrides) with b_q and rank replaced. Matrices `job` protects keep only protection."""
    free = dataclasses.replace(job, protect=())
    out = []
    for name, shape in compressible(cfg).items():
        shape = tuple(int(x) for x in shape)
        if job.is_protected(name):
            out.append(MatrixChoices(name, shape, None, (PROTECT,), (cost_bits(None, PROTECT, shape),)))
            continue
        base = free.budget_for(name, shape)
        opts = [o for o in options if not o.protected and is_feasible(base, o, shape)]
        if allow_protect:
            opts.append(PROTECT)
        if not opts:
            raise AllocationError(f"matrix {name} {list(shape)}: no option of the grid is valid for it "
                                  f"(ranks above min(m, n) = {min(shape[-2:])}, or bits the "
                                  f"{base.quantizer} quantizer lacks) and protection is off")
        out.append(MatrixChoices(name, shape, base, tuple(opts),
                                 tuple(cost_bits(base, o, shape) for o in opts)))
    return out


def budget_bits(mats: Sequence[MatrixChoices], *, avg_bits: float | None = None, gb: float | None = None) -> int:
    """The budget in bits: avg_bits per parameter of the compressible linears, or gb (1e9 bytes)."""
    if (avg_bits is None) == (gb is None):
        raise AllocationError("give exactly one of --avg-bits and --budget-gb")
    if avg_bits is not None:
        if not avg_bits > 0:
            raise AllocationError(f"--avg-bits {avg_bits} must be > 0")
        return int(math.floor(avg_bits * sum(m.params for m in mats)))
    if not gb > 0:
        raise AllocationError(f"--budget-gb {gb} must be > 0")
    return int(math.floor(gb * 8e9))


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The chosen option per matrix (in model order) with its cost (bits), predicted error and weight."""
    names: tuple[str, ...]
    options: tuple[Option, ...]
    costs: tuple[int, ...]
    errors: tuple[float, ...]
    weights: tuple[float, ...]
    params: tuple[int, ...]
    power: float
    solution: knapsack.Solution | None

    @property
    def total_bits(self) -> int:
        return sum(self.costs)

    @property
    def bits_per_param(self) -> float:
        return self.total_bits / sum(self.params)

    @property
    def objective(self) -> float:
        return sum(w * e ** self.power for w, e in zip(self.weights, self.errors))

    def summary(self) -> dict[str, Any]:
        s = self.solution
        counts = Counter(o.label for o in self.options)
        return {"matrices": len(self.names), "linear_params": sum(self.params),
                "total_bits": self.total_bits, "bytes": self.total_bits / 8,
                "bits_per_param": self.bits_per_param, "objective": self.objective, "power": self.power,
                "mean_predicted_error": sum(self.errors) / len(self.errors),
                "options": dict(sorted(counts.items())),
                **({} if s is None else {
                    "budget_bits": s.budget, "min_cost_bits": s.min_cost, "dp_unit_bits": s.unit,
                    "dp_cells": s.cells, "dp_exact": s.exact, "dp_rounding_bits": s.rounding_bits,
                    "lower_bound": s.lower_bound, "optimality_gap": s.gap})}


def predicted(mat: MatrixChoices, opt: Option, model: ErrorModel) -> float:
    return 0.0 if opt.protected else model.predict(mat.name, opt.b_q, opt.rank)


def allocate(mats: Sequence[MatrixChoices], model: ErrorModel, budget: int,
             weights: dict[str, float] | None = None, *, power: float = 2.0,
             max_cells: int = knapsack.DEFAULT_MAX_CELLS) -> Allocation:
    """The exact MCKP choice (knapsack.solve); weights: {matrix name: w ≥ 0} (missing: 1)."""
    weights = weights or {}
    w = [float(weights.get(m.name, 1.0)) for m in mats]
    errs = [[predicted(m, o, model) for o in m.options] for m in mats]
    values = [[wi * e ** power for e in es] for wi, es in zip(w, errs)]
    try:
        sol = knapsack.solve([m.costs for m in mats], values, budget, max_cells=max_cells)
    except knapsack.InfeasibleBudget:
        lo = sum(min(m.costs) for m in mats)
        par = sum(m.params for m in mats)
        raise AllocationError(f"budget {budget} bits ({budget / par:.4f} bits/param, {budget / 8e9:.4f} GB) is "
                              f"below the minimum achievable {lo} bits ({lo / par:.4f} bits/param, "
                              f"{lo / 8e9:.4f} GB) of these options") from None
    return Allocation(tuple(m.name for m in mats), tuple(m.options[j] for m, j in zip(mats, sol.choice)),
                      tuple(m.costs[j] for m, j in zip(mats, sol.choice)),
                      tuple(es[j] for es, j in zip(errs, sol.choice)), tuple(w),
                      tuple(m.params for m in mats), power, sol)


def evaluate(mats: Sequence[MatrixChoices], chosen: Sequence[Option], model: ErrorModel,
             weights: dict[str, float] | None = None, *, power: float = 2.0) -> Allocation:
    """The cost and predicted objective of a given choice per matrix (e.g. the uniform config)."""
    weights = weights or {}
    costs, errs = [], []
    for m, o in zip(mats, chosen):
        if o not in m.options:
            raise AllocationError(f"matrix {m.name}: option {o.label} is not among its options")
        costs.append(m.costs[m.options.index(o)])
        errs.append(predicted(m, o, model))
    return Allocation(tuple(m.name for m in mats), tuple(chosen), tuple(costs), tuple(errs),
                      tuple(float(weights.get(m.name, 1.0)) for m in mats), tuple(m.params for m in mats),
                      power, None)


def weights_from_globs(spec: dict[str, Any], names: Sequence[str], source: str = "<weights>") -> dict[str, float]:
    """{glob: weight} (fnmatch on full names, later entries win) -> {name: weight}; unmatched: 1."""
    out = {}
    for g, v in spec.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or not math.isfinite(v):
            raise AllocationError(f"{source}: weights[{g!r}] = {v!r} must be a finite number >= 0")
        hit = [n for n in names if fnmatch.fnmatchcase(n, g)]
        if not hit:
            raise AllocationError(f"{source}: weights[{g!r}] matches no compressible matrix")
        out.update({n: float(v) for n in hit})
    return out


def weights_from_sensitivity(d: dict[str, Any], mats: Sequence[MatrixChoices], model: ErrorModel,
                             power: float = 2.0, source: str = "<sensitivity>") -> dict[str, float]:
    """Per-matrix weights from a sensitivity file: either {"weights": {glob: w}}, or the output of
    experiments.sensitivity ({"probe": {"b_q", "rank"}, "results": [{"layer", "proj", "kl"}, ...]}),
    where w_i = KL_i / E_i(probe)^power (the KL measured at the probe per unit of predicted
    objective), normalised to mean 1; matrices without a measurement get the mean (1)."""
    names = [m.name for m in mats]
    if "weights" in d:
        if not isinstance(d["weights"], dict):
            raise AllocationError(f"{source}: 'weights' must be a mapping of glob -> weight")
        return weights_from_globs(d["weights"], names, source)
    try:
        probe = d["probe"]
        b, r = int(probe["b_q"]), int(probe["rank"])
        res = {(int(x["layer"]), str(x["proj"])): float(x["kl"]) for x in d["results"]}
    except (KeyError, TypeError, ValueError) as e:
        raise AllocationError(f"{source}: expected 'weights' or 'probe' + 'results' [{{layer, proj, kl}}] "
                              f"({type(e).__name__}: {e})") from None
    out = {}
    for m in mats:
        layer = int(m.name.split(".")[2])
        kl = res.get((layer, proj_of(m.name)))
        if kl is None:
            continue
        e = model.predict(m.name, b, r)
        out[m.name] = max(kl, 0.0) / max(e ** power, 1e-30)
    if not out:
        raise AllocationError(f"{source}: no result matches a matrix of this model")
    mean = sum(out.values()) / len(out)
    if mean <= 0:
        raise AllocationError(f"{source}: every KL is 0; nothing to weight by")
    return {n: v / mean for n, v in out.items()}


# ------------------------------------------------------------------ the compress config
def config_dict(job: JobConfig, cfg: ModelConfig, alloc: Allocation) -> dict[str, Any]:
    """The job config (YAML-shaped) applying `alloc`: `job`'s defaults with the most common option's
    b_q / rank, `job`'s own pattern_overrides, then one exact-name override (b_q, rank) for every
    matrix whose merged budget differs from its choice; protection by exact name in `protect`.
    Checked: the result gives every matrix exactly its chosen budget."""
    d = job.to_dict()
    free = [o for o in alloc.options if not o.protected]
    if free:
        top = Counter(free).most_common(1)[0][0]
        d["defaults"].update(b_q=top.b_q, rank=top.rank)
    d["pattern_overrides"] = dict(d["pattern_overrides"])
    protect = list(d["protect"])
    plain = JobConfig.from_dict({**d, "protect": []}, source=job.source)
    for name, o in zip(alloc.names, alloc.options):
        if o.protected:
            if not job.is_protected(name):
                protect.append(name)
            continue
        merged, _ = plain._merged(name)
        if (merged["b_q"], merged["rank"]) != (o.b_q, o.rank):
            d["pattern_overrides"][name] = {"b_q": o.b_q, "rank": o.rank}
    d["protect"] = protect
    check = JobConfig.from_dict(d, source="<allocation>").check(cfg)
    for name, o in zip(alloc.names, alloc.options):
        got = check[name]
        if (got is None) != o.protected or (got is not None and (got.b_q, got.rank) != (o.b_q, o.rank)):
            raise AssertionError(f"config_dict: {name} gets {got} instead of {o.label}")
    return d


def config_yaml(d: dict[str, Any], header: Sequence[str] = ()) -> str:
    """YAML text (comments first) that caldera.config.load_job_config reads back to the same config."""
    import yaml
    head = "".join(f"# {line}\n" for line in header)
    dump = lambda key, flow: yaml.safe_dump({key: d[key]}, sort_keys=False, default_flow_style=flow,  # noqa: E731
                                            width=1000)
    return head + dump("defaults", False) + dump("pattern_overrides", None) + dump("protect", False)
