"""A checkpoint written by an earlier release (format version 1, tests/fixtures/checkpoint_v1,
see its README) still loads with today's code, verifies against its source model, and gives the
logits that release computed."""
from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np

from caldera_jax.checkpoints_io.compressed import load_compressed
from caldera_jax.models import forward

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "checkpoint_v1"


def test_version1_fixture_loads_with_the_logits_it_was_written_with(tmp_path):
    ckpt = tmp_path / "ckpt"                              # a copy: loading never depends on where it lies
    shutil.copytree(FIXTURE / "checkpoint", ckpt)
    assert json.loads((ckpt / "caldera_config.json").read_text())["format_version"] == 1
    cfg, params = load_compressed(ckpt, source=str(FIXTURE / "source"))
    tokens = np.load(FIXTURE / "tokens.npy")
    got = np.asarray(forward(params, cfg, jnp.asarray(tokens)), np.float32)
    want = np.load(FIXTURE / "logits.npy")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
