"""The compression job end to end on tiny models (CPU): outputs and report, 8-bit logits close to
the original, perplexity monotone in the bit width, resume after a crash (in-process exception,
hard exit, real kill -9) byte-identical to an uninterrupted run, other jobs' directories refused,
the MoE job on an ep x dp mesh."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: F401  (the parity reference; a test dependency)

from caldera_jax.eval.perplexity import window_nll  # noqa: E402
from caldera_jax.models import forward, generate  # noqa: E402
from caldera_jax.checkpoints_io import load_hf  # noqa: E402
from caldera_jax.checkpoints_io import compressed as ck  # noqa: E402
from caldera_jax.checkpoints_io.fingerprint import fingerprint  # noqa: E402
from experiments import compress as job  # noqa: E402
from tests.hf_tiny import randomize_, tiny_hf_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# every linear 32 x 32: one compiled decomposition per budget
TINY = dict(intermediate_size=32, num_key_value_heads=4)
CONFIG = """
defaults: {{quantizer: uniform, b_q: {bq}, group_size: 16, rank: 4, b_l: 8, b_r: 8, factor_group_size: 8,
           iters: 1, lplr_iters: 1, requant_sweeps: 0, incoherence: true,
           calib_samples: 16, calib_seq_len: 24, calib_batch_size: 8}}
protect: ["model.layers.1.self_attn.o_proj.weight"]
"""


def peaky_model(tmp, model_type="llama", name=None, layers=2, **over):
    """A tiny random model with larger weights (scale 0.3): a peaked next-token distribution, so
    perplexity reacts to compression."""
    path, model = tiny_hf_model(model_type, tmp, save=False, name=name, num_hidden_layers=layers, **{**TINY, **over})
    randomize_(model, 0, scale=0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    path = peaky_model(tmp)
    cfg, params = load_hf(path)
    # data sampled from the model itself: the original is the best model of it
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (32, 1))
    seq = np.concatenate([prompts, generate(params, cfg, prompts, max_new_tokens=31, temperature=1.0,
                                            key=jax.random.key(1), eos_token_id=())], 1)
    calib = seq[:16].copy()
    calib[3, 20:] = -1                                   # some padding
    np.save(tmp / "calib.npy", calib)
    for bq in (8, 4, 3, 2):
        (tmp / f"b{bq}.yaml").write_text(CONFIG.format(bq=bq))
    cache = tmp / "xla-cache"
    return {"tmp": tmp, "path": path, "cfg": cfg, "params": params, "eval": seq[16:], "cache": str(cache)}


def argv(s, out, bq=8, model=None, extra=()):
    return ["--model", model or s["path"], "--config", str(s["tmp"] / f"b{bq}.yaml"), "--calib",
            str(s["tmp"] / "calib.npy"), "--out", str(out), "--compile-cache", s["cache"], "--no-progress",
            *extra]


def ckpt_bytes(out) -> dict[str, bytes]:
    """Every file of the checkpoint (the report/ folder holds timings and is not part of it)."""
    res = {}
    for root, _, files in os.walk(out):
        rel = os.path.relpath(root, out)
        if rel.split(os.sep)[0] == "report":
            continue
        for f in files:
            res[os.path.normpath(os.path.join(rel, f))] = open(os.path.join(root, f), "rb").read()
    return res


def ppl(params, cfg, seq) -> float:
    nll = window_nll(forward(params, cfg, jnp.asarray(seq)), jnp.asarray(seq))
    return float(np.exp(np.sum(nll) / (seq.shape[0] * (seq.shape[1] - 1))))


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted 8-bit run: the bytes every resumed run must reproduce."""
    out = setup["tmp"] / "ref8"
    rep = job.main(argv(setup, out))
    return out, rep


def test_outputs_report_and_8bit_logits(setup, reference):
    out, rep = reference
    cfg = setup["cfg"]
    names = set(os.listdir(out))
    assert {"caldera_config.json", "job.json", "globals.safetensors", "layers", "report"} <= names
    assert sorted(os.listdir(out / "layers")) == ["layer-00000.safetensors", "layer-00001.safetensors"]
    assert {"report.json", "metrics.jsonl", "error_by_layer.png"} <= set(os.listdir(out / "report"))
    lines = [json.loads(x) for x in open(out / "report" / "metrics.jsonl")]
    assert len(lines) == len(rep["matrices"]) == 14
    m = ck.compressed_info(out)
    assert m["source_fingerprint"]["digest"] == fingerprint(setup["path"])["digest"]
    assert m["job"]["calibration"]["tokens"] == 16 * 24 - 4
    for r in m["matrices"].values():
        assert {"rel_fro", "rel_h", "corr", "bits_per_param"} <= set(r)
        if r["protected"]:
            assert r["bits_per_param"] == 16.0 and r["budget"] is None
        else:
            assert r["rel_h"] < 0.02 and r["corr"] > 0.999 and 8 < r["bits_per_param"] < 20
    assert [row["layer"] for row in rep["layers"]] == [0, 1] and rep["summary"]["protected"] == 1
    # the model runs the loaded checkpoint; 8 bits: logits close to the original
    cfg2, cparams = ck.load_compressed(out, source=setup["path"])
    tokens = jnp.asarray(setup["eval"][:4])
    ref = np.asarray(forward(setup["params"], cfg, tokens))
    got = np.asarray(forward(cparams, cfg2, tokens))
    # (weights scaled 0.3: errors grow ~6x through the 2 layers; 0.3% per matrix -> ~2% logits)
    assert np.linalg.norm(got - ref) < 0.04 * np.linalg.norm(ref)
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) > 0.95


def test_perplexity_monotone_in_bits(setup, reference):
    base = ppl(setup["params"], setup["cfg"], setup["eval"])
    got = {8: ppl(ck.load_compressed(reference[0])[1], setup["cfg"], setup["eval"])}
    for bq in (4, 3, 2):
        out = setup["tmp"] / f"out{bq}"
        job.main(argv(setup, out, bq))
        got[bq] = ppl(ck.load_compressed(out)[1], setup["cfg"], setup["eval"])
    print("perplexity original", base, "compressed", got)
    assert base * 0.999 <= got[8] < got[4] < got[3] < got[2]
    assert got[8] < base * 1.01 and got[2] > base * 1.2


def test_crash_then_rerun_is_byte_identical(setup, reference):
    out = setup["tmp"] / "crash"

    def boom(i):
        if i == 0:
            raise RuntimeError("simulated crash after layer 0")

    with pytest.raises(RuntimeError, match="simulated crash"):
        job.main(argv(setup, out), on_layer_done=boom)
    assert os.listdir(out / "layers") == ["layer-00000.safetensors"]
    assert not os.path.exists(out / "caldera_config.json")
    done = []
    job.main(argv(setup, out), on_layer_done=done.append)
    assert done == [1]                                   # layer 0 was not recomputed
    assert ckpt_bytes(out) == ckpt_bytes(reference[0])
    # a rerun of a finished job changes nothing
    job.main(argv(setup, out), on_layer_done=done.append)
    assert done == [1] and ckpt_bytes(out) == ckpt_bytes(reference[0])


def test_other_job_in_out_dir_refused(setup, reference):
    with pytest.raises(job.JobError, match=r"holds a different job \(job_config, job_config_digest differ\)"):
        job.main(argv(setup, reference[0], bq=4))
    other = peaky_model(setup["tmp"], name="other-eps", rms_norm_eps=1e-5)   # same tensors
    with pytest.raises(job.JobError, match=r"holds a different job \(model_config differ\)"):
        job.main(argv(setup, reference[0], model=other))
    path, m = tiny_hf_model("llama", setup["tmp"], save=False, name="other-weights", **TINY)
    randomize_(m, 1, scale=0.3)
    m.save_pretrained(path)
    with pytest.raises(job.JobError, match=r"holds a different job \(source_digest differ\)"):
        job.main(argv(setup, reference[0], model=path))
    # the code changed since the job started: a resume would mix two versions' layers
    import shutil
    moved = setup["tmp"] / "code-changed"
    shutil.copytree(reference[0], moved)
    ident = json.loads((moved / "job.json").read_text())
    ident["code_digest"] = "0" * 64
    (moved / "job.json").write_text(json.dumps(ident))
    with pytest.raises(job.JobError, match=r"\(code_digest differ\); code: the caldera_jax sources changed"):
        job.main(argv(setup, moved))
    with pytest.raises(job.JobError, match="needs 64 devices"):
        job.main(argv(setup, setup["tmp"] / "m", extra=["--mesh", "ep=8,dp=8"]))
    with pytest.raises(job.JobError, match="expected comma-separated"):
        job.main(argv(setup, setup["tmp"] / "m", extra=["--mesh", "tp=2"]))


# A real process running the CLI's main with an on_layer_done hook: "pause" sleeps 2 s after each
# layer (a window for kill -9), "exit" dies like kill -9 (os._exit, no cleanup) after the first one.
DRIVER = ("import os, sys, time\n"
          "from experiments import compress\n"
          "hook = {'pause': lambda i: time.sleep(2), 'exit': lambda i: os._exit(137)}[sys.argv[1]]\n"
          "compress.main(sys.argv[2:], on_layer_done=hook)\n")


def _run(args, hook=None, wait=True):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "experiments.compress", *args] if hook is None else \
        [sys.executable, "-c", DRIVER, hook, *args]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = p.communicate(timeout=300)
        return p.returncode, out
    return p


def test_kill9_and_hard_exit_then_rerun_byte_identical(setup, tmp_path):
    """Real processes: (1) kill -9 once the first layer file exists, (2) a hard exit (os._exit,
    no cleanup) after the next layer, (3) a rerun to the end; the checkpoint equals an
    uninterrupted in-process run of the same job, byte for byte."""
    path = peaky_model(tmp_path, name="four", layers=4)
    ref = tmp_path / "ref"
    job.main(argv(setup, ref, model=path))
    out = tmp_path / "out"
    a = argv(setup, out, model=path)
    p = _run(a, "pause", wait=False)                   # 2 s after each layer: time to kill it
    t0 = time.time()
    while not os.path.exists(out / ck.layer_file(0)) and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    finished = sorted(os.listdir(out / "layers"))
    assert not os.path.exists(out / "caldera_config.json"), "the job finished before it was killed"
    rc, log = _run(a, "exit")
    assert rc == 137, log
    assert len([f for f in os.listdir(out / "layers") if not f.startswith(".")]) == len(finished) + 1
    rc, log = _run(a)                                  # the real command line
    assert rc == 0, log
    assert "resuming" in log
    assert ckpt_bytes(out) == ckpt_bytes(ref)


def test_moe_job_on_mesh(setup, tmp_path):
    """qwen3_moe on ep=2 x dp=2 (fake CPU devices): experts spread with decompose_many, Hessians
    data parallel; the result loads, runs and matches a single-device run's errors."""
    path = peaky_model(tmp_path, "qwen3_moe", name="moe", moe_intermediate_size=32)
    # k/v/o protected: few dense decompositions (each device compiles its own on CPU)
    (tmp_path / "moe.yaml").write_text(CONFIG.format(bq=8).replace(
        'protect: ["model.layers.1.self_attn.o_proj.weight"]', 'protect: ["*.self_attn.[kvo]_proj.weight"]'))
    a = ["--config", str(tmp_path / "moe.yaml")]
    rep1 = job.main(argv(setup, tmp_path / "one", model=path, extra=a))
    rep4 = job.main(argv(setup, tmp_path / "mesh", model=path, extra=[*a, "--mesh", "ep=2,dp=2"]))
    assert len(rep4["devices"]) == 4
    for a, b in zip(rep1["matrices"], rep4["matrices"]):
        assert a["name"] == b["name"]
        assert abs(a["rel_h"] - b["rel_h"]) < 2e-3, a["name"]
    exp = [r for r in rep4["matrices"] if "experts" in r["name"]]
    assert len(exp) == 6 and all(len(r["experts"]["rel_h"]) == 4 for r in exp)
    cfg, params = load_hf(path)
    cfg2, cparams = ck.load_compressed(tmp_path / "mesh", source=path)
    tokens = jnp.asarray(setup["eval"][:4])
    ref = np.asarray(forward(params, cfg, tokens))
    got = np.asarray(forward(cparams, cfg2, tokens))
    assert np.linalg.norm(got - ref) < 0.12 * np.linalg.norm(ref)     # (top-2 routing flips amplify)


def test_propagate_compressed_resume(setup, reference):
    """calib_propagate: compressed: layer i's Hessians come from the already-compressed layers
    (reloaded from disk on resume); the resumed checkpoint is byte-identical."""
    (setup["tmp"] / "prop.yaml").write_text(CONFIG.format(bq=8).replace("calib_batch_size: 8",
                                                                        "calib_batch_size: 8, calib_propagate: compressed"))
    a = ["--config", str(setup["tmp"] / "prop.yaml")]
    full = setup["tmp"] / "prop-full"
    job.main(argv(setup, full, extra=a))

    def boom(i):
        raise RuntimeError("crash")

    out = setup["tmp"] / "prop-crash"
    with pytest.raises(RuntimeError):
        job.main(argv(setup, out, extra=a), on_layer_done=boom)
    job.main(argv(setup, out, extra=a))
    assert ckpt_bytes(out) == ckpt_bytes(full)
    ref = ckpt_bytes(reference[0])
    got = ckpt_bytes(full)
    # layer 0 sees the same inputs either way; layer 1's inputs (hence Hessians, hence Q) differ
    assert got["layers/layer-00000.safetensors"] != ref["layers/layer-00000.safetensors"]   # job digest differs
    m_ref = ck.read_layer_meta(str(reference[0] / ck.layer_file(1)))["matrices"]
    m_got = ck.read_layer_meta(str(full / ck.layer_file(1)))["matrices"]
    assert any(m_ref[n]["rel_h"] != m_got[n]["rel_h"] for n in m_ref)
    m_ref0 = ck.read_layer_meta(str(reference[0] / ck.layer_file(0)))["matrices"]
    m_got0 = ck.read_layer_meta(str(full / ck.layer_file(0)))["matrices"]
    assert all(m_ref0[n]["rel_h"] == m_got0[n]["rel_h"] for n in m_ref0)


def test_one_job_per_directory(setup, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"),
        str(out / job.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(job.JobError, match="another compression job is running in this directory"):
            job.main(argv(setup, out))
    finally:
        holder.kill()
        holder.wait()
    rc, log = _run(["--model", setup["path"], "--config", str(setup["tmp"] / "b8.yaml"), "--calib",
                    str(setup["tmp"] / "calib.npy"), "--out", str(out), "--mesh", "ep=0"])
    assert rc == 2 and "error: --mesh 'ep=0'" in log


def test_gguf_source_text_calibration_and_perplexity(setup, tmp_path):
    """A GGUF file as the source (its tokenizer, .txt calibration, --ppl-tokens before/after)."""
    from tests.test_gguf import write_gguf
    g = tmp_path / "tiny.gguf"
    write_gguf(g, "llama", tied=False)
    text = tmp_path / "text.txt"
    text.write_text("\n".join("the thin man ran in the rain and the cat sat on an ant" for _ in range(200)))
    (tmp_path / "g.yaml").write_text(CONFIG.format(bq=4).replace(
        'protect: ["model.layers.1.self_attn.o_proj.weight"]', 'protect: ["*.[kvo]_proj.weight", "*.mlp.*"]'))
    rep = job.main(["--model", str(g), "--config", str(tmp_path / "g.yaml"), "--calib", str(text),
                    "--out", str(tmp_path / "out"), "--compile-cache", setup["cache"], "--no-progress",
                    "--ppl-tokens", "256", "--ppl-seq-len", "32", "--ppl-text", str(text)])
    p = rep["perplexity"]
    assert p["before"]["tokens"] == p["after"]["tokens"] == 8 * 31
    assert p["after"]["ppl"] != p["before"]["ppl"] and p["after"]["ppl"] < 1.5 * p["before"]["ppl"]
    assert rep["summary"]["protected"] == 2 * 6
    assert any(f.startswith("tokenizer") for f in os.listdir(tmp_path / "out"))
    cfg, params = ck.load_compressed(tmp_path / "out", source=str(g))
    # the job reads one layer at a time; the whole loaded model gives the same figure
    from caldera_jax.checkpoints_io.model_source import load_model
    from caldera_jax.eval.perplexity import model_perplexity, tokenize_text
    kw = dict(seq_len=32, max_tokens=256, batch_size=4)
    scfg, sparams, tok = load_model(str(g))
    ids = tokenize_text(tok, str(text))
    whole_after = model_perplexity(params, cfg, ids, **kw)
    whole_before = model_perplexity(sparams, scfg, ids, **kw)
    assert abs(whole_after["ppl"] - p["after"]["ppl"]) < 1e-5 * p["after"]["ppl"]
    assert abs(whole_before["ppl"] - p["before"]["ppl"]) < 1e-5 * p["before"]["ppl"]
