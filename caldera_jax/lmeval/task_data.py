"""The offline eval sets behind the packaged lm-eval tasks (caldera_jax/lmeval/tasks/*.yaml).

The YAMLs name these functions as `!function caldera_jax.lmeval.task_data.NAME`; lm-eval calls
`evalset(**task metadata, **dataset_kwargs)` to get the data, offline:

    <evalsets>/<set>/<split>.jsonl     written by `python -m experiments.assets fetch evalsets`
    <evalsets> = metadata "evalsets_dir", else $CALDERA_JAX_CACHE/evalsets, else ~/.cache/caldera-jax/evalsets

The rest are the per-document functions of lm-eval's own hellaswag and winogrande tasks (same
prompts, so our numbers compare with lm-eval's).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

CACHE_ENV = "CALDERA_JAX_CACHE"
FETCH = "python -m experiments.assets fetch evalsets"


class EvalSetMissingError(FileNotFoundError):
    """An eval set file that is not there; the message gives the fetch command."""


def data_root(override: str | os.PathLike | None = None) -> Path:
    """Where the jsonl eval sets live (not checked)."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "caldera-jax") / "evalsets"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file; a bad line is an error naming the file and line."""
    if not path.is_file():
        raise EvalSetMissingError(f"{path}: eval set not found (fetch the eval sets with `{FETCH}`)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{k}: not valid JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{k}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    return rows


def evalset(evalset: str, evalset_splits: Sequence[str], evalsets_dir: str | None = None, **_: Any):
    """datasets.DatasetDict {split: Dataset} of one eval set (lm-eval's `custom_dataset`)."""
    import datasets
    root = data_root(evalsets_dir)
    return datasets.DatasetDict({s: datasets.Dataset.from_list(read_jsonl(root / evalset / f"{s}.jsonl"))
                                 for s in evalset_splits})


# ------------------------------------------------------------------ lm-eval's hellaswag preprocessing
def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    """query = "<activity>: <ctx_a> <Ctx_b>", choices = the cleaned endings, gold = label."""
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}
    return dataset.map(one)


# ------------------------------------------------------------------ lm-eval's winogrande (partial scoring)
def winogrande_text(doc) -> int:
    """The index of the right context (each option fills the blank in its own context)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc) -> str:
    """The sentence after the blank: the continuation scored under each context."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choice(doc) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]
