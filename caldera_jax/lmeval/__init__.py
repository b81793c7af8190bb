"""Evaluation with lm-eval (EleutherAI's harness) on our JAX models, offline.

    adapter.py    the lm-eval model `caldera-jax` (register() / lm_class(); lm_eval imported on use)
    engine.py     batched scoring and greedy KV-cache decoding over bucketed shapes (pure JAX)
    model.py      open_model(path, source, dtype): original or CALDERA checkpoint + tokenizer + identity
    task_data.py  the offline eval sets behind the packaged task YAMLs
    tasks/        arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, mmlu, lambada_openai,
                  gsm8k_cot: lm-eval task YAMLs for TaskManager(include_path=tasks_dir())
    __main__.py   `python -m caldera_jax.lmeval ...`: lm-eval's own CLI with `caldera-jax` and the tasks
"""
from __future__ import annotations

import os


def tasks_dir() -> str:
    """The packaged task YAMLs (lm-eval's TaskManager(include_path=...) / --include_path)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
