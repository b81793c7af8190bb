"""One conversation -> (input_ids, labels) with the loss on the assistant's tokens only.

The assistant's tokens are found from the chat template's own output, not by re-tokenizing
prefixes: the conversation is rendered to text once; for every assistant turn i the template is
rendered for messages[:i] with the generation prompt (P_i) and for messages[:i+1] (T_i); the
characters T_i[len(P_i):] (the reply and its end-of-turn marker) are that turn's span, checked to
sit at the same place in the whole rendering. The whole text is tokenized once with offsets, and
a token is labelled when its first character lies in a span. A template that renders prefixes
differently from the whole (so the check fails) is an error naming the turn, never a silent
mis-labelling. System prompts a template inserts by itself (SmolLM2's, Qwen's) are handled because
every span is measured in the template's own output.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

IGNORE = -100            # label of a token without loss (the transformers / optax convention)
ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is a short key for the skipped-records summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Example:
    """input_ids [T] int32; labels [T] int32 (IGNORE where no loss). Labels are aligned with
    input_ids: the loss at position t predicts input_ids[t] from the tokens before it."""
    input_ids: np.ndarray
    labels: np.ndarray

    @property
    def loss_tokens(self) -> int:
        return int(np.sum(self.labels != IGNORE))


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001  (jinja errors: a template that refuses this shape of chat)
        raise BadRecord("template_error", f"the chat template refuses {len(messages)} message(s) "
                        f"({type(e).__name__}: {e})") from e


def render_chat(tokenizer, messages: Any) -> str:
    """A whole conversation as the chat template writes it (checked by check_messages; a template
    that fails, or a tokenizer without one, is a BadRecord)."""
    return _render(tokenizer, check_messages(messages), False)


def check_messages(messages: Any) -> list[dict]:
    """messages: a list of {"role": system|user|assistant, "content": non-empty str} with at least
    one assistant turn; BadRecord otherwise."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("no_messages", "'messages' is not a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRecord("bad_role", f"message {j} has no role in {ROLES}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise BadRecord("empty_text", f"message {j} ({m['role']}) has no text")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant", "no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole rendering, [(start, end) character spans of every assistant reply])."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise BadRecord("template_mismatch", f"turn {i}: the chat template does not render this "
                            f"conversation's prefixes as prefixes of the whole (cannot locate the reply)")
        start, end = len(prompt), len(upto)
        if m["content"] not in text[start:end]:
            raise BadRecord("template_mismatch", f"turn {i}: the reply is not inside its rendered span")
        spans.append((start, end))
    return text, spans


def encode_chat(tokenizer, messages: Any, max_len: int | None = None) -> Example:
    """A conversation -> Example with labels on the assistant replies (and their end-of-turn
    markers). BadRecord for malformed records, or when longer than max_len tokens."""
    messages = check_messages(messages)
    text, spans = assistant_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__}: response-only labels need a fast tokenizer (offsets)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64)
    in_reply = np.zeros(len(ids), bool)
    for a, b in spans:
        in_reply |= (starts >= a) & (starts < b)
    labels = np.where(in_reply, ids, IGNORE).astype(np.int32)
    if max_len is not None and len(ids) > max_len:
        raise BadRecord("too_long", f"{len(ids)} tokens > max_len {max_len}")
    if not in_reply.any():
        raise BadRecord("no_assistant", "the assistant replies produced no tokens")
    return Example(ids, labels)


def encode_text(tokenizer, text: Any, max_len: int | None = None) -> list[Example]:
    """Plain text -> Examples with the loss on every token, cut into pieces of max_len tokens."""
    if not isinstance(text, str) or not text.strip():
        raise BadRecord("empty_text", "no text")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    step = len(ids) if max_len is None else max_len
    return [Example(ids[s:s + step], ids[s:s + step].copy()) for s in range(0, len(ids), step)
            if len(ids[s:s + step]) >= 2]
