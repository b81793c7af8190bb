"""The notes' CALDERA table on a real model: SmolLM2-135M-Instruct, every setting a whole-model job.

    python -m bench.caldera_smollm2 [--only e8p-2b-inc-r64,...] [--work runs/caldera-table]
                                    [--ppl-tokens 8192] [--keep-checkpoints]

Grid: Q quantizer {uniform (groupwise, group 64, symmetric), E8P} x b_q {2, 3, 4} x incoherence
{on, off} x {Q-only (rank 0), CALDERA rank 64 with 4-bit L/R}. Everything else is the default
job's schedule (iters 1, lplr_iters 1, requant_sweeps 0, LDLQ, 32 x 256 Shakespeare calibration
tokens, `--mesh auto`) with the library's default order, the LR step first (BASE below; the
default job itself now takes the Q step first, from the ablation). Each setting runs the compression pipeline (`caldera_jax.pipeline.compress.run`) end to end (calibration,
decomposition, the compressed checkpoint), then the perplexity of the checkpoint as
`load_compressed` gives it, on the held-out Shakespeare plays (fixed token budget, 512-token
windows); the uncompressed model's perplexity is measured once on the same windows.

Per setting: mean relative Frobenius error ||W - Ŵ||_F / ||W||_F over the 210 linears, mean
H-weighted error sqrt(tr(E H Eᵀ)/tr(W H Wᵀ)), minimum weight correlation, bits per parameter of the
linears counted from what the checkpoint stores (codes + scales + factors + signs), the same for the
whole model (file bytes, embeddings included), perplexity, and wall time.

`--ablations` adds, at E8P 2-bit, uniform 3-bit and E8P 3-bit (rank 64, incoherence on): the Q step
first instead of the LR step, Q first with the Hessian downdated by the low-rank subspace, and the
issue's long schedule (5 outer x 10 LPLR iterations, 10 sweeps), alone and with Q first + downdate;
and a rank sweep (16, 32, 128) at E8P 2 and 3 bits.

Resumable: one JSON line per finished setting in <work>/results.jsonl; a rerun skips those (an
interrupted setting resumes inside its compression job). The checkpoints' weights are deleted after
measuring unless --keep-checkpoints (each setting's report/ stays). Writes
bench/results/caldera_smollm2.json and a PNG beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

QUANTIZERS = ("e8p", "uniform")
BITS = (2, 3, 4)
RANKS = (0, 64)
# order / downdate pinned to the settings these rows were measured with (the library's defaults
# became Q first + downdate after this table, issue 16)
BASE = {"b_l": 4, "b_r": 4, "factor_group_size": 64, "group_size": 64, "symmetric": True,
        "order": "lr_first", "hessian_downdate": False,
        "iters": 1, "lplr_iters": 1, "requant_sweeps": 0, "sigma_reg": 0.01,
        "calib_samples": 32, "calib_seq_len": 256, "calib_batch_size": 8, "calib_propagate": "original"}


@dataclasses.dataclass(frozen=True)
class Setting:
    quantizer: str
    b_q: int
    incoherence: bool
    rank: int
    variant: str = ""            # a key of VARIANTS: fields changed from BASE (ablations)

    @property
    def name(self) -> str:
        base = f"{self.quantizer}-{self.b_q}b-{'inc' if self.incoherence else 'noinc'}-r{self.rank}"
        return base + (f"-{self.variant}" if self.variant else "")

    def config(self) -> dict:
        return {"defaults": {**BASE, "quantizer": self.quantizer, "b_q": self.b_q,
                             "incoherence": self.incoherence, "rank": self.rank, **VARIANTS[self.variant]}}


# Ablations of the alternation on the real model (rank 64, incoherence on): the order of the steps,
# and the long schedule (5 outer x 10 LPLR iterations, 10 re-quantization sweeps).
VARIANTS = {"": {},
            "qfirst": {"order": "q_first"},
            "qfirst-dd": {"order": "q_first", "hessian_downdate": True},
            "long": {"iters": 5, "lplr_iters": 10, "requant_sweeps": 10},
            "qfirst-dd-long": {"order": "q_first", "hessian_downdate": True,
                               "iters": 5, "lplr_iters": 10, "requant_sweeps": 10}}


def grid() -> list[Setting]:
    """Incoherence on first (the default job's family), then off."""
    return [Setting(q, b, inc, r) for inc, q, b, r in itertools.product((True, False), QUANTIZERS, BITS, RANKS)]


def ablations() -> list[Setting]:
    """The alternation variants at three rank-64 settings, then a rank sweep (16, 32, 128) at E8P
    2 and 3 bits: where the bits are better spent on this small model, Q or L·R."""
    return ([Setting(q, b, True, 64, v) for q, b in (("e8p", 2), ("uniform", 3), ("e8p", 3))
             for v in VARIANTS if v]
            + [Setting("e8p", b, True, r) for b in (2, 3) for r in (16, 32, 128)])


def read_results(path: str) -> dict[str, dict]:
    done = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[r["setting"]] = r
    return done


def run_setting(s: Setting, work: str, ppl_ids, ppl_kw: dict, source, keep: bool) -> dict:
    """Compresses SmolLM2 with setting s, measures the checkpoint; returns its result row."""
    import yaml

    from caldera_jax.checkpoints_io.compressed import load_compressed
    from caldera_jax.eval.perplexity import model_perplexity
    from caldera_jax.pipeline import compress as pipeline
    from experiments import assets

    cfg_path = os.path.join(work, "configs", s.name + ".yaml")
    os.makedirs(os.path.dirname(cfg_path), exist_ok=True)
    with open(cfg_path, "w") as f:
        yaml.safe_dump(s.config(), f, sort_keys=False)
    out = os.path.join(work, s.name)
    t0 = time.perf_counter()
    rep = pipeline.run(pipeline.CompressJob(
        model=source.path, config=cfg_path, calib=str(assets.fetch("shakespeare") / "train.txt"), out=out,
        mesh={"ep": 0}, progress=False, command=f"bench.caldera_smollm2 --only {s.name}"))
    seconds = time.perf_counter() - t0
    cfg, params = load_compressed(out, source=source)
    ppl = model_perplexity(params, cfg, ppl_ids, **ppl_kw)
    summ = rep["summary"]
    row = {"setting": s.name, **dataclasses.asdict(s),
           "rel_fro": summ["rel_fro_mean"], "rel_h": summ["rel_h_mean"], "corr_min": summ["corr_min"],
           "linear_bits": summ["linear_bits_per_param"], "model_bits": summ["model_bits_per_param"],
           "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"], "seconds": seconds,
           "resumed_layers": rep["resumed_layers"]}
    if not keep:                     # the weights go; report/ and caldera_config.json stay
        for f in os.listdir(out):
            p = os.path.join(out, f)
            if f.endswith(".safetensors"):
                os.remove(p)
            elif os.path.isdir(p) and f != "report":
                shutil.rmtree(p)
    return row


def plot(rows: list[dict], base_ppl: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {("e8p", True): "C0", ("e8p", False): "C1", ("uniform", True): "C2", ("uniform", False): "C3"}
    for (q, inc), color in styles.items():
        for rank, marker, ls in ((0, "o", "--"), (64, "s", "-")):
            rs = sorted((r for r in rows if r["quantizer"] == q and r["incoherence"] == inc and r["rank"] == rank),
                        key=lambda r: r["linear_bits"])
            if not rs:
                continue
            lab = f"{q} {'inc' if inc else 'no inc'} {'Q-only' if rank == 0 else 'r64'}"
            x = [r["linear_bits"] for r in rs]
            axes[0].plot(x, [r["rel_fro"] for r in rs], ls, marker=marker, color=color, label=lab)
            axes[1].plot(x, [r["ppl"] for r in rs], ls, marker=marker, color=color, label=lab)
    sweep = [r for r in rows if r["rank"] not in RANKS]          # the rank sweep (E8P, incoherence on)
    for ax, key in ((axes[0], "rel_fro"), (axes[1], "ppl")):
        ax.scatter([r["linear_bits"] for r in sweep], [r[key] for r in sweep], marker="^", color="C0",
                   label="e8p inc, other ranks" if key == "ppl" else None)
        for r in sweep:
            ax.annotate(f"r{r['rank']}", (r["linear_bits"], r[key]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    axes[1].axhline(base_ppl, color="k", lw=0.8, label=f"uncompressed {base_ppl:.2f}")
    axes[0].set_ylabel("mean relative Frobenius error")
    axes[1].set_ylabel("perplexity, held-out (capped at 300)")
    axes[1].set_yscale("log")
    axes[1].set_ylim(0.95 * base_ppl, 300)
    for ax in axes:
        ax.set_xlabel("bits per parameter of the linears")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("CALDERA on SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.caldera_smollm2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join("runs", "caldera-table"))
    ap.add_argument("--only", default="", help="comma-separated setting names (default: the whole grid)")
    ap.add_argument("--ablations", action="store_true",
                    help="also the order / schedule ablations (VARIANTS) at three rank-64 settings and "
                         "the rank sweep (ablations())")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--out", default=os.path.join("bench", "results", "caldera_smollm2.json"))
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # internal: run --only's one setting
    args = ap.parse_args(argv)

    from caldera_jax import runtime
    from experiments import assets
    runtime.setup(cpu_devices=min(os.cpu_count() or 1, 8),   # what `--mesh auto` uses
                  compile_cache=str(assets.cache_dir() / "xla-cache"))
    from tqdm.auto import tqdm

    from bench.common import write_report
    from caldera_jax.checkpoints_io.fingerprint import open_source
    from caldera_jax.checkpoints_io.model_source import load_tokenizer, open_layers
    from caldera_jax.eval.perplexity import streamed_perplexity
    from caldera_jax.eval.perplexity import tokenize_text

    settings = grid() + (ablations() if args.ablations else [])
    if args.only:
        want = args.only.split(",")
        known = {s.name: s for s in grid() + ablations()}
        unknown = [w for w in want if w not in known]
        if unknown:
            ap.error(f"--only: unknown settings {unknown}; known: {list(known)}")
        settings = [known[w] for w in want]
    if args.one and len(settings) != 1:
        ap.error("--one needs exactly one setting in --only")
    os.makedirs(args.work, exist_ok=True)
    results_path = os.path.join(args.work, "results.jsonl")
    done = read_results(results_path)

    source = open_source(str(assets.fetch("smollm2-135m-instruct")))
    tok = load_tokenizer(source.tokenizer_dir, source.tokenizer_kwargs)
    ppl_ids = tokenize_text(tok, str(assets.fetch("shakespeare") / "valid.txt"))
    ppl_kw = dict(seq_len=512, max_tokens=args.ppl_tokens, batch_size=4)
    if "baseline" not in done:
        m = open_layers(source)
        b = streamed_perplexity(m.read_layer, m.read_globals, m.cfg, ppl_ids, **ppl_kw)
        done["baseline"] = {"setting": "baseline", "ppl": b["ppl"], "ppl_tokens": b["tokens"], "linear_bits": 32.0}
        with open(results_path, "a") as f:
            f.write(json.dumps(done["baseline"]) + "\n")
    base_ppl = done["baseline"]["ppl"]
    print(f"uncompressed perplexity {base_ppl:.3f} ({done['baseline']['ppl_tokens']} tokens)", flush=True)

    if args.one:                       # the child process of one setting (see below)
        row = run_setting(settings[0], args.work, ppl_ids, ppl_kw, source, args.keep_checkpoints)
        with open(results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        return

    todo = [s for s in settings if s.name not in done]
    bar = tqdm(total=len(settings), initial=len(settings) - len(todo), unit="setting", desc="caldera table")
    for s in todo:
        # one process per setting: 20+ whole-model jobs in one process exhaust LLVM's code memory
        # (every setting compiles its own programs); the on-disk compile cache keeps this cheap
        bar.set_postfix_str(s.name)
        cmd = [sys.executable, "-m", "bench.caldera_smollm2", "--one", "--only", s.name, "--work", args.work,
               "--ppl-tokens", str(args.ppl_tokens)] + (["--keep-checkpoints"] if args.keep_checkpoints else [])
        subprocess.run(cmd, check=True)
        row = read_results(results_path)[s.name]
        done[s.name] = row
        bar.write(f"{s.name}: rel-fro {row['rel_fro']:.4f}  H-err {row['rel_h']:.4f}  "
                  f"{row['linear_bits']:.3f} bits/param  ppl {row['ppl']:.3f}  {row['seconds']:.0f}s")
        bar.update(1)
    bar.close()

    rows = [done[s.name] for s in grid() + ablations() if s.name in done]
    png = os.path.splitext(args.out)[0] + ".png"
    plot([r for r in rows if not r.get("variant")], base_ppl, png)
    write_report(args.out, "caldera_smollm2", rows,
                 ["setting", "rel_fro", "rel_h", "corr_min", "linear_bits", "model_bits", "ppl", "seconds"],
                 extra={"baseline_ppl": base_ppl, "ppl_tokens": done["baseline"]["ppl_tokens"],
                        "command": "python -m bench.caldera_smollm2", "base_config": BASE, "plot": png})


if __name__ == "__main__":
    main()
