"""caldera_jax.data with the real SmolLM2-135M-Instruct tokenizer and chat template: response-only
labels equal the template's known assistant text, bad records are counted and skipped, the split
is deterministic, batches and packing keep every token."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caldera_jax.data.batching import pack, padded_batches
from caldera_jax.data.chat import IGNORE, BadRecord, encode_chat, encode_text
from caldera_jax.data.records import DataError, load_tokenized, split_indices
from experiments import assets

CHAT = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, since 1871."}]


@pytest.fixture(scope="module")
def tok():
    if not assets.is_cached("smollm2-135m-instruct"):
        pytest.fail("asset 'smollm2-135m-instruct' is not cached: run `python -m experiments.assets fetch "
                    "smollm2-135m-instruct` (make test does)")
    from caldera_jax.checkpoints_io.model_source import load_tokenizer
    return load_tokenizer(str(assets.asset_path("smollm2-135m-instruct")))


def test_labels_are_exactly_the_assistant_replies(tok):
    e = encode_chat(tok, CHAT)
    # the template (SmolLM2's, which inserts its own system prompt) renders each reply as
    # "<|im_start|>assistant\n{content}<|im_end|>\n": the loss covers "{content}<|im_end|>\n"
    assert tok.decode(e.input_ids) == tok.apply_chat_template(CHAT, tokenize=False)
    labelled = e.labels != IGNORE
    runs = np.split(np.flatnonzero(labelled), np.flatnonzero(np.diff(np.flatnonzero(labelled)) > 1) + 1)
    assert [tok.decode(e.input_ids[r]) for r in runs] == ["Paris.<|im_end|>\n", "Rome, since 1871.<|im_end|>\n"]
    np.testing.assert_array_equal(e.labels[labelled], e.input_ids[labelled])
    assert "France" not in tok.decode(e.input_ids[labelled]) and "SmolLM" not in tok.decode(e.input_ids[labelled])


def test_a_given_system_prompt_is_not_labelled(tok):
    e = encode_chat(tok, [{"role": "system", "content": "Answer tersely."}] + CHAT[:2])
    assert tok.decode(e.input_ids[e.labels != IGNORE]) == "Paris.<|im_end|>\n"


@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": "hi"}], "no_assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty_text"),
    ([{"role": "robot", "content": "hi"}], "bad_role"),
    ("not a list", "no_messages"),
    (CHAT, "too_long")])
def test_bad_records_say_why(tok, messages, reason):
    with pytest.raises(BadRecord) as e:
        encode_chat(tok, messages, max_len=20)
    assert e.value.reason == reason


def test_jsonl_split_is_deterministic_and_bad_records_are_counted(tok, tmp_path):
    rng = np.random.default_rng(0)
    good = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a + b}."}]}
            for a, b in rng.integers(0, 1000, (40, 2))]
    bad = [{"messages": [{"role": "user", "content": "no reply"}]}, {"messages": []},
           {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good + bad) + "\n")
    d1 = load_tokenized(str(path), tok, max_len=256)
    d2 = load_tokenized(str(path), tok, max_len=256)
    assert d1.meta["split_records"] == {"train": 34, "val": 4, "test": 5} and d1.meta["split_seed"] == 42
    assert d1.meta["split_digest"] == d2.meta["split_digest"]
    assert d1.meta["skipped"] == {"no_assistant": 1, "no_messages": 1, "too_long": 1}
    assert sum(d1.meta["examples"].values()) == 40
    for s in d1.splits:
        assert [e.input_ids.tolist() for e in d1.splits[s]] == [e.input_ids.tolist() for e in d2.splits[s]]
    parts = split_indices(43)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(43))
    assert not np.array_equal(split_indices(43, seed=1)["train"], parts["train"])


def test_unusable_files_are_refused_with_the_path(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_tokenized(str(tmp_path / "missing.jsonl"), tok)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: none of its 1 records is usable.*no_assistant"):
        load_tokenized(str(only_bad), tok)


def test_text_mode_pads_and_packs_every_token(tok):
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 6
    ex = encode_text(tok, text, max_len=40)
    assert sum(len(e.input_ids) for e in ex) == len(tok(text, add_special_tokens=False)["input_ids"])
    chats = [encode_chat(tok, CHAT[:2]), encode_chat(tok, CHAT)] + ex
    batches = list(padded_batches(chats, batch_size=3, seq_len=128))
    assert len(batches) == -(-len(chats) // 3)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e.input_ids) for e in chats)
    packed = pack(chats, seq_len=128)
    assert int(packed["attention_mask"].sum()) == sum(len(e.input_ids) for e in chats)
    assert packed["input_ids"].shape[0] < len(chats)                      # rows hold several examples
    for r in range(packed["input_ids"].shape[0]):                         # positions restart per segment
        seg = packed["segment_ids"][r]
        for s in set(seg[seg > 0].tolist()):
            np.testing.assert_array_equal(packed["positions"][r][seg == s], np.arange(int((seg == s).sum())))
    got = sorted(tuple(packed["input_ids"][r][packed["segment_ids"][r] == s].tolist())
                 for r in range(len(packed["input_ids"])) for s in set(packed["segment_ids"][r].tolist()) - {0})
    assert got == sorted(tuple(e.input_ids.tolist()) for e in chats)     # no example split or lost


def test_packed_rows_give_each_sequence_its_own_logits(tmp_path):
    """A packed row (segment ids, restarting positions) through our decoder equals every sequence
    run alone: no attention crosses a segment boundary."""
    import jax.numpy as jnp

    from caldera_jax.checkpoints_io.hf import load_hf
    from caldera_jax.data.chat import Example
    from caldera_jax.models.decoder import forward
    from tests.hf_tiny import tiny_hf_model
    cfg, params = load_hf(tiny_hf_model("llama", tmp_path)[0])
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in (7, 5, 9, 3)]
    b = pack([Example(s, s) for s in seqs], seq_len=16)
    logits = np.asarray(forward(params, cfg, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                                jnp.asarray(b["positions"]), segment_ids=jnp.asarray(b["segment_ids"])))
    for s in seqs:
        alone = np.asarray(forward(params, cfg, jnp.asarray(s[None])))[0]
        r, at = next((r, int(np.flatnonzero(b["segment_ids"][r] == g)[0]))
                     for r in range(len(b["input_ids"])) for g in set(b["segment_ids"][r].tolist()) - {0}
                     if np.array_equal(b["input_ids"][r][b["segment_ids"][r] == g], s))
        np.testing.assert_allclose(logits[r, at:at + len(s)], alone, rtol=2e-5, atol=2e-5)
    unsegmented = np.asarray(forward(params, cfg, jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                                     jnp.asarray(b["positions"])))
    assert not np.allclose(unsegmented, logits, atol=1e-3)       # without segment ids, attention leaks
