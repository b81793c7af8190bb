"""The compression job against careless and hostile input: each case gets a clear error before any
work, or is repaired, and nothing already written (ours or the user's) is lost or corrupted.

Checkpoint-file attacks (crafted classes, byte corruption, incomplete checkpoints at load time)
are in tests/test_checkpoint_security.py; the resume/crash cases that already worked stay in
tests/test_compress_job.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from caldera_jax.caldera.config import load_job_config
from caldera_jax.caldera.spec import BudgetError, MatrixBudget
from caldera_jax.checkpoints_io import compressed as ck
from caldera_jax.pipeline import compress as pipeline
from experiments import compress as job
from tests.hf_tiny import randomize_, tiny_hf_model
from tests.test_compress_job import CONFIG, REPO, TINY, argv, ckpt_bytes, reference, setup  # noqa: F401


def _damage(path, offset_from_end: int = 64) -> None:
    """Flips bytes in a file's data section (the header, and so the metadata, still reads)."""
    data = bytearray(open(path, "rb").read())
    for k in range(8):
        data[-offset_from_end + k] ^= 0xFF
    open(path, "wb").write(bytes(data))


# ------------------------------------------------------------------ a rerun never blesses corruption
def test_rerun_redoes_a_damaged_finished_layer(setup, reference):
    """A finished checkpoint with damaged layer data: the rerun detects it against the digest
    recorded at write time, redoes that layer, and ends byte-identical to the original run."""
    out = setup["tmp"] / "damaged"
    shutil.copytree(reference[0], out)
    _damage(out / ck.layer_file(0))
    assert ck.read_layer_meta(str(out / ck.layer_file(0))) is not None      # metadata still reads
    with pytest.raises(ck.CheckpointError):
        ck.load_compressed(out)                                             # the load refuses it
    redone = []
    job.main(argv(setup, out), on_layer_done=redone.append)
    assert redone == [0]
    assert ckpt_bytes(out) == ckpt_bytes(reference[0])
    ck.load_compressed(out)


def test_rerun_after_crash_redoes_damaged_layer(setup, reference):
    out = setup["tmp"] / "crash-damaged"

    def boom(i):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        job.main(argv(setup, out), on_layer_done=boom)
    _damage(out / ck.layer_file(0))
    redone = []
    job.main(argv(setup, out), on_layer_done=redone.append)
    assert redone == [0, 1]
    assert ckpt_bytes(out) == ckpt_bytes(reference[0])


def test_layer_damaged_during_the_run_is_not_hashed_into_the_manifest(setup, reference):
    """Damage after a layer was written but before caldera_config.json: refused, and the rerun repairs."""
    out = setup["tmp"] / "damaged-midway"

    def damage_layer0(i):
        if i == 1:
            _damage(out / ck.layer_file(0))

    with pytest.raises(job.JobError, match=r"layer-00000\.safetensors: changed on disk after it was written"):
        job.main(argv(setup, out), on_layer_done=damage_layer0)
    assert not (out / ck.CONFIG_FILE).exists()
    job.main(argv(setup, out))
    assert ckpt_bytes(out) == ckpt_bytes(reference[0])


# ------------------------------------------------------------------ --out and --overwrite
def test_overwrite_refuses_a_directory_that_is_not_a_job(setup):
    out = setup["tmp"] / "users-dir"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "model.safetensors").write_bytes(b"not ours")
    for extra in ((), ("--overwrite",)):
        with pytest.raises(job.JobError, match="is not a compression job's directory"):
            job.main(argv(setup, out, extra=extra))
    assert sorted(os.listdir(out)) == ["model.safetensors", "thesis.tex"]          # no .lock left
    assert (out / "thesis.tex").read_text() == "years of work"


def test_out_equal_to_or_inside_the_model_is_refused(setup):
    model = setup["tmp"] / "model-copy"
    shutil.copytree(setup["path"], model)
    before = {f: (model / f).read_bytes() for f in os.listdir(model)}
    for out in (model, model / "compressed"):
        for extra in ((), ("--overwrite",)):
            with pytest.raises(job.JobError, match="source model's directory"):
                job.main(argv(setup, out, model=str(model), extra=extra))
    assert {f: (model / f).read_bytes() for f in os.listdir(model)} == before


def test_overwrite_deletes_only_our_files(setup, reference, capsys):
    out = setup["tmp"] / "ours-plus-user"
    shutil.copytree(reference[0], out)
    (out / "notes.txt").write_text("mine")
    (out / "layers" / "README").write_text("also mine")
    (out / ".staging").mkdir()                                  # a killed run's half-written layer: ours
    (out / ".staging" / ck.layer_file(0).split("/")[-1]).write_bytes(b"partial")
    with pytest.raises(job.JobError, match="holds a different job"):
        job.main(argv(setup, out, bq=4))
    capsys.readouterr()
    job.main(argv(setup, out, bq=4, extra=("--overwrite",)))
    err = capsys.readouterr().err
    assert "notes.txt" in err and ".staging" not in err         # .staging was ours: not reported as kept
    assert not (out / ".staging").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "layers" / "README").read_text() == "also mine"
    assert json.loads((out / ck.JOB_FILE).read_text())["job_config"] != \
        json.loads((reference[0] / ck.JOB_FILE).read_text())["job_config"]


def test_out_os_errors_are_one_line(setup, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, msg in ((a_file, "exists and is not a directory"),
                     (a_file / "sub", "cannot create the output directory")):
        rc, log = _cli(argv(setup, out))
        assert rc == 2 and f"error: {out}: " in log and msg in log and "Traceback" not in log, log
    assert a_file.read_text() == "x"


def _cli(args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-m", "experiments.compress", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**env, "PYTHONPATH": REPO})
    return p.returncode, p.stdout + p.stderr


# ------------------------------------------------------------------ incomplete sources
def _without(tmp, name: str, drop: str, **over) -> str:
    path, model = tiny_hf_model("llama", tmp, save=False, name=name, num_hidden_layers=2, **{**TINY, **over})
    randomize_(model, 0, scale=0.3)
    model.save_pretrained(path)
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    assert drop in tensors, sorted(tensors)
    del tensors[drop]
    save_file(tensors, f, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("drop,over", [("model.norm.weight", {}),
                                       ("lm_head.weight", {"tie_word_embeddings": False}),
                                       ("model.layers.1.mlp.down_proj.weight", {})])
def test_source_missing_a_tensor_is_refused_before_work(setup, tmp_path, drop, over):
    src = _without(tmp_path, "missing", drop, **over)
    out = tmp_path / "out"
    with pytest.raises(job.JobError, match=rf"the source lacks 1 tensor\(s\).*{drop.replace('.', r'[.]')}"):
        job.main(argv(setup, out, model=src))
    assert not out.exists()                               # nothing was written, no layer was decomposed


# ------------------------------------------------------------------ impossible schedules
@pytest.mark.parametrize("field,value,msg", [("iters", 0, "must be >= 1"), ("lplr_iters", -1, "must be >= 0"),
                                             ("requant_sweeps", -2, "must be >= 0"), ("rank", -1, "must be >= 0")])
def test_impossible_schedule_refused(tmp_path, field, value, msg):
    with pytest.raises(BudgetError, match=rf"{field}={value} {msg}"):
        MatrixBudget(**{field: value}).validate()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"defaults: {{quantizer: uniform, b_q: 4, {field}: {value}}}\n")
    with pytest.raises(ValueError, match=rf"{field}={value}"):
        load_job_config(str(cfg))


# ------------------------------------------------------------------ calibration that is not one
def test_whitespace_calibration_is_refused(setup, tmp_path):
    """Text calibration needs a tokenizer: a tiny GGUF source carries one."""
    from tests.test_gguf import write_gguf
    g = tmp_path / "tiny.gguf"
    write_gguf(g, "llama", tied=False)
    text = tmp_path / "blank.txt"
    text.write_text(" \n\n   \t\n" * 50)
    args = argv(setup, tmp_path / "out", model=str(g))
    args[args.index("--calib") + 1] = str(text)
    with pytest.raises(job.JobError, match=r"blank\.txt: only \d+ calibration tokens"):
        job.main(args)
    assert not (tmp_path / "out").exists()


def test_small_calibration_warns(setup, capsys):
    cfg = dataclasses.replace(setup["cfg"], intermediate_size=512)
    plan = {"model.layers.0.mlp.down_proj.weight": MatrixBudget()}
    pipeline.check_calibration_size("c.txt", 300, cfg, plan)
    assert "300 calibration tokens < 512 input features" in capsys.readouterr().err
    pipeline.check_calibration_size("c.txt", 600, cfg, plan)
    assert capsys.readouterr().err == ""


def test_nan_calibration_ids_refused(setup, tmp_path):
    bad = np.load(setup["tmp"] / "calib.npy").astype(np.float32)
    bad[2, 5] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    args = argv(setup, tmp_path / "out")
    args[args.index("--calib") + 1] = str(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match="nan.npy"):
        job.main(args)
    assert not (tmp_path / "out").exists()
