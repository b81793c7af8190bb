"""Multi-host compressor training: two processes (4 CPU devices each, gloo collectives) joined by
`runtime.init_distributed` train the same codec as one process with 8 devices, on the same
dp=2 x ep=4 mesh; only process 0 writes the job's files. And the environment is read strictly."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from caldera_jax import runtime
from caldera_jax.pipeline import train_compressors as tc
from tests.test_train_compressors import setup  # noqa: F401  (the tiny MoE and its chat data)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = dict(ratio=4, batch_size=4, seq_len=64, epochs=1, max_steps=3, lr=3e-2, val_interval=3, ckpt_interval=3,
           dtype="float32", init="identity")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cli_args(setup, out) -> list[str]:
    a = ["--model", setup["model"], "--data", setup["data"], "--out", str(out), "--mesh", "dp=2,ep=4",
         "--no-progress"]
    for k, v in JOB.items():
        a += ["--" + k.replace("_", "-"), str(v)]
    return a


def test_two_processes_train_the_same_codec_as_one(setup):
    one = setup["tmp"] / "one"
    tc.run(tc.CompressorJob(model=setup["model"], data=setup["data"], out=str(one),
                            mesh=(("dp", 2), ("ep", 4)), progress=False, **JOB), log=lambda s: None)
    two = setup["tmp"] / "two"
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_PLATFORMS": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-m", "experiments.train_compressors", *_cli_args(setup, two)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    rec = json.loads((two / tc.RUN_JSON).read_text())
    assert rec["processes"] == 2
    ref = json.loads((one / tc.RUN_JSON).read_text())
    assert ref["processes"] == 1
    np.testing.assert_allclose(rec["val_loss_before"], ref["val_loss_before"], rtol=1e-5)
    np.testing.assert_allclose(rec["val_loss_best"], ref["val_loss_best"], rtol=1e-4)
    assert rec["val_loss_best"] < rec["val_loss_before"]                 # it trained
    w1, w2 = load_file(str(one / tc.CODEC_FILE)), load_file(str(two / tc.CODEC_FILE))
    assert sorted(w1) == sorted(w2)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # process 0 wrote the metrics once: one row per step, no duplicates from process 1
    steps = [json.loads(x)["step"] for x in (two / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, {"num_processes": 4}),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {"num_processes": 2}),
    ({"SLURM_NTASKS": "4", "CALDERA_JAX_DISTRIBUTED": "0"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}),
])
def test_the_environment_says_how_to_join(env, want):
    assert runtime.distributed_env(env) == want
    assert runtime.process_count(want) == (1 if want is None else want["num_processes"])


@pytest.mark.parametrize("env, msg", [
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"}, "JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2"),
])
def test_an_incomplete_environment_is_refused_naming_the_variable(env, msg):
    with pytest.raises(runtime.DistributedError, match=msg):
        runtime.distributed_env(env)


def test_a_mesh_that_does_not_split_over_the_processes_is_refused(monkeypatch, capsys, tmp_path):
    from experiments import train_compressors
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(SystemExit):
        train_compressors.main(["--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
                                "--out", str(tmp_path / "out"), "--mesh", "dp=2,ep=4"])
    assert "--mesh dp=2,ep=4: 8 devices do not split evenly over 3 processes" in capsys.readouterr().err


def test_frozen_weights_are_placed_as_the_expert_parallel_layer_reads_them(setup):
    from caldera_jax.checkpoints_io.hf import load_hf
    from caldera_jax.moe import make_mesh
    from caldera_jax.moe.ep import param_shardings
    from caldera_jax.train.placement import place
    from jax.sharding import PartitionSpec as P
    _, params = load_hf(setup["model"])
    mesh = make_mesh(ep=4, dp=2)
    placed = place(params, param_shardings(params, mesh))
    layer = placed["model"]["layers"]["0"]["mlp"]
    assert layer["experts"]["gate_proj"]["weight"].sharding.spec == P("ep", None, None)
    assert layer["experts"]["down_proj"]["weight"].sharding.spec == P("ep", None, None)
    assert layer["experts"]["gate_proj"]["weight"].addressable_shards[0].data.shape[0] == 1     # 4 experts / ep=4
    assert layer["gate"]["weight"].sharding.spec == P() and placed["model"]["embed_tokens"]["weight"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(layer["experts"]["up_proj"]["weight"]),
                                  np.asarray(params["model"]["layers"]["0"]["mlp"]["experts"]["up_proj"]["weight"]))
