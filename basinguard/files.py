"""Crash-safe file writes, the one way basinguard writes a file others read: images, traces and manifests (CLI,
batch job) and caches (TensorRT plans, sidecars, fused graphs). Stdlib only."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from basinguard.errors import BasinguardWarning

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it): mkstemp's 0600 is widened to it
os.umask(_UMASK)
_TEMP_EXTRA = len(".") + len(".xxxxxxxx.tmp")  # what `write_atomic` adds to a name: `.NAME.<8 random>.tmp`


def umask_mode(mode: int = 0o666) -> int:
    """The permissions a new file (0o666) or folder (0o777) gets under this process's umask."""
    return mode & ~_UMASK


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry, not just the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def user_cache_dir() -> Path | None:
    """Caches of derived data that outlive a job: $BASINGUARD_CACHE_DIR, else $XDG_CACHE_HOME/basinguard, else
    ~/.cache/basinguard; None where there is no home to put it in (a container user without one)."""
    if os.environ.get("BASINGUARD_CACHE_DIR"):
        return Path(os.environ["BASINGUARD_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "basinguard"
    try:
        return Path.home() / ".cache" / "basinguard"
    except RuntimeError:  # no $HOME and no passwd entry
        return None


def digest_memo() -> Path | None:
    """The one memo of model-file hashes (`file_digests`), shared by model identities and TensorRT plan keys."""
    cache = user_cache_dir()
    return None if cache is None else cache / "file-digests.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    """What says a file is unchanged since it was hashed: size, mtime and ctime (which, unlike mtime, no tool can
    set back: cp -p, rsync -a and tar keep old mtimes), inode and device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_stamp(path: Path) -> list[int]:
    """`path`'s identity as a memo records it (see `_stamp`): equal stamps mean the same, unchanged file."""
    return _stamp(Path(path).stat())


def _read_memo(memo: Path) -> dict:
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):  # missing, unreadable or corrupt: it only costs hashing
        return {}
    return known if isinstance(known, dict) else {}


_memo_warned: set[Path] = set()


def file_digests(paths: Sequence[Path], memo: Path | None = None) -> list[str]:
    """Each file's sha256. `memo` (a JSON file) remembers them by resolved path and `_stamp`, so a multi-GB model
    file is read once per change, not on every load. Entries are merged under a lock, so processes hashing other
    files at the same time keep each other's; a memo that cannot be read or written only costs hashing (said once)."""
    known = _read_memo(memo) if memo is not None else {}
    digests, new = [], {}
    for path in paths:
        stamp = _stamp(Path(path).stat())
        key = str(Path(path).resolve())
        entry = known.get(key)
        sha = entry.get("sha256") if isinstance(entry, dict) and entry.get("stamp") == stamp else None
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            sha = sha256_file(path)
            new[key] = {"stamp": stamp, "sha256": sha}
        digests.append(sha)
    if memo is not None and new:
        try:
            update_memo(memo, new)
        except OSError as exc:
            if memo not in _memo_warned:
                _memo_warned.add(memo)
                warnings.warn(f"cannot write the file-hash cache {memo} ({exc.strerror or exc}); model files are "
                              "hashed again on every job (set BASINGUARD_CACHE_DIR to a writable folder)",
                              BasinguardWarning, stacklevel=2)
    return digests


def read_memo(memo: Path | None) -> dict:
    """A JSON memo of derived data keyed by file path (`update_memo`); {} where it is missing or unreadable."""
    return {} if memo is None else _read_memo(memo)


def update_memo(memo: Path, new: dict) -> None:
    """Merge `new` (resolved file path → entry) into the JSON memo `memo` under a lock, so that processes adding
    other files at the same time keep each other's entries; entries of files that are gone are dropped. Raises
    OSError where the memo cannot be written (callers decide whether that is worth a word)."""
    memo.parent.mkdir(parents=True, exist_ok=True)
    with open(memo.with_name(memo.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # drop files gone (os.path.exists: False, not an error, for paths that cannot be checked)
        merged = {k: v for k, v in _read_memo(memo).items() if os.path.exists(k)} | new
        write_atomic(memo, json.dumps(merged, indent=1).encode())


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
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a read-only folder: the error names our temporary file, not the file asked for
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), umask_mode())
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
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        # A write that failed (a full disk, a quota) names no file, a failed rename our temporary one: name the file
        # the caller asked for. An error naming another file (one `content` read) stays as it is.
        if exc.filename is None or str(exc.filename) == str(tmp):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
