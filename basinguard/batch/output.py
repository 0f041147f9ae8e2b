"""OUT_DIR: its lock, its manifest (`manifest.jsonl`, one line per finished image) and the durability rules.

Nothing lost, nothing twice
  OUT_DIR/.lock is held with flock for the whole job (the kernel drops it when the process dies), so a second
  job on the same OUT_DIR refuses. Each image is written to `.<id>.png.tmp` and renamed; only then is its
  manifest line appended in one write and fsynced. On start the job removes leftover temporary files, cuts a
  truncated last manifest line (a kill mid-append), merges Ray shards (`manifest.part-K.jsonl`), drops the lines
  of images whose PNG was deleted, and skips every image id the manifest still has, so a restart with the same
  arguments makes each missing image exactly once. Manifest entries are checked against the prompt file, the
  settings and the model (`check_same_job`), so a different job's OUT_DIR is refused rather than mixed.

Dataset shards (`--output-format webdataset|parquet`, `ImageSink` over `basinguard.outputs.shards`)
  A shard is renamed into place whole, then its images' lines are appended in one write, each naming the shard as
  its `file`. On start a shard whose images are not all in the manifest (a kill between the two) is removed, and
  its images are made again, as those of a temporary (unpublished) shard are: each image ends up in one shard.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from basinguard.batch.prompts import BatchError, ImageTask
from basinguard.files import fsync_dir, lock_held, temporary_files, write_atomic
from basinguard.outputs.images import EXTENSIONS, ImageOptions, encode_image
from basinguard.outputs.shards import (
    DEFAULT_SHARD_SIZE,
    OUTPUT_FORMATS,
    SHARD_NAME,
    PublishedShard,
    Sample,
    ShardWriter,
    recover_shards,
    shard_writer,
)
from basinguard.runtime.model_folder import accepted_model_ids, names_this_model
from basinguard.runtime.pipeline import Generation, Pipeline
from basinguard.runtime.schedulers import GAP_SPACE
from basinguard.runtime.settings import FAMILY_SETTINGS, family_record

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part-*.jsonl"
LOCK = ".lock"
WORKER_LOCK = ".worker-{shard}.lock"  # held by each Ray worker for the life of its process
WORKER_WAIT_S = 60.0
IMAGE_FORMATS = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class OutputSettings:
    """How a job's images are written: their format and metadata (`ImageOptions`), and whether into loose files or
    shards of `shard_size` images (`OUTPUT_FORMATS`)."""

    image_format: str = "png"
    output_format: str = "files"
    shard_size: int = DEFAULT_SHARD_SIZE
    image: ImageOptions = field(default_factory=ImageOptions)

    def validate(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise BatchError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)} (got {self.image_format!r})")
        if self.output_format not in OUTPUT_FORMATS:
            raise BatchError(f"--output-format must be one of {', '.join(OUTPUT_FORMATS)} (got {self.output_format!r})")
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise BatchError(f"--shard-size must be an integer >= 1 (got {self.shard_size!r})")


def output_format_of(entry: dict) -> str:
    """The output format a manifest entry was written in: its `file` is a shard (.tar, .parquet) or an image."""
    match = SHARD_NAME.match(entry.get("file", ""))
    return "files" if match is None else {"tar": "webdataset", "parquet": "parquet"}[match.group(3)]


def check_output_format(done: dict[str, dict], out_dir: Path, output_format: str) -> None:
    """One OUT_DIR, one output format: a resumed job does not add loose files to shards, or shards to files."""
    other = next((e for e in done.values() if e.get("output_format", "files") != output_format), None)
    if other is not None:
        raise BatchError(f"{out_dir / MANIFEST} holds --output-format {other.get('output_format', 'files')} output "
                         f"(image {other['id']}); resume it with that format, or use a new OUT_DIR for "
                         f"{output_format}")


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold OUT_DIR/.lock (flock) for the job; a second job gets a clear refusal, a dead one frees it. A job that
    made OUT_DIR and fails before writing anything into it (no model, no Ray) leaves no OUT_DIR behind."""
    made = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # OUT_DIR is a file, or not writable
        raise BatchError(f"cannot use OUT_DIR {out_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BatchError(f"{out_dir} is in use by another batch job (pid {holder}); wait for it to finish, "
                         "or write to another OUT_DIR") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    except BaseException:
        # Folders this job made, if nothing but the lock (and a manifest with no line: the first batch failed) is in
        # them; never at the cost of the error being raised.
        with suppress(OSError):
            names = {p.name for p in out_dir.iterdir()}
            if made and LOCK in names and names <= {LOCK, MANIFEST} and (
                    MANIFEST not in names or (out_dir / MANIFEST).stat().st_size == 0):
                for name in names:
                    (out_dir / name).unlink()
                for folder in made:
                    folder.rmdir()  # fails, and stops, at the first one that is not empty
        raise
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race with a waiting job)


def hold_worker_lock(out_dir: Path, shard: int) -> int:
    """A Ray worker's exclusive flock on OUT_DIR/.worker-K.lock, held until its process ends (the kernel releases
    it however the process ends). A later job waits for these (`wait_for_workers`), so the workers of a killed
    driver, which Ray stops only seconds later, cannot write into OUT_DIR while the next job reads it."""
    fd = os.open(out_dir / WORKER_LOCK.format(shard=shard), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_for_workers(out_dir: Path, timeout: float = WORKER_WAIT_S) -> None:
    """Under the job lock: return once no worker of an earlier job holds its lock (or raise after `timeout`)."""
    deadline = time.monotonic() + timeout
    told = False
    for path in sorted(out_dir.glob(WORKER_LOCK.format(shard="*"))):
        while lock_held(path):
            if time.monotonic() > deadline:
                raise BatchError(f"a worker of an earlier job still holds {path} after {timeout:.0f} s; stop it "
                                 "(`ray stop`, or end its process) and run again")
            if not told:
                print(f"basinguard batch: waiting for the workers of an earlier job on {out_dir} to stop",
                      file=sys.stderr)
                told = True
            time.sleep(0.05)


def _repair_tail(path: Path) -> None:
    """Cut a truncated last line (a kill mid-append) off a manifest file, in place."""
    with open(path, "r+b") as f:
        size = pos = f.seek(0, os.SEEK_END)
        end = 0
        while pos > 0:  # scan back for the last newline
            start = max(0, pos - 65536)
            f.seek(start)
            cut = f.read(pos - start).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            pos = start
        if end == size:
            return
        f.truncate(end)
        os.fsync(f.fileno())
    print(f"basinguard batch: repaired {path}: dropped a truncated last line ({size - end} bytes)", file=sys.stderr)


def iter_manifest(path: Path) -> Iterator[dict]:
    """A manifest's entries, streamed; the file's truncated last line, if any, is repaired first."""
    if not path.exists():
        return
    _repair_tail(path)
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry["id"], str) or not isinstance(entry.get("file", ""), str):
                    raise TypeError("id and file must be text")
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
                raise BatchError(f"{path} line {number} is corrupt (not a manifest entry); fix or remove that line "
                                 "and restart: its image will be made again") from None
            yield entry


class ManifestWriter:
    """Appends entries, one write and one fsync per call, so a finished image's line survives any kill."""

    def __init__(self, path: Path):
        existed = path.exists()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # what the umask allows, as any file
        if not existed:
            fsync_dir(path.parent)

    def append(self, *entries: dict) -> None:
        data = memoryview("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode())
        try:
            while data:  # a single write almost always takes it all; loop for the rare short write
                data = data[os.write(self.fd, data):]
            os.fsync(self.fd)
        except OSError as exc:  # a full disk: os.write names no file
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What resuming and the summary need of a finished entry; the rest (traces) stays on disk.
_KEPT = ("id", "line", "index", "prompt", "negative_prompt", "seed", "policy", "scheduler", "steps", "height", "width",
         "model", "flagged", "transition_step", "engine", "gap_space", *FAMILY_SETTINGS)


def slim(entry: dict) -> dict:
    kept = {k: entry.get(k) for k in _KEPT} | {"output_format": output_format_of(entry)}
    # The threshold its flag was made with; entries written before it was recorded have none unless they have no flag
    if "detect_threshold" in entry or entry.get("flagged") is None:
        kept["detect_threshold"] = entry.get("detect_threshold")
    return kept


def merge_parts(out_dir: Path) -> None:
    """Fold Ray shards (manifest.part-K.jsonl) into manifest.jsonl, each image id once, then drop the shards.

    Entries whose id manifest.jsonl lacks are appended (and fsynced) shard by shard; the shards are removed
    only after all are in. A kill in between leaves entries in both, which the next merge skips by id.
    """
    parts = sorted(out_dir.glob(PART_GLOB))
    if not parts:
        return
    main = out_dir / MANIFEST
    seen = {e["id"] for e in iter_manifest(main)}
    with ManifestWriter(main) as writer:
        for part in parts:
            new = []
            for entry in iter_manifest(part):
                if entry["id"] not in seen:
                    seen.add(entry["id"])
                    new.append(entry)
            new.sort(key=lambda e: (e.get("line", 0), e.get("index", 0)))
            writer.append(*new)
    for part in parts:
        part.unlink()
    fsync_dir(out_dir)


def prepare_output(out_dir: Path) -> tuple[dict[str, dict], set[str]]:
    """Under the lock: drop temporary files of a killed job, merge shards; return the finished entries by id, and
    the ids whose PNG is gone (`forget` them once the job is known to be this OUT_DIR's, so they are made again)."""
    wait_for_workers(out_dir)  # a killed Ray job's workers may still be writing for a few seconds
    images = [tmp for suffix in EXTENSIONS.values() for tmp in temporary_files(out_dir, f"*.{suffix}")]
    for tmp in [*images, *temporary_files(out_dir, MANIFEST)]:  # ours only
        tmp.unlink(missing_ok=True)
    merge_parts(out_dir)
    manifest = out_dir / MANIFEST
    in_shards: dict[str, set[str]] = {}
    for entry in iter_manifest(manifest):
        if SHARD_NAME.match(entry.get("file", "")):
            in_shards.setdefault(entry["file"], set()).add(entry["id"])
    # shards published but not (wholly) recorded are removed; temporary ones too
    lost: set[str] = recover_shards(out_dir, in_shards)
    done: dict[str, dict] = {}
    for entry in iter_manifest(manifest):
        if (out_dir / entry.get("file", f"{entry['id']}.png")).is_file():
            done.setdefault(entry["id"], slim(entry))
        else:
            lost.add(entry["id"])
    return done, lost - done.keys()


def forget(out_dir: Path, lost: set[str], what: str = "PNG") -> None:
    """Drop the manifest lines of `lost` image ids, atomically: a kill leaves the old manifest or the new one."""
    if not lost:
        return
    manifest = out_dir / MANIFEST
    kept = [line for line in manifest.read_bytes().splitlines(keepends=True)
            if line.strip() and json.loads(line)["id"] not in lost]
    write_atomic(manifest, lambda p: p.write_bytes(b"".join(kept)), fsync=True)
    print(f"basinguard batch: {len(lost)} image(s) in {manifest} have no {what} any more; they will be made again",
          file=sys.stderr)


def check_same_job(tasks: Sequence[ImageTask], done: dict[str, dict], out_dir: Path, model: dict,
                   prediction_type: str = "epsilon") -> None:
    """Refuse to mix jobs: an image id already in the manifest must describe the same image, made by the same
    model (`model_identity`), with d in the same units."""
    ids = accepted_model_ids(model)
    raw_d = next((e for e in done.values() if e.get("gap_space") != GAP_SPACE), None)
    if raw_d is not None and prediction_type != "epsilon":  # ε models: the raw gap was the ε gap all along
        raise BatchError(f"{out_dir / MANIFEST} already has image {raw_d['id']}, whose d (switch steps, flags) was "
                         f"measured on the UNet's raw output, before d was measured in ε space; on this "
                         f"{prediction_type} model the two differ: use a new OUT_DIR")
    other_model = next((e for e in done.values() if not names_this_model(e.get("model"), ids)), None)
    if other_model is not None:  # even where no image id overlaps: one OUT_DIR, one model
        raise BatchError(f"{out_dir / MANIFEST} already has image {other_model['id']} made by a different model (its "
                         "files changed, or another --model); use a new OUT_DIR, or the model it was made with")
    for task in tasks:
        entry = done.get(task.id)
        if entry is None:
            continue
        want = {"prompt": task.prompt, "negative_prompt": task.negative_prompt, "seed": task.seed,
                "policy": task.sampling.policy.parameters(), "scheduler": task.sampling.scheduler,
                "steps": task.sampling.steps, "height": task.sampling.height, "width": task.sampling.width,
                # its `flagged` was decided with this threshold: another one would leave stale flags
                "detect_threshold": task.sampling.policy.detect_threshold,
                # SDXL's time_ids and clip_skip (None, as an SD entry has none)
                **family_record(task.sampling, FAMILY_SETTINGS)}
        diff = [k for k, v in want.items() if (k in entry or k != "detect_threshold") and entry.get(k) != v]
        if diff:
            raise BatchError(f"{out_dir / MANIFEST} already has image {task.id} (line {task.line}) with a different "
                             f"{', '.join(diff)} than this job; it holds another job's output: restart with the same "
                             "arguments and prompt file, or use a new OUT_DIR")


def warn_other_engines(out_dir: Path, done: dict[str, dict], engines: set[str]) -> None:
    """Resuming on another engine is allowed (a job may move to a GPU), but the two engines' pixels differ slightly:
    say so. `engines`: the labels this run's images will carry (`LoadedModel.provider`)."""
    others = sorted({e["engine"] for e in done.values() if e.get("engine")} - engines)
    if others:
        print(f"basinguard batch: warning: {out_dir} has images made on {', '.join(others)}; this run uses "
              f"{' or '.join(sorted(engines))}, whose images may differ from those in the last bits", file=sys.stderr)


def generate_batch(pipeline: Pipeline, batch: Sequence[ImageTask]) -> tuple[list[Generation], dict[str, float]]:
    """One packed batch in one `Pipeline.generate` call; also its per-stage seconds divided per image."""
    pipeline.timer.reset()
    gens = pipeline.generate([t.prompt for t in batch], batch[0].sampling, seeds=[t.seed for t in batch],
                             negative_prompts=[t.negative_prompt for t in batch])
    timings = {k: v / len(batch) for k, v in pipeline.timer.summary().items()}
    return gens, timings


def manifest_entry(task: ImageTask, gen: Generation, timings: dict[str, float], model: dict, batch: int) -> dict:
    trace = dict(gen.trace)
    engine = trace.pop("provider")
    # The detection score: the auto policy's own, else d at step 0 where the policy measured it.
    score = trace["detection_score"] if trace["detection_score"] is not None else trace["gap"][0]
    threshold = task.sampling.policy.detect_threshold
    return {"id": task.id, "file": task.file, "line": task.line, "index": task.index, **trace,
            "detection_score": score, "detect_threshold": threshold,
            "flagged": None if threshold is None or score is None else score > threshold,
            "batch": batch, "timings": timings, "engine": engine, "model": model}


class ImageSink:
    """Where a job's finished images go, and when their manifest lines are appended: each image file renamed into
    place, then its line (files); or each image into a shard, and a shard's lines once it is published whole, its
    name as their `file` and the image's name in it as `member` (webdataset, parquet). `put` and `close` return
    the entries they appended. Leaving it by an exception drops the unpublished shard: its images are made again."""

    def __init__(self, out_dir: Path, manifest: ManifestWriter, settings: OutputSettings, writer: int = 0):
        settings.validate()
        self.out_dir, self.manifest, self.settings = out_dir, manifest, settings
        self.extension = EXTENSIONS[settings.image_format]
        self.shards: ShardWriter | None = None
        if settings.output_format != "files":
            self.shards = shard_writer(settings.output_format, out_dir, settings.shard_size, writer)

    def put(self, task: ImageTask, gen: Generation, entry: dict) -> list[dict]:
        name = f"{task.id}.{self.extension}"
        data = encode_image(gen.to_pil(), gen.trace, self.settings.image_format, self.settings.image, title=name)
        entry = entry | {"output_format": self.settings.output_format}
        if self.shards is None:
            write_atomic(self.out_dir / name, data, fsync=True)
            entry["file"] = name
            self.manifest.append(entry)  # after the rename: a manifest line always has its image
            return [entry]
        return self._record(self.shards.add(Sample(task.id, data, self.extension, gen.trace, entry | {"member": name})))

    def _record(self, shard: PublishedShard | None) -> list[dict]:
        if shard is None:
            return []
        entries = [sample.entry | {"file": shard.name} for sample in shard.samples]
        self.manifest.append(*entries)  # after the rename, in one write: a shard is in the manifest whole or not
        return entries

    def close(self) -> list[dict]:
        """Publish the last, partial shard."""
        return [] if self.shards is None else self._record(self.shards.close())

    def __enter__(self) -> ImageSink:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.shards is not None:
            self.shards.abort()


def write_batch(pipeline: Pipeline, batch: Sequence[ImageTask], model: dict, sink: ImageSink,
                extra: dict | None = None) -> list[dict]:
    """Generate one batch and hand each image and its manifest entry (+ `extra`) to `sink`; returns the entries
    appended to the manifest by now (with shards, those of shards this batch completed)."""
    gens, timings = generate_batch(pipeline, batch)
    entries = []
    for task, gen in zip(batch, gens, strict=True):
        entries += sink.put(task, gen, manifest_entry(task, gen, timings, model, len(batch)) | (extra or {}))
    return entries


