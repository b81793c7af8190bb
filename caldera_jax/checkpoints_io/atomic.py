"""Durability helper shared by the checkpoint writers (write to a temporary name, fsync, rename)."""
from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """fsync a file or directory by path, so a following rename publishes complete bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
