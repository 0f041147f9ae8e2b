"""Dataset shards of finished images: WebDataset tar files or parquet files, each published whole.

A shard is written under a temporary name (`.shard-WWW-NNNNNN.tar.<random>.tmp`, as `files.write_atomic` names
its own) and renamed once complete and fsynced, so a reader, or a job resumed after a kill, never sees half a shard.
The caller records which shard holds each key (a batch job's manifest) only after `add` or `close` hands the
shard back as published; `recover_shards` then makes a resumed job exactly-once: it removes temporary shards and
every published shard whose keys are not all recorded (a kill between the rename and the record), and names the
recorded keys whose shard is gone, so that they are made again.

WebDataset  `KEY.png` (or .jpg/.webp: the encoded image with all its metadata), `KEY.json` (the trace), `KEY.txt`
            (the prompt), as the `webdataset` library and img2dataset group files by key.
parquet     one row per image: `key`, `image` (struct of bytes and path, Hugging Face `datasets`' Image feature,
            declared in the schema's metadata), the prompt and sampling settings as columns, and `trace` (JSON).
Shards are named `shard-WWW-NNNNNN.tar|.parquet`: W the writer (a Ray worker; 000 locally), N its sequence.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basinguard.files import fsync_dir, temporary_files, umask_mode
from basinguard.outputs.errors import OutputError

OUTPUT_FORMATS = ("files", "webdataset", "parquet")
DEFAULT_SHARD_SIZE = 1000
SHARD_SUFFIXES = {"webdataset": ".tar", "parquet": ".parquet"}
SHARD_NAME = re.compile(r"^shard-(\d{3})-(\d{6})\.(tar|parquet)$")
PARQUET_ROW_GROUP = 64  # rows buffered before a row group is written: a shard's images never all sit in memory
INSTALL_HINT = "pip install 'basinguard[shards]'"


@dataclass(frozen=True)
class Sample:
    """One finished image for a shard. `key` has no dot or slash (WebDataset splits a name at its first dot);
    `entry` is the caller's own (its manifest entry), handed back once the shard holding the sample is published."""

    key: str
    image: bytes  # the encoded file, metadata included (`images.encode_image`)
    image_ext: str  # png, jpg or webp
    trace: Mapping[str, Any]
    entry: Any = None

    def __post_init__(self) -> None:
        if not self.key or any(c in self.key for c in "./\\"):
            raise OutputError(f"shard key {self.key!r} must be non-empty, without '.', '/' or '\\'")


@dataclass(frozen=True)
class PublishedShard:
    name: str  # the file name in the output folder
    samples: list[Sample]


def shard_name(writer: int, index: int, output_format: str) -> str:
    return f"shard-{writer:03d}-{index:06d}{SHARD_SUFFIXES[output_format]}"


def published_shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("shard-*") if SHARD_NAME.match(p.name) and p.is_file())


def next_shard_index(out_dir: Path, writer: int) -> int:
    """One past the highest sequence number writer `writer` has published in `out_dir` (0 for none)."""
    used = [int(m.group(2)) for p in published_shards(out_dir) if (m := SHARD_NAME.match(p.name))
            and int(m.group(1)) == writer]
    return max(used, default=-1) + 1


def shard_keys(path: Path) -> set[str]:
    """The keys a published shard holds (OSError, tarfile.TarError or a pyarrow error where it is unreadable)."""
    path = Path(path)
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            return {member.name.split(".", 1)[0] for member in tar}
    pq = _pyarrow()[1]
    return set(pq.read_table(path, columns=["key"]).column("key").to_pylist())


def recover_shards(out_dir: Path, recorded: Mapping[str, Iterable[str]]) -> set[str]:
    """Before a job writes into `out_dir` (under its lock): remove temporary shards and each published shard whose
    keys are not exactly those `recorded` for it (shard name → keys, from the manifest), and return the recorded keys
    whose shard is gone or was removed, to be forgotten and made again."""
    out_dir = Path(out_dir)
    for tmp in temporary_files(out_dir, "shard-"):
        tmp.unlink(missing_ok=True)
    for path in published_shards(out_dir):
        try:
            complete = shard_keys(path) == set(recorded.get(path.name, ()))
        except Exception:  # a shard no reader can open is as incomplete as one never recorded
            complete = False
        if not complete:
            path.unlink()
    present = {p.name for p in published_shards(out_dir)}
    fsync_dir(out_dir)
    return {key for name, keys in recorded.items() if name not in present for key in keys}


class ShardWriter(ABC):
    """Collects samples into shards of `shard_size`; `add` and `close` return the shard they published, if any.
    Use as a context manager: leaving it by an exception discards the unpublished shard (its keys are not recorded,
    so a resumed job makes them again); `close` publishes the last, partial one."""

    output_format: str

    def __init__(self, out_dir: Path, shard_size: int = DEFAULT_SHARD_SIZE, writer: int = 0):
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise OutputError(f"--shard-size must be an integer >= 1 (got {shard_size!r})")
        self.out_dir, self.shard_size, self.writer = Path(out_dir), shard_size, writer
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.index = next_shard_index(self.out_dir, writer)
        self.samples: list[Sample] = []
        self.tmp: Path | None = None

    @property
    def name(self) -> str:
        return shard_name(self.writer, self.index, self.output_format)

    def add(self, sample: Sample) -> PublishedShard | None:
        if self.tmp is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp", dir=self.out_dir)
            os.fchmod(fd, umask_mode())
            os.close(fd)
            self.tmp = Path(tmp)
            self._open(self.tmp)
        self._write(sample)
        self.samples.append(sample)
        return self._publish() if len(self.samples) >= self.shard_size else None

    def close(self) -> PublishedShard | None:
        """Publish the partial shard, if any."""
        return self._publish() if self.samples else None

    def abort(self) -> None:
        """Drop the unpublished shard."""
        if self.tmp is not None:
            try:
                self._finish()
            except Exception:  # it is being thrown away
                pass
            self.tmp.unlink(missing_ok=True)
        self.tmp, self.samples = None, []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()

    def _publish(self) -> PublishedShard:
        assert self.tmp is not None
        self._finish()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the shard's bytes before its name: a recorded shard is a whole one
        finally:
            os.close(fd)
        published = PublishedShard(self.name, self.samples)
        os.replace(self.tmp, self.out_dir / published.name)
        fsync_dir(self.out_dir)
        self.tmp, self.samples = None, []
        self.index += 1
        return published

    @abstractmethod
    def _open(self, path: Path) -> None: ...

    @abstractmethod
    def _write(self, sample: Sample) -> None: ...

    @abstractmethod
    def _finish(self) -> None:
        """Complete and close the file being written (its footer, if the format has one)."""


class WebDatasetWriter(ShardWriter):
    output_format = "webdataset"

    def _open(self, path: Path) -> None:
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def _write(self, sample: Sample) -> None:
        self._member(f"{sample.key}.{sample.image_ext}", sample.image)
        self._member(f"{sample.key}.json", json.dumps(sample.trace, ensure_ascii=False).encode())
        self._member(f"{sample.key}.txt", str(sample.trace.get("prompt", "")).encode())

    def _finish(self) -> None:
        self.tar.close()


# parquet columns beside key, image and trace: (name, arrow type name, from the trace)
PARQUET_COLUMNS: tuple[tuple[str, str], ...] = (
    ("prompt", "string"), ("negative_prompt", "string"), ("seed", "int64"), ("policy", "string"),
    ("guidance_scale", "float64"), ("transition_step", "int64"), ("steps", "int64"), ("scheduler", "string"),
    ("width", "int64"), ("height", "int64"), ("detection_score", "float64"))


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise OutputError(f"--output-format parquet needs pyarrow: {INSTALL_HINT} ({exc})") from None
    return pa, pq


def parquet_schema() -> Any:
    """The shards' arrow schema, with the Hugging Face features `datasets` reads (image: its Image feature)."""
    pa = _pyarrow()[0]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("key", pa.string()), ("image", image), *((name, getattr(pa, kind)()) for name, kind in PARQUET_COLUMNS),
              ("trace", pa.string())]
    features: dict[str, Any] = {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}}
    features |= {name: {"dtype": kind, "_type": "Value"} for name, kind in PARQUET_COLUMNS}
    features["trace"] = {"dtype": "string", "_type": "Value"}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def parquet_row(sample: Sample) -> dict[str, Any]:
    trace = sample.trace
    policy = trace.get("policy") or {}
    values = {"policy": policy.get("name"), "guidance_scale": policy.get("guidance_scale")}
    row = {"key": sample.key, "image": {"bytes": sample.image, "path": f"{sample.key}.{sample.image_ext}"},
           "trace": json.dumps(trace, ensure_ascii=False)}
    return row | {name: values[name] if name in values else trace.get(name) for name, _ in PARQUET_COLUMNS}


class ParquetWriter(ShardWriter):
    output_format = "parquet"

    def _open(self, path: Path) -> None:
        pa, pq = _pyarrow()
        self.schema = parquet_schema()
        self.parquet = pq.ParquetWriter(path, self.schema)
        self.rows: list[dict[str, Any]] = []
        self._table = pa.Table.from_pylist

    def _flush(self) -> None:
        if self.rows:
            self.parquet.write_table(self._table(self.rows, schema=self.schema))
            self.rows = []

    def _write(self, sample: Sample) -> None:
        self.rows.append(parquet_row(sample))
        if len(self.rows) >= PARQUET_ROW_GROUP:
            self._flush()

    def _finish(self) -> None:
        self._flush()
        self.parquet.close()


WRITERS: dict[str, type[ShardWriter]] = {"webdataset": WebDatasetWriter, "parquet": ParquetWriter}


def shard_writer(output_format: str, out_dir: Path, shard_size: int = DEFAULT_SHARD_SIZE, writer: int = 0) -> ShardWriter:
    if output_format not in WRITERS:
        raise OutputError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)} (got {output_format!r})")
    if output_format == "parquet":
        _pyarrow()  # a missing pyarrow is said before any image is made
    return WRITERS[output_format](out_dir, shard_size, writer)
