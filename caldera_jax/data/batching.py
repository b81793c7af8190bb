"""Examples -> fixed-shape batches: padded (one example per row) or packed (several per row).

Both give numpy arrays [B, T]: input_ids, labels (IGNORE where no loss, padding included),
attention_mask (1 = real token), positions (0.. per example) and segment_ids (1.. per example in
the row, 0 = padding). A packed row's examples must not attend to each other: a model call must
pass segment_ids (or positions and a mask built from them) for packing to be exact; padded rows
need only attention_mask.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from caldera_jax.data.chat import IGNORE, Example


def _empty(rows: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((rows, seq_len), pad_id, np.int32),
            "labels": np.full((rows, seq_len), IGNORE, np.int32),
            "attention_mask": np.zeros((rows, seq_len), np.int32),
            "positions": np.zeros((rows, seq_len), np.int32),
            "segment_ids": np.zeros((rows, seq_len), np.int32)}


def _put(b: dict, r: int, at: int, e: Example, seg: int) -> None:
    n = len(e.input_ids)
    b["input_ids"][r, at:at + n] = e.input_ids
    b["labels"][r, at:at + n] = e.labels
    b["attention_mask"][r, at:at + n] = 1
    b["positions"][r, at:at + n] = np.arange(n)
    b["segment_ids"][r, at:at + n] = seg


def padded_batches(examples: list[Example], batch_size: int, seq_len: int, pad_id: int = 0,
                   drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One example per row, right-padded to seq_len (longer examples are an error: filter with
    max_len first). The last batch is padded with empty rows unless drop_last."""
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        b = _empty(batch_size, seq_len, pad_id)
        for r, e in enumerate(chunk):
            if len(e.input_ids) > seq_len:
                raise ValueError(f"example {s + r} has {len(e.input_ids)} tokens > seq_len {seq_len}")
            _put(b, r, 0, e, 1)
        yield b


def pack(examples: list[Example], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """All examples into rows of seq_len, first-fit in the given order (deterministic), without
    splitting an example; returns one dict of [rows, seq_len] arrays."""
    rows: list[list[Example]] = []
    free: list[int] = []
    for k, e in enumerate(examples):
        n = len(e.input_ids)
        if n > seq_len:
            raise ValueError(f"example {k} has {n} tokens > seq_len {seq_len}")
        j = next((j for j, f in enumerate(free) if f >= n), None)
        if j is None:
            rows.append([])
            free.append(seq_len)
            j = len(rows) - 1
        rows[j].append(e)
        free[j] -= n
    b = _empty(len(rows), seq_len, pad_id)
    for r, row in enumerate(rows):
        at = 0
        for seg, e in enumerate(row, start=1):
            _put(b, r, at, e, seg)
            at += len(e.input_ids)
    return b


def packed_batches(examples: list[Example], batch_size: int, seq_len: int,
                   pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """`pack`'s rows in batches of batch_size rows (the last filled with empty rows)."""
    if not examples:
        return
    rows = pack(examples, seq_len, pad_id)
    n = len(rows["input_ids"])
    for s in range(0, n, batch_size):
        b = _empty(batch_size, seq_len, pad_id)
        k = min(batch_size, n - s)
        for name, a in rows.items():
            b[name][:k] = a[s:s + k]
        yield b
