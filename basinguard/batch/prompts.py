"""Prompt files: a .txt, .jsonl or .csv file → the images it asks for (`ImageTask`), with each bad line named.

Formats (chosen by extension)
  .txt    one prompt a line; blank lines are ignored.
  .jsonl  one JSON object a line; blank lines are ignored.
  .csv    a header row naming the fields, then one record a row (empty cells count as absent).
  Fields: `prompt` (required), `negative_prompt`, `seed`, `num_images`, and any sampling setting the job's flags
  set, with the same name (`FIELD_TYPES`). Pairs (`original_size`, `crops_coords_top_left`, `target_size`) are two
  integers, written [A, B] or "AxB" in either format (CSV: "AxB" or "A,B" in quotes).
  Prompt text, from any format, follows the tokenizer's one rule (`prompt_text`). A prompt longer than the text
  encoder takes is cut, as diffusers cuts it, and noted with its line (`PromptFile.truncated`; the manifest keeps
  what was dropped); `long_prompts="error"` makes it a bad line instead.

Image identity and seeds
  Image k (0-based) of the prompt on line L (1-based line of the file; for CSV the line its record starts on)
  has id `LLLLLL-KKK` (`image_id`). Its seed is the line's `seed` field + k, if it has one (as
  `basinguard generate --seed S` numbers its images); otherwise the top 53 bits of
  sha256("basinguard-batch:{base_seed}:{L}:{k}") as an unsigned big-endian integer (`derive_seed`): stable across
  runs, machines, batch sizes and worker counts, and exact in JSON.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basinguard.errors import BasinguardError
from basinguard.runtime.settings import MICRO_CONDITIONING, SamplingConfig, with_overrides
from basinguard.runtime.spec import ModelSpec
from basinguard.runtime.tokenizer import prompt_text

# A prompt longer than the text encoder takes: cut it, as diffusers does, naming what was dropped (the default), or
# refuse its line.
LONG_PROMPTS = ("truncate", "error")
MAX_IMAGES_PER_LINE = 10_000  # a typo guard: num_images beyond this is almost surely a mistake
# Per-line fields and their types: the image's own, then the sampling settings a line may override.
FIELD_TYPES: dict[str, type] = {
    "prompt": str, "negative_prompt": str, "seed": int, "num_images": int,
    "policy": str, "guidance_scale": float, "transition_t": int, "pre_scale": float, "opposite_scale": float,
    "mitigation": str, "detect_threshold": float, "latest_transition_t": int, "guidance_end_t": int, "steps": int,
    "scheduler": str,
    **dict.fromkeys(MICRO_CONDITIONING, tuple),  # SDXL's (height, width) / (top, left) pairs, in pixels
    "clip_skip": int,
}
IMAGE_FIELDS = ("prompt", "negative_prompt", "seed", "num_images")


class BatchError(BasinguardError):
    """A batch job that cannot run as asked (bad prompt file, busy or foreign OUT_DIR, corrupt manifest)."""


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
_PAIR = re.compile(r"\s*([+-]?[0-9]+)\s*[xX,]\s*([+-]?[0-9]+)\s*")


def _pair(name: str, value: Any) -> tuple[int, int]:
    """A pair field, in either file format: [A, B] (JSON) or "AxB" / "A,B" (text)."""
    if isinstance(value, str) and (match := _PAIR.fullmatch(value)):
        return int(match[1]), int(match[2])
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        return value[0], value[1]
    raise ValueError(f"field {name!r} must be two integers, [A, B] or \"AxB\", got {json.dumps(value)}")
_CSV_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _csv_cell(name: str, text: str) -> Any:
    """A CSV cell is text: a number field's is parsed here, so that it reaches `_typed` as JSON's would. Numbers are
    ASCII digits as JSON writes them: Python's int() and float() would also take "1_000" and full-width digits."""
    want = FIELD_TYPES[name]
    if want is str:
        return text
    text = text.strip()
    if want is tuple:  # "AxB" or "A,B", as in JSON: the model checks the range
        return text
    if not (_CSV_INTEGER if want is int else _CSV_NUMBER).fullmatch(text):
        raise ValueError(f"field {name!r} must be {'an integer' if want is int else 'a number'}, got {text!r}")
    return int(text) if want is int else float(text)


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
        return _pair(name, value)
    if isinstance(value, bool) or not isinstance(value, int | float) or (want is int and not isinstance(value, int)):
        raise ValueError(f"field {name!r} must be {'an integer' if want is int else 'a number'}, got {json.dumps(value)}")
    if want is float and not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a finite number, got {value}")
    return want(value)


def _line_tasks(number: int, record: dict[str, Any], spec: ModelSpec, base: SamplingConfig, images_per_prompt: int,
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
        cut = spec.tokenizer.truncation(text)
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

    overrides = {name: value for name, value in fields.items() if name not in IMAGE_FIELDS}
    sampling = with_overrides(base, overrides, lambda setting: f"field {setting}")
    if sampling not in resolved:  # most lines share settings: validate each distinct one once
        checked = spec.resolve(sampling)
        spec.make_scheduler(checked)  # steps and scheduler name checked against the model
        resolved[sampling] = checked  # only once both checks passed: a later line with the same values fails too
    sampling = resolved[sampling]
    return [ImageTask(image_id(number, k), number, k, prompt, negative,
                      seed + k if seed is not None else derive_seed(base_seed, number, k), sampling)
            for k in range(count)]


def read_prompts(path: Path, spec: ModelSpec, base: SamplingConfig, images_per_prompt: int = 1,
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
            tasks += _line_tasks(number, record, spec, base, images_per_prompt, base_seed, resolved, long_prompts,
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


