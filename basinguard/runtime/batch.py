"""Production batch generation: a prompt file → one PNG per image + `manifest.jsonl`, resumable after any kill.

Prompt files (chosen by extension)
  .txt    one prompt a line; blank lines are ignored.
  .jsonl  one JSON object a line; blank lines are ignored.
  .csv    a header row naming the fields, then one record a row (empty cells count as absent).
  Fields: `prompt` (required), `negative_prompt`, `seed`, `num_images`, and per-line overrides of the job's
  sampling settings: `policy`, `guidance_scale`, `transition_t`, `pre_scale`, `opposite_scale`, `mitigation`,
  `detect_threshold`, `latest_transition_t`, `steps`, `scheduler`, and for SDXL models `original_size`,
  `crops_coords_top_left`, `target_size` (two integers: [A, B] in JSON, "AxB" in CSV) and `clip_skip`.
  Prompt text, from any format: surrounding whitespace and byte-order marks are dropped (`prompt_text`); an empty
  prompt is a bad line. A prompt longer than the text encoder takes is cut, as diffusers cuts it, with a warning
  naming its line and the dropped words, recorded in its manifest line (`truncation`); `long_prompts="error"`
  makes it a bad line instead.

Image identity and seeds
  Image k (0-based) of the prompt on line L (1-based line of the file; for CSV the line its record starts on)
  has id `LLLLLL-KKK` (`image_id`) and file `<id>.png`. Its seed is
    * the line's `seed` field + k, if the line has one (as `basinguard generate --seed S` numbers its images);
    * otherwise the top 53 bits of sha256("basinguard-batch:{base_seed}:{L}:{k}") as an unsigned big-endian
      integer (`derive_seed`): stable across runs, machines, batch sizes and worker counts, and exact in JSON.
  The initial latents come from the seed alone (`Pipeline.initial_latents`), so an image does not depend on
  what it was batched with.

Packing
  Images with the same sampling settings are packed into batches of `batch_size` across prompt boundaries,
  so every UNet call runs at N = batch_size (2N with guidance) except each settings group's tail.

Nothing lost, nothing twice
  OUT_DIR/.lock is held with flock for the whole job (the kernel drops it when the process dies), so a second
  job on the same OUT_DIR refuses. Each image is written to `.<id>.png.tmp` and renamed; only then is its
  manifest line appended in one write and fsynced. On start the job removes leftover temporary files, cuts a
  truncated last manifest line (a kill mid-append), merges Ray shards (`manifest.part-K.jsonl`), drops the lines
  of images whose PNG was deleted, and skips every image id the manifest still has, so a restart with the same
  arguments makes each missing image exactly once. Manifest entries are checked against the prompt file, the settings and the model
  (`check_same_job`), so a different job's OUT_DIR is refused rather than mixed.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from basinguard.errors import BasinguardError
from basinguard.files import fsync_dir, lock_held, temporary_files, write_atomic
from basinguard.runtime.detection import calibration_warnings
from basinguard.runtime.guidance import make_policy, setting_problem
from basinguard.runtime.model_folder import ModelFolder, accepted_model_ids, model_identity, names_this_model
from basinguard.runtime.pipeline import (
    MICRO_CONDITIONING,
    SDXL_SETTINGS,
    Generation,
    Pipeline,
    SamplingConfig,
    sdxl_record,
)
from basinguard.runtime.schedulers import GAP_SPACE, Scheduler
from basinguard.runtime.tokenizer import PromptTokenizer, PromptTruncatedWarning, text_encoder_length

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part-*.jsonl"
LOCK = ".lock"
WORKER_LOCK = ".worker-{shard}.lock"  # held by each Ray worker for the life of its process
WORKER_WAIT_S = 60.0
ON_ERROR = ("skip", "stop")
# A prompt longer than the text encoder takes: cut it, as diffusers does, naming what was dropped (the default), or
# refuse its line.
LONG_PROMPTS = ("truncate", "error")
MAX_IMAGES_PER_LINE = 10_000  # a typo guard: num_images beyond this is almost surely a mistake

# Per-line fields: name → (type, what it overrides). Policy fields map onto PolicyConfig, the rest onto SamplingConfig.
POLICY_FIELDS = {"policy": "name", "guidance_scale": "guidance_scale", "transition_t": "transition_t",
                 "pre_scale": "pre_scale", "opposite_scale": "opposite_scale", "mitigation": "mitigation",
                 "detect_threshold": "detect_threshold", "latest_transition_t": "latest_transition_t"}
SAMPLING_FIELDS = ("steps", "scheduler", *SDXL_SETTINGS)
FIELD_TYPES: dict[str, type] = {
    "prompt": str, "negative_prompt": str, "seed": int, "num_images": int,
    "policy": str, "guidance_scale": float, "transition_t": int, "pre_scale": float, "opposite_scale": float,
    "mitigation": str, "detect_threshold": float, "latest_transition_t": int, "steps": int, "scheduler": str,
    **dict.fromkeys(MICRO_CONDITIONING, tuple),  # SDXL's (height, width) / (top, left) pairs, in pixels
    "clip_skip": int,
}


class BatchError(BasinguardError):
    """A batch job that cannot run as asked (bad prompt file, busy or foreign OUT_DIR, corrupt manifest)."""


# ---------------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class ImageTask:
    """One image to make: everything that determines its pixels, and where it goes."""

    id: str
    line: int
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    sampling: SamplingConfig  # resolved: height and width filled in, validated against the model

    @property
    def file(self) -> str:
        return f"{self.id}.png"


@dataclass(frozen=True)
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class PromptFile:
    tasks: list[ImageTask]
    errors: list[LineError]
    lines: int  # prompt lines read (good and bad)
    truncated: list[LineError] = field(default_factory=list)  # good lines whose prompt is cut (`LONG_PROMPTS`)


class Checker(Protocol):
    """What validating a prompt file needs: a Pipeline, or a `SpecChecker` where no models are loaded."""

    folder: ModelFolder
    tokenizer: PromptTokenizer

    def resolve(self, sampling: SamplingConfig) -> SamplingConfig: ...

    def make_scheduler(self, sampling: SamplingConfig) -> Scheduler: ...


class SpecChecker:
    """A Pipeline's folder, tokenizer and validation without its ONNX sessions (e.g. on a Ray driver).

    `resolve`, `make_scheduler` and `check_latents` are the Pipeline's own methods: they only read `self.folder`.
    """

    resolve = Pipeline.resolve
    make_scheduler = Pipeline.make_scheduler
    check_latents = Pipeline.check_latents

    def __init__(self, folder: Path):
        self.folder = ModelFolder.open(folder)
        self.tokenizer = PromptTokenizer.from_folder(self.folder.path / "tokenizer",
                                                     text_encoder_length(self.folder.path / "text_encoder"))


def image_id(line: int, index: int) -> str:
    return f"{line:06d}-{index:03d}"


def derive_seed(base_seed: int, line: int, index: int) -> int:
    """Seed of image `index` of the prompt on `line` when the line gives none (see the module docstring)."""
    digest = hashlib.sha256(f"basinguard-batch:{base_seed}:{line}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 11  # 53 bits: exact as a JSON number everywhere


class _RepeatedField(Exception):
    pass


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a field given twice is an error (json would keep the last one without a word)."""
    record: dict[str, Any] = {}
    for name, value in pairs:
        if name in record:
            raise _RepeatedField(f"field {name!r} given twice")
        record[name] = value
    return record


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | LineError]]:
    """(line number, raw fields or the error) per prompt line of a .txt/.jsonl/.csv file."""
    kind = path.suffix.lower()
    if kind not in (".txt", ".jsonl", ".csv"):
        raise BatchError(f"prompt file {path} must end in .txt, .jsonl or .csv")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BatchError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    if kind == ".csv":
        yield from _csv_records(path, data)
        return
    for number, raw in enumerate(data.splitlines(), start=1):  # \n, \r\n or a lone \r, as the CSV reader splits
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, LineError(number, f"not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not prompt_text(text):
            continue
        if kind == ".txt":
            yield number, {"prompt": text}
            continue
        try:
            record = json.loads(text, object_pairs_hook=_object_without_repeats)
        except json.JSONDecodeError as exc:
            yield number, LineError(number, f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        except _RepeatedField as exc:
            yield number, LineError(number, str(exc))
            continue
        if not isinstance(record, dict):
            yield number, LineError(number, f"expected a JSON object with a \"prompt\" field, got {type(record).__name__}")
            continue
        yield number, record


def _csv_records(path: Path, data: bytes) -> Iterator[tuple[int, dict[str, Any] | LineError]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error, not a prompt
    header: list[str] | None = None
    end = 0  # the line the previous record ended on; a record starts on the next one
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                unknown = [h for h in header if h not in FIELD_TYPES]
                if unknown or "prompt" not in header or len(set(header)) != len(header):
                    raise BatchError(f"{path} line {start}: the header must name distinct fields including "
                                     f"'prompt' from {', '.join(FIELD_TYPES)} (got {', '.join(header)})")
                continue
            if len(row) > len(header):
                yield start, LineError(start, f"{len(row)} cells but the header names {len(header)} fields")
                continue
            try:  # a cell of only spaces is empty, as a .txt line of only spaces is
                yield start, {h: _csv_cell(h, cell) for h, cell in zip(header, row, strict=False)
                              if cell.strip() or h == "negative_prompt"}
            except ValueError as exc:
                yield start, LineError(start, str(exc))
    except csv.Error as exc:
        raise BatchError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    if header is None:
        raise BatchError(f"{path} has no header row (e.g. 'prompt,seed')")


_CSV_INTEGER = re.compile(r"[+-]?[0-9]+")
_CSV_PAIR = re.compile(r"([+-]?[0-9]+)\s*[xX]\s*([+-]?[0-9]+)")
_CSV_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _csv_cell(name: str, text: str) -> Any:
    """A CSV cell is text: a number field's is parsed here, so that it reaches `_typed` as JSON's would. Numbers are
    ASCII digits as JSON writes them: Python's int() and float() would also take "1_000" and full-width digits."""
    want = FIELD_TYPES[name]
    if want is str:
        return text
    text = text.strip()
    if want is tuple:  # "AxB": the model checks the range
        pair = _CSV_PAIR.fullmatch(text)
        if pair is None:
            raise ValueError(f"field {name!r} must be two integers as AxB, got {text!r}")
        return [int(pair[1]), int(pair[2])]
    if not (_CSV_INTEGER if want is int else _CSV_NUMBER).fullmatch(text):
        raise ValueError(f"field {name!r} must be {'an integer' if want is int else 'a number'}, got {text!r}")
    return int(text) if want is int else float(text)


def prompt_text(text: str) -> str:
    """The one rule for a prompt's text, from any prompt file or flag: without surrounding whitespace and without
    byte-order marks (U+FEFF, invisible, where files were joined), which the tokenizer drops anyway."""
    return text.replace("\ufeff", "").strip()


def _typed(name: str, value: Any) -> Any:
    """A field's value as its type: text for text fields, a JSON number for number fields (not "2" in quotes)."""
    want = FIELD_TYPES[name]
    if value is None:
        return None
    if want is str:
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} must be text, got {json.dumps(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape ("\\ud800"): it could never be written to the manifest
            raise ValueError(f"field {name!r} is not valid Unicode (a lone surrogate escape)") from None
        return value
    if want is tuple:
        if not isinstance(value, list) or len(value) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"field {name!r} must be two integers [A, B], got {json.dumps(value)}")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or (want is int and not isinstance(value, int)):
        raise ValueError(f"field {name!r} must be {'an integer' if want is int else 'a number'}, got {json.dumps(value)}")
    if want is float and not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a finite number, got {value}")
    return want(value)


def _line_tasks(number: int, record: dict[str, Any], checker: Checker, base: SamplingConfig, images_per_prompt: int,
                base_seed: int, resolved: dict[SamplingConfig, SamplingConfig], long_prompts: str,
                notes: list[LineError]) -> list[ImageTask]:
    """The images of one prompt line; ValueError/BasinguardError name what is wrong with it. A prompt cut to the
    text encoder's length adds a note to `notes` (with `long_prompts` "error" it is what is wrong)."""
    unknown = sorted(set(record) - set(FIELD_TYPES))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELD_TYPES)})")
    fields = {name: _typed(name, value) for name, value in record.items()}
    if fields.get("prompt") is None:
        raise ValueError("missing field 'prompt'")
    prompt, negative = prompt_text(fields["prompt"]), prompt_text(fields.get("negative_prompt") or "")
    if not prompt:
        raise ValueError("empty prompt")
    for what, text in (("prompt", prompt), ("negative prompt", negative)):
        cut = checker.tokenizer.truncation(text)
        if cut is not None and long_prompts == "error":
            raise ValueError(cut.refusal(what))
        if cut is not None:
            notes.append(LineError(number, f"{what} cut to the text encoder's length: {cut.describe(text)}"))
    count = images_per_prompt if fields.get("num_images") is None else fields["num_images"]
    if not 1 <= count <= MAX_IMAGES_PER_LINE:
        raise ValueError(f"num_images must be in [1, {MAX_IMAGES_PER_LINE}], got {count}")
    seed = fields.get("seed")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    policy_overrides = {attr: fields[name] for name, attr in POLICY_FIELDS.items() if fields.get(name) is not None}
    sampling_overrides = {name: fields[name] for name in SAMPLING_FIELDS if fields.get(name) is not None}
    sampling = replace(base, policy=replace(base.policy, **policy_overrides), **sampling_overrides)
    for setting in ("pre_scale", "transition_t", "opposite_scale", "mitigation", "latest_transition_t"):
        problem = setting in policy_overrides and setting_problem(
            setting, sampling.policy.name, sampling.policy.mitigation, f"field {setting}")
        if problem:
            raise ValueError(problem)
    if sampling not in resolved:  # most lines share settings: validate each distinct one once
        checked = checker.resolve(sampling)
        checker.make_scheduler(checked)  # steps and scheduler name checked against the model
        resolved[sampling] = checked  # only once both checks passed: a later line with the same values fails too
    sampling = resolved[sampling]
    return [ImageTask(image_id(number, k), number, k, prompt, negative,
                      seed + k if seed is not None else derive_seed(base_seed, number, k), sampling)
            for k in range(count)]


def read_prompts(path: Path, checker: Checker, base: SamplingConfig, images_per_prompt: int = 1,
                 base_seed: int = 0, long_prompts: str = "truncate") -> PromptFile:
    """Every image of a prompt file, and every bad line with its line number (the caller decides skip/stop), and
    the good lines whose prompt is cut (`LONG_PROMPTS`: with "error" those are bad lines)."""
    if long_prompts not in LONG_PROMPTS:
        raise BatchError(f"--long-prompts must be one of {', '.join(LONG_PROMPTS)} (got {long_prompts!r})")
    tasks: list[ImageTask] = []
    errors: list[LineError] = []
    truncated: list[LineError] = []
    resolved: dict[SamplingConfig, SamplingConfig] = {}
    lines = 0
    for number, record in _records(Path(path)):
        lines += 1
        if isinstance(record, LineError):
            errors.append(record)
            continue
        notes: list[LineError] = []
        try:
            tasks += _line_tasks(number, record, checker, base, images_per_prompt, base_seed, resolved, long_prompts,
                                 notes)
            truncated += notes
        except (ValueError, BasinguardError) as exc:
            errors.append(LineError(number, str(exc)))
    return PromptFile(tasks, errors, lines, truncated)


def pack(tasks: Sequence[ImageTask], batch_size: int) -> list[list[ImageTask]]:
    """Batches of `batch_size` images with equal sampling settings, across prompt boundaries, in file order."""
    if batch_size < 1:
        raise BatchError(f"batch size must be >= 1 (got {batch_size})")
    groups: dict[SamplingConfig, list[ImageTask]] = {}
    for task in tasks:
        groups.setdefault(task.sampling, []).append(task)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


# ---------------------------------------------------------------------------------------------------- output dir


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
         "model", "flagged", "transition_step", "engine", "gap_space", *SDXL_SETTINGS)


def slim(entry: dict) -> dict:
    kept = {k: entry.get(k) for k in _KEPT}
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
    for tmp in [*temporary_files(out_dir, "*.png"), *temporary_files(out_dir, MANIFEST)]:  # ours only
        tmp.unlink(missing_ok=True)
    merge_parts(out_dir)
    manifest = out_dir / MANIFEST
    done: dict[str, dict] = {}
    lost: set[str] = set()
    for entry in iter_manifest(manifest):
        if (out_dir / entry.get("file", f"{entry['id']}.png")).is_file():
            done.setdefault(entry["id"], slim(entry))
        else:
            lost.add(entry["id"])
    return done, lost - done.keys()


def forget(out_dir: Path, lost: set[str]) -> None:
    """Drop the manifest lines of `lost` image ids, atomically: a kill leaves the old manifest or the new one."""
    if not lost:
        return
    manifest = out_dir / MANIFEST
    kept = [line for line in manifest.read_bytes().splitlines(keepends=True)
            if line.strip() and json.loads(line)["id"] not in lost]
    write_atomic(manifest, lambda p: p.write_bytes(b"".join(kept)), fsync=True)
    print(f"basinguard batch: {len(lost)} image(s) in {manifest} have no PNG any more; they will be made again",
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
                **sdxl_record(task.sampling)}
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


# ---------------------------------------------------------------------------------------------------- the job


@dataclass
class BatchJob:
    prompts: Path
    out_dir: Path
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the job's settings; lines may override
    images_per_prompt: int = 1
    batch_size: int = 4
    seed: int = 0  # base seed for lines without a seed field
    on_error: str = "stop"
    progress: bool = True
    calibration: tuple[Path, dict] | None = None  # the --detect-calibration file and its contents, to warn against
    long_prompts: str = "truncate"  # see LONG_PROMPTS

    def validate(self) -> None:
        if not Path(self.prompts).is_file():  # before OUT_DIR is created or any model loads
            what = "is a directory" if Path(self.prompts).is_dir() else "not found"
            raise BatchError(f"prompt file {self.prompts} {what}")
        if self.batch_size < 1:
            raise BatchError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise BatchError(f"--seed must be an integer >= 0 (got {self.seed!r})")
        if not 1 <= self.images_per_prompt <= MAX_IMAGES_PER_LINE:
            raise BatchError(f"--images-per-prompt must be in [1, {MAX_IMAGES_PER_LINE}] (got {self.images_per_prompt})")
        if self.on_error not in ON_ERROR:
            raise BatchError(f"--on-error must be one of {', '.join(ON_ERROR)} (got {self.on_error!r})")
        if self.long_prompts not in LONG_PROMPTS:
            raise BatchError(f"--long-prompts must be one of {', '.join(LONG_PROMPTS)} (got {self.long_prompts!r})")


@dataclass
class BatchSummary:
    total: int  # images the job asks for (good lines)
    generated: int  # made by this run
    done_before: int  # found finished in the manifest
    flagged: int | None  # images scored above the detection threshold; None: no threshold was given
    mean_transition_step: float | None
    seconds: float  # wall time of this run's generation
    skipped: list[LineError]
    no_transition: int = 0  # images that never switched to guidance (transition_step null)
    truncated: int = 0  # prompt lines cut to the text encoder's length

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        ts = "n/a" if self.mean_transition_step is None else f"{self.mean_transition_step:.2f}"
        out = [f"images: {self.done_before + self.generated}/{self.total} done ({self.generated} this run, "
               f"{self.done_before} already done)",
               f"flagged as memorized: {'n/a (no detection threshold)' if self.flagged is None else self.flagged}",
               f"mean transition step: {ts}",
               f"never switched to guidance: {self.no_transition}" + (
                   " (d had no local minimum; --latest-transition-t T gives dtp/og-dtp a latest switch)"
                   if self.no_transition else ""),
               f"prompts cut to the text encoder's length: {self.truncated}",
               f"throughput: {self.images_per_second:.3f} images/s ({self.seconds:.1f} s)",
               f"skipped lines: {len(self.skipped)}"]
        out += [f"  {e}" for e in self.skipped]
        return "\n".join(out)


def check_settings(sampling: SamplingConfig, checker: Checker) -> SamplingConfig:
    """The job's own settings (its flags), checked once before any line, since a bad flag is not every line's
    fault; returns them resolved against the model."""
    policy = sampling.policy
    if policy.name == "auto" and policy.detect_threshold is None:  # lines may each set detect_threshold
        sampling = replace(sampling, policy=replace(policy, detect_threshold=0.0))  # a stand-in, for the check
    try:
        resolved = replace(checker.resolve(sampling), policy=policy)
        checker.make_scheduler(resolved)
    except BasinguardError as exc:
        raise BatchError(f"job settings: {exc}") from None
    return resolved


def unflagged_lines_out(parsed: PromptFile, checker: Checker, job: SamplingConfig) -> PromptFile:
    """The lines whose threshold their policy cannot apply (`unmeasured_threshold`) become bad lines, except a line
    that leaves a job's auto for a policy of its own: it opts out of the gate, and its images are not flagged."""
    problems: dict[SamplingConfig, str | None] = {}
    tasks, errors = [], list(parsed.errors)
    inherited = job.policy.detect_threshold if job.policy.name == "auto" else None
    for task in parsed.tasks:
        if task.sampling not in problems:
            threshold = task.sampling.policy.detect_threshold
            problems[task.sampling] = None if inherited is not None and threshold == inherited else (
                unmeasured_threshold(task.sampling, checker))
        if problems[task.sampling] is None:
            tasks.append(task)
        elif task.index == 0:
            errors.append(LineError(task.line, problems[task.sampling]))
    kept = {t.line for t in tasks}
    return PromptFile(tasks, sorted(errors, key=lambda e: e.line), parsed.lines,
                      [note for note in parsed.truncated if note.line in kept])


def unmeasured_threshold(sampling: SamplingConfig, checker: Checker) -> str | None:
    """In a batch job a detection threshold flags each image by its d at step 0. A policy that runs only the
    unconditional branch there (stp with pre-scale 0, before τ) measures no d, and its images would go unflagged
    without a word. (`detect` scores along plain CFG whatever the policy: this is not its check.)"""
    policy = sampling.policy
    if policy.detect_threshold is None or policy.name == "auto":
        return None
    scheduler = checker.make_scheduler(sampling)
    if make_policy(policy, 1, checker.folder.num_train_timesteps).needs_cond(0, scheduler.timesteps[0]):
        return None
    return (f"a detection threshold flags images by d at step 0, which {policy.name} with pre-scale "
            f"{policy.pre_scale:g} does not measure (it runs only the unconditional branch before τ); "
            "use policy auto to gate on it")


def load_job(job: BatchJob, checker: Checker) -> PromptFile:
    """Read and check the prompt file; bad lines are reported on stderr and then skipped or stop the job."""
    check_settings(job.sampling, checker)
    parsed = unflagged_lines_out(read_prompts(job.prompts, checker, job.sampling, job.images_per_prompt, job.seed,
                                              job.long_prompts), checker, job.sampling)
    messages = {e.message for e in parsed.errors}
    if not parsed.tasks and len(messages) == 1 and len(parsed.errors) > 1:  # one cause, not one report per line
        raise BatchError(f"{job.prompts}: every line ({len(parsed.errors)}): {messages.pop()}")
    for err in parsed.errors:
        print(f"basinguard batch: {job.prompts}: {err}", file=sys.stderr)
    if parsed.errors and job.on_error == "stop":
        more = f" (and {len(parsed.errors) - 1} more bad lines)" if len(parsed.errors) > 1 else ""
        raise BatchError(f"{job.prompts} {parsed.errors[0]}{more}; nothing generated (--on-error stop; "
                         "--on-error skip makes the good lines)")
    if not parsed.tasks:
        raise BatchError(f"{job.prompts} has no usable prompt lines ({parsed.lines} read, {len(parsed.errors)} bad)")
    for note in parsed.truncated:  # once per line here; the pipeline's own warning is silenced (`quiet_truncation`)
        print(f"basinguard batch: warning: {job.prompts}: {note}", file=sys.stderr)
    if job.calibration is not None:
        first = [(t.line, t.sampling, t.negative_prompt) for t in parsed.tasks if t.index == 0]
        for warning in calibration_warnings(*job.calibration, first, accepted_model_ids(model_identity(checker.folder.path))):
            print(f"basinguard batch: warning: {warning}", file=sys.stderr)
    return parsed


@contextmanager
def quiet_truncation() -> Iterator[None]:
    """The pipeline's PromptTruncatedWarning silenced: a job names each cut prompt once, with its line, when it reads
    the prompt file (`load_job`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        yield


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


def write_batch(pipeline: Pipeline, batch: Sequence[ImageTask], out_dir: Path, model: dict,
                manifest: ManifestWriter, extra: dict | None = None) -> list[dict]:
    """Generate one batch, write each PNG atomically, then append (and fsync) its manifest line (+ `extra`)."""
    gens, timings = generate_batch(pipeline, batch)
    entries = []
    for task, gen in zip(batch, gens, strict=True):
        write_atomic(out_dir / task.file, lambda p, g=gen: g.save_png(p), fsync=True)
        entry = manifest_entry(task, gen, timings, model, len(batch)) | (extra or {})
        manifest.append(entry)  # after the rename: a manifest line always has its PNG
        entries.append(entry)
    return entries


def progress_bar(total: int, enabled: bool):  # -> tqdm
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                desc="basinguard batch")


def summarize(parsed: PromptFile, done: dict[str, dict], new: list[dict], seconds: float) -> BatchSummary:
    ids = {t.id for t in parsed.tasks}
    entries = [e for e in done.values() if e["id"] in ids] + new
    steps = [e["transition_step"] for e in entries if e.get("transition_step") is not None]
    return BatchSummary(total=len(parsed.tasks), generated=len(new), done_before=len(entries) - len(new),
                        flagged=None if all(e.get("flagged") is None for e in entries)
                        else sum(bool(e.get("flagged")) for e in entries),
                        mean_transition_step=sum(steps) / len(steps) if steps else None,
                        seconds=seconds, skipped=parsed.errors,
                        no_transition=sum(e.get("transition_step") is None for e in entries),
                        truncated=len({note.line for note in parsed.truncated}))


def run_batch(job: BatchJob, pipeline: Pipeline | Callable[[], Pipeline], checker: Checker | None = None) -> BatchSummary:
    """Run (or resume) a batch job on this machine. `pipeline` may be a factory, called once OUT_DIR is locked,
    so that a busy OUT_DIR is refused before any model loads; it then needs a `checker` (a `SpecChecker`) to read
    the prompt file with."""
    job.validate()
    checker = pipeline if isinstance(pipeline, Pipeline) else checker
    if checker is None:
        raise TypeError("run_batch: a pipeline factory needs checker= (a SpecChecker of the same model folder)")
    parsed = load_job(job, checker)  # before OUT_DIR is made: a job refused for its prompts leaves nothing behind
    with output_lock(job.out_dir):
        done, lost = prepare_output(job.out_dir)
        pipe = pipeline if isinstance(pipeline, Pipeline) else pipeline()
        model = model_identity(pipe.folder.path)
        check_same_job(parsed.tasks, done, job.out_dir, model, pipe.folder.prediction_type)
        forget(job.out_dir, lost)  # only now: a refused job leaves the manifest as it found it
        pending = [t for t in parsed.tasks if t.id not in done]
        if pending:
            warn_other_engines(job.out_dir, done, {pipe.unet.model.provider})
        new: list[dict] = []
        start = time.perf_counter()
        with (ManifestWriter(job.out_dir / MANIFEST) as manifest, progress_bar(len(pending), job.progress) as bar,
              quiet_truncation()):
            for batch in pack(pending, job.batch_size):
                new += map(slim, write_batch(pipe, batch, job.out_dir, model, manifest))
                bar.update(len(batch))
        return summarize(parsed, done, new, time.perf_counter() - start)
