"""Expert-parallel MoE layer with each dispatch codec: time, compressor overhead, wire bytes, and a
projection of the communication time saved at Qwen3-30B-A3B scale.

    python -m bench.moe_ep [--tokens 256] [--experts 32] [--repeats 3] [--out bench/results/moe_ep.json]
    python -m bench.moe_ep --flops-only --experts 128 --tokens 32768   # Qwen3-30B-A3B shapes, counted

Measured (8 fake CPU devices, mesh ep=8, float32 compute): a stack of two MoE layers (layer 0 is a
stale codec's reference layer, layer 1 a conditioned one) at Qwen3-30B-A3B widths (hidden 2048,
expert width 768, top-8) with fewer experts (default 32) so that it fits two CPU cores. Per codec:
median forward+backward time per layer, wall and process CPU time (same run as identity,
rounds interleaved across codecs; ratios to identity taken within a round, median over rounds), the codec's FLOPs from the shapes
and the XLA cost-analysis FLOPs difference to identity, and the bytes each layer hands to its
collectives, read from the compiled HLO (bf16 wire for identity/learned, as a bf16 model sends).

Projected (paper, stated assumptions printed): bytes per token from those HLO figures, scaled to
ep = 8 / 16 / 64 with 128 experts, top-8, 48 layers, and DeepEP's published all-to-all bandwidths.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from bench.common import write_report
from caldera_jax import runtime
from caldera_jax.config import ModelConfig
from caldera_jax.models.hooks import Ctx
from caldera_jax.moe import (FP8, Identity, IntQuant, Learned, StaleConditioned,
                             add_codec_params, codec_name, expert_parallel_hooks, make_mesh)
from caldera_jax.moe.fold import fold_is_cheaper
from caldera_jax.moe.wire import bytes_by_scope, collectives

QWEN3 = dict(hidden=2048, experts=128, top_k=8, layers=48, intermediate=768)
BANDWIDTH_GBS = [(8, "NVLink intranode", 150.0), (16, "RDMA internode", 45.0), (16, "RDMA internode", 90.0),
                 (64, "RDMA internode", 45.0), (64, "RDMA internode", 90.0)]
STRIDE = 12          # the notes' reference-layer stride for the projection
TOKENS_PER_DEVICE = 4096


def codecs() -> list[tuple[object, str]]:
    """(codec, expert-side decoder): every codec with decoder="auto" (the default), and the
    learned/stale 4x codecs also with each decoder forced, side by side (caldera_jax/moe/fold.py)."""
    bf16 = "bfloat16"
    auto = [Identity(wire_dtype=bf16), IntQuant(8), IntQuant(4), IntQuant(2), IntQuant(4, "zeropoint"), FP8(),
            Learned(2, wire_dtype=bf16), Learned(4, wire_dtype=bf16), Learned(8, wire_dtype=bf16),
            Learned(16, wire_dtype=bf16),
            StaleConditioned(4, wire_dtype=bf16, stride=2, stale_kind="raw"),
            StaleConditioned(4, wire_dtype=bf16, stride=2, stale_kind="compressed")]
    forced = [(c, d) for c in (Learned(4, wire_dtype=bf16), StaleConditioned(4, wire_dtype=bf16, stride=2))
              for d in ("rows", "fold")]
    return [(c, "auto") for c in auto] + forced


def label(codec, decoder: str) -> str:
    return codec_name(codec) + ("" if decoder == "auto" else f" ({decoder})")


def layer_config(experts: int) -> ModelConfig:
    H = QWEN3["hidden"]
    return ModelConfig(model_type="qwen3_moe", vocab_size=16, hidden_size=H, intermediate_size=QWEN3["intermediate"],
                       num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                       num_experts=experts, num_experts_per_tok=QWEN3["top_k"],
                       moe_intermediate_size=QWEN3["intermediate"])


def init(cfg: ModelConfig, tokens: int):
    """Two MoE blocks of random weights (HF-style N(0, 0.02)), tokens x and a cotangent r."""
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    ks = jax.random.split(jax.random.key(0), 10)
    layers = {}
    for i in range(2):
        k = ks[4 * i: 4 * i + 4]
        layers[str(i)] = {"mlp": {
            "gate": {"weight": 0.02 * jax.random.normal(k[0], (E, H))},
            "experts": {"gate_proj": {"weight": 0.02 * jax.random.normal(k[1], (E, I, H))},
                        "up_proj": {"weight": 0.02 * jax.random.normal(k[2], (E, I, H))},
                        "down_proj": {"weight": 0.02 * jax.random.normal(k[3], (E, H, I))}}}}
    x = jax.random.normal(ks[8], (tokens, H))
    return {"model": {"layers": layers}}, x, jax.random.normal(ks[9], (tokens, H))


def step_fn(hooks, cfg: ModelConfig):
    """(params, x, r) -> (loss, grads w.r.t. params and x) through two EP MoE layers."""
    def loss(params, x, r):
        ctx = Ctx(hooks, {})
        h = x
        for i in range(2):
            h = h + hooks.moe(f"model.layers.{i}.mlp", params["model"]["layers"][str(i)]["mlp"], cfg, h, h, ctx)
        return jnp.sum(h * r), ctx.aux
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def codec_flops(codec, cfg: ModelConfig, layer: int, folded: bool, n: int, ep: int) -> float:
    """Forward FLOPs the codec adds per token (n tokens per device, ep devices): one encode on the
    source; decoded: one decode per routed row (k per token); folded (fold.py): the per-call fold
    of W_d into the local experts' gate/up, spread over the n tokens, minus what gate/up save by
    reading d < H inputs."""
    H, k, I = cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    if isinstance(codec, Learned):
        b = H // codec.ratio
        dec_in = b
        if isinstance(codec, StaleConditioned) and codec.stale_role(cfg, layer) == "use":
            dec_in += codec.stale_width(cfg)
        if folded:
            e_loc = cfg.num_experts // ep
            return 2 * H * b + 4 * e_loc * I * H * dec_in / n + k * 4 * I * (dec_in - H)
        return 2 * H * b + k * 2 * dec_in * H
    if isinstance(codec, Identity):
        return 0.0
    return 4 * H + k * 2 * H          # quantizers: scale, divide, round, clip; decode: shift, multiply


def folds(codec, decoder: str, cfg: ModelConfig, layer: int, n: int, ep: int, slots: int) -> bool:
    """Whether the EP layer folds this codec's decoder (the same rule it applies when tracing)."""
    if decoder == "rows" or not isinstance(codec, Learned):
        return False
    if decoder == "fold":
        return True
    dec_in = cfg.hidden_size // codec.ratio
    if isinstance(codec, StaleConditioned) and codec.stale_role(cfg, layer) == "use":
        dec_in += codec.stale_width(cfg)
    e_loc = cfg.num_experts // ep
    return fold_is_cheaper(e_loc * ep * slots, ep * slots, e_loc, cfg.moe_intermediate_size, cfg.hidden_size, dec_in)


def moe_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs of the MoE block per token: router + top-k SwiGLU experts."""
    H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    return 2 * H * E + k * 3 * 2 * H * I


def prepare(codec, decoder: str, cfg, base_params, x, r, mesh, capacity_factor: float, run: bool = True) -> dict:
    """Compiles the step for `codec` and reads its HLO and FLOPs; returns the row and the runner.
    The combine path sends bf16 (Identity(bfloat16) combine codec), as a bf16 model does.
    run=False: params, x and r may be jax.ShapeDtypeStructs (compile and count only)."""
    params = jax.eval_shape(lambda p: add_codec_params(p, cfg, codec, jax.random.key(1)), base_params) \
        if not run else add_codec_params(base_params, cfg, codec, jax.random.key(1))
    hooks = expert_parallel_hooks(mesh, codec=codec, capacity_factor=capacity_factor,
                                  combine_codec=Identity(wire_dtype="bfloat16"), decoder=decoder)
    t0 = time.perf_counter()
    compiled = step_fn(hooks, cfg).lower(params, x, r).compile()
    compile_s = time.perf_counter() - t0
    dropped = None
    if run:
        (_, aux), _ = compiled(params, x, r)
        dropped = int(sum(int(v) for k_, v in aux.items() if k_.endswith(".dropped")))
    ops = collectives(jax.jit(_forward(hooks, cfg)).lower(params, x).compile().as_text())
    ep = mesh.shape["ep"]
    n = x.shape[0] // ep
    slots = hooks.moe.dispatch.slots(n, cfg.num_experts_per_tok, cfg.num_experts)
    rows = cfg.num_experts * slots
    per_layer = [bytes_by_scope(ops, layer=i) for i in range(2)]
    folded = [folds(codec, decoder, cfg, i, n, ep, slots) for i in range(2)]
    row = {"codec": label(codec, decoder), "compile_s": compile_s, "dropped": dropped,
           "folded": "+".join("fold" if f else "rows" for f in folded) if isinstance(codec, Learned) else "-",
           "xla_gflop": float((compiled.cost_analysis() or {}).get("flops", float("nan"))) / 1e9,
           "codec_flop_tok": sum(codec_flops(codec, cfg, i, folded[i], n, ep) for i in range(2)) / 2,
           "moe_flop_tok": moe_flops(cfg),
           # at ep=1 XLA drops the all-to-alls: no wire bytes to read (None)
           "row_B": per_layer[1]["moe_dispatch"] / rows if ep > 1 else None,
           "ids_B_row": per_layer[1].get("moe_token_ids", 0.0) / rows,
           "stale_B_tok": per_layer[0].get("moe_stale", 0.0) / n,
           "combine_B_row": per_layer[1]["moe_combine"] / rows if ep > 1 else None,
           "other_collective_B": sum(v for layer in per_layer for s, v in layer.items()
                                     if s not in ("moe_dispatch", "moe_combine", "moe_stale", "moe_token_ids"))}
    return {"row": row, "run": (lambda: jax.block_until_ready(compiled(params, x, r))) if run else None}


def _forward(hooks, cfg):
    def fwd(params, x):
        ctx = Ctx(hooks, {})
        h = x
        for i in range(2):
            h = h + hooks.moe(f"model.layers.{i}.mlp", params["model"]["layers"][str(i)]["mlp"], cfg, h, h, ctx)
        return h
    return fwd


def project(row: dict, ident: dict) -> list[dict]:
    """Dispatch + combine seconds per MoE layer at Qwen3-30B-A3B scale from the measured bytes.

    Per token and MoE layer a device sends k rows out (dispatch) and k rows back (combine, bf16),
    a fraction (ep-1)/ep of them to other devices (uniform routing); conditioned stale layers add
    an int32 token id per row; a reference layer (1 in STRIDE) all_gathers the stale state to the
    ep-1 peers. Bytes / bandwidth, no overlap with compute, no per-device deduplication.
    """
    k = QWEN3["top_k"]
    out = []
    for ep, link, bw in BANDWIDTH_GBS:
        def layer_bytes(r):
            frac = (ep - 1) / ep
            base = k * frac * (r["row_B"] + r["combine_B_row"])
            if r["stale_B_tok"] == 0:
                return base
            cond = base + k * frac * r["ids_B_row"]
            ref = base + (ep - 1) * r["stale_B_tok"]
            return ((STRIDE - 1) * cond + ref) / STRIDE
        b, b0 = layer_bytes(row), layer_bytes(ident)
        t, t0 = TOKENS_PER_DEVICE * b / (bw * 1e9), TOKENS_PER_DEVICE * b0 / (bw * 1e9)
        name = row["codec"].replace("-s2", f"-s{STRIDE}") if row["stale_B_tok"] else row["codec"]
        out.append({"codec": name, "ep": ep, "link": link, "GB_s": bw,
                    "B_tok_layer": b, "comm_us_layer": 1e6 * t, "saved_us_layer": 1e6 * (t0 - t),
                    "saved_ms_48_layers": 1e3 * QWEN3["layers"] * (t0 - t), "saved_pct": 100 * (1 - b / b0)})
    return out


def _table(rows: list[dict], cols: list[str]) -> None:
    def f(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    w = [max(len(c), *(len(f(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(x) for c, x in zip(cols, w)))
    for r in rows:
        print("  ".join(f(r[c]).ljust(x) for c, x in zip(cols, w)))


ASSUMPTIONS = [
    "measured: 8 fake CPU devices on one host (all-to-all is a memory copy; times are compute-bound "
    "CPU times, not network times); mesh ep=8; float32 compute; identity and learned codecs send bf16",
    "measured layer: hidden 2048, expert width 768, top-8, fewer experts than Qwen3 (see meta) so it fits "
    "two CPU cores; forward+backward of a 2-layer stack (reference + conditioned layer), time / 2",
    "codec FLOPs (analytic): one encode per token + either one decode per routed row (k per token) or, "
    "folded (caldera_jax/moe/fold.py), the per-call fold W_g·W_d spread over the device's tokens minus "
    "what gate/up save by reading d < H inputs; quantizer FLOPs are elementwise estimates; "
    "xla_flop_delta_pct is the compiled forward+backward step's FLOPs (XLA cost analysis) vs identity",
    "projection: Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, 48 MoE layers), "
    f"{TOKENS_PER_DEVICE} tokens per device per layer, uniform routing ((ep-1)/ep of rows leave the device), "
    "exactly k rows per token (dropless), combine path in bf16, no overlap of communication with compute, "
    "no DeepEP-style per-device deduplication of rows",
    f"projection: stale codecs averaged over stride {STRIDE} (the notes'); the reference layer all_gathers "
    "its stale state to all ep-1 peers (needed because later layers route tokens to other devices); "
    "conditioned layers send an int32 token id per row",
    "bandwidths: DeepEP published all-to-all figures, ~150 GB/s NVLink intranode (ep=8), "
    "~45-90 GB/s RDMA internode (ep=16, 64)",
    "real all-to-all over NVLink is not measured (one GPU at most was lent: `--ep 1` on it times the "
    "codecs without communication; bench/gpu_check.sh)",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256, help="tokens in the batch (all devices)")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--ep", type=int, default=8, help="expert-parallel devices (8 fake CPU devices by default; "
                    "1 on a single GPU)")
    ap.add_argument("--out", default="bench/results/moe_ep.json")
    ap.add_argument("--flops-only", action="store_true",
                    help="compile and count (XLA FLOPs, wire bytes) without running: for full-size shapes, "
                         "e.g. --experts 128 --tokens 32768 (Qwen3-30B-A3B, 4096 tokens per device at ep=8)")
    args = ap.parse_args(argv)
    runtime.setup(cpu_devices=args.ep)            # fake CPU devices (no effect on a GPU)
    cfg = layer_config(args.experts)
    mesh = make_mesh(ep=args.ep)
    if args.flops_only:
        params, x, r = jax.eval_shape(lambda: init(cfg, args.tokens))
    else:
        params, x, r = init(cfg, args.tokens)
    prepared = []
    for codec, decoder in codecs():
        prepared.append(prepare(codec, decoder, cfg, params, x, r, mesh, args.capacity_factor,
                                run=not args.flops_only))
        print(f"  compiled {prepared[-1]['row']['codec']} ({prepared[-1]['row']['compile_s']:.1f}s)", flush=True)
    if args.flops_only:
        rows = [p["row"] for p in prepared]
        for row in rows:
            row["codec_flop_pct"] = 100 * row["codec_flop_tok"] / row["moe_flop_tok"]
            row["xla_flop_delta_pct"] = 100 * (row["xla_gflop"] / rows[0]["xla_gflop"] - 1)
            row["wire_vs_bf16"] = row["row_B"] / rows[0]["row_B"]
        write_report(args.out, "moe_ep_flops", rows,
                     ["codec", "folded", "xla_gflop", "xla_flop_delta_pct", "codec_flop_pct", "row_B", "wire_vs_bf16"],
                     extra={"mesh": f"ep={args.ep}", "tokens": args.tokens, "experts": args.experts,
                            "hidden": cfg.hidden_size, "expert_width": cfg.moe_intermediate_size,
                            "top_k": cfg.num_experts_per_tok, "capacity_factor": args.capacity_factor,
                            "assumptions": ASSUMPTIONS, "device": jax.default_backend()})
        return
    # Interleaved rounds: every codec runs once per round, right after the others, so all see the
    # same machine load; ratios to identity are taken within a round, then the median over rounds.
    # CPU time (all threads of this process) is reported beside wall time: other jobs on a shared
    # machine stretch wall time much more than the work this process does.
    wall: list[list[float]] = [[] for _ in prepared]
    cpu: list[list[float]] = [[] for _ in prepared]
    for p in prepared:
        p["run"]()                                   # warm-up
    for rep in range(args.repeats):
        for i, p in enumerate(prepared):
            w0, c0 = time.perf_counter(), time.process_time()
            p["run"]()
            wall[i].append(time.perf_counter() - w0)
            cpu[i].append(time.process_time() - c0)
        print(f"  round {rep + 1}/{args.repeats} done", flush=True)
    rows = []
    for p, w, c in zip(prepared, wall, cpu):
        rows.append({**p["row"], "layer_ms": 1e3 * statistics.median(w) / 2,
                     "layer_cpu_ms": 1e3 * statistics.median(c) / 2,
                     "time_vs_identity": statistics.median(a / b for a, b in zip(w, wall[0])),
                     "cpu_vs_identity": statistics.median(a / b for a, b in zip(c, cpu[0])),
                     "layer_ms_rounds": [round(1e3 * t / 2, 1) for t in w],
                     "layer_cpu_ms_rounds": [round(1e3 * t / 2, 1) for t in c]})
    ident = rows[0]
    for row in rows:
        row["codec_flop_pct"] = 100 * row["codec_flop_tok"] / row["moe_flop_tok"]
        row["xla_flop_delta_pct"] = 100 * (row["xla_gflop"] / ident["xla_gflop"] - 1)
        row["wire_vs_bf16"] = row["row_B"] / ident["row_B"] if row["row_B"] is not None else None
    projection = [p for row in rows for p in project(row, ident)] if ident["row_B"] is not None else []
    cols = ["codec", "folded", "layer_ms", "time_vs_identity", "layer_cpu_ms", "cpu_vs_identity", "codec_flop_pct", "xla_flop_delta_pct", "row_B",
            "wire_vs_bf16", "ids_B_row", "stale_B_tok", "combine_B_row", "dropped"]
    print("\nprojection (paper):" + ("" if projection else " none at ep=1 (no all-to-all)"))
    if projection:
        _table(projection, ["codec", "ep", "link", "GB_s", "B_tok_layer", "comm_us_layer", "saved_us_layer",
                            "saved_ms_48_layers", "saved_pct"])
    print("\nassumptions:\n" + "\n".join(f"  - {a}" for a in ASSUMPTIONS))
    print("\nmeasured:")
    write_report(args.out, "moe_ep", rows, cols,
                 extra={"mesh": f"ep={args.ep} ({jax.devices()[0].device_kind})", "tokens": args.tokens, "experts": args.experts,
                        "hidden": cfg.hidden_size, "expert_width": cfg.moe_intermediate_size,
                        "top_k": cfg.num_experts_per_tok, "capacity_factor": args.capacity_factor,
                        "repeats": args.repeats, "projection": projection, "assumptions": ASSUMPTIONS,
                        "device": jax.default_backend()})


if __name__ == "__main__":
    main()
