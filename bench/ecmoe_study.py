"""Issue 14's study: every dispatch codec on the real MoE, by response-only perplexity and downstream.

    python -m bench.ecmoe_study [--model smollm2-moe|DIR] [--work runs/ecmoe-<name>]
        [--fixed none,int8,int4,int2,fp8,int4-g128,int2-g128] [--offline-ratios 2,4,8,16]
        [--e2e e2e-4x,e2e-stale-4x,...]
        [--e2e-steps 150] [--downstream none,int4,off-4x,e2e-4x] [--downstream-limit 500]
        [--out bench/results/ecmoe_<name>.json]

Steps, each an experiments CLI in a child process (each resumable; a finished step is skipped, so
rerunning the same command continues where a killed run stopped):
 1. data: ARC validation questions answered greedily by the uncompressed MoE itself (the asset
    `selfchat-smollm2-moe`, or `experiments.selfchat` for another model): training teaches the
    compressed model to behave like it; the
    seed-42 80/10/10 split of caldera_jax.data; every perplexity below is on the test split.
 2. fixed codecs (no training): response-only perplexity with the codec around the all-to-all,
    router "compressed" (it sees the decoded state) and "uncompressed" (it sees the original).
 3. offline: `experiments.offline_codecs collect` (the MoE layers' dispatched states on response
    tokens), then `fit` per layer and stale (raw reference state, every `stride`-th layer) at each
    ratio; perplexity in both router modes; SNR / cosine per layer from the fit's report.
 4. end to end: `experiments.train_compressors` for each --e2e row (ratio, stale, init, router
    mode as data in E2E below), `--e2e-steps` optimizer steps; perplexity in both router modes;
    training throughput (response tokens/s and model FLOPs/s against a measured matmul peak).
 5. downstream: `experiments.eval --tasks arc_easy,piqa --limit N --codec ...` for the
    --downstream rows (router mode: each codec's own).
 6. a table, JSON and PNG (perplexity against wire bytes per token, one line per method).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

E2E = {   # name -> (ratio, stale, init, router mode it trains with)
    "e2e-2x": (2, "none", "offline", "compressed"),
    "e2e-4x": (4, "none", "offline", "compressed"),
    "e2e-8x": (8, "none", "offline", "compressed"),
    "e2e-16x": (16, "none", "offline", "compressed"),
    "e2e-4x-identity": (4, "none", "identity", "compressed"),
    "e2e-16x-identity": (16, "none", "identity", "compressed"),
    "e2e-stale-4x": (4, "uncompressed", "offline", "compressed"),
    "e2e-stale-16x": (16, "uncompressed", "offline", "compressed"),
    "e2e-16x-router-unc": (16, "none", "offline", "uncompressed"),
    "e2e-stale-16x-router-unc": (16, "uncompressed", "offline", "uncompressed"),
}
DEFAULT_E2E = "e2e-4x,e2e-stale-4x,e2e-16x,e2e-stale-16x,e2e-4x-identity,e2e-16x-router-unc"


def wire_fraction(codec: str, cfg) -> float:
    """A fixed codec's dispatch bytes per token over bf16's 2·H: the bytes of the payload its
    encode produces for one token (codes, scales, offsets), as codec_spec configures it for cfg."""
    import jax.numpy as jnp
    from caldera_jax.moe.codec_spec import load_codec
    spec = load_codec(codec, cfg)
    if spec.codec is None:
        return 1.0
    payload = spec.codec.encode({}, jnp.ones((1, cfg.hidden_size), jnp.float32))
    return sum(a.size * a.dtype.itemsize for a in payload.values()) / (2 * cfg.hidden_size)


def learned_wire_fraction(ratio: int, stale: str, cfg, stride: int) -> float:
    """A learned codec's dispatch bytes per token over bf16's k·2·H: the code (2·H/ratio bytes per
    routed copy) plus, for a stale codec, a 4-byte token id per copy and the reference layers'
    state sent once per token (raw 2·H, or its code), averaged over the MoE layers."""
    if stale == "none":
        return 1 / ratio
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    refs = sum(1 for j in range(len(moe)) if j % stride == 0)
    per_ref = 1.0 if stale == "uncompressed" else 1 / ratio
    return 1 / ratio + 2 / cfg.hidden_size + refs / len(moe) * per_ref / cfg.num_experts_per_tok


def active_params(model: str) -> tuple[int, int]:
    """(parameters a token uses, ModelConfig) of an MoE HF directory: everything but the experts,
    plus top-k experts' worth per MoE layer."""
    from caldera_jax.checkpoints_io.hf import load_hf
    from caldera_jax.params import flatten
    cfg, params = load_hf(model)
    total = experts = 0
    for n, v in flatten(params).items():
        total += v.size
        if ".experts." in n:
            experts += v.size
    k, e = cfg.num_experts_per_tok, cfg.num_experts
    return int(total - experts + experts * k / e), cfg


def _run(cmd: list[str], log: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 matmul GFLOP/s on this machine (the MFU denominator), median of repeats."""
    import jax
    import jax.numpy as jnp
    from bench.common import median_time
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    t, _ = median_time(lambda: f(a).block_until_ready(), repeats)
    return 2 * n ** 3 / t / 1e9


def plot(rows: list[dict], base: float, path: str, title: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    for method, style in (("fixed", "o"), ("offline per-layer", "v-"), ("offline stale", "^-"),
                          ("e2e per-layer", "s-"), ("e2e stale", "D-")):
        pts = sorted((r["wire_fraction"], r["ppl_compressed"]) for r in rows
                     if r["method"] == method and r.get("ppl_compressed") and r.get("init", "offline") != "identity"
                     and r.get("train_router", "compressed") == "compressed")
        if pts:
            ax.plot(*zip(*pts), style, label=method)
    for r in rows:
        if r["method"] == "fixed" and r.get("ppl_compressed"):
            ax.annotate(r["name"], (r["wire_fraction"], r["ppl_compressed"]), fontsize=8)
    ax.axhline(base, color="gray", ls="--", lw=1, label=f"no codec {base:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="dispatch bytes per token (fraction of bf16)",
           ylabel="response-only perplexity (test split)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ecmoe_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-moe", help="an asset name, or an MoE HF directory")
    ap.add_argument("--work", default=None, help="default runs/ecmoe-<model name>")
    ap.add_argument("--data", default=None, help="chat JSONL (default: the MoE's own answers, step 1)")
    ap.add_argument("--selfchat-limit", type=int, default=None)
    ap.add_argument("--fixed", default="none,int8,int4,int2,fp8,int4-g128,int2-g128")
    ap.add_argument("--offline-ratios", default="2,4,8,16")
    ap.add_argument("--offline-steps", type=int, default=500)
    ap.add_argument("--collect-tokens", type=int, default=32768, help="response tokens of states per split")
    ap.add_argument("--stride", type=int, default=12)
    ap.add_argument("--e2e", default=DEFAULT_E2E, help=f"comma-separated, of {list(E2E)}")
    ap.add_argument("--e2e-steps", type=int, default=150)
    ap.add_argument("--e2e-lr", type=float, default=1e-3)
    ap.add_argument("--downstream", default="none,int4,int2,off-4x,e2e-4x,e2e-stale-4x")
    ap.add_argument("--downstream-tasks", default="arc_easy,piqa")
    ap.add_argument("--downstream-limit", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--out", default=None, help="default bench/results/ecmoe_<model name>.json")
    args = ap.parse_args(argv)
    e2e = [e for e in args.e2e.split(",") if e]
    if unknown := [e for e in e2e if e not in E2E]:
        ap.error(f"--e2e: unknown {unknown}; known: {list(E2E)}")

    from bench.common import write_report
    from experiments import assets
    model = args.model if os.path.exists(args.model) else str(assets.fetch(args.model))
    name = os.path.basename(os.path.normpath(model))
    work = os.path.abspath(args.work or os.path.join("runs", f"ecmoe-{name}"))
    out = args.out or os.path.join("bench", "results", f"ecmoe_{name}.json")
    os.makedirs(os.path.join(work, "ppl"), exist_ok=True)
    log = os.path.join(work, "study.log")
    py = [sys.executable, "-m"]
    active, cfg = active_params(model)

    data = args.data
    if data is None and "selfchat-" + args.model in assets.ASSETS and not args.selfchat_limit:
        data = str(assets.fetch("selfchat-" + args.model) / "chat.jsonl")    # built once, cached
    if data is None:                             # resumes by itself; a finished set is left as is
        data = os.path.join(work, "selfchat-moe.jsonl")
        if not os.path.exists(data):
            _run(py + ["experiments.selfchat", "--model", model, "--out", data]
                 + (["--limit", str(args.selfchat_limit)] if args.selfchat_limit else []), log)

    def ppl(codec: str, tag: str, router: str | None) -> dict:
        path = os.path.join(work, "ppl", f"{tag}-{router or 'own'}.json")
        if not os.path.exists(path):
            _run(py + ["experiments.perplexity", "--model", model, "--data", data, "--split", "test",
                       "--seq-len", str(args.seq_len), "--codec", codec, "--out", path]
                 + (["--router-mode", router] if router else []), log)
        return json.load(open(path))

    def both_modes(codec: str, tag: str) -> dict:
        c, u = ppl(codec, tag, "compressed"), ppl(codec, tag, "uncompressed")
        return {"ppl_compressed": c["ppl"], "ppl_uncompressed": u["ppl"], "tokens": c["tokens"]}

    rows, codecs = [], {}
    base = ppl("none", "none", None)
    for f in args.fixed.split(","):
        w = wire_fraction(f, cfg)
        r = {"name": f, "method": "fixed", "ratio": round(1 / w, 2), "wire_fraction": w}
        r.update({"ppl_compressed": base["ppl"], "ppl_uncompressed": base["ppl"], "tokens": base["tokens"]}
                 if f == "none" else both_modes(f, f))
        rows.append(r)
        codecs[f] = f

    states = os.path.join(work, "states")
    ratios = [int(x) for x in args.offline_ratios.split(",") if x]
    if ratios:
        if not os.path.exists(os.path.join(states, "meta.json")):
            _run(py + ["experiments.offline_codecs", "collect", "--model", model, "--data", data, "--out", states,
                       "--seq-len", str(args.seq_len), "--max-tokens", str(args.collect_tokens), "--no-progress"], log)
    for stale in ("none", "uncompressed"):
        for ratio in ratios:
            tag = f"off-{'stale-' if stale != 'none' else ''}{ratio}x"
            d = os.path.join(work, tag)
            if not os.path.exists(os.path.join(d, "codec.safetensors")):
                _run(py + ["experiments.offline_codecs", "fit", "--states", states, "--out", d, "--ratio", str(ratio),
                           "--stale", stale, "--stride", str(args.stride), "--steps", str(args.offline_steps),
                           "--no-progress"], log)
            rep = json.load(open(os.path.join(d, "report.json")))
            lay = rep.get("layers", [])
            r = {"name": tag, "method": "offline " + ("stale" if stale != "none" else "per-layer"), "ratio": ratio,
                 "stale": stale, "wire_fraction": learned_wire_fraction(ratio, stale, cfg, args.stride),
                 "snr_db_mean": sum(x["snr_db"] for x in lay) / max(len(lay), 1),
                 "cosine_mean": sum(x["cosine"] for x in lay) / max(len(lay), 1), **both_modes(d, tag)}
            rows.append(r)
            codecs[tag] = d

    peak = matmul_peak_gflops() if e2e else None
    for tag in e2e:
        ratio, stale, init, router = E2E[tag]
        d = os.path.join(work, tag)
        if not os.path.exists(os.path.join(d, "codec.safetensors")):
            init_arg = "identity" if init == "identity" else \
                f"offline:{os.path.join(work, 'off-' + ('stale-' if stale != 'none' else '') + f'{ratio}x')}"
            _run(py + ["experiments.train_compressors", "--model", model, "--data", data, "--out", d,
                       "--ratio", str(ratio), "--stale", stale, "--stride", str(args.stride), "--router-mode", router,
                       "--init", init_arg, "--max-steps", str(args.e2e_steps), "--epochs", "10",
                       "--lr", str(args.e2e_lr), "--seq-len", str(args.seq_len),
                       "--val-interval", str(max(args.e2e_steps // 2, 1)),
                       "--ckpt-interval", str(max(args.e2e_steps // 4, 1)), "--no-progress"], log)
        run = json.load(open(os.path.join(d, "run.json")))
        steps = [json.loads(x) for x in open(os.path.join(d, "train", "metrics.jsonl"))]
        secs = sum(s.get("seconds", 0.0) for s in steps[1:])     # first step compiles
        toks = sum(s.get("tokens", 0) for s in steps[1:])
        job = run["job"]
        r = {"name": tag, "method": "e2e " + ("stale" if stale != "none" else "per-layer"), "ratio": ratio,
             "stale": stale, "init": init, "train_router": router,
             "wire_fraction": learned_wire_fraction(ratio, stale, cfg, args.stride),
             "val_loss_before": run["val_loss_before"], "val_loss_best": run["val_loss_best"],
             "best_step": run["best_step"], "steps": run["steps"],
             "response_tokens_per_s": toks / secs if secs else None,
             "padded_tokens_per_s": (len(steps) - 1) * job["batch_size"] * job["seq_len"] / secs if secs else None,
             **both_modes(d, tag)}
        if secs:
            r["model_gflops_per_s"] = 4 * active * r["padded_tokens_per_s"] / 1e9
            r["mfu_vs_matmul_peak"] = r["model_gflops_per_s"] / peak
        rows.append(r)
        codecs[tag] = d

    down = {}
    tasks = args.downstream_tasks
    for tag in [t for t in args.downstream.split(",") if t]:
        if tag not in codecs:
            print(f"downstream: {tag} was not run in this study; skipped", flush=True)
            continue
        res_dir = os.path.join(work, "eval")
        fname = f"caldera-jax-{tasks.replace(',', '+')}-limit{args.downstream_limit}" + \
            ("" if tag == "none" else f"-codec-{os.path.basename(codecs[tag].rstrip('/'))}") + ".json"
        path = os.path.join(res_dir, fname)
        if not os.path.exists(path):
            _run(py + ["experiments.eval", "--model", model, "--tasks", tasks, "--limit", str(args.downstream_limit),
                       "--codec", codecs[tag], "--out", res_dir, "--batch-size", "8"], log)
        res = json.load(open(path))["results"]
        down[tag] = {t: {"acc": res[t].get("acc,none"), "acc_stderr": res[t].get("acc_stderr,none"),
                         "acc_norm": res[t].get("acc_norm,none"), "acc_norm_stderr": res[t].get("acc_norm_stderr,none")}
                     for t in tasks.split(",")}
        for r in rows:
            if r["name"] == tag:
                for t in tasks.split(","):
                    r[f"{t}_acc"] = down[tag][t]["acc"]

    for r in rows:
        r["ppl_vs_none_pct"] = 100 * (r["ppl_compressed"] / base["ppl"] - 1)
    plot(rows, base["ppl"], os.path.splitext(out)[0] + ".png", f"{name}: dispatch codecs")
    cols = ["name", "method", "ratio", "wire_fraction", "ppl_compressed", "ppl_uncompressed", "ppl_vs_none_pct",
            "snr_db_mean", "val_loss_before", "val_loss_best"] + [f"{t}_acc" for t in tasks.split(",")]
    write_report(out, "ecmoe_study", rows, cols,
                 extra={"model": model, "data": data, "work": work, "split": "test", "baseline": base,
                        "downstream": down, "downstream_limit": args.downstream_limit,
                        "matmul_peak_gflops": peak, "active_params": active, "e2e_steps": args.e2e_steps, "e2e_lr": args.e2e_lr,
                        "command": "python -m bench.ecmoe_study " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
