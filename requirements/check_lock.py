"""Fail unless this environment holds exactly the versions in the lock file.

    python requirements/check_lock.py [--sync] LOCK

Run by `make install` after the constrained install: a dependency added to pyproject without
refreshing the lock (so installed unpinned) or a pin that pip could not honour stops here.
--sync first uninstalls what the lock does not list (a package a re-resolved lock dropped, e.g.
tzdata when python-dateutil went back to 2.9), so an existing .venv converges to a new lock.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed() -> dict[str, str]:
    out = {_norm(d.metadata["Name"]): d.version for d in md.distributions()}
    out.pop("caldera-jax", None)
    return out


def main(lock_path: str, sync: bool = False) -> int:
    locked = {}
    with open(lock_path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, version = line.partition("==")
                locked[_norm(name)] = version
    installed = _installed()
    unlisted = sorted(n for n in installed if n not in locked)
    if sync and unlisted:
        print(f"uninstalling what {lock_path} does not list: {', '.join(unlisted)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *unlisted], check=True)
        installed = _installed()
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
    args = sys.argv[1:]
    sync = "--sync" in args
    rest = [a for a in args if a != "--sync"]
    if len(rest) != 1:
        sys.exit("usage: check_lock.py [--sync] LOCK")
    sys.exit(main(rest[0], sync))
