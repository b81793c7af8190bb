"""Evaluation with lm-eval: the `caldera-jax` adapter answers lm-eval's interface, its scores equal a
direct computation with our forward (and lm-eval's own hf model), its greedy generation equals
caldera_jax.models.generate and honours stop sequences and max tokens, the export reloads in
transformers with our logits, and a packaged task YAML runs end to end offline (with the request
cache). Tiny random models with a character-level tokenizer (tests/hf_tiny.py); no network."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caldera_jax.lmeval import engine, tasks_dir
from caldera_jax.lmeval.adapter import NAME, register
from caldera_jax.models import forward, generate
from tests.hf_tiny import tiny_hf_model, tiny_llama_dir

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoint_v1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama (vocab 104) with the character tokenizer, saved as a HF directory."""
    return tiny_llama_dir(tmp_path_factory.mktemp("lmeval"), max_position_embeddings=512)


@pytest.fixture(scope="module")
def lm(tiny):
    return register()(path=tiny, batch_size=4)


def _inst(kind, args):
    from lm_eval.api.instance import Instance
    return Instance(kind, {}, args, 0)


def _direct_logprob(lm, ctx: list[int], cont: list[int], width: int = 128) -> tuple[float, bool]:
    """log p(cont | ctx) from one plain forward of our model, no cache, no shared context (the
    sequence right-padded to `width`, so one compile serves every call: causal attention makes
    the real positions' logits independent of what follows)."""
    seq, mask = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
    seq[0, :len(ctx) + len(cont)], mask[0, :len(ctx) + len(cont)] = ctx + cont, True
    logits = forward(lm.params, lm.cfg, jnp.asarray(seq), jnp.asarray(mask))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)[0]
    pos = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    lp = np.asarray(logp)[pos, cont]
    return float(lp.sum()), bool(np.all(np.asarray(logp).argmax(-1)[pos] == np.asarray(cont)))


def test_adapter_answers_lm_eval_interface(lm, tiny):
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model
    cls = get_model(NAME)
    assert issubclass(cls, LM) and cls is register()
    assert get_model("hf").__name__ == "HFLM"                  # lm-eval's own models still registered
    built = cls.create_from_arg_string(f"path={tiny},batch_size=2", {"device": None, "max_batch_size": None})
    assert built.buckets.batch == 2 and built.max_length == 512
    ll = lm.loglikelihood([_inst("loglikelihood", ("Question: why?\nAnswer:", " because")),
                           _inst("loglikelihood", ("", "empty context"))])
    assert [type(x) for pair in ll for x in pair] == [float, bool, float, bool] and all(v < 0 for v, _ in ll)
    (roll,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", ("To be, or not to be.",))])
    assert isinstance(roll, float) and roll < 0
    (text,) = lm.generate_until([_inst("generate_until", ("Once upon", {"until": ["\n\n"], "max_gen_toks": 5}))])
    assert isinstance(text, str)
    chat = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(NotImplementedError, match="greedy only"):
        lm.generate_until([_inst("generate_until", ("x", {"do_sample": True, "temperature": 0.7}))])


def test_loglikelihood_equals_direct_forward(lm, monkeypatch):
    """Padded, bucketed, batched scores with shared contexts equal one plain forward per request
    (also when the logits budget splits every call), and lm-eval's rolling windows sum to the
    whole string's log-likelihood given the prefix token."""
    q = "Question: What is 2+2?\nAnswer:"
    pairs = [(q, " 4"), ("The cat", " sat on the mat."), ("A", "B"), (q, " five"), (q, " 2+2"),
             ("Long context " * 6, " and a long continuation follows it"), ("x y z", " w")]
    got = lm.loglikelihood([_inst("loglikelihood", p) for p in pairs])
    monkeypatch.setattr(engine, "PACK_LENGTHS", (16, 32))     # the longer ones: prefill + extend
    mixed = lm.loglikelihood([_inst("loglikelihood", p) for p in pairs])
    monkeypatch.setattr(engine, "LOGITS_BUDGET_BYTES", 1)
    split = lm.loglikelihood([_inst("loglikelihood", p) for p in pairs])
    for other in (mixed, split):
        assert [g for _, g in other] == [g for _, g in got]
        np.testing.assert_allclose([v for v, _ in other], [v for v, _ in got], rtol=0, atol=1e-4)
    for (c, x), (lp, greedy) in zip(pairs, got):
        ctx, cont = lm._encode_pair(c, x)
        want_lp, want_greedy = _direct_logprob(lm, ctx, cont)
        assert abs(lp - want_lp) < 1e-4 * max(1.0, abs(want_lp)) and greedy == want_greedy
    s = "Some text to score, whole."
    (roll,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (s,))])
    want, _ = _direct_logprob(lm, [lm.prefix_token_id], lm.tok_encode(s))
    assert abs(roll - want) < 1e-4 * abs(want)


def test_packing_places_every_unit_once_within_its_row():
    lengths = np.random.default_rng(0).integers(1, 129, 300).tolist()
    rows = engine._pack_rows(lengths, 128)
    assert sorted(u for r in rows for u in r) == list(range(300))
    assert max(sum(lengths[u] for u in r) for r in rows) <= 128
    assert len(rows) <= sum(lengths) / 128 * 11 / 9 + 1               # first-fit decreasing's bound


def test_scores_a_caldera_checkpoint_with_its_quantized_weights():
    """The engine runs a compressed checkpoint's QLRWeight leaves (prefill + extend with a shared
    context) and agrees with a plain forward of the same leaves."""
    from caldera_jax.checkpoints_io.compressed import load_compressed
    cfg, params = load_compressed(os.path.join(FIXTURE, "checkpoint"), source=os.path.join(FIXTURE, "source"))
    rng = np.random.default_rng(3)
    ctx = rng.integers(3, cfg.vocab_size, 20).tolist()
    items = [(ctx + rng.integers(3, cfg.vocab_size, n).tolist(), n) for n in (1, 4, 7)]
    got = engine.score(params, cfg, items, engine.Buckets(batch=4))
    for (toks, n), (lp, _) in zip(items, got):
        seq = np.zeros((1, 32), np.int32)
        seq[0, :len(toks)] = toks
        logp = np.asarray(jax.nn.log_softmax(forward(params, cfg, jnp.asarray(seq), jnp.asarray(seq > 0)), -1))[0]
        want = sum(logp[t - 1, toks[t]] for t in range(len(toks) - n, len(toks)))
        assert abs(lp - want) < 1e-4 * abs(want)


def test_matches_lm_eval_hf_model(lm, tiny):
    """lm-eval's own transformers backend on the same checkpoint: same log-likelihoods and the
    same greedy generations."""
    from lm_eval.models.huggingface import HFLM
    hf = HFLM(pretrained=tiny, batch_size=4, device="cpu", dtype="float32")
    reqs = [_inst("loglikelihood", p) for p in [("Question: Is it?\nAnswer:", " yes"), ("Pick", " one of these")]]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), hf.loglikelihood(reqs)):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b)) and ga == gb
    gen = [_inst("generate_until", (p, {"until": ["."], "max_gen_toks": 12, "do_sample": False}))
           for p in ("Question: name a colour\nAnswer:", "Abc")]
    assert lm.generate_until(gen) == hf.generate_until(gen)


def test_generate_until_stop_sequences_and_max_tokens(lm):
    prompt = "Question: say something\nAnswer:"
    ids = lm.tok_encode(prompt)
    ref = generate(lm.params, lm.cfg, np.asarray([ids]), max_new_tokens=24, eos_token_id=lm.eos_ids)[0].tolist()
    ref = ref[:next((k for k, t in enumerate(ref) if t in lm.eos_ids), len(ref))]
    full = lm.tok_decode(ref)
    assert len(full) >= 6, "the tiny model should not stop at once"

    def run(until, n):
        return lm.generate_until([_inst("generate_until", (prompt, {"until": until, "max_gen_toks": n}))])[0]

    assert run([], 24) == full                                   # = caldera_jax.models.generate, greedy
    assert run([], 3) == lm.tok_decode(ref[:3])                  # max tokens
    stop = full[3:5]
    assert run([stop], 24) == full[:full.index(stop)]            # cut at the first stop sequence
    # decoding stops once every row has stopped: one check per row, not one per token
    calls = []
    out = engine.greedy(lm.params, lm.cfg, [ids, ids[:-3]], 64, lambda k, t: calls.append(k) or True,
                        engine.Buckets(batch=4, chunk=4), eos_ids=lm.eos_ids)
    assert sorted(calls) == [0, 1] and all(len(o) <= 4 for o in out)


def _write_evalsets(root) -> None:
    """A few ARC-style and GSM8K-style documents in the evalsets layout (<set>/<split>.jsonl)."""
    arc = [{"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C"]}, "answerKey": k}
           for i, (q, c, k) in enumerate([("Which is hot?", ["ice", "fire", "snow"], "B"),
                                          ("Which is a number?", ["seven", "blue", "tree"], "A"),
                                          ("What do cows drink?", ["milk", "oil", "water"], "C")])]
    gsm = [{"id": 0, "question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5",
            "short_answer": "5", "cot_answer": "3 + 2 = 5. So the answer is 5."},
           {"id": 1, "question": "What is 10 minus 4?", "answer": "10 - 4 = 6\n#### 6",
            "short_answer": "6", "cot_answer": "10 - 4 = 6. So the answer is 6."}]
    shots = [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2. So the answer is 2."},
             {"question": "What is 2 times 3?", "answer": "2 * 3 = 6. So the answer is 6."}]
    for rel, rows in (("arc_easy/test", arc), ("arc_easy/validation", arc[:2]), ("gsm8k/test", gsm),
                      ("gsm8k/fewshot", shots)):
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def test_task_yaml_end_to_end_offline(tiny, tmp_path, monkeypatch):
    """The packaged arc_easy and gsm8k_cot (strict and flexible extraction) run through
    lm_eval.simple_evaluate on the tiny model; a rerun with the request cache calls no model."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = register()(path=tiny, batch_size=4)          # its own: the cache hook is set on it
    _write_evalsets(tmp_path / "evalsets")
    tm = TaskManager(include_path=tasks_dir(), include_defaults=False,
                     metadata={"evalsets_dir": str(tmp_path / "evalsets")})
    kw = dict(tasks=["arc_easy", "gsm8k_cot"], num_fewshot=2, task_manager=tm, use_cache=str(tmp_path / "cache"),
              log_samples=False, verbosity="ERROR", bootstrap_iters=0)
    res = lm_eval.simple_evaluate(model=lm, **kw)
    r = res["results"]
    assert 0.0 <= r["arc_easy"]["acc,none"] <= 1.0 and res["n-samples"]["arc_easy"]["effective"] == 3
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(r["gsm8k_cot"])
    monkeypatch.setattr(lm, "loglikelihood", lambda *a, **k: pytest.fail("not served from the cache"))
    monkeypatch.setattr(lm, "generate_until", lambda *a, **k: pytest.fail("not served from the cache"))
    again = lm_eval.simple_evaluate(model=lm, **kw)["results"]
    assert again["arc_easy"]["acc,none"] == r["arc_easy"]["acc,none"]
    assert again["gsm8k_cot"]["exact_match,flexible-extract"] == r["gsm8k_cot"]["exact_match,flexible-extract"]


def test_eval_cli_writes_json_and_table(tiny, tmp_path, monkeypatch, capsys):
    from experiments import eval as eval_cli
    _write_evalsets(tmp_path / "cache" / "evalsets")
    monkeypatch.setenv("CALDERA_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    res = eval_cli.main(["--model", tiny, "--tasks", "arc_easy", "--limit", "2", "--batch-size", "4",
                         "--out", str(out), "--compile-cache", "none"])
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "acc" in printed
    (written,) = [f for f in os.listdir(out) if f.endswith(".json")]
    saved = json.loads((out / written).read_text())
    assert saved["results"]["arc_easy"]["acc,none"] == res["results"]["arc_easy"]["acc,none"]
    assert saved["caldera"]["examples"] == 2 and saved["caldera"]["model"]["kind"] == "hf"
    assert any(f.startswith("requests-caldera-jax-") for f in os.listdir(out))
    with pytest.raises(SystemExit, match="unknown task"):
        eval_cli.main(["--model", tiny, "--tasks", "arc_easy,nope", "--out", str(out), "--compile-cache", "none"])


# ------------------------------------------------------------------ export
def test_export_reloads_in_transformers_with_our_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    from caldera_jax.checkpoints_io.compressed import load_compressed
    from experiments import export_hf
    ckpt, src = os.path.join(FIXTURE, "checkpoint"), os.path.join(FIXTURE, "source")
    out = tmp_path / "hf"
    export_hf.main(["--ckpt", ckpt, "--out", str(out), "--dtype", "float32", "--source", src])
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokens = np.load(os.path.join(FIXTURE, "tokens.npy"))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    cfg, params = load_compressed(ckpt, source=src)
    ours = np.asarray(forward(params, cfg, jnp.asarray(tokens)), np.float32)
    assert np.abs(theirs - ours).max() < 1e-4
    bf16 = tmp_path / "hf16"
    export_hf.main(["--ckpt", ckpt, "--out", str(bf16), "--source", src])
    m16 = AutoModelForCausalLM.from_pretrained(bf16, local_files_only=True)
    assert m16.dtype == torch.bfloat16


def test_export_refuses_other_source_and_existing_out(tmp_path):
    from caldera_jax.checkpoints_io.errors import CheckpointError
    from caldera_jax.checkpoints_io.export import export_hf
    from caldera_jax.checkpoints_io.fingerprint import FingerprintMismatchError
    ckpt = os.path.join(FIXTURE, "checkpoint")
    other, _ = tiny_hf_model("llama", tmp_path, seed=1, intermediate_size=32, num_key_value_heads=4, name="other")
    with pytest.raises(FingerprintMismatchError, match="tensors differ"):
        export_hf(ckpt, tmp_path / "out", source=other)
    assert not os.path.exists(tmp_path / "out") and not any(".tmp-" in f for f in os.listdir(tmp_path))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("someone's file")
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(ckpt, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "someone's file"
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    with pytest.raises(CheckpointError, match="inside the checkpoint"):
        export_hf(copy, copy / "hf")
