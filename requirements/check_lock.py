"""Fail unless this environment holds exactly the versions in the lock file (argv[1]).

Run by `make install` after the constrained install: a dependency added to pyproject without
refreshing the lock (so installed unpinned) or a pin that pip could not honour stops here.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock_path: str) -> int:
    locked = {}
    with open(lock_path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                locked[_norm(name)] = version
    installed = {_norm(d.metadata["Name"]): d.version for d in md.distributions()}
    installed.pop("caldera-jax", None)
    wrong = [f"{n}: installed {v}, lock {locked.get(n, '(absent)')}"
             for n, v in sorted(installed.items()) if locked.get(n) != v]
    missing = sorted(set(locked) - set(installed))
    if wrong or missing:
        print(f"{lock_path}: the environment does not match the lock:", file=sys.stderr)
        for w in wrong + [f"{n}: in the lock, not installed" for n in missing]:
            print(f"  {w}", file=sys.stderr)
        print("run `make lock` to re-resolve, then `make test`", file=sys.stderr)
        return 1
    print(f"{len(locked)} packages match {lock_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
