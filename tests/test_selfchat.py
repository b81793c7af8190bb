"""experiments.selfchat on a tiny model with the real SmolLM2 tokenizer and chat template: one
record per prompt in the prompts' order, greedy answers equal a direct generate call, and a run
killed between batches continues to the same file."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.pipeline import selfchat
from tests.hf_tiny import tiny_hf_model, with_smollm2_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selfchat")
    model = with_smollm2_tokenizer(tiny_hf_model("llama", tmp, vocab_size=49152)[0])
    ev = tmp / "evalsets" / "arc_easy"
    ev.mkdir(parents=True)
    rows = [{"id": f"q{k}", "question": q, "choices": {"label": ["A", "B"], "text": ["yes", "no"]}, "answerKey": "A"}
            for k, q in enumerate(["Is ice cold?", "Do fish swim in water every day of the year?", "Is the sun hot?",
                                   "Can birds fly?", "Is a circle round?"])]
    (ev / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"model": model, "evalsets": str(tmp / "evalsets"), "tmp": tmp}


def _job(setup, out):
    return selfchat.SelfChatJob(setup["model"], setup["evalsets"], str(out), sets=("arc_easy/validation",),
                                max_new_tokens=6, batch_size=2, progress=False)


def test_answers_in_order_and_equal_to_greedy_generation(setup):
    out = setup["tmp"] / "a.jsonl"
    meta = selfchat.run(_job(setup, out), log=lambda s: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"arc_easy/validation:q{k}" for k in range(5)] and meta["rows"] == 5
    from caldera_jax.checkpoints_io.model_source import load_model
    from caldera_jax.models.generate import generate
    cfg, params, tok = load_model(setup["model"], dtype=jnp.float32)
    ids = tok.apply_chat_template([rows[2]["messages"][0]], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    eos = tuple(sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), cfg.eos_token_id} - {None}))
    new = generate(params, cfg, np.asarray([ids]), max_new_tokens=6, eos_token_id=eos)[0].tolist()
    stop = next((j for j, t in enumerate(new) if t in eos), None)
    assert rows[2]["messages"][1]["content"] == tok.decode(new[:stop], skip_special_tokens=True).strip()


def test_a_killed_run_continues_to_the_same_file(setup, monkeypatch):
    ref = setup["tmp"] / "ref.jsonl"
    selfchat.run(_job(setup, ref), log=lambda s: None)
    out = setup["tmp"] / "killed.jsonl"
    real, calls = selfchat.generate, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)
    monkeypatch.setattr(selfchat, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        selfchat.run(_job(setup, out), log=lambda s: None)
    assert not out.exists() and len((setup["tmp"] / "killed.jsonl.partial").read_text().splitlines()) == 2
    monkeypatch.setattr(selfchat, "generate", real)
    selfchat.run(_job(setup, out), log=lambda s: None)
    assert out.read_text() == ref.read_text()


def test_selfchat_asset_builder_answers_every_validation_question(setup, tmp_path, monkeypatch):
    """experiments.assets' selfchat-smollm2 builder: the chat set lands in the asset directory with
    one answered row per ARC validation question (both sets), and its work directory is removed."""
    import shutil

    from experiments import assets
    ev = tmp_path / "evalsets"
    shutil.copytree(setup["evalsets"], ev)
    (ev / "arc_challenge").mkdir()
    shutil.copy(ev / "arc_easy" / "validation.jsonl", ev / "arc_challenge" / "validation.jsonl")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    paths = {"smollm2-135m-instruct": setup["model"], "evalsets": str(ev)}
    monkeypatch.setattr(assets, "asset_path", lambda name: __import__("pathlib").Path(paths[name]))
    ctx = assets._Ctx(asset=assets.ASSETS["selfchat-smollm2"], files={}, work=tmp_path / "w",
                      out=tmp_path / "w" / "out", progress=False)
    produced = assets.ASSETS["selfchat-smollm2"].build(ctx)
    rows = [json.loads(line) for line in (ctx.out / "chat.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and produced["selfchat"]["rows"] == 10 and produced["answered_by"] == "smollm2-135m-instruct"
    assert {r["source"] for r in rows} == {"arc_easy/validation", "arc_challenge/validation"}
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)
    assert not (tmp_path / "cache" / "work" / "selfchat-smollm2").exists()
