"""Crash-safe file writes, the one way basinguard writes a file others read: images, traces and manifests (CLI,
batch job) and caches (TensorRT plans, sidecars, fused graphs). Stdlib only."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it): mkstemp's 0600 is widened to it
os.umask(_UMASK)
_TEMP_EXTRA = len(".") + len(".xxxxxxxx.tmp")  # what `write_atomic` adds to a name: `.NAME.<8 random>.tmp`


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry, not just the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def user_cache_dir() -> Path:
    """Caches of derived data that outlive a job: $BASINGUARD_CACHE_DIR, else $XDG_CACHE_HOME/basinguard, else
    ~/.cache/basinguard."""
    env = os.environ.get("BASINGUARD_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "basinguard"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(paths: Sequence[Path], memo: Path | None = None) -> list[str]:
    """Each file's sha256. `memo` (a JSON file) remembers them by resolved path, size and mtime, so a multi-GB
    model file is read once per change, not on every load; an unreadable or unwritable memo only costs hashing."""
    known: dict = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
    if not isinstance(known, dict):
        known = {}
    digests, changed = [], False
    for path in paths:
        st = Path(path).stat()
        key = str(Path(path).resolve())
        entry = known.get(key)
        if not isinstance(entry, dict) or entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = known[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
            changed = True
        digests.append(entry["sha256"])
    if memo is not None and changed:
        known = {k: v for k, v in known.items() if Path(k).exists()}  # forget files that are gone
        try:
            write_atomic(memo, json.dumps(known, indent=1).encode())
        except OSError:
            pass
    return digests


def lock_held(path: Path) -> bool:
    """Whether a live process holds an exclusive flock on the lock file `path` (False where the file is gone or
    cannot be opened: there is nothing to wait for). The probe is read-only and shared, and released at once."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def temporary_name_fits(name: str) -> bool:
    """Whether `write_atomic`'s temporary name for a file called `name` fits the file system's 255 bytes."""
    return len(name.encode()) + _TEMP_EXTRA <= 255


def temporary_files(folder: Path, name_glob: str) -> list[Path]:
    """`write_atomic`'s temporary files (left by a kill) for names matching `name_glob` in `folder`."""
    return sorted(folder.glob(f".{name_glob}*.tmp"))


def write_atomic(path: Path, content: bytes | memoryview | Callable[[Path], None], *, fsync: bool = False) -> None:
    """Write `content` (bytes, or a function that writes the file at the path it is given) through a unique
    temporary name beside `path`, then rename: a kill, a failed write or a concurrent writer never leaves a
    half-written `path`, and a failure leaves no temporary file. The file gets the usual permissions (umask).

    With `fsync` the data and the rename also survive a power loss (a kill -9 alone never loses data the kernel
    has accepted, so it is off by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            if callable(content):
                f.close()
                content(tmp)
            else:
                f.write(content)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
