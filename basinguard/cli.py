"""`basinguard` command line: argument parsing and clear one-line errors; the work is in the packages."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from basinguard.errors import BasinguardError
from basinguard.files import temporary_files, temporary_name_fits, write_atomic
from basinguard.runtime.guidance import POLICY_NAMES, PolicyConfig, setting_problem
from basinguard.runtime.schedulers import SCHEDULERS

if TYPE_CHECKING:
    from basinguard.runtime.pipeline import Generation, SamplingConfig

SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "shapes"
SCHEDULER_CHOICES = tuple(SCHEDULERS)
USEFUL_AUC = 0.7  # below it a calibration's threshold is little better than chance (0.5): warn
DETECT_IGNORES = ("--policy", "--pre-scale", "--transition-t", "--opposite-scale", "--mitigation",
                  "--latest-transition-t")
FALLBACK_DEFAULTS = {"policy": "cfg", "guidance_scale": 7.5, "transition_t": 500, "pre_scale": 0.0,
                     "opposite_scale": None, "steps": 50, "scheduler": None}


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if not (SHIPPED_MODEL / "unet" / "model.onnx").exists():
        raise BasinguardError(f"no --model given and the shipped model is not installed at {SHIPPED_MODEL}; "
                              "pass --model DIR (an exported ONNX folder)")
    return SHIPPED_MODEL


def positive_int(text: str) -> int:
    """argparse type for counts such as --threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (got {text!r})")
    return value


def output_file(arg: str, flag: str, suffixes: tuple[str, ...] | None = None, count: int = 1) -> Path:
    """A file path the command will write (`count` of them, see `indexed`), checked before any work: not a
    directory, a parent that is one (or can be made), one of `suffixes` if given, a name short enough."""
    path = Path(arg)
    targets = [indexed(path, k, count) for k in range(count)]
    if not all(temporary_name_fits(target.name) for target in targets):  # write_atomic's temporary name too
        raise BasinguardError(f"{flag} {arg}: file name too long")
    if path.is_dir():
        raise BasinguardError(f"{flag} {arg} is a directory; give a file path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise BasinguardError(f"{flag} {arg} must end in {' or '.join(suffixes)}")
    for target in targets:
        if target.is_dir():
            raise BasinguardError(f"{flag} {target} is a directory; give a file path")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise BasinguardError(f"{flag} {arg}: {parent} is a file, not a directory")
    return path


def indexed(path: Path, k: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")


def save_image(generation, path: Path, raw: bool = False) -> None:
    """PNG, or with `raw` the float32 pixels in [0, 1] as .npy (for parity checks without 8-bit rounding)."""
    if raw:
        with open(path, "wb") as f:
            np.save(f, generation.pixels)
    else:
        generation.save_png(path)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate, batch, detect and demo. None means: the model's own default."""
    p.add_argument("--model", help="exported ONNX model folder (default: the shipped model)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    p.add_argument("--threads", type=positive_int, default=None, help="intra-op threads per model (default: ORT's)")
    p.add_argument("--static-shapes", action="store_true",
                   help="cpu: shape-specialised UNet sessions, built at a shape's first call (~0.5 s and one more "
                   "copy of the weights each); 10-20 %% faster UNet calls on small models, for long jobs")
    p.add_argument("--policy", choices=(*POLICY_NAMES, "auto"), default=None)
    p.add_argument("--guidance-scale", type=float, default=None, help="λ, the CFG scale after the transition")
    p.add_argument("--transition-t", type=int, default=None, help="τ for stp/og-stp: λ applies once t <= τ")
    p.add_argument("--pre-scale", type=float, default=None, help="s_pre before the transition for stp/dtp")
    p.add_argument("--opposite-scale", type=float, default=None, help="λ_og for og-*: s_pre = -λ_og (default: the model's, else λ as in Algorithm 1)")
    p.add_argument("--detect-threshold", type=float, default=None, help="auto: d at the first step (t = T) above this → mitigate")
    p.add_argument("--mitigation", choices=("stp", "dtp", "og-stp", "og-dtp"), default=None)
    p.add_argument("--latest-transition-t", type=int, default=None, metavar="T",
                   help="dtp/og-dtp: an image whose d has had no local minimum by t <= T switches there "
                   "(default: off, Algorithm 1: such an image never switches)")
    p.add_argument("--long-prompts", choices=("truncate", "error"), default="truncate",
                   help="a prompt longer than the text encoder takes: cut it and warn, naming the dropped words, "
                   "as diffusers does (default), or refuse it")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None,
                   help="default: the model's own; -karras: Karras sigmas; euler-a: Euler ancestral (per-image noise)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--original-size", type=parse_pair, default=None, metavar="HxW",
                   help="SDXL micro-conditioning: the size the image claims to come from (default: its own size)")
    p.add_argument("--crops-coords-top-left", type=parse_pair, default=None, metavar="TOP,LEFT",
                   help="SDXL micro-conditioning: the crop's top-left corner in pixels (default: 0,0)")
    p.add_argument("--target-size", type=parse_pair, default=None, metavar="HxW",
                   help="SDXL micro-conditioning: the size aimed at (default: the image's own size)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="SDXL: text encoder layers skipped back from the penultimate one, as diffusers' clip_skip "
                   "(default: none)")


def sampling_from_args(args: argparse.Namespace, defaults: dict) -> SamplingConfig:
    from basinguard.runtime.pipeline import SamplingConfig

    d = {**FALLBACK_DEFAULTS, **defaults}

    def pick(name: str):
        value = getattr(args, name, None)
        return d.get(name) if value is None else value

    name = pick("policy")
    # A model's default threshold is for its default auto policy; under another policy it would refuse every job.
    threshold = args.detect_threshold if getattr(args, "detect_threshold", None) is not None else (
        d.get("detect_threshold") if name == "auto" else None)
    policy = PolicyConfig(name=name, guidance_scale=pick("guidance_scale"), transition_t=pick("transition_t"),
                          pre_scale=pick("pre_scale"), opposite_scale=pick("opposite_scale"),
                          detect_threshold=threshold, mitigation=pick("mitigation") or "og-dtp",
                          latest_transition_t=pick("latest_transition_t"))
    for setting in ("pre_scale", "transition_t", "opposite_scale", "mitigation", "latest_transition_t"):
        flag = "--" + setting.replace("_", "-")
        problem = getattr(args, setting, None) is not None and setting_problem(setting, policy.name, policy.mitigation, flag)
        if problem:
            raise BasinguardError(problem)
    return SamplingConfig(steps=pick("steps"), scheduler=pick("scheduler"), height=args.height, width=args.width,
                          policy=policy, original_size=getattr(args, "original_size", None),
                          crops_coords_top_left=getattr(args, "crops_coords_top_left", None),
                          target_size=getattr(args, "target_size", None), clip_skip=getattr(args, "clip_skip", None))


def read_latents(path: str, num_images: int) -> np.ndarray:
    """--latents: one finite (N, C, h, w) .npy array; N decides the image count (--num-images 1 or N)."""
    try:
        latents = np.load(path)  # allow_pickle stays False: a file that is not .npy/.npz fails as "pickled"
    except OSError as exc:
        raise BasinguardError(f"cannot read --latents {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:  # numpy takes a file without the .npy magic for a pickle
        why = "" if "pickle" in str(exc) else f" ({exc})"
        raise BasinguardError(f"--latents {path} is not a readable .npy file{why}") from None
    if not isinstance(latents, np.ndarray):  # an .npz archive
        raise BasinguardError(f"--latents must be one .npy array (got {type(latents).__name__} from {path})")
    if latents.ndim != 4 or len(latents) == 0:
        raise BasinguardError(f"--latents must have shape (N, C, h, w) with N >= 1; got {latents.shape}")
    real = np.issubdtype(latents.dtype, np.floating)
    with np.errstate(over="ignore"):  # the denoising loop runs in float32: a float64 beyond its range is inf
        if not real or not np.isfinite(latents.astype(np.float32)).all():
            raise BasinguardError(f"--latents must hold finite real numbers within float32's range (got dtype "
                                  f"{latents.dtype}{' with NaN, inf or |x| > 3.4e38' if real else ''})")
    if num_images not in (1, len(latents)):
        raise BasinguardError(f"--num-images {num_images} but --latents holds {len(latents)} images; "
                              "the latents decide the count")
    return latents


def cmd_generate(args: argparse.Namespace) -> None:
    from basinguard.runtime.batch import MAX_IMAGES_PER_LINE, SpecChecker, prompt_text
    from basinguard.runtime.detection import calibration_warnings
    from basinguard.runtime.model_folder import accepted_model_ids, model_identity
    from basinguard.runtime.pipeline import Pipeline

    if not 1 <= args.num_images <= MAX_IMAGES_PER_LINE:
        raise BasinguardError(f"--num-images must be in [1, {MAX_IMAGES_PER_LINE}] (got {args.num_images}; "
                              "for more, `basinguard batch`)")
    if args.batch_size < 1:
        raise BasinguardError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.latents and args.seed is not None:  # as Pipeline.generate: a trace would name a seed not used
        raise BasinguardError("give --seed or --latents, not both (the latents are x_T itself; a seed makes x_T)")
    prompt, negative_prompt = prompt_text(args.prompt), prompt_text(args.negative_prompt)
    if not prompt:  # as a prompt file's empty line is refused
        raise BasinguardError("--prompt is empty; give the text to generate (a blank prompt is refused in prompt "
                              "files too)")
    latents = read_latents(args.latents, args.num_images) if args.latents else None
    n = args.num_images if latents is None else len(latents)
    if n > MAX_IMAGES_PER_LINE:
        raise BasinguardError(f"--latents holds {n} images; at most {MAX_IMAGES_PER_LINE} a run (for more, "
                              "`basinguard batch`)")
    out = output_file(args.out, "--out", (".png", ".npy"), n)
    trace = output_file(args.trace, "--trace", (".json",), n) if args.trace else None
    outputs = [indexed(out, k, n) for k in range(n)] + ([indexed(trace, k, n) for k in range(n)] if trace else [])
    refuse_overwriting(("--out", "--trace"), outputs, {"--latents": args.latents,
                                                       "--detect-calibration": args.detect_calibration})
    calib = _calibrated_threshold(args)
    model = model_dir(args.model)
    checker = SpecChecker(model)  # every check that needs only the folder's configs, before any model loads
    if args.long_prompts == "error":
        for flag, text in (("--prompt", prompt), ("--negative-prompt", negative_prompt)):
            cut = checker.tokenizer.truncation(text)
            if cut is not None:
                raise BasinguardError(cut.refusal(flag))
    sampling = sampling_from_args(args, checker.folder.sampling_defaults)
    if args.detect_threshold is not None and sampling.policy.name != "auto":  # batch and detect flag with it
        flag = "--detect-calibration" if calib is not None else "--detect-threshold"
        raise BasinguardError(f"{flag} applies to policy auto only here, not {sampling.policy.name}")
    resolved = checker.resolve(sampling)
    checker.make_scheduler(resolved)
    if latents is not None:  # the whole file, once, rather than a batch's slice of it
        checker.check_latents(latents, len(latents), resolved)
    if calib is not None:
        for warning in calibration_warnings(Path(args.detect_calibration), calib, [(1, resolved, negative_prompt)],
                                            accepted_model_ids(model_identity(model))):
            print(f"basinguard generate: warning: {warning}", file=sys.stderr)
    remove_leftovers(outputs)
    pipe = Pipeline(model, provider=args.provider, threads=args.threads, static_shapes=args.static_shapes)
    seeds = [(args.seed or 0) + k for k in range(n)]
    # Image k has seed + k (or latents[k]) whatever the batch it runs in; each batch's images are written before
    # the next batch starts, so an interrupted run keeps what it made.
    never_switched = 0
    for start in range(0, n, args.batch_size):
        m = min(args.batch_size, n - start)
        gens = pipe.generate([prompt] * m, sampling,
                             seeds=None if latents is not None else seeds[start:start + m],
                             negative_prompts=[negative_prompt] * m,
                             latents=None if latents is None else latents[start:start + m])
        for k, g in enumerate(gens, start=start):
            write_generation(out, trace, k, n, g)
        never_switched += sum(g.trace["transition_step"] is None for g in gens)
    times = pipe.timer.summary()
    print("  ".join(f"{k} {v:.3f}s" for k, v in times.items()))
    if never_switched:
        print(f"never switched to guidance: {never_switched} of {n}")
        print(f"basinguard generate: warning: {never_switched_warning(never_switched, n, resolved.policy)}",
              file=sys.stderr)


def never_switched_warning(count: int, total: int, policy: PolicyConfig) -> str:
    """Why `count` of `total` images never reached λ, and what to do about it."""
    name = policy.mitigation if policy.name == "auto" else policy.name
    if name in ("dtp", "og-dtp"):
        before = "steered away from the prompt" if name == "og-dtp" else f"ran at pre-scale {policy.pre_scale:g}"
        if policy.latest_transition_t is not None:  # the fallback was given: t never came down to it
            return (f"{count} of {total} images never switched to guidance: d had no local minimum and no step's t "
                    f"was <= --latest-transition-t {policy.latest_transition_t}, so {name} {before} at every step")
        return (f"{count} of {total} images never switched to guidance: d had no local minimum, so {name} "
                f"{before} at every step; --latest-transition-t T switches such images once t <= T")
    return f"{count} of {total} images never switched to guidance: t never reached τ = {policy.transition_t}"


def refuse_overwriting(flags: tuple[str, ...], outputs: list[Path], inputs: dict[str, str | None]) -> None:
    """An output path that is one of the command's input files would replace the input with what is made from it."""
    for in_flag, name in inputs.items():
        if not name or not Path(name).exists():
            continue
        for target in outputs:
            if target.exists() and os.path.samefile(target, name):
                raise BasinguardError(f"{' or '.join(flags)} {target} is the {in_flag} file; writing it would "
                                      "replace the input: choose another path")


def remove_leftovers(outputs: list[Path]) -> None:
    """`write_atomic`'s temporary files of these outputs left by a killed run (as batch removes its own)."""
    for folder in {target.parent for target in outputs}:
        names = {target.name for target in outputs if target.parent == folder}
        for tmp in temporary_files(folder, "?") if folder.is_dir() else []:
            if tmp.name[1:].rsplit(".", 2)[0] in names:  # `.NAME.XXXXXXXX.tmp`
                tmp.unlink(missing_ok=True)


def write_generation(out: Path, trace: Path | None, k: int, n: int, g: Generation) -> None:
    """Image k of n (and its trace), each written atomically."""
    write_atomic(indexed(out, k, n), lambda p: save_image(g, p, raw=out.suffix.lower() == ".npy"))
    if trace is not None:
        write_atomic(indexed(trace, k, n), lambda p: p.write_text(json.dumps(g.trace, indent=1)))
    ts = g.trace["transition_step"]
    print(f"{indexed(out, k, n)}  seed={g.trace['seed']}  transition_step={ts}")


def cmd_export(args: argparse.Namespace) -> None:
    try:
        from basinguard.export.onnx_export import ExportError, export_pipeline
    except ImportError as exc:
        raise BasinguardError(f"export needs the export extra: pip install 'basinguard[export]' ({exc})") from None
    if getattr(args, "tensorrt", False):
        from basinguard.engine.tensorrt import native_problem

        problem = native_problem()  # before the export, which takes minutes
        if problem:
            raise BasinguardError(f"--tensorrt: {problem}")
    try:
        export_pipeline(args.src, Path(args.out), fp16=args.fp16, opset=args.opset, atol=args.atol,
                        check_memory=not args.no_memory_check, config=args.config,
                        prediction_type=args.prediction_type, allow_pickle=args.allow_pickle, loras=args.lora or (),
                        vae=args.vae)
    except ExportError as exc:
        raise BasinguardError(str(exc)) from None
    if getattr(args, "tensorrt", False):
        from basinguard.engine.tensorrt import build_engines
        from basinguard.runtime.model_folder import ModelFolder

        # build-engines' defaults: batch 1, the native size
        build_engines(Path(args.out), ModelFolder.open(Path(args.out)).engine_geometry())


def _integers(text: str) -> list[int]:
    """The integers of 'A', 'AxB' or 'A,B' (any count); [] where a part is not an integer."""
    try:
        return [int(part) for part in text.lower().replace(",", "x").split("x")]
    except ValueError:
        return []


def parse_pair(text: str) -> tuple[int, int]:
    """'AxB' or 'A,B' → (A, B), integers; the model checks the range (SDXL micro-conditioning)."""
    values = _integers(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers as AxB or A,B, e.g. 1024x1024 (got {text!r})")
    return (values[0], values[1])


def parse_hw(text: str) -> tuple[int, int]:
    """'512' or 'HxW' ('512x768') → (height, width) in pixels."""
    values = _integers(text)
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW in pixels, e.g. 512 or 512x768 (got {text!r})")
    return (values[0], values[-1])


def cmd_build_engines(args: argparse.Namespace) -> None:
    from basinguard.engine.tensorrt import BuildSpec, build_engines
    from basinguard.runtime.model_folder import ModelFolder

    spec = BuildSpec(batch=args.batch, min_batch=args.min_batch, image=args.image_size, min_image=args.min_image_size,
                     max_image=args.max_image_size, static=args.static, fp16=not args.fp32, vae_fp16=args.vae_fp16,
                     workspace_mib=args.workspace_mib, opt_level=args.opt_level)
    folder = ModelFolder.open(Path(args.onnx_dir))
    for flag, size in (("--image-size", args.image_size), ("--min-image-size", args.min_image_size),
                       ("--max-image-size", args.max_image_size)):
        try:  # the sizes generate accepts: a plan for others could never be used
            if size is not None:
                folder.check_size(*size)
        except BasinguardError as exc:
            raise BasinguardError(f"{flag}: {exc}") from None
    absent = [role for role in args.models or [] if not (folder.path / role / "model.onnx").is_file()]
    if absent:
        raise BasinguardError(f"--models {' '.join(absent)}: {folder.path} has no {absent[0]}/model.onnx")
    geometry = folder.engine_geometry()
    records = build_engines(Path(args.onnx_dir), geometry, spec, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                            roles=args.models, force=args.force)
    for role, record in records.items():
        print(f"{role}\t{record.plan}")


def cmd_demo(args: argparse.Namespace) -> None:
    from basinguard.demo import run_demo

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise BasinguardError(f"--out {args.out} is a file; the demo writes a report folder")
    report = run_demo(model_dir(args.model), Path(args.out), seeds=args.seeds, provider=args.provider,
                      threads=args.threads)
    print(f"report: {report.resolve()}")


def _calibrated_threshold(args: argparse.Namespace, detect_steps: int | None = None, seeds: int = 1) -> dict | None:
    """--detect-calibration FILE → args.detect_threshold (the two flags exclude each other). `detect_steps` and
    `seeds`: how the scores it will be compared with are made (None, 1: d at step 0 of one image, as `auto`)."""
    from basinguard.runtime.detection import load_calibration

    if not getattr(args, "detect_calibration", None):
        return None
    if args.detect_threshold is not None:
        raise BasinguardError("give --detect-threshold or --detect-calibration, not both")
    calib = load_calibration(Path(args.detect_calibration), detect_steps, model=model_dir(args.model))
    args.detect_threshold = float(calib["threshold"])
    if calib.get("seeds", 1) != seeds:
        print(f"basinguard: warning: {args.detect_calibration} averaged {calib.get('seeds', 1)} seeds per prompt, these "
              f"scores {seeds}; averaging narrows the scores, so its threshold may flag too many or too few",
              file=sys.stderr)
    return calib


def cmd_batch(args: argparse.Namespace) -> None:
    from basinguard.runtime.batch import MANIFEST, PART_GLOB, BatchJob, SpecChecker, check_settings, run_batch
    from basinguard.runtime.pipeline import Pipeline

    if args.ray_workers is not None and args.ray is None:
        raise BasinguardError("--ray-workers applies to --ray only")
    out_dir = Path(args.out_dir)
    manifests = [out_dir / MANIFEST, *(out_dir.glob(PART_GLOB) if out_dir.is_dir() else [])]
    refuse_overwriting(("OUT_DIR's manifest",), manifests, {"PROMPTS": args.prompts})
    model = model_dir(args.model)
    calib = _calibrated_threshold(args)
    checker = SpecChecker(model)
    sampling = sampling_from_args(args, checker.folder.sampling_defaults)
    check_settings(sampling, checker)  # a bad flag stops here, before OUT_DIR or any model
    job = BatchJob(Path(args.prompts), Path(args.out_dir), sampling, images_per_prompt=args.images_per_prompt,
                   batch_size=args.batch_size, seed=args.seed, on_error=args.on_error, progress=not args.no_progress,
                   calibration=None if calib is None else (Path(args.detect_calibration), calib),
                   long_prompts=args.long_prompts)
    if args.ray is not None:
        from basinguard.ray_batch import run_batch_ray

        summary = run_batch_ray(job, model, provider=args.provider, threads=args.threads, address=args.ray,
                                workers=args.ray_workers, static_shapes=args.static_shapes)
    else:
        summary = run_batch(job, lambda: Pipeline(model, provider=args.provider, threads=args.threads,
                                                  static_shapes=args.static_shapes), checker)
    print(summary.format())


def _negative_prompt_record(negative_prompts: list[str]) -> bool | str:
    """A calibration's record of its negative prompts: True (every line had one), False (none) or "some"."""
    given = sum(bool(n) for n in negative_prompts)
    return given == len(negative_prompts) if given in (0, len(negative_prompts)) else "some"


def cmd_detect(args: argparse.Namespace) -> None:
    from basinguard.runtime.batch import check_settings, quiet_truncation, read_prompts
    from basinguard.runtime.detection import (
        calibrate,
        calibration_mismatch,
        calibration_warnings,
        detection_scores,
    )
    from basinguard.runtime.model_folder import accepted_model_ids, model_identity
    from basinguard.runtime.pipeline import Pipeline, sdxl_record

    # d is scored along plain CFG whatever the policy (`detection_scores`): a policy setting would change nothing.
    ignored = [flag for flag in DETECT_IGNORES if getattr(args, flag[2:].replace("-", "_")) is not None]
    if ignored:
        raise BasinguardError(f"{', '.join(ignored)}: detect scores d along plain CFG whatever the policy; of the "
                              "sampling settings only --guidance-scale (past step 0), --steps, --scheduler and the "
                              "size apply")
    if args.calibrate:
        if not (args.memorized and args.normal and args.out) or args.prompts:
            raise BasinguardError("--calibrate takes --memorized FILE --normal FILE --out FILE.json and no PROMPTS")
    elif not args.prompts:
        raise BasinguardError("give PROMPTS, or --calibrate --memorized FILE --normal FILE --out FILE.json")
    if args.seeds < 1 or args.detect_steps < 1:
        raise BasinguardError(f"--seeds and --detect-steps must be >= 1 (got {args.seeds} and {args.detect_steps})")
    if args.seed < 0:  # as batch's --seed
        raise BasinguardError(f"--seed must be an integer >= 0 (got {args.seed})")
    if args.calibrate and args.fpr is None:
        args.fpr = 0.01
    if args.fpr is not None and not 0 <= args.fpr < 1:
        raise BasinguardError(f"--fpr must be in [0, 1) (got {args.fpr})")
    if not args.calibrate:
        unused = [flag for flag, value in (("--memorized", args.memorized), ("--normal", args.normal),
                                           ("--out", args.out), ("--fpr", args.fpr)) if value is not None]
        if unused:
            raise BasinguardError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} to --calibrate only")
    calibration_out = output_file(args.out, "--out", (".json",)) if args.calibrate else None
    if calibration_out is not None:
        refuse_overwriting(("--out",), [calibration_out], {"--memorized": args.memorized, "--normal": args.normal,
                                                           "--detect-calibration": args.detect_calibration})
    calib = _calibrated_threshold(args, args.detect_steps, args.seeds)
    model = model_dir(args.model)
    identity = model_identity(model)  # once: every file scored and the calibration written name it
    pipe = Pipeline(model, provider=args.provider, threads=args.threads, static_shapes=args.static_shapes)
    sampling = sampling_from_args(args, pipe.folder.sampling_defaults)
    resolved = check_settings(sampling, pipe)
    seeds = [args.seed + k for k in range(args.seeds)]
    # How a calibration's scores are made, as it records them: one setting, so every line scored must be at it.
    recorded = {"detect_steps": args.detect_steps, "steps": resolved.steps, "scheduler": resolved.scheduler,
                "height": resolved.height, "width": resolved.width, "guidance_scale": resolved.policy.guidance_scale,
                **(sdxl_record(resolved) if pipe.folder.family == "sdxl" else {})}

    def score_file(path: str):  # -> (the first image task of each usable line, its score)
        parsed = read_prompts(Path(path), pipe, sampling, long_prompts=args.long_prompts)
        for err in parsed.errors:
            print(f"basinguard detect: {path}: {err}", file=sys.stderr)
        for note in parsed.truncated:
            print(f"basinguard detect: warning: {path}: {note}", file=sys.stderr)
        if parsed.errors and args.on_error == "stop":
            raise BasinguardError(f"{path} {parsed.errors[0]} (--on-error skip scores the good lines)")
        first = [t for t in parsed.tasks if t.index == 0]  # one score per line; num_images does not apply
        if not first:
            raise BasinguardError(f"{path} has no usable prompt")
        for t in first if args.calibrate else []:  # a line's own steps, size... would make the record lie
            names = [d.split(" ", 1)[0] for d in calibration_mismatch(recorded, t.sampling, set())]
            if names:
                flags = ", ".join(f"{name} {recorded[name]}" for name in names)
                raise BasinguardError(f"{path} line {t.line} sets its own {', '.join(names)}; a calibration records "
                                      f"one setting for all its prompts (the flags': {flags}): give it as a flag, or "
                                      "calibrate prompts of other settings apart")
        if calib is not None:
            settings = [(t.line, t.sampling, t.negative_prompt) for t in first]
            for warning in calibration_warnings(Path(args.detect_calibration), calib, settings,
                                                accepted_model_ids(identity)):
                print(f"basinguard detect: warning: {warning}", file=sys.stderr)
        # Lines may set their own steps, scheduler or guidance scale (as in batch); every line is scored on the
        # same seeds, so that scores compare across prompts.
        scores = np.empty(len(first))
        by_settings: dict = {}
        for k, t in enumerate(first):
            by_settings.setdefault(t.sampling, []).append(k)
        for group_sampling, ks in by_settings.items():
            with quiet_truncation():  # each cut prompt was named above, with its line
                scores[ks] = detection_scores(pipe, [first[k].prompt for k in ks], group_sampling, seeds,
                                              steps=args.detect_steps, batch_size=args.batch_size,
                                              negative_prompts=[first[k].negative_prompt for k in ks])
        return first, scores.tolist()

    if not args.calibrate:
        first, scores = score_file(args.prompts)
        # A line's own detect_threshold (else the flag's), as `auto` in batch would gate that line.
        thresholds = [t.sampling.policy.detect_threshold for t in first]
        flagging = any(th is not None for th in thresholds)
        print("line\tscore" + ("\tflagged" if flagging else "") + "\tprompt")
        for t, score, th in zip(first, scores, thresholds, strict=True):
            flag = ("\t-" if th is None else f"\t{'yes' if score > th else 'no'}") if flagging else ""
            # one row per line, whatever the prompt: a reader in text mode also ends a line at a lone \r
            prompt = t.prompt.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            print(f"{t.line}\t{score:.6g}{flag}\t{prompt}")
        return
    memorized, pos = score_file(args.memorized)
    normal, neg = score_file(args.normal)
    try:
        result = calibrate(pos, neg, fpr=args.fpr)
    except ValueError as exc:
        raise BasinguardError(str(exc)) from None
    result |= recorded | {"seeds": args.seeds, "seed": args.seed,
               "memorized_file": str(args.memorized), "normal_file": str(args.normal), "model": identity,
               "negative_prompts": _negative_prompt_record([t.negative_prompt for t in (*memorized, *normal)]),
               # which e_∅ d was measured against ("zeros": SDXL's force_zeros_for_empty_prompt)
               "model_family": pipe.folder.family,
               "uncond": sorted(set(pipe.uncond_kinds([t.negative_prompt for t in (*memorized, *normal)])))}
    write_atomic(calibration_out, lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
    if result["auc"] < USEFUL_AUC:  # written all the same (a user may want to look), but not without a word
        print(f"basinguard detect: warning: AUC {result['auc']:.2f}: these scores hardly separate {args.memorized} "
              f"from {args.normal} (0.5 is chance, 1 a perfect split); a threshold from them would flag by luck. "
              "Check that the memorized prompts are memorized by this model", file=sys.stderr)
    print(f"AUC {result['auc']:.4f}  TPR {result['tpr']:.4f} at FPR {result['fpr']:.4f} (target {args.fpr})  "
          f"threshold {result['threshold']:.6g}  ({len(pos)} memorized, {len(neg)} normal prompts) -> {args.out}")


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake (a flag's value of the wrong type, a missing argument) is one line naming it and where the
    help is, not the whole usage: the usage of `generate` alone is some 20 lines, and the error is its last."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="basinguard", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images for one prompt")
    add_sampling_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=None, help="image k uses seed + k (default 0)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--detect-calibration", metavar="FILE.json", help="auto: the threshold from `detect --calibrate`")
    g.add_argument("--batch-size", type=int, default=8, help="images per UNet call (2x that with guidance); "
                   "each batch is written before the next starts")
    g.add_argument("--latents", help="initial latents .npy of shape (N, C, h, w), instead of --seed")
    g.add_argument("--out", default="out.png", help="PNG path (.npy: float pixels); an index is added when N > 1")
    g.add_argument("--trace", help="JSON trace path; an index is added when N > 1")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="diffusers pipeline folder or single-file checkpoint → ONNX model folder")
    e.add_argument("src", help="a diffusers pipeline folder, or an SD 1.x/2.x/SDXL .safetensors checkpoint")
    e.add_argument("out")
    e.add_argument("--fp16", action="store_true", help="fp16 text encoder and UNet (for GPU); VAE stays fp32")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--atol", type=float, default=None, help="validation tolerance (max abs vs torch)")
    e.add_argument("--tensorrt", action="store_true", help="then build TensorRT plans (build-engines' defaults)")
    e.add_argument("--no-memory-check", action="store_true",
                   help="export even where the estimated peak memory exceeds what is available")
    e.add_argument("--config", metavar="DIFFUSERS_FOLDER",
                   help="single file: the model's configs, tokenizers and scheduler (default: the published ones)")
    e.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="what the UNet predicts, where the checkpoint cannot tell (SD 2.x)")
    e.add_argument("--allow-pickle", action="store_true",
                   help="load a pickled .ckpt single file (tensors only, by torch's weights-only unpickler)")
    e.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="fuse a LoRA (.safetensors, kohya or diffusers/PEFT) at WEIGHT (default 1); repeatable")
    e.add_argument("--vae", metavar="FILE_OR_FOLDER", help="replace the VAE (.safetensors file or diffusers folder)")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("build-engines", help="TensorRT plans for an exported ONNX folder (for --provider tensorrt)")
    r.add_argument("onnx_dir", metavar="ONNX_DIR")
    r.add_argument("--cache-dir", help="where plans live (default: $BASINGUARD_ENGINE_DIR, else ONNX_DIR/tensorrt); "
                   "generate/batch look in $BASINGUARD_ENGINE_DIR, so set it to this directory when running")
    r.add_argument("--batch", type=int, default=1, help="images per call N: the UNet profile spans 1..2N (static: N and 2N)")
    r.add_argument("--min-batch", type=int, default=None, help="smallest UNet batch (default: 1 for a dynamic plan, "
                   "serving batch jobs' smaller tail batches; N for a static one)")
    r.add_argument("--image-size", type=parse_hw, default=None, metavar="HxW", help="size the kernels are tuned for "
                   "(default: the model's native size)")
    r.add_argument("--min-image-size", type=parse_hw, default=None, metavar="HxW", help="default: --image-size")
    r.add_argument("--max-image-size", type=parse_hw, default=None, metavar="HxW", help="default: --image-size")
    r.add_argument("--static", action="store_true", help="fixed shapes, one profile per batch size (N, 2N): faster, "
                   "and BASINGUARD_CUDA_GRAPH=1 then captures CUDA graphs")
    r.add_argument("--fp32", action="store_true", help="no fp16 conversion (default: fp16 text encoder and "
                   "UNet; an fp32 export is converted to fp16 first). An `export --fp16` folder builds fp16 either way: "
                   "TensorRT builds the graph's own types")
    r.add_argument("--vae-fp16", action="store_true", help="fp16 VAE decoder too (may overflow to NaN)")
    r.add_argument("--models", nargs="+", choices=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
                   default=None, help="default: every one the folder has (text_encoder_2: SDXL's)")
    r.add_argument("--workspace-mib", type=int, default=None, help="cap on the builder's scratch GPU memory")
    r.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0-5 (TensorRT's default 3)")
    r.add_argument("--force", action="store_true", help="rebuild even when a valid cached plan exists")
    r.set_defaults(func=cmd_build_engines)

    d = sub.add_parser("demo", help="the method at work on the shipped model: an HTML report")
    d.add_argument("--model", help="exported model folder with memorization/ (default: the shipped model)")
    d.add_argument("--out", default="basinguard-demo", help="report folder (default: basinguard-demo)")
    d.add_argument("--seeds", type=int, default=6, help="seeds per caption and policy (default: 6)")
    d.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    d.add_argument("--threads", type=positive_int, default=None)
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("batch", help="generate a prompt file's images into OUT_DIR with a manifest; resumable")
    add_sampling_flags(b)
    b.add_argument("prompts", metavar="PROMPTS", help=".txt (a prompt a line), .jsonl or .csv (fields: prompt, "
                   "negative_prompt, seed, num_images, policy, guidance_scale, transition_t, pre_scale, "
                   "opposite_scale, mitigation, detect_threshold, latest_transition_t, steps, scheduler)")
    b.add_argument("out_dir", metavar="OUT_DIR")
    b.add_argument("--images-per-prompt", type=int, default=1, help="for lines without num_images")
    b.add_argument("--batch-size", type=int, default=4, help="images per UNet call (2x that with guidance)")
    b.add_argument("--seed", type=int, default=0, help="base seed: a line without a seed field gets, for image k "
                   "of line L, the top 53 bits of sha256('basinguard-batch:SEED:L:k'); with one, seed + k")
    b.add_argument("--detect-calibration", metavar="FILE.json", help="auto: the threshold from `detect --calibrate`")
    b.add_argument("--on-error", choices=("skip", "stop"), default="stop", help="a bad prompt line: skip it or stop")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: no ADDRESS starts a local instance; 'auto' or ray://head:10001 joins a cluster")
    b.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per worker slot)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.set_defaults(func=cmd_batch)

    t = sub.add_parser("detect", help="memorization scores per prompt, or --calibrate a threshold for --policy auto")
    add_sampling_flags(t)
    t.add_argument("prompts", metavar="PROMPTS", nargs="?", help=".txt, .jsonl or .csv prompt file (as batch; a "
                   "line's seed and num_images fields do not apply: every prompt is scored on the same seeds)")
    t.add_argument("--detect-steps", type=int, default=1, help="score = mean d over this many first steps "
                   "(auto gates on 1)")
    t.add_argument("--seeds", type=int, default=1, help="score = mean over seeds SEED..SEED+N-1 (auto scores one)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=8, help="prompt x seed pairs per UNet call")
    t.add_argument("--detect-calibration", metavar="FILE.json", help="flag prompts with this file's threshold")
    t.add_argument("--on-error", choices=("skip", "stop"), default="stop")
    t.add_argument("--calibrate", action="store_true", help="choose a threshold from --memorized and --normal")
    t.add_argument("--memorized", metavar="FILE", help="prompts known to be memorized (positives)")
    t.add_argument("--normal", metavar="FILE", help="prompts known not to be (negatives)")
    t.add_argument("--fpr", type=float, default=None, help="false-positive rate allowed on --normal (default 0.01)")
    t.add_argument("--out", metavar="FILE.json", help="calibration file to write")
    t.set_defaults(func=cmd_detect)
    return ap


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. a truncated prompt naming its dropped words) as one line, not a source excerpt."""
    print(f"basinguard: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen below and not at exit
    except BrokenPipeError:
        # `basinguard detect … | head -1`: the reader has all it wants. Quiet, as a tool killed by SIGPIPE is; stdout
        # goes to /dev/null so that the interpreter's last flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BasinguardError as exc:
        print(f"basinguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the checks could not foresee (full disk, permissions): one line, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"basinguard {args.command}: error: cannot read or write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"basinguard {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
