"""`basinguard export`, `build-engines`, `demo` and `batch`: flags turned into calls of the packages."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from basinguard.cli.common import calibrated_threshold, image_options, model_dir, refuse_overwriting, sampling_from_args
from basinguard.errors import BasinguardError
from basinguard.model_format import is_exported_folder

if TYPE_CHECKING:
    pass


def cmd_export(args: argparse.Namespace) -> None:
    if is_exported_folder(Path(args.src)):  # an export already: only its UNet is quantized, without torch
        _quantize_exported(args)
        return
    try:
        from basinguard.export.onnx_export import ExportError, export_pipeline
    except ImportError as exc:
        if (exc.name or "").startswith("onnxruntime"):  # the export validates with ONNX Runtime: one of its sets
            raise BasinguardError(f"export needs ONNX Runtime: pip install 'basinguard[cpu]' (or a GPU set, "
                                  f"docs/gpu.md) ({exc})") from None
        raise BasinguardError(f"export needs the export extra: pip install 'basinguard[export]' ({exc})") from None
    if getattr(args, "tensorrt", False) and args.quantize:
        raise BasinguardError(f"--tensorrt and --quantize {args.quantize} do not go together: an int8 UNet is for "
                              "ONNX Runtime's CPU provider; TensorRT builds from the float export")
    if getattr(args, "tensorrt", False):
        from basinguard.engine.tensorrt import native_problem

        problem = native_problem()  # before the export, which takes minutes
        if problem:
            raise BasinguardError(f"--tensorrt: {problem}")
    try:
        export_pipeline(args.src, Path(args.out), fp16=args.fp16, opset=args.opset, atol=args.atol,
                        check_memory=not args.no_memory_check, config=args.config,
                        prediction_type=args.prediction_type, allow_pickle=args.allow_pickle, loras=args.lora or (),
                        vae=args.vae, quantize=args.quantize)
    except ExportError as exc:
        raise BasinguardError(str(exc)) from None
    if getattr(args, "tensorrt", False):
        from basinguard.engine.tensorrt import build_engines
        from basinguard.runtime.spec import ModelSpec

        # build-engines' defaults: batch 1, the native size
        build_engines(Path(args.out), ModelSpec(Path(args.out)).engine_geometry())


def _quantize_exported(args: argparse.Namespace) -> None:
    """`export EXPORTED_DIR OUT --quantize int8`: an int8 copy of a folder basinguard exported."""
    if not args.quantize:
        raise BasinguardError(f"{args.src} is an exported basinguard folder already; export its diffusers source, "
                              "or give --quantize int8 to write an int8 copy of it")
    given = [flag for flag, value in (("--fp16", args.fp16), ("--tensorrt", args.tensorrt), ("--lora", args.lora),
                                      ("--vae", args.vae), ("--config", args.config),
                                      ("--prediction-type", args.prediction_type), ("--allow-pickle", args.allow_pickle))
             if value]
    if given:
        raise BasinguardError(f"{given[0]} does not go with --quantize {args.quantize} of an exported folder: it "
                              f"applies to a diffusers source or single file ({args.src} is exported already)")
    try:
        from basinguard.export.errors import ExportError
        from basinguard.export.quantize import quantize_folder
    except ImportError as exc:  # onnxruntime comes from an extra
        raise BasinguardError(f"--quantize needs ONNX Runtime: pip install 'basinguard[cpu]' ({exc})") from None
    try:
        quantize_folder(Path(args.src), Path(args.out), args.quantize, check_memory=not args.no_memory_check)
    except ExportError as exc:
        raise BasinguardError(str(exc)) from None


def cmd_build_engines(args: argparse.Namespace) -> None:
    from basinguard.engine.tensorrt import BuildSpec, build_engines
    from basinguard.runtime.spec import ModelSpec

    spec = BuildSpec(batch=args.batch, min_batch=args.min_batch, image=args.image_size, min_image=args.min_image_size,
                     max_image=args.max_image_size, static=args.static, fp16=not args.fp32, vae_fp16=args.vae_fp16,
                     workspace_mib=args.workspace_mib, opt_level=args.opt_level)
    model = ModelSpec(Path(args.onnx_dir))
    folder = model.folder
    for flag, size in (("--image-size", args.image_size), ("--min-image-size", args.min_image_size),
                       ("--max-image-size", args.max_image_size)):
        try:  # the sizes generate accepts: a plan for others could never be used
            if size is not None:
                folder.check_size(*size)
        except BasinguardError as exc:
            raise BasinguardError(f"{flag}: {exc}") from None
    if folder.unet_quantization and (not args.models or "unet" in args.models):
        raise BasinguardError(f"{folder.path}'s UNet is quantized to {folder.unet_quantization} for ONNX Runtime's "
                              "CPU provider; build TensorRT engines from its float export (fp32 or --fp16)")
    absent = [role for role in args.models or [] if not (folder.path / role / "model.onnx").is_file()]
    if absent:
        raise BasinguardError(f"--models {' '.join(absent)}: {folder.path} has no {absent[0]}/model.onnx")
    geometry = model.engine_geometry()
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


def cmd_batch(args: argparse.Namespace) -> None:
    from basinguard.batch.job import BatchJob, check_settings, run_batch
    from basinguard.batch.output import MANIFEST, PART_GLOB, OutputSettings
    from basinguard.outputs.images import EXTENSIONS
    from basinguard.outputs.shards import DEFAULT_SHARD_SIZE
    from basinguard.runtime.pipeline import Pipeline
    from basinguard.runtime.spec import ModelSpec

    if args.ray_workers is not None and args.ray is None:
        raise BasinguardError("--ray-workers applies to --ray only")
    out_dir = Path(args.out_dir)
    manifests = [out_dir / MANIFEST, *(out_dir.glob(PART_GLOB) if out_dir.is_dir() else [])]
    refuse_overwriting(("OUT_DIR's manifest",), manifests, {"PROMPTS": args.prompts})
    model = model_dir(args.model)
    calib = calibrated_threshold(args)
    spec = ModelSpec(model)
    sampling = sampling_from_args(args, spec)
    check_settings(sampling, spec)  # a bad flag stops here, before OUT_DIR or any model
    if args.shard_size is not None and args.output_format == "files":
        raise BasinguardError("--shard-size applies to --output-format webdataset or parquet")
    output = OutputSettings(args.image_format, args.output_format, args.shard_size or DEFAULT_SHARD_SIZE,
                            image_options(args, {"." + EXTENSIONS[args.image_format]}, lambda: spec.identity))
    output.validate()  # e.g. parquet without pyarrow: said before OUT_DIR is made
    if output.output_format == "parquet":
        from basinguard.outputs.shards import parquet_schema

        parquet_schema()
    job = BatchJob(Path(args.prompts), Path(args.out_dir), sampling, images_per_prompt=args.images_per_prompt,
                   batch_size=args.batch_size, seed=args.seed, on_error=args.on_error, progress=not args.no_progress,
                   calibration=None if calib is None else (Path(args.detect_calibration), calib),
                   long_prompts=args.long_prompts, output=output)
    if args.ray is not None:
        from basinguard.batch.ray_executor import run_batch_ray

        summary = run_batch_ray(job, model, provider=args.provider, threads=args.threads, address=args.ray,
                                workers=args.ray_workers, static_shapes=args.static_shapes)
    else:
        summary = run_batch(job, lambda: Pipeline(spec, provider=args.provider, threads=args.threads,
                                                  static_shapes=args.static_shapes), spec)
    print(summary.format())
