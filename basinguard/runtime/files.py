"""Crash-safe file writes shared by the CLI and the batch job (stdlib only)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry, not just the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None], *, fsync: bool = False) -> None:
    """Write through a temporary name and rename, so a kill never leaves a half-written file.

    The temporary name is `.NAME.tmp` next to `path`. With `fsync` the data and the rename also survive a
    power loss (a kill -9 alone never loses data the kernel has accepted, so it is off by default).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a directory in the way, an interrupt: leave no temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
