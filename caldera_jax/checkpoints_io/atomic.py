"""Durability helpers shared by the checkpoint and asset writers (write to a temporary name, fsync,
rename)."""
from __future__ import annotations

import os
import shutil


def fsync_path(path: str) -> None:
    """fsync a file or directory by path, so a following rename publishes complete bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Renames the finished directory tmp to final; an existing final is moved aside first (a
    hidden sibling), restored if the rename fails, and deleted afterwards."""
    tmp, final = os.fspath(tmp), os.fspath(final)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    if not os.path.lexists(final):
        os.rename(tmp, final)
    else:
        old = os.path.join(parent, f".{os.path.basename(final)}.old-{os.getpid()}")
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old)
    fsync_path(parent)
