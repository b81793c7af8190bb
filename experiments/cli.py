"""What every command does with an expected refusal: one line on stderr, exit status 2, no traceback.

    if __name__ == "__main__":
        cli.run(main)
"""
from __future__ import annotations

import sys
from typing import Callable

from caldera_jax.pipeline.job_dir import JobError
from experiments.assets import AssetError

# the jobs' own refusals (JobError), missing or bad assets, and every config / calibration /
# checkpoint / budget / allocation error (ValueError subclasses): the user's input, not a bug
REFUSALS = (JobError, AssetError, ValueError, FileNotFoundError, PermissionError)


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except REFUSALS as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
