"""caldera_jax.train: gradient accumulation normalised by real tokens (a partial step included),
resume after a crash ends at exactly the uninterrupted run's parameters, the loop learns, and the
run leaves its metrics, curves and best checkpoint."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.train.accumulate import accumulated, micro_grads
from caldera_jax.train.loop import TrainConfig, token_nll, train
from caldera_jax.train.optim import OptimConfig


def _toy_loss(w, frozen, batch, key):
    """Masked squared error: (sum over real rows, row count)."""
    err = (batch["x"] @ w - batch["y"]) ** 2
    m = batch["m"]
    return jnp.sum(err * m), jnp.sum(m), {"abs": jnp.sum(jnp.abs(err) * m)}


def _toy_batch(rng, rows, real):
    return {"x": rng.normal(size=(rows, 3)).astype(np.float32), "y": rng.normal(size=rows).astype(np.float32),
            "m": (np.arange(rows) < real).astype(np.float32)}


def test_accumulation_equals_one_big_batch_and_partial_steps_are_not_scaled_down():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=3).astype(np.float32))
    micro = [_toy_batch(rng, 8, n) for n in (8, 3, 6)]                 # different real token counts
    keys = [jax.random.key(j) for j in range(3)]
    g, loss, n, _ = accumulated(micro_grads(_toy_loss), w, None, micro, keys)
    big = {k: np.concatenate([b[k] for b in micro]) for k in micro[0]}
    ref = jax.grad(lambda w: _toy_loss(w, None, big, None)[0] / 17.0)(w)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5)
    assert float(n) == 17
    g1, _, _, _ = accumulated(micro_grads(_toy_loss), w, None, micro[1:2], keys[:1])   # a partial step
    ref1 = jax.grad(lambda w: _toy_loss(w, None, micro[1], None)[0] / 3.0)(w)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(ref1), rtol=1e-5)


class _LMData:
    """Deterministic micro-batches of a repeating token pattern (learnable), by step."""

    def __init__(self, vocab, accum=2, rows=2, T=12, last_partial_at=None):
        self.vocab, self.accum, self.rows, self.T, self.partial = vocab, accum, rows, T, last_partial_at

    def _batch(self, seed):
        rng = np.random.default_rng(seed)
        start = rng.integers(0, 5, (self.rows, 1))
        ids = ((start + np.arange(self.T)[None]) % 5 + 1).astype(np.int32)
        labels = ids.copy()
        labels[:, : self.T // 3] = -100                               # a prompt without loss
        return {"input_ids": ids, "labels": labels}

    def micro_batches(self, step):
        m = 1 if step == self.partial else self.accum
        return [self._batch(1000 * step + j) for j in range(m)]

    def val_batches(self):
        return [self._batch(10**6 + j) for j in range(2)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from caldera_jax.checkpoints_io.hf import load_hf
    from tests.hf_tiny import tiny_hf_model
    cfg, params = load_hf(tiny_hf_model("llama", tmp_path_factory.mktemp("m"), tie_word_embeddings=False)[0])
    from caldera_jax.models.decoder import forward

    def loss_fn(head, frozen, batch, key):
        p = {**frozen, "lm_head": head}
        s, n = token_nll(forward(p, cfg, batch["input_ids"]), batch["labels"])
        return s, n, {}
    frozen = {k: v for k, v in params.items() if k != "lm_head"}
    return cfg, params["lm_head"], frozen, loss_fn


def _run(tiny, out, on_step=None, steps=6):
    cfg, head, frozen, loss_fn = tiny
    tc = TrainConfig(steps=steps, accum=2, optim=OptimConfig(lr=3e-2, warmup_frac=0.2), val_every=3, ckpt_every=2)
    return train(loss_fn, head, frozen, _LMData(cfg.vocab_size, last_partial_at=steps - 1), tc, str(out),
                 progress=False, on_step=on_step, log=lambda s: None)


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny, tmp_path):
    ref = _run(tiny, tmp_path / "ref")

    def crash(step, row):
        if step == 3:                                   # after step 3, before the step-4 checkpoint
            raise KeyboardInterrupt("simulated kill")
    with pytest.raises(KeyboardInterrupt):
        _run(tiny, tmp_path / "crash", on_step=crash)
    res = _run(tiny, tmp_path / "crash")
    assert res.resumed_from == 2
    for a, b in zip(jax.tree.leaves(res.trainable), jax.tree.leaves(ref.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(res.rows) == strip(ref.rows)
    on_disk = [json.loads(line) for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk] == list(range(1, 7))          # no row lost or repeated
    assert on_disk[-1]["micro_batches"] == 1                         # the partial last step
    assert (res.best_step, res.best_val) == (ref.best_step, ref.best_val)
    assert (tmp_path / "crash" / "curves.png").stat().st_size > 0


def test_the_loop_learns_and_keeps_the_best(tiny, tmp_path):
    res = _run(tiny, tmp_path / "learn", steps=12)
    val = [r["val_loss"] for r in res.rows if "val_loss" in r]
    assert val[-1] < 0.7 * val[0], val
    assert res.best_val == min(val)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        TrainConfig(steps=0)
