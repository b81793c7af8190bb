"""Training and evaluation data: chat and plain-text records -> token ids with response-only labels.

    chat.py      one conversation -> input_ids, labels (-100 except the assistant's tokens), found
                 from the chat template's own rendering (character spans + the tokenizer's offsets)
    records.py   JSONL read through `datasets`, the deterministic train/val/test split, bad-record
                 accounting, the tokenized set with its metadata
    batching.py  padded batches and packed rows (segment ids, restarting positions)
"""
