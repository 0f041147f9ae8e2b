"""A batch job: a prompt file → one image per task in OUT_DIR + its manifest, resumable after any kill.

Images with the same sampling settings are packed into batches of `batch_size` across prompt boundaries, so every
UNet call runs at N = batch_size (2N with guidance) except each settings group's tail (`prompts.pack`).
`open_job` is the one opening of a job (its prompt file checked, OUT_DIR locked and repaired, the same-job check,
what is left to do) and `finish` its close; the local executor (`run_batch`) and the Ray one (`batch.ray_executor`)
differ only in how the pending images run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from basinguard.batch.output import (
    MANIFEST,
    ImageSink,
    ManifestWriter,
    OutputSettings,
    check_output_format,
    check_same_job,
    forget,
    merge_parts,
    output_lock,
    prepare_output,
    slim,
    warn_other_engines,
    write_batch,
)
from basinguard.batch.prompts import (
    LONG_PROMPTS,
    MAX_IMAGES_PER_LINE,
    BatchError,
    ImageTask,
    LineError,
    PromptFile,
    pack,
    read_prompts,
)
from basinguard.errors import BasinguardError
from basinguard.runtime.detection import calibration_warnings
from basinguard.runtime.guidance import make_policy
from basinguard.runtime.pipeline import Pipeline
from basinguard.runtime.settings import SamplingConfig
from basinguard.runtime.spec import ModelSpec
from basinguard.runtime.tokenizer import quiet_truncation

ON_ERROR = ("skip", "stop")


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
    output: OutputSettings = field(default_factory=OutputSettings)  # image format and metadata, files or shards

    def validate(self) -> None:
        self.output.validate()
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


def check_settings(sampling: SamplingConfig, spec: ModelSpec) -> SamplingConfig:
    """The job's own settings (its flags), checked once before any line, since a bad flag is not every line's
    fault; returns them resolved against the model."""
    policy = sampling.policy
    if policy.name == "auto" and policy.detect_threshold is None:  # lines may each set detect_threshold
        sampling = replace(sampling, policy=replace(policy, detect_threshold=0.0))  # a stand-in, for the check
    try:
        resolved = replace(spec.resolve(sampling), policy=policy)
        spec.make_scheduler(resolved)
    except BasinguardError as exc:
        raise BatchError(f"job settings: {exc}") from None
    return resolved


def unflagged_lines_out(parsed: PromptFile, spec: ModelSpec, job: SamplingConfig) -> PromptFile:
    """The lines whose threshold their policy cannot apply (`unmeasured_threshold`) become bad lines, except a line
    that leaves a job's auto for a policy of its own: it opts out of the gate, and its images are not flagged."""
    problems: dict[SamplingConfig, str | None] = {}
    tasks, errors = [], list(parsed.errors)
    inherited = job.policy.detect_threshold if job.policy.name == "auto" else None
    for task in parsed.tasks:
        if task.sampling not in problems:
            threshold = task.sampling.policy.detect_threshold
            problems[task.sampling] = None if inherited is not None and threshold == inherited else (
                unmeasured_threshold(task.sampling, spec))
        if problems[task.sampling] is None:
            tasks.append(task)
        elif task.index == 0:
            errors.append(LineError(task.line, problems[task.sampling]))
    kept = {t.line for t in tasks}
    return PromptFile(tasks, sorted(errors, key=lambda e: e.line), parsed.lines,
                      [note for note in parsed.truncated if note.line in kept])


def unmeasured_threshold(sampling: SamplingConfig, spec: ModelSpec) -> str | None:
    """In a batch job a detection threshold flags each image by its d at step 0. A policy that runs only the
    unconditional branch there (stp with pre-scale 0, before τ) measures no d, and its images would go unflagged
    without a word. (`detect` scores along plain CFG whatever the policy: this is not its check.)"""
    policy = sampling.policy
    if policy.detect_threshold is None or policy.name == "auto":
        return None
    scheduler = spec.make_scheduler(sampling)
    if make_policy(policy, 1, spec.folder.num_train_timesteps).rows(0, scheduler.timesteps[0]).kind == "both":
        return None
    return (f"a detection threshold flags images by d at step 0, which {policy.name} with pre-scale "
            f"{policy.pre_scale:g} does not measure (it runs only the unconditional branch before τ); "
            "use policy auto to gate on it")


def load_job(job: BatchJob, spec: ModelSpec) -> PromptFile:
    """Read and check the prompt file; bad lines are reported on stderr and then skipped or stop the job."""
    check_settings(job.sampling, spec)
    parsed = unflagged_lines_out(read_prompts(job.prompts, spec, job.sampling, job.images_per_prompt, job.seed,
                                              job.long_prompts), spec, job.sampling)
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
    if job.calibration is not None:
        first = [(t.line, t.sampling, t.negative_prompt) for t in parsed.tasks if t.index == 0]
        for warning in calibration_warnings(*job.calibration, first, spec.accepted_ids):
            print(f"basinguard batch: warning: {warning}", file=sys.stderr)
    return parsed


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


TRUNCATIONS_SHOWN = 3  # a job's truncation warning names this many lines; the manifest has every one


def warn_truncated(job: BatchJob, parsed: PromptFile, pending: Sequence[ImageTask]) -> None:
    """One warning for the prompt lines this run cuts to the text encoder's length: their count and the first few
    (each image's manifest line records what was dropped, under `truncation`)."""
    lines = {task.line for task in pending}
    notes = [note for note in parsed.truncated if note.line in lines]
    if not notes:
        return
    shown = "; ".join(str(note) for note in notes[:TRUNCATIONS_SHOWN])
    more = f"; and {len(notes) - TRUNCATIONS_SHOWN} more" if len(notes) > TRUNCATIONS_SHOWN else ""
    print(f"basinguard batch: warning: {job.prompts}: {len(notes)} prompt(s) cut to the text encoder's length, as "
          f"diffusers cuts them (each manifest line records the words cut): {shown}{more}", file=sys.stderr)


@dataclass
class OpenJob:
    """A job opened under its OUT_DIR lock: its prompt file's tasks, what earlier runs finished and what is left."""

    job: BatchJob
    parsed: PromptFile
    done: dict[str, dict]
    pending: list[ImageTask]
    identity: dict  # the model's (`ModelSpec.identity`), recorded in every manifest line


@contextmanager
def open_job(job: BatchJob, spec: ModelSpec, engines: Callable[[], set[str]]) -> Iterator[OpenJob]:
    """The one opening of a job, local or Ray: the prompt file read and checked (before OUT_DIR is made: a job refused
    for its prompts leaves nothing behind), OUT_DIR locked and repaired, the same-job check, then what is left to do.
    `engines`: the labels this run's images will carry, asked only where images are left to make."""
    job.validate()
    parsed = load_job(job, spec)
    with output_lock(job.out_dir):
        done, lost = prepare_output(job.out_dir)
        check_same_job(parsed.tasks, done, job.out_dir, spec.identity, spec.folder.prediction_type)
        check_output_format(done, job.out_dir, job.output.output_format)
        output = job.output
        what = "whole shard" if output.output_format != "files" else "PNG" if output.image_format == "png" else "file"
        forget(job.out_dir, lost, what)  # only now: a refused job leaves the manifest as it found it
        pending = [t for t in parsed.tasks if t.id not in done]
        if pending:
            warn_other_engines(job.out_dir, done, engines())
            warn_truncated(job, parsed, pending)
        with quiet_truncation():  # each cut prompt was named once, above
            yield OpenJob(job, parsed, done, pending, spec.identity)


def finish(opened: OpenJob, new: list[dict], seconds: float) -> BatchSummary:
    """The one close: shards folded into the manifest, and the summary."""
    merge_parts(opened.job.out_dir)
    return summarize(opened.parsed, opened.done, new, seconds)


def run_batch(job: BatchJob, pipeline: Pipeline | Callable[[], Pipeline], spec: ModelSpec | None = None) -> BatchSummary:
    """Run (or resume) a batch job on this machine. `pipeline` may be a factory, called once OUT_DIR is locked and
    the job is known to be its own, so that a refused job loads no model; it then needs the model's `spec`."""
    loaded = pipeline if isinstance(pipeline, Pipeline) else None
    spec = loaded.spec if loaded is not None else spec
    if spec is None:
        raise TypeError("run_batch: a pipeline factory needs spec= (the ModelSpec of the same model folder)")

    def pipe() -> Pipeline:
        nonlocal loaded
        if loaded is None:
            loaded = pipeline()  # type: ignore[operator]
        return loaded

    with open_job(job, spec, lambda: {pipe().unet.model.provider}) as opened:
        new: list[dict] = []
        start = time.perf_counter()
        with (ManifestWriter(job.out_dir / MANIFEST) as manifest, ImageSink(job.out_dir, manifest, job.output) as sink,
              progress_bar(len(opened.pending), job.progress) as bar):
            for batch in pack(opened.pending, job.batch_size):
                new += map(slim, write_batch(pipe(), batch, opened.identity, sink))
                bar.update(len(batch))
            new += map(slim, sink.close())
        return finish(opened, new, time.perf_counter() - start)
