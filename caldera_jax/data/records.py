"""JSONL records (read through `datasets`) -> tokenized train / val / test sets.

    data = load_tokenized("chat.jsonl", tokenizer, mode="chat", max_len=1024)
    data.splits["train"]          # list[Example]
    data.meta                     # {"source", "sha256", "records", "split_seed": 42, "fractions",
                                  #  "indices" per split (their digest), "skipped": {reason: count}, ...}

Records: mode "chat": {"messages": [{"role", "content"}, ...]}; mode "text": {"text": str}.
The split is a permutation of the record indices by numpy's default_rng(seed) (42 unless told),
cut at the fractions (80/10/10): the same file gives the same split on every machine. Bad records
(no assistant turn, empty text, too long, ...) are counted by reason and skipped; they never stop
a run, but a file with no usable record at all is an error.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

from caldera_jax.data.chat import BadRecord, Example, encode_chat, encode_text

SPLITS = ("train", "val", "test")
SPLIT_SEED = 42


class DataError(ValueError):
    """A data file that cannot be used at all (missing, unreadable, no usable record)."""


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
    splits: dict[str, list[Example]]
    meta: dict[str, Any]


def split_indices(n: int, seed: int = SPLIT_SEED, fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Deterministic split of range(n): {"train", "val", "test"} -> sorted index arrays."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    perm = np.random.default_rng(seed).permutation(n)
    a = int(round(fractions[0] * n))
    b = a + int(round(fractions[1] * n))
    return {s: np.sort(part) for s, part in zip(SPLITS, (perm[:a], perm[a:b], perm[b:]))}


def read_records(path: str) -> list[dict]:
    """Every record of a JSONL file, through `datasets` (local file, no network)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    import datasets
    try:
        ds = datasets.Dataset.from_json(path, keep_in_memory=True)
    except Exception as e:  # noqa: BLE001  (pyarrow / json errors of many kinds)
        raise DataError(f"{path}: not readable as JSON lines ({type(e).__name__}: {e})") from e
    return ds.to_list()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenized(path: str, tokenizer, *, mode: str = "chat", max_len: int | None = None,
                   seed: int = SPLIT_SEED, fractions=(0.8, 0.1, 0.1)) -> TokenizedSet:
    """Reads, splits (by record, before tokenizing) and tokenizes a JSONL file; see module doc."""
    if mode not in ("chat", "text"):
        raise ValueError(f"mode must be 'chat' or 'text', got {mode!r}")
    records = read_records(path)
    parts = split_indices(len(records), seed, fractions)
    skipped: collections.Counter = collections.Counter()
    first_error: dict[str, str] = {}
    splits: dict[str, list[Example]] = {}
    for name, idx in parts.items():
        out = []
        for i in idx:
            rec = records[int(i)]
            try:
                if mode == "chat":
                    out.append(encode_chat(tokenizer, rec.get("messages"), max_len))
                else:
                    out.extend(encode_text(tokenizer, rec.get("text"), max_len))
            except BadRecord as e:
                skipped[e.reason] += 1
                first_error.setdefault(e.reason, f"record {int(i)}: {e}")
        splits[name] = out
    if not any(splits.values()):
        raise DataError(f"{path}: none of its {len(records)} records is usable "
                        f"(skipped: {dict(skipped)}; e.g. {next(iter(first_error.values()), '-')})")
    meta = {"source": os.path.abspath(path), "sha256": _sha256(path), "mode": mode, "max_len": max_len,
            "records": len(records), "split_seed": seed, "fractions": list(fractions),
            "split_records": {s: int(len(v)) for s, v in parts.items()},
            "split_digest": hashlib.sha256(b"".join(parts[s].astype(np.int64).tobytes() for s in SPLITS)).hexdigest(),
            "examples": {s: len(v) for s, v in splits.items()},
            "loss_tokens": {s: int(sum(e.loss_tokens for e in v)) for s, v in splits.items()},
            "skipped": dict(skipped), "skipped_examples": first_error}
    return TokenizedSet(splits, meta)


def summary(meta: dict[str, Any]) -> str:
    """One line for logs: records, examples per split, loss tokens, skipped by reason."""
    sk = ", ".join(f"{k} {v}" for k, v in sorted(meta["skipped"].items())) or "none"
    ex = " / ".join(f"{meta['examples'][s]}" for s in SPLITS)
    return (f"{meta['source']}: {meta['records']} records -> train/val/test {ex} examples "
            f"({meta['loss_tokens']['train']} train loss tokens); skipped: {sk}")
