"""lm-eval's own command line with the `caldera-jax` model registered and the offline tasks included.

    python -m caldera_jax.lmeval --model caldera-jax --model_args path=runs/mine --batch_size 8 \
        --tasks arc_easy,piqa --limit 200 --output_path out/
    python -m caldera_jax.lmeval --model hf --model_args pretrained=HF_DIR --tasks arc_easy ...

Every argument is lm-eval's (`python -m caldera_jax.lmeval --help`); the batch size goes in
`--batch_size` (lm-eval passes it to the model itself: a `batch_size=` in --model_args clashes). lm-eval 0.4.13 finds models
only through its registry, which this wrapper fills before handing over; `--include_path` defaults
to the packaged tasks (caldera_jax/lmeval/tasks), whose names replace lm-eval's built-in ones of
the same name. Runs offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from caldera_jax import runtime
    runtime.setup(compile_cache="~/.cache/caldera-jax/xla-cache", hf_offline=True)
    from caldera_jax.lmeval import tasks_dir
    from caldera_jax.lmeval.adapter import register
    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--tasks" or a.startswith("--tasks=") for a in args) and not any(
            a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", tasks_dir()]
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
