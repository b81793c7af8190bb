"""Budget allocation (caldera_jax.allocation, pipeline.error_sweep / fit_error_model / allocate):
the knapsack is exact (brute force) and never exceeds the budget; the fit recovers known
parameters; the sweep resumes without repeating work; the allocated config loads and compresses a
tiny model to exactly the predicted size."""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest

from caldera_jax.allocation import error_model as em
from caldera_jax.allocation import knapsack
from caldera_jax.allocation.options import Option, grid_options, parse_grid, GridError

CURVE = dict(alpha=0.9, beta=0.85, gamma=0.06, delta=0.6)


def brute_force(costs, values, budget):
    best = None
    for ch in itertools.product(*(range(len(c)) for c in costs)):
        if sum(costs[g][j] for g, j in enumerate(ch)) <= budget:
            v = sum(values[g][j] for g, j in enumerate(ch))
            if best is None or v < best[0] - 1e-12:
                best = (v, ch)
    return best


def random_instance(rng, groups=5, options=4, scale=1000):
    costs = [[int(x) for x in rng.integers(1, scale, options)] for _ in range(groups)]
    values = [[float(x) for x in rng.random(options)] for _ in range(groups)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    return costs, values, int(rng.integers(lo, hi + 1))


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_exact_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    costs, values, budget = random_instance(rng, groups=5 + seed % 2, options=3 + seed % 3)
    best = brute_force(costs, values, budget)
    sol = knapsack.solve(costs, values, budget)
    assert sol.exact and sol.gap == 0
    assert sol.cost <= budget and sol.cost == sum(costs[g][j] for g, j in enumerate(sol.choice))
    assert sol.value == pytest.approx(best[0], abs=1e-12)
    # coarse cells: costs rounded up, never over budget; the lower bound brackets the optimum
    coarse = knapsack.solve(costs, values, budget, max_cells=5)
    assert coarse.cost <= budget and coarse.unit > 1
    assert coarse.lower_bound <= best[0] + 1e-12 <= coarse.value + 1e-9


def test_knapsack_budget_never_exceeded_and_infeasible_message():
    rng = np.random.default_rng(42)
    for _ in range(30):
        costs, values, budget = random_instance(rng, groups=12, options=6, scale=10 ** 6)
        for cells in (7, 100, 1 << 12):
            assert knapsack.solve(costs, values, budget, max_cells=cells).cost <= budget
    costs = [[5, 9], [3, 4]]
    with pytest.raises(knapsack.InfeasibleBudget, match="minimum achievable 8 bits"):
        knapsack.solve(costs, [[1, 0], [1, 0]], 7)
    sol = knapsack.solve(costs, [[1, 0], [1, 0]], 8)
    assert sol.choice == (0, 0) and sol.cost == 8


def test_knapsack_speed_200_matrices_15_options():
    import time
    rng = np.random.default_rng(1)
    costs = [[int(x) for x in rng.integers(10 ** 5, 10 ** 7, 15)] for _ in range(200)]
    values = [[float(x) for x in rng.random(15)] for _ in range(200)]
    t = time.process_time()                     # CPU seconds (the test machine is shared)
    sol = knapsack.solve(costs, values, int(sum(np.mean(c) for c in costs)))
    assert time.process_time() - t < 60 and sol.cost <= sol.budget
    assert sol.gap <= 0.01 * sol.value


def synthetic(rng, n=12, noise=0.002):
    names, bits, ranks, errs, s_true = [], [], [], [], {}
    projs = ("self_attn.q_proj", "mlp.down_proj")
    for i in range(n):
        name = f"model.layers.{i // 2}.{projs[i % 2]}.weight"
        s_true[name] = float(np.exp(rng.normal(0, 0.6)))
        for b in (2, 3, 4):
            for r in (0, 16, 64, 256):
                names.append(name), bits.append(b), ranks.append(r)
                errs.append(s_true[name] * float(em.curve(b, r, **CURVE)) * float(np.exp(rng.normal(0, noise))))
    return names, bits, ranks, errs, s_true


def test_fit_recovers_known_parameters():
    names, bits, ranks, errs, s_true = synthetic(np.random.default_rng(0))
    m = em.fit(names, bits, ranks, errs)
    gm = math.exp(np.mean(np.log(list(s_true.values()))))        # scales are normalised to geomean 1
    assert m.kind == "parametric" and m.stats["r2_log"] > 0.999
    assert m.beta == pytest.approx(CURVE["beta"], rel=0.02)
    assert m.delta == pytest.approx(CURVE["delta"], rel=0.05)
    assert m.alpha == pytest.approx(CURVE["alpha"] * gm, rel=0.03)
    assert m.gamma == pytest.approx(CURVE["gamma"] * gm, rel=0.05)
    for n, s in s_true.items():
        assert m.scales[n] == pytest.approx(s / gm, rel=0.02)
    assert set(m.stats["by_proj"]) == {"q_proj", "down_proj"}
    # JSON round trip predicts the same; an unseen layer gets its projection's median scale
    m2 = em.ErrorModel.from_json(json.loads(json.dumps(m.to_json())))
    assert m2.predict(names[0], 3, 64) == pytest.approx(m.predict(names[0], 3, 64))
    assert m2.predict("model.layers.99.mlp.down_proj.weight", 2, 0) > 0


def test_fit_falls_back_to_interpolation():
    rng = np.random.default_rng(3)
    names, bits, ranks, errs, _ = synthetic(rng)
    errs = [float(x) for x in rng.uniform(0.01, 0.5, len(errs))]   # no structure: R² poor
    m = em.fit(names, bits, ranks, errs)
    assert m.kind == "interpolation" and m.stats["r2_log"] < 0.7
    assert m.predict(names[0], bits[0], ranks[0]) == errs[0]          # exact on the grid
    t = m.table[names[0]]
    mid = m.predict(names[0], 3, 16)
    assert mid == pytest.approx(t[(3, 16)])
    between = m.predict(names[0], 2.5, 16)
    assert between == pytest.approx(math.sqrt(t[(2, 16)] * t[(3, 16)]))
    with pytest.raises(em.ErrorModelError, match="outside the swept grid"):
        m.predict(names[0], 5, 16)


def test_grid_parsing():
    assert parse_grid("bits=2,3,4 rank=0,32") == {"bits": (2, 3, 4), "rank": (0, 32)}
    assert grid_options((3, 2), (0,)) == (Option(2, 0), Option(3, 0))
    with pytest.raises(GridError, match="missing 'rank"):
        parse_grid(["bits=2"])


# ------------------------------------------------------------------ on a tiny model
TINY_BASE = """
defaults: {quantizer: uniform, b_q: 3, group_size: 16, rank: 4, b_l: 8, b_r: 8, factor_group_size: 8,
           iters: 1, lplr_iters: 1, requant_sweeps: 0, incoherence: true,
           calib_samples: 16, calib_seq_len: 24, calib_batch_size: 8}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.hf_tiny import randomize_, save_tiny_tokenizer, tiny_hf_model
    tmp = tmp_path_factory.mktemp("alloc")
    path, model = tiny_hf_model("llama", tmp, save=False, vocab_size=101, intermediate_size=32,
                                num_key_value_heads=4)
    randomize_(model, 0, scale=0.3)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    calib = np.random.default_rng(0).integers(0, 96, (16, 24))
    np.save(tmp / "calib.npy", calib)
    (tmp / "base.yaml").write_text(TINY_BASE)
    return {"tmp": tmp, "path": path, "calib": str(tmp / "calib.npy"), "base": str(tmp / "base.yaml")}


def _sweep(tiny, out, on_record=None):
    from caldera_jax.pipeline import error_sweep as sw
    spec = sw.SweepJob(model=tiny["path"], config=tiny["base"], calib=tiny["calib"], out=str(out),
                       bits=(2, 4), ranks=(0, 4), devices=1, progress=False)
    return sw.run(spec, sw.SweepCallbacks(on_record=on_record, log=lambda s: None))


def test_sweep_resumes_without_repeating_work(tiny):
    from caldera_jax.pipeline.error_sweep import read_records
    out = tiny["tmp"] / "sweep"
    seen = []

    class Crash(Exception):
        pass

    def crash_at_9(rec):
        seen.append(rec)
        if len(seen) == 9:
            raise Crash()

    with pytest.raises(Crash):
        _sweep(tiny, out, crash_at_9)
    first = read_records(str(out / "sweep.jsonl"))
    assert len(first) == 9
    with open(out / "sweep.jsonl", "ab") as f:                    # a torn line from a hard crash
        f.write(b'{"name": "model.layers.1.mlp')
    again = []
    res = _sweep(tiny, out, again.append)
    assert res["done_before"] == 9 and res["new"] == res["total"] - 9 == len(again)
    recs = read_records(str(out / "sweep.jsonl"))
    keys = [(r["name"], r["b_q"], r["rank"]) for r in recs]
    assert len(keys) == len(set(keys)) == 2 * 7 * 4                  # 2 layers x 7 linears x grid 4
    assert recs[:9] == first
    assert not any((r["name"], r["b_q"], r["rank"]) in {(f["name"], f["b_q"], f["rank"]) for f in first}
                   for r in again)
    from caldera_jax.allocation.options import cost_bits
    from caldera_jax.caldera.config import load_job_config
    base = load_job_config(tiny["base"]).defaults
    for r in recs:                       # the packed size equals the shape-only count the allocator uses
        assert 0 < r["rel_h"] < 1.5
        assert r["cost_bits"] == cost_bits(base, Option(r["b_q"], r["rank"]), tuple(r["shape"]))
    # 4 bits is better than 2, rank 4 better than rank 0 (mean over matrices)
    mean = lambda b, k: np.mean([r["rel_h"] for r in recs if r["b_q"] == b and r["rank"] == k])  # noqa: E731
    assert mean(4, 0) < mean(2, 0) and mean(2, 4) < mean(2, 0)
    assert _sweep(tiny, out)["new"] == 0                              # nothing left to do


def test_allocate_yaml_loads_and_compresses_to_the_predicted_size(tiny):
    from caldera_jax.caldera.config import load_job_config
    from caldera_jax.checkpoints_io import load_hf
    from caldera_jax.pipeline import allocate, compress, fit_error_model
    from caldera_jax.allocation.plan import AllocationError
    out = tiny["tmp"] / "sweep2"
    _sweep(tiny, out)
    fit = fit_error_model.run(fit_error_model.FitJob(str(out / "sweep.jsonl"), str(tiny["tmp"] / "fit")))
    assert os.path.isfile(tiny["tmp"] / "fit" / "residuals.png") and "by_proj" in fit
    cfg, _ = load_hf(tiny["path"])
    sens = tiny["tmp"] / "sens.json"
    sens.write_text(json.dumps({"weights": {"model.layers.1.*": 5.0}}))
    yaml_path = str(tiny["tmp"] / "alloc.yaml")
    rep = allocate.run(allocate.AllocateJob(model=tiny["path"], error_model=str(tiny["tmp"] / "fit" / "error_model.json"),
                                            config=tiny["base"], out=yaml_path, avg_bits=5.0,
                                            sensitivity=str(sens)))
    s = rep["summary"]
    assert s["total_bits"] <= s["budget_bits"] and s["bits_per_param"] <= 5.0
    assert len(set(m["option"] for m in rep["matrices"])) > 1          # not uniform
    job_cfg = load_job_config(yaml_path, cfg)
    plan = job_cfg.check(cfg)
    for m in rep["matrices"]:
        b = plan[m["name"]]
        assert (b is None) == (m["option"] == "bf16")
        if b is not None:
            assert (b.b_q, b.rank) == (m["b_q"], m["rank"])
    res = compress.run(compress.CompressJob(model=tiny["path"], config=yaml_path, calib=tiny["calib"],
                                            out=str(tiny["tmp"] / "ck"), progress=False),
                       compress.Callbacks(log=lambda s: None))
    got = res["summary"]["linear_bits_per_param"]
    assert got == pytest.approx(s["bits_per_param"], rel=1e-9)       # the size is exactly the predicted one
    with pytest.raises(AllocationError, match="below the minimum achievable"):
        allocate.run(allocate.AllocateJob(model=tiny["path"], error_model=str(tiny["tmp"] / "fit" / "error_model.json"),
                                          config=tiny["base"], out=yaml_path, avg_bits=1.0))
    # the same in one command: experiments.compress --avg-bits allocates, then compresses
    from experiments import compress as cli
    out = str(tiny["tmp"] / "ck-cli")
    rep2 = cli.main(["--model", tiny["path"], "--config", tiny["base"], "--calib", tiny["calib"], "--out", out,
                     "--avg-bits", "5.0", "--error-model", str(tiny["tmp"] / "fit" / "error_model.json"),
                     "--sensitivity", str(sens), "--no-progress"])
    assert rep2["summary"]["linear_bits_per_param"] == pytest.approx(s["bits_per_param"], rel=1e-9)
    assert load_job_config(out + ".alloc.yaml").digest() == load_job_config(yaml_path).digest()


def test_sensitivity_one_matrix_at_a_time(tiny, tmp_path):
    """KL > 0 and cosine < 1 per compressed matrix; a rerun skips the matrices done."""
    from caldera_jax.pipeline import sensitivity as sens
    path = tiny["path"]
    text = tmp_path / "t.txt"
    text.write_text("".join(chr(32 + (i * 7919) % 90) for i in range(2000)))
    base = tmp_path / "base.yaml"
    base.write_text(TINY_BASE.replace("calib_samples: 16, calib_seq_len: 24", "calib_samples: 8, calib_seq_len: 64"))
    job = sens.SensitivityJob(model=path, config=str(base), calib=str(text), text=str(text), out=str(tmp_path / "s"),
                              b_q=2, rank=0, projections=("q_proj",), tokens=128, seq_len=64, progress=False)
    rep = sens.run(job, log=lambda s: None)
    assert [r["layer"] for r in rep["results"]] == [0, 1]
    for r in rep["results"]:
        assert r["kl"] > 0 and 0 < r["cosine"] < 1 and r["tokens"] == 2 * 63
    assert os.path.isfile(tmp_path / "s" / "sensitivity.png")
    seen = []
    assert sens.run(job, on_record=seen.append, log=lambda s: None)["results"] == rep["results"] and not seen
