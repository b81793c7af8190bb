"""Deriving an MoE from a dense model (caldera_jax.moefy, caldera_jax.pipeline.moefy, experiments.moefy)
on tiny random models: E = 1 and top_k = E equal the dense model; the balanced clustering; the
job's checkpoint loads in transformers with the same logits, tokenizer and chat template; bad
inputs refused before any work; a crash (in process, and a real kill -9) then a rerun gives the
same bytes as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caldera_jax.checkpoints_io import load_hf
from caldera_jax.models import forward, generate
from caldera_jax.moefy import MoefyConfig, MoefyError, convert
from caldera_jax.moefy.activations import ffn_inputs
from caldera_jax.moefy.cluster import balanced_kmeans, check_clusters, coactivation_features, weight_features
from caldera_jax.pipeline.job_dir import JobError
from experiments import assets
from experiments import moefy as cli
from tests.hf_tiny import tiny_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(intermediate_size=64, tie_word_embeddings=True)      # the real model's tied head
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# small but complete: 2 layers fitted, 6 distillation steps, a checkpoint every 2
JOB = ["--experts", "4", "--top-k", "2", "--router-steps", "40", "--distill-steps", "6",
       "--set", "calib_samples=16", "--set", "calib_seq_len=32", "--set", "cluster_tokens=256",
       "--set", "distill_batch=4", "--set", "distill_seq_len=32", "--set", "distill_samples=40",
       "--set", "val_samples=4", "--set", "eval_every=3", "--set", "ckpt_every=2", "--set", "distill_lr=1e-3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moefy")
    path, model = tiny_hf_model("llama", tmp, **TINY)
    tok_dir = assets.asset_path("smollm2-135m-instruct")         # a real tokenizer with a chat template
    for f in TOKENIZER_FILES:
        shutil.copy(tok_dir / f, os.path.join(path, f))
    cfg, params = load_hf(path, dtype=jnp.float32)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (48, 1))
    seq = np.concatenate([prompts, generate(params, cfg, prompts, max_new_tokens=31, temperature=1.0,
                                            key=jax.random.key(1), eos_token_id=())], 1)
    np.save(tmp / "calib.npy", seq)
    return {"tmp": tmp, "path": path, "model": model, "cfg": cfg, "params": params,
            "cache": str(tmp / "xla-cache")}


def argv(s, out, model=None, extra=()):
    return ["--model", model or s["path"], "--out", str(out), "--calib", str(s["tmp"] / "calib.npy"),
            "--ppl-tokens", "0", "--compile-cache", s["cache"], "--no-progress", *JOB, *extra]


def hf_bytes(out) -> dict[str, bytes]:
    """The HF checkpoint's files (work/ and report/ hold state and timings)."""
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
            if os.path.isfile(os.path.join(out, f)) and not f.startswith(".")}


@pytest.fixture(scope="module")
def reference(setup):
    out = setup["tmp"] / "ref"
    return out, cli.main(argv(setup, out))


def _clusters(params, cfg, E, method="weights"):
    return {i: balanced_kmeans(weight_features(params["model"]["layers"][str(i)]["mlp"]), E, seed=0)
            for i in range(cfg.num_hidden_layers)}


def _tokens(cfg):
    return jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 13)))


def test_one_expert_is_the_dense_model_bit_for_bit(setup):
    cfg, params = setup["cfg"], setup["params"]
    moe_cfg, moe = convert(cfg, params, _clusters(params, cfg, 1), MoefyConfig(experts=1, top_k=1))
    assert moe_cfg.model_type == "mixtral" and moe_cfg.num_experts == 1
    ref = np.asarray(forward(params, cfg, _tokens(cfg)))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_array_equal(np.asarray(forward(jax.tree.map(jnp.asarray, moe), moe_cfg, _tokens(cfg))), ref)


@pytest.mark.parametrize("E", [4, 8])
def test_top_k_equal_to_experts_is_the_dense_model(setup, E):
    """Mixtral renormalises the top-k probabilities: with k = E and the zero router each weight is
    1/E, and the conversion's down_proj scale k = E makes the sum the dense FFN (float rounding)."""
    cfg, params = setup["cfg"], setup["params"]
    moe_cfg, moe = convert(cfg, params, _clusters(params, cfg, E), MoefyConfig(experts=E, top_k=E))
    ref = np.asarray(forward(params, cfg, _tokens(cfg)))
    out = np.asarray(forward(jax.tree.map(jnp.asarray, moe), moe_cfg, _tokens(cfg)))
    np.testing.assert_allclose(out, ref, rtol=0, atol=5e-6)
    # top-2 of the same split is not the dense model (the test can tell them apart)
    moe_cfg2, moe2 = convert(cfg, params, _clusters(params, cfg, E), MoefyConfig(experts=E, top_k=2))
    assert np.abs(np.asarray(forward(jax.tree.map(jnp.asarray, moe2), moe_cfg2, _tokens(cfg))) - ref).max() > 1e-2


def test_clustering_is_balanced_and_deterministic(setup):
    cfg, params = setup["cfg"], setup["params"]
    toks = np.load(setup["tmp"] / "calib.npy")[:8]
    _, layer, x = next(ffn_inputs(lambda i: params["model"]["layers"][str(i)],
                                  params["model"]["embed_tokens"]["weight"], cfg, toks, np.ones(toks.shape, bool)))
    I = cfg.intermediate_size
    for feats in (coactivation_features(layer["mlp"], x, 200), weight_features(layer["mlp"])):
        for E in (2, 4, 8):
            a = balanced_kmeans(feats, E, seed=[0, 1])
            check_clusters(a, I, E)                                  # a partition, I/E neurons each
            assert a.shape == (E, I // E)
            assert all(np.all(np.diff(row) > 0) for row in a) and np.all(np.diff(a[:, 0]) > 0)   # canonical
            np.testing.assert_array_equal(a, balanced_kmeans(feats, E, seed=[0, 1]))
    with pytest.raises(ValueError, match="not a balanced partition"):
        check_clusters(np.arange(I).reshape(4, -1)[:, ::-1][:3], I, 4)


def test_job_output_loads_in_transformers_with_same_logits(setup, reference):
    out, rep = reference
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    cfg, params = load_hf(out, dtype=jnp.float32)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (4, 2, 16)
    toks = np.asarray(_tokens(cfg))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(toks)).logits.float().numpy()
    ours = np.asarray(forward(params, cfg, jnp.asarray(toks)))
    assert np.abs(ref).max() > 0.1
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                               add_generation_prompt=True)
    # what the job reports, and its training record
    rows = [json.loads(line) for line in open(out / "report" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(7)) and "val_kl" in rows[0] and "val_kl" in rows[-1]
    assert rep["distill"]["val_kl_after"] < rep["distill"]["val_kl_before"]
    assert os.path.getsize(out / "report" / "loss_curves.png") > 1000
    for r in rep["layers_fit"]:
        assert 0 < r["recovered"] <= r["oracle"] + 1e-6 <= 1 + 1e-6
        assert abs(sum(r["load"]) - 1) < 1e-5
    p = rep["params"]
    assert p["moe_total"] == p["dense_total"] + 2 * 4 * 32               # the routers
    assert p["moe_active_per_token"] == p["moe_total"] - 2 * 2 * 3 * 32 * 16


def test_bad_inputs_refused_before_any_work(setup, tmp_path):
    out = tmp_path / "out"
    gelu, _ = tiny_hf_model("llama", tmp_path, name="gelu", hidden_act="gelu", **TINY)
    moe, _ = tiny_hf_model("qwen3_moe", tmp_path, name="moe")
    cases = [
        (dict(model=gelu), "hidden_act 'gelu'"),
        (dict(model=moe), "already a mixture of experts"),
        (dict(extra=["--experts", "5"]), "experts=5 does not divide the source's intermediate_size=64"),
        (dict(extra=["--experts", "4", "--top-k", "5"]), "top_k=5 > experts=4"),
        (dict(model=str(tmp_path / "nope")), str(tmp_path / "nope")),
        (dict(extra=["--set", "bogus=1"]), "--set 'bogus=1': expected key=value"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError) as e:
            cli.main(argv(setup, out, **kw))
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not out.exists(), msg
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="is not a moefy job's directory"):
        cli.main(argv(setup, tmp_path / "theirs"))
    assert os.listdir(tmp_path / "theirs") == ["notes.txt"]
    with pytest.raises(JobError, match=r"inside it"):
        cli.main(argv(setup, os.path.join(setup["path"], "moe")))


def test_crash_then_rerun_is_byte_identical(setup, reference):
    """Crashes during the router fit and during distillation (after the step-2 checkpoint); each
    rerun resumes from what was written, and the checkpoint equals the uninterrupted run's."""
    out = setup["tmp"] / "crash"

    def crash_at(kind, when):
        def f(i, _rec):
            if i == when:
                raise RuntimeError(f"simulated crash: {kind} {i}")
        return f

    with pytest.raises(RuntimeError, match="simulated crash: layer 0"):
        cli.main(argv(setup, out), cli.pipeline.Callbacks(on_layer=crash_at("layer", 0)))
    assert os.listdir(out / "work" / "fit") == ["layer-00000.npz"]
    layers, steps = [], []
    with pytest.raises(RuntimeError, match="simulated crash: step 3"):
        cli.main(argv(setup, out), cli.pipeline.Callbacks(on_layer=lambda i, r: layers.append(i),
                                                          on_step=crash_at("step", 3)))
    assert layers == [1] and not os.path.exists(out / "config.json")
    cli.main(argv(setup, out), cli.pipeline.Callbacks(on_step=lambda i, r: steps.append(i)))
    assert steps == [3, 4, 5, 6]                           # resumed from the step-2 checkpoint
    assert hf_bytes(out) == hf_bytes(reference[0])
    with pytest.raises(JobError, match=r"holds a different moefy job \(moefy_config differ\)"):
        cli.main(argv(setup, out, extra=["--seed", "1"]))


DRIVER = ("import sys, time\n"
          "from experiments import moefy\n"
          "moefy.main(sys.argv[1:], moefy.pipeline.Callbacks(on_step=lambda i, r: time.sleep(1.5)))\n")


def test_kill9_then_rerun_is_byte_identical(setup, reference):
    """A real process killed (SIGKILL) in the middle of distillation; the same command again
    resumes from its last checkpoint and writes the uninterrupted run's bytes."""
    out = setup["tmp"] / "killed"
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, "-c", DRIVER, *argv(setup, out)], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "work" / "distill"
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < 120 and not (ckpt.is_dir() and any(
            d.isdigit() for d in os.listdir(ckpt))):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(out / "config.json"), "the job finished before it was killed"
    steps = []
    cli.main(argv(setup, out), cli.pipeline.Callbacks(on_step=lambda i, r: steps.append(i)))
    assert steps and steps[0] > 1 and steps[-1] == 6
    assert hf_bytes(out) == hf_bytes(reference[0])


def test_cli_error_is_one_line(setup, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-m", "experiments.moefy", *argv(setup, tmp_path / "o"),
                        "--top-k", "9"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: top_k=9 > experts=4: a token cannot choose more experts "
                                             "than there are"]
    assert not (tmp_path / "o").exists()


def test_config_checks():
    with pytest.raises(MoefyError, match="clustering='kmeans'"):
        MoefyConfig(clustering="kmeans").check()
    with pytest.raises(MoefyError, match="distill_steps=-1"):
        MoefyConfig(distill_steps=-1).check()
    assert MoefyConfig.from_dict(MoefyConfig().to_dict()) == MoefyConfig()
