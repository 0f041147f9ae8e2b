"""The output folder of an export: written beside OUT under a lock, renamed into place when complete."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from basinguard.export.errors import ExportError
from basinguard.files import lock_held


def _running_export(out: Path, besides: Path | None = None) -> bool:
    """Whether another export into `out` holds its lock (`.NAME.partial-XXXX.lock`, see `prepare_out`). Two that
    start at the same moment may both see the other and stop; never may both go on."""
    mine = None if besides is None else besides.resolve()  # mkstemp names it absolutely, glob as OUT was given
    return any(lock.resolve() != mine and lock_held(lock) for lock in out.parent.glob(f".{out.name}.partial-*.lock"))


def prepare_out(out: Path) -> tuple[Path, int]:
    """A fresh working folder next to OUT, which becomes OUT by one rename once everything is written, and the
    descriptor of its lock (`.NAME.partial-XXXX.lock` beside it, flock-held while this export runs). Working
    folders of exports that were killed (their lock free) are removed first: an SD export's is gigabytes."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"output {out} already exists; remove it or choose another path")
    if _running_export(out):  # it would find OUT taken only once its own export is done
        raise ExportError(f"another export into {out} is running; wait for it to finish or choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder of the path should be, or no permission
        raise ExportError(f"cannot make the folder {out.parent} for the output: {exc.strerror or exc}") from None
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        folder = stale.with_name(stale.name.removesuffix(".lock"))
        lock_path = folder.with_name(folder.name + ".lock")
        if stale == folder and folder.is_dir() or stale != folder and not folder.exists():
            if not lock_held(lock_path):  # its export was killed (or a lock outlived its folder)
                shutil.rmtree(folder, ignore_errors=True)
                lock_path.unlink(missing_ok=True)
    # The lock first (a unique name, held at once), then its folder: another export's cleanup never sees this
    # folder without its held lock.
    try:
        lock, lock_name = tempfile.mkstemp(prefix=f".{out.name}.partial-", suffix=".lock", dir=out.parent)
    except OSError as exc:  # a read-only folder: name the output asked for, not our lock file
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from None
    fcntl.flock(lock, fcntl.LOCK_EX)
    tmp = Path(lock_name[: -len(".lock")])
    if _running_export(out, besides=Path(lock_name)):  # one that started between the check above and our lock
        Path(lock_name).unlink(missing_ok=True)
        os.close(lock)
        raise ExportError(f"another export into {out} is running; wait for it to finish or choose another path")
    tmp.mkdir()
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become OUT's mode
    return tmp, lock


def release_out(tmp: Path, lock: int) -> None:
    """Drop `prepare_out`'s lock once its folder is OUT (or removed)."""
    tmp.with_name(tmp.name + ".lock").unlink(missing_ok=True)
    os.close(lock)


@contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """The working folder to fill (`prepare_out`); it becomes OUT by one rename when the block ends without an
    exception and is removed when it ends with one, a KeyboardInterrupt included."""
    tmp, lock = prepare_out(out)
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # an empty folder left for us (checked in prepare_out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_out(tmp, lock)
