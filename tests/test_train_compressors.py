"""End-to-end codec training through a frozen tiny MoE (real SmolLM2 tokenizer and chat template,
mesh dp=2 x ep=2 on fake CPU devices): the validation loss of a 4x learned codec drops from its
near-identity start, only the codec changes, the saved codec reloads as an offline init with the
same loss, and bad options are refused before any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from caldera_jax.pipeline import train_compressors as tc
from tests.hf_tiny import tiny_hf_model, with_smollm2_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codec")
    model = with_smollm2_tokenizer(tiny_hf_model("qwen3_moe", tmp, vocab_size=49152, num_hidden_layers=2)[0])
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(60):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        rows.append({"messages": [{"role": "user", "content": f"Add {a} and {b}."},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    data = tmp / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"model": model, "data": str(data), "tmp": tmp}


def _job(setup, out, **kw):
    base = dict(model=setup["model"], data=setup["data"], out=str(out), ratio=4, batch_size=4, seq_len=64,
                epochs=2, lr=3e-2, warmup_frac=0.1, val_interval=6, ckpt_interval=6,
                mesh=(("dp", 2), ("ep", 2)), dtype="float32", progress=False)
    return tc.CompressorJob(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(setup):
    """The 4x codec trained by the first test (run.json holds its record)."""
    out = setup["tmp"] / "run"
    tc.run(_job(setup, out), log=lambda s: None)
    return out, json.loads((out / tc.RUN_JSON).read_text())


def test_training_lowers_the_validation_loss_and_saves_a_reloadable_codec(setup, trained):
    out, rec = trained
    assert rec["val_loss_best"] < rec["val_loss_before"] - 0.05, rec
    assert rec["data"]["split_records"] == {"train": 48, "val": 6, "test": 6}
    w = load_file(str(out / tc.CODEC_FILE))
    assert sorted(w) == [f"model.layers.{i}.mlp.codec.{k}.weight" for i in (0, 1) for k in ("compress", "decompress")]
    assert w["model.layers.0.mlp.codec.compress.weight"].shape == (8, 32)
    assert json.loads((out / tc.CODEC_JSON).read_text())["codec"] == "learned-4x"
    # the saved codec as an offline initialisation starts where training ended
    again = tc.run(_job(setup, setup["tmp"] / "again", init=f"offline:{out}", epochs=1, max_steps=1, lr=1e-9),
                   log=lambda s: None)
    np.testing.assert_allclose(again["val_loss_before"], rec["val_loss_best"], rtol=1e-5)


def test_packed_rows_give_the_padded_rows_loss(setup):
    """--pack puts several records in a row; with attention kept inside each record and no target
    across a boundary, the validation loss of the same codec is the padded layout's."""
    inp = {p: tc.open_inputs(_job(setup, setup["tmp"] / "x", seq_len=256, pack=p)) for p in (False, True)}
    rows = lambda r: sum(int(b["attention_mask"].any(1).sum()) for b in r)          # noqa: E731
    assert rows(inp[True]["batches"]["val"]) < rows(inp[False]["batches"]["val"]) / 2     # records share rows
    res = {p: tc.run(_job(setup, setup["tmp"] / f"pack-{p}", seq_len=256, epochs=1, max_steps=1, lr=1e-9,
                          pack=p), log=lambda s: None) for p in (False, True)}
    np.testing.assert_allclose(res[True]["val_loss_before"], res[False]["val_loss_before"], rtol=1e-5)


@pytest.mark.parametrize("kw,msg", [(dict(ratio=3), "ratio 3"), (dict(stale="sometimes"), "stale must be"),
                                    (dict(mesh=(("dp", 2), ("ep", 3))), "--mesh"),
                                    (dict(init="offline:/nonexistent"), "does not exist"),
                                    (dict(model="/nonexistent"), "not a directory")])
def test_bad_options_are_refused_before_any_work(setup, kw, msg):
    out = setup["tmp"] / "bad"
    with pytest.raises(tc.CompressorJobError, match=msg):
        tc.run(_job(setup, out, **kw), log=lambda s: None)
    assert not out.exists()


def test_offline_collect_and_fit(setup):
    """collect: one row per response token per MoE layer, same count for every layer; fit: the
    reconstruction of held-out states improves on the codec's near-identity start."""
    from caldera_jax.pipeline import offline_codecs as oc
    states = setup["tmp"] / "states"
    meta = oc.collect(oc.CollectJob(setup["model"], setup["data"], str(states), seq_len=64, progress=False),
                      log=lambda s: None)
    want = meta["data"]["loss_tokens"]
    assert meta["tokens"] == {"train": want["train"], "val": want["val"]} and meta["layers"] == [0, 1]
    x = np.load(states / "train" / "layer-001.npy")
    assert x.shape == (want["train"], 32) and np.all(np.isfinite(x)) and np.std(x) > 0
    assert oc.collect(oc.CollectJob(setup["model"], setup["data"], str(states)), log=lambda s: None) == meta
    r0 = oc.fit(oc.FitJob(str(states), str(setup["tmp"] / "off0"), steps=1, lr=1e-9, progress=False),
                log=lambda s: None)
    r = oc.fit(oc.FitJob(str(states), str(setup["tmp"] / "off"), steps=60, lr=1e-2, val_interval=20,
                         progress=False), log=lambda s: None)
    for a, b in zip(r0["layers"], r["layers"]):
        assert b["snr_db"] > a["snr_db"] + 1.0 and b["cosine"] > a["cosine"], (a, b)
    # the offline codec initialises end-to-end training
    rec = tc.run(_job(setup, setup["tmp"] / "e2e-off", init=f"offline:{setup['tmp'] / 'off'}", max_steps=1,
                      lr=1e-9), log=lambda s: None)
    assert rec["val_loss_before"] > 0


def test_trained_codec_evaluates_as_it_was_validated(setup, trained):
    """A trained codec directory, read back by experiments.perplexity (response-only, the same
    seed-42 val split): its loss equals training's best validation loss (trained on dp=2 x ep=2,
    evaluated on one device); the identity codec through the expert-parallel layer equals no codec;
    INT2 on the wire costs loss; the lm-eval adapter scores with the codec."""
    from experiments import perplexity
    out, rec = trained
    common = ["--model", setup["model"], "--data", setup["data"], "--split", "val", "--seq-len", "64"]
    res = perplexity.main(common + ["--codec", str(out), "--out", str(setup["tmp"] / "ppl.json")])
    np.testing.assert_allclose(res["nll"], rec["val_loss_best"], rtol=2e-5)
    assert res["codec_name"] == "learned-4x" and res["router_mode"] == "compressed"
    assert json.loads((setup["tmp"] / "ppl.json").read_text())["nll"] == res["nll"]
    none = perplexity.main(common)
    ident = perplexity.main(common + ["--codec", "identity"])
    np.testing.assert_allclose(ident["nll"], none["nll"], rtol=1e-5)
    assert ident["tokens"] == none["tokens"] == res["tokens"] > 0
    int2 = perplexity.main(common + ["--codec", "int2"])
    assert int2["nll"] > none["nll"] + 0.01, (int2, none)

    from caldera_jax.lmeval.adapter import register
    from lm_eval.api.instance import Instance
    reqs = [Instance("loglikelihood", {}, ("Add 3 and 4.", " 3 plus 4 is 7."), 0)]
    got = {c: register()(path=setup["model"], codec=c, batch_size=2).loglikelihood(reqs)[0][0]
           for c in ("none", "identity", str(out))}
    np.testing.assert_allclose(got["identity"], got["none"], rtol=1e-5)
    assert abs(got[str(out)] - got["none"]) > 1e-4, got


def test_a_codec_from_another_model_is_refused_naming_its_file(setup, trained, tmp_path):
    import shutil

    from caldera_jax.checkpoints_io.hf import load_hf
    from caldera_jax.moe.codec_spec import CodecSpecError, load_codec
    cfg, _ = load_hf(setup["model"])
    bad = tmp_path / "other"
    shutil.copytree(trained[0], bad, ignore=shutil.ignore_patterns("train"))
    desc = json.loads((bad / tc.CODEC_JSON).read_text())
    (bad / tc.CODEC_JSON).write_text(json.dumps({**desc, "hidden_size": 64}))
    with pytest.raises(CodecSpecError, match=r"codec\.json: trained for hidden_size=64"):
        load_codec(str(bad), cfg)
    (bad / tc.CODEC_JSON).write_text(json.dumps({**desc, "ratio": 8}))
    with pytest.raises(CodecSpecError, match=r"codec\.safetensors: .*shape"):
        load_codec(str(bad), cfg)
    assert load_codec("fp8", cfg).codec.block == 32            # hidden 32: 128-channel blocks do not fit
    assert load_codec("int4-g128", cfg).codec.group == 32
    with pytest.raises(CodecSpecError, match="neither a fixed codec"):
        load_codec(str(tmp_path / "nowhere"), cfg)
