"""Fine-tuning after decomposition on a tiny model (CPU): it lowers the distillation loss on held-out
windows as the written checkpoint scores them; Q's packed codes are bit-identical and bits/param
unchanged; STE's checkpoint scores what training saw; a crash then a rerun ends at the same bytes as an
uninterrupted run; bad input is refused before any work."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.caldera.finetune import FinetuneConfig, FinetuneError
from caldera_jax.checkpoints_io import compressed as ck
from caldera_jax.checkpoints_io import load_hf
from caldera_jax.checkpoints_io.fingerprint import FingerprintMismatchError
from caldera_jax.formats.qlr_weight import QLRWeight
from caldera_jax.models import forward, generate
from caldera_jax.params import flatten
from caldera_jax.pipeline import compress as cj
from caldera_jax.pipeline import finetune as fj
from caldera_jax.pipeline.job_dir import JobError
from tests.test_compress_job import CONFIG, peaky_model

FT = FinetuneConfig(steps=24, batch=4, seq_len=32, samples=40, val_samples=8, lr=1e-2, val_every=8, ckpt_every=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    path = peaky_model(tmp)
    cfg, params = load_hf(path)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (48, 1))
    seq = np.concatenate([prompts, generate(params, cfg, prompts, max_new_tokens=31, temperature=1.0,
                                            key=jax.random.key(1), eos_token_id=())], 1)
    np.save(tmp / "calib.npy", seq)
    (tmp / "cfg.yaml").write_text(CONFIG.format(bq=2).replace("b_l: 8, b_r: 8", "b_l: 4, b_r: 4"))
    ckpt = str(tmp / "c")
    cj.run(cj.CompressJob(model=path, config=str(tmp / "cfg.yaml"), calib=str(tmp / "calib.npy"), out=ckpt,
                          progress=False))
    job = fj.FinetuneJob(ckpt=ckpt, model=path, calib=str(tmp / "calib.npy"), out=str(tmp / "ft"), config=FT,
                         progress=False)
    rep = fj.run(job)
    return dict(tmp=tmp, path=path, cfg=cfg, params=params, seq=seq, ckpt=ckpt, job=job, rep=rep)


def _val_kl(setup, params) -> float:
    """Mean KL(original ‖ model) of next-token distributions on the job's validation windows."""
    order = np.random.default_rng(FT.seed).permutation(len(setup["seq"]))[:FT.val_samples]
    tok = jnp.asarray(setup["seq"][order, :FT.seq_len])
    t = jax.nn.log_softmax(forward(setup["params"], setup["cfg"], tok)[:, :-1], -1)
    s = jax.nn.log_softmax(forward(params, setup["cfg"], tok)[:, :-1], -1)
    return float(jnp.mean(jnp.sum(jnp.exp(t) * (t - s), -1)))


def _qlr(params) -> dict[str, QLRWeight]:
    return {n: w for n, w in flatten(params).items() if isinstance(w, QLRWeight)}


def test_lowers_held_out_kl_and_keeps_codes_and_bits(setup):
    _, base = ck.load_compressed(setup["ckpt"], setup["path"])
    _, tuned = ck.load_compressed(setup["job"].out, setup["path"])       # a normal, fingerprinted checkpoint
    before, after = _val_kl(setup, base), _val_kl(setup, tuned)
    assert after < 0.9 * before, (before, after)
    b, t = _qlr(base), _qlr(tuned)
    assert b.keys() == t.keys() and len(b) == 13                     # 14 linears, one protected
    changed = 0
    for n in b:
        assert np.array_equal(np.asarray(b[n].q.codes), np.asarray(t[n].q.codes)), n
        assert b[n].nbytes() == t[n].nbytes() and b[n].q.fmt == t[n].q.fmt and b[n].l.fmt == t[n].l.fmt, n
        assert np.array_equal(np.asarray(b[n].signs_in), np.asarray(t[n].signs_in)), n
        changed += not np.array_equal(np.asarray(b[n].l.codes), np.asarray(t[n].l.codes))
    assert changed == len(b)                                          # every factor was trained
    bits = setup["rep"]["bits_per_param"]
    assert bits["base"] == bits["finetuned"]
    info = ck.compressed_info(setup["job"].out)
    assert info["finetune"]["base_checkpoint"]["manifest_sha256"] == ck.compressed_info(setup["ckpt"])["manifest_sha256"]
    for f in ("report/report.json", "report/ppl_by_tokens.png", "finetune/metrics.jsonl", "finetune/curves.png"):
        assert os.path.isfile(os.path.join(setup["job"].out, f)), f


def test_ste_checkpoint_scores_what_training_saw(setup):
    """With STE the written (re-quantized) checkpoint equals the model validated in training."""
    _, tuned = ck.load_compressed(setup["job"].out, setup["path"])
    rep = setup["rep"]
    best = min(r["val_loss"] for r in rep["validation"])
    assert abs(_val_kl(setup, tuned) - best) < 1e-3 * max(best, 1.0)


def test_crash_then_rerun_is_byte_identical(setup):
    out = str(setup["tmp"] / "ft-crash")
    job = dataclasses.replace(setup["job"], out=out)

    def crash(step, row):
        if step == 13:
            raise KeyboardInterrupt("simulated crash")
    with pytest.raises(KeyboardInterrupt):
        fj.run(job, on_step=crash)
    assert not os.path.isfile(os.path.join(out, ck.CONFIG_FILE))
    rep = fj.run(job)
    assert rep["resumed_from_step"] == 8
    for i in range(setup["cfg"].num_hidden_layers):
        with open(os.path.join(out, ck.layer_file(i)), "rb") as a, \
                open(os.path.join(setup["job"].out, ck.layer_file(i)), "rb") as b:
            assert a.read() == b.read(), i
    assert ck.compressed_info(out)["files"] == ck.compressed_info(setup["job"].out)["files"]


def test_data_parallel_step_matches_one_device(setup):
    """--mesh dp=2 (batches split, the frozen model replicated once) follows the one-device run."""
    rep = fj.run(dataclasses.replace(setup["job"], out=str(setup["tmp"] / "ft-dp2"), mesh={"dp": 2}))
    assert rep["mesh"]["dp"] == 2
    one = [r["val_loss"] for r in setup["rep"]["validation"]]
    two = [r["val_loss"] for r in rep["validation"]]
    assert len(one) == len(two) >= 3
    np.testing.assert_allclose(two, one, rtol=2e-3)
    assert two[-1] < 0.9 * two[0]


def test_bad_input_refused_before_work(setup, tmp_path):
    job = setup["job"]
    with pytest.raises(JobError, match="--out"):
        fj.run(dataclasses.replace(job, out=job.ckpt))
    with pytest.raises(FinetuneError, match="steps"):
        fj.run(dataclasses.replace(job, out=str(tmp_path / "a"), config=dataclasses.replace(FT, steps=0)))
    with pytest.raises(FinetuneError, match="factors"):
        fj.run(dataclasses.replace(job, out=str(tmp_path / "a"), config=dataclasses.replace(FT, factors="qat")))
    # a checkpoint of another model: the teacher's fingerprint differs
    from transformers import AutoModelForCausalLM
    from tests.hf_tiny import randomize_
    m = AutoModelForCausalLM.from_pretrained(setup["path"])
    randomize_(m, 7, scale=0.3)
    m.save_pretrained(tmp_path / "other")
    with pytest.raises(FingerprintMismatchError):
        fj.run(dataclasses.replace(job, model=str(tmp_path / "other"), out=str(tmp_path / "b")))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_compress_config_finetune_section(setup, tmp_path):
    """A `finetune:` section in the compress config: the job then writes <out>-finetuned; the
    section is not part of the compression's identity; bad settings are refused before any work."""
    from caldera_jax.caldera.config import JobConfigError, load_job_config
    from experiments import compress as cli
    base = (setup["tmp"] / "cfg.yaml").read_text()
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(base + "finetune: {steps: 4, batch: 4, seq_len: 32, samples: 40, val_samples: 8, lr: 1e-2, "
                          "val_every: 4, ckpt_every: 4}\n")
    assert load_job_config(str(cfg)).digest() == load_job_config(str(setup["tmp"] / "cfg.yaml")).digest()
    out = str(tmp_path / "c")
    rep = cli.main(["--model", setup["path"], "--config", str(cfg), "--calib", str(setup["tmp"] / "calib.npy"),
                    "--out", out, "--no-progress"])
    assert rep["finetune"]["best_step"] == 4
    ck.load_compressed(out + "-finetuned", setup["path"])
    (tmp_path / "bad.yaml").write_text(base + "finetune: {steps: 0}\n")
    with pytest.raises(JobConfigError, match="finetune.steps=0"):
        cli.main(["--model", setup["path"], "--config", str(tmp_path / "bad.yaml"), "--calib",
                  str(setup["tmp"] / "calib.npy"), "--out", str(tmp_path / "d"), "--no-progress"])
    assert not os.path.exists(tmp_path / "d")



@pytest.mark.parametrize("factors", ["requant", "ste"])
def test_trainable_view_equals_the_compressed_model(setup, factors):
    """Before any step the trainable view (float L, R; row scales 1; STE re-rounding the already
    rounded factors) computes the compressed model's logits, and finalize() of it gives back the
    same stored weights."""
    from caldera_jax.caldera.finetune import assemble, factor_formats, finalize, split
    _, base = ck.load_compressed(setup["ckpt"])
    ft = dataclasses.replace(FT, factors=factors)
    trainable, frozen = split(base, ft)
    tok = jnp.asarray(setup["seq"][:4, :32])
    ref = forward(base, setup["cfg"], tok)
    got = jax.jit(lambda t: forward(assemble(t, frozen, ft, factor_formats(base)), setup["cfg"], tok))(trainable)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    back = _qlr(finalize(trainable, base, ft))
    for n, w in _qlr(base).items():
        np.testing.assert_allclose(np.asarray(back[n].dequantize()), np.asarray(w.dequantize()), rtol=1e-5, atol=1e-6)
