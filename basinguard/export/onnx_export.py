"""Export a diffusers Stable Diffusion (1.x/2.x) or SDXL pipeline to an ONNX model folder in optimum's layout.

OUT holds model_index.json, text_encoder/, unet/, vae_decoder/ (each model.onnx + the component's config.json),
tokenizer/ (the source's files plus a tokenizer.json), scheduler/scheduler_config.json and basinguard.json, our
manifest: versions, opset, dtypes, the model family ("sd" or "sdxl"), every model's inputs/outputs/dynamic axes,
the source and the validation results. SDXL adds text_encoder_2/ and tokenizer_2/. Names and layout are optimum's;
see `basinguard.export.graphs` for where dtypes and axes differ.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from basinguard.export.errors import ExportError, first_line
from basinguard.export.graphs import GraphSpec, TorchModels, build_specs, pin_static_dims, trace_to_onnx
from basinguard.export.graphs import unet_size_multiple as _unet_size_multiple
from basinguard.export.lora import LoraSpec, check_lora_file, lora_modules, parse_lora
from basinguard.export.memory import GIB, check_export_memory
from basinguard.export.onnx_files import convert_to_half, save_checked
from basinguard.export.out_folder import output_folder
from basinguard.export.quantize import QUANTIZE_MODES, check_quantize_memory, quantize_unet
from basinguard.export.single_file import PREDICTION_TYPES, copy_configs, pipeline_class, prepare_single_file
from basinguard.export.sources import Extras, assemble, check_vae_source, sources_record
from basinguard.export.validate import Expected, expected_outputs, graph_io, validate_graph
from basinguard.model_format import read_json
from basinguard.runtime.tokenizer import PromptTokenizer, PromptTruncatedWarning

__all__ = ["DEFAULT_ATOL", "ExportError", "check_source", "export_pipeline"]

# Measured on the tiny test pipeline: fp32 max |onnx - torch| ~5e-6; fp16 graphs vs the fp32 module ~3e-3.
DEFAULT_ATOL = {"float32": 1e-3, "float16": 2e-2}
MIN_OPSET = 14  # scaled_dot_product_attention
REQUIRED = ("model_index.json", "unet", "text_encoder", "vae", "tokenizer", "scheduler")
EXPECTED_CLASSES = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel", "vae": "AutoencoderKL"}
SDXL_CLASSES = {"text_encoder_2": "CLIPTextModelWithProjection"}  # beside EXPECTED_CLASSES, with tokenizer_2
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_TOKENIZER_CHECK = ["a photo of an astronaut riding a horse on mars", "A Cat, DETAILED; 8k!!! (masterpiece:1.2)",
                    "", "  extra   spaces\tand\nnewlines  ", "café naïve 3.14 it's", " ".join(["castle"] * 90)]
_CONVERT_HINT = ("convert it in a trusted environment, e.g. `StableDiffusionPipeline.from_pretrained(SRC)"
                 ".save_pretrained(DIR, safe_serialization=True)`, then export DIR")


def _resolve_source(src: str | Path, log: Callable[[str], object]) -> Path:
    """A local pipeline folder or single-file checkpoint; a hub id is downloaded (safetensors only) into the Hugging
    Face cache."""
    path = Path(src).expanduser()
    if path.is_file() or path.is_dir():
        return path
    text = str(src)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ExportError(f"source folder not found: {src}")
    log(f"{src}: not a local folder, fetching it from the Hugging Face Hub (safetensors only)")
    try:
        from diffusers import DiffusionPipeline

        # Components passed as None are not downloaded: the safety checker alone is over 1 GB.
        return Path(DiffusionPipeline.download(text, use_safetensors=True, safety_checker=None,
                                               feature_extractor=None))
    except Exception as exc:  # network, auth and missing-file errors all land here
        raise ExportError(f"{src!r} is not a local folder and could not be fetched from the Hugging Face Hub "
                          f"(offline? download it and pass the folder): {first_line(exc)}") from None


def _weights(component: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in component.iterdir() if p.is_file()]
    safe = [p for p in files if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json")]
    return safe, pickles


def _check_component(folder: Path, name: str, index: dict) -> None:
    """A model part: the class we export, a config.json and safetensors weights (never pickle)."""
    expected, declared = {**EXPECTED_CLASSES, **SDXL_CLASSES}[name], index.get(name, [None, None])[-1]
    if declared not in (expected, None):
        raise ExportError(f"{name} is a {declared}; the exporter supports {expected} (SD 1.x/2.x, SDXL)")
    if not (folder / name / "config.json").is_file():
        raise ExportError(f"{folder / name} has no config.json")
    safe, pickles = _weights(folder / name)
    if not safe and pickles:
        raise ExportError(f"{folder / name} has only pickle weights ({pickles[0].name}); pickle checkpoints are "
                          f"not loaded because unpickling can run arbitrary code: {_CONVERT_HINT}")
    if not safe:
        raise ExportError(f"{folder / name} has no weights (*.safetensors)")


def check_source(folder: Path) -> dict:
    """Refuse what cannot be exported, naming what is missing; returns model_index.json."""
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if missing:
        raise ExportError(f"{folder} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")
    index = read_json(folder / "model_index.json")
    if index.get("text_encoder", [None, None])[-1] is None and "text_encoder_2" in index:
        raise ExportError(f"{folder} has no first text encoder (an SDXL refiner?); the exporter supports SD 1.x/2.x "
                          "and SDXL base pipelines")
    xl = index.get("text_encoder_2", [None, None])[-1] is not None
    if xl:
        missing = [name for name in ("text_encoder_2", "tokenizer_2") if not (folder / name).exists()]
        if missing:
            raise ExportError(f"{folder} is an SDXL pipeline but is missing {', '.join(missing)}")
    for name in (*EXPECTED_CLASSES, *(SDXL_CLASSES if xl else ())):
        _check_component(folder, name, index)
    for tok in (folder / "tokenizer", *([folder / "tokenizer_2"] if xl else [])):
        slow_files = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
        if not slow_files and not (tok / "tokenizer.json").is_file():
            raise ExportError(f"{tok} has neither vocab.json + merges.txt nor tokenizer.json")
    if not (folder / "scheduler/scheduler_config.json").is_file():
        raise ExportError(f"{folder / 'scheduler'} has no scheduler_config.json")
    return index


def scheduler_problem(folder: Path) -> str | None:
    """Why basinguard's runtime cannot run the pipeline's own scheduler as configured (e.g. Karras sigmas), or
    None. The export is still usable with another scheduler, so this is said before the minutes of exporting."""
    from basinguard.runtime.schedulers import SCHEDULERS, UnsupportedConfig, make_scheduler

    try:
        make_scheduler(read_json(folder / "scheduler/scheduler_config.json"), 10)
    except UnsupportedConfig as exc:
        return (f"the runtime cannot run this pipeline's scheduler as configured ({exc}); generate with another: "
                f"--scheduler {'|'.join(SCHEDULERS)}")
    except ValueError as exc:  # an option every scheduler reads: no --scheduler helps
        return f"the runtime cannot run this pipeline's scheduler config ({exc}), with any --scheduler"
    return None


def _variant(component: Path) -> str | None:
    """"fp16" when a component has only fp16-variant weights (a common hub layout); None otherwise."""
    names = [p.name for p in _weights(component)[0]]
    return "fp16" if names and all(".fp16." in n for n in names) else None


def _load_models(folder: Path) -> dict[str, Any]:
    """float32 torch modules, safetensors only (diffusers/transformers refuse pickle with use_safetensors=True)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    no_accelerate = {"low_cpu_mem_usage": False}  # diffusers otherwise nags that `accelerate` is missing
    # Eager attention: plain matmul/softmax ops, traced the same on every transformers version.
    loaders = {"text_encoder": (CLIPTextModel, {"attn_implementation": "eager"}),
               "unet": (UNet2DConditionModel, no_accelerate), "vae": (AutoencoderKL, no_accelerate)}
    if (folder / "text_encoder_2").is_dir():  # SDXL (check_source has checked its parts)
        loaders["text_encoder_2"] = (CLIPTextModelWithProjection, {"attn_implementation": "eager"})
    loaded = {}
    for name, (cls, extra) in loaders.items():
        try:
            model = cls.from_pretrained(folder / name, use_safetensors=True, variant=_variant(folder / name), **extra)
            loaded[name] = model.float().eval()  # fp16-variant weights load as saved; export from float32
        except Exception as exc:  # corrupt weights, config mismatches
            raise ExportError(f"cannot load {folder / name}: {first_line(exc)}") from None
    return loaded


def _torch_models(loaded: dict[str, Any], folder: Path) -> TorchModels:
    steps = read_json(folder / "scheduler/scheduler_config.json").get("num_train_timesteps", 1000)
    return TorchModels(loaded["text_encoder"], loaded["unet"], loaded["vae"], folder, int(steps),
                       loaded.get("text_encoder_2"))


def _write_tokenizer(src: Path, dst: Path, validate: bool, log: Callable[[str], object]) -> dict:
    """Copy the source tokenizer; add a tokenizer.json converted by CLIPTokenizerFast from the slow files."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    shutil.copytree(src, dst)
    slow_files = (src / "vocab.json").is_file() and (src / "merges.txt").is_file()
    try:
        if not (dst / "tokenizer.json").is_file():
            fast = CLIPTokenizerFast.from_pretrained(src, from_slow=True)
            fast.backend_tokenizer.save(str(dst / "tokenizer.json"))
        ours = PromptTokenizer.from_folder(dst)
        reference = (CLIPTokenizer if slow_files else CLIPTokenizerFast).from_pretrained(src) if validate else None
    except Exception as exc:  # transformers and tokenizers raise assorted errors on bad tokenizer files
        raise ExportError(f"cannot convert the tokenizer in {src}: {first_line(exc)}") from None
    if reference is None:
        return {"max_length": ours.max_length}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours.encode(_TOKENIZER_CHECK).tolist()
    want = reference(_TOKENIZER_CHECK, padding="max_length", max_length=ours.max_length, truncation=True).input_ids
    bad = [p for p, g, w in zip(_TOKENIZER_CHECK, got, want, strict=True) if g != w]
    if bad:
        raise ExportError(f"tokenizer check failed: basinguard's tokenizer and {type(reference).__name__} disagree "
                          f"on {bad[0]!r}")
    log(f"  tokenizer: {len(got)} prompts tokenized as {type(reference).__name__} does")
    return {"max_length": ours.max_length, "reference": type(reference).__name__, "prompts_checked": len(got)}


def _copy_static(folder: Path, tmp: Path, validate: bool, log: Callable[[str], object]) -> dict:
    shutil.copy2(folder / "model_index.json", tmp / "model_index.json")
    (tmp / "scheduler").mkdir()
    shutil.copy2(folder / "scheduler/scheduler_config.json", tmp / "scheduler/scheduler_config.json")
    names = ("tokenizer", "tokenizer_2") if (folder / "text_encoder_2").is_dir() else ("tokenizer",)
    return {name: _write_tokenizer(folder / name, tmp / name, validate, log) for name in names}


@dataclass
class _Options:
    fp16: bool
    opset: int
    atol: float | None
    validate: bool
    log: Callable[[str], object]


def _trace(spec: GraphSpec, raw: Path, opts: _Options) -> str | None:
    """Trace the graph to `raw`; returns how float16 was made (None for a float32 graph)."""
    if not spec.half:
        trace_to_onnx(spec, raw, opts.opset, half=False)
        return None
    try:
        trace_to_onnx(spec, raw, opts.opset, half=True)
        return "torch_half"
    except ExportError as exc:  # e.g. "... not implemented for 'Half'" where torch lacks CPU float16 kernels
        opts.log(f"  {spec.name}: float16 tracing failed ({exc}); converting the float32 ONNX graph instead")
    trace_to_onnx(spec, raw, opts.opset, half=False)
    convert_to_half(raw, spec.name, spec.fixed_float32)
    return "onnxruntime_float16_conversion"


@dataclass
class _Traced:
    """A graph torch has traced to `raw`, and what is left to do without its torch module."""

    name: str
    dtype: str
    raw: Path
    config: Path
    dynamic_axes: dict[str, dict[int, str]]
    fp16_method: str | None
    expected: Expected | None  # torch's outputs on the validation cases


def _trace_graph(spec: GraphSpec, tmp: Path, opts: _Options) -> _Traced:
    """torch's part of one graph: the validation references, then the trace."""
    dtype = "float16" if spec.half else "float32"
    opts.log(f"exporting {spec.name} ({dtype})")
    expected = expected_outputs(spec, spec.half) if opts.validate else None
    raw = tmp / "_raw" / spec.name / "model.onnx"
    fp16_method = _trace(spec, raw, opts)
    pin_static_dims(spec, raw)
    return _Traced(spec.name, dtype, raw, spec.config, spec.dynamic_axes, fp16_method, expected)


def _finish_graph(traced: _Traced, tmp: Path, opts: _Options) -> dict:
    """Save, check and validate a traced graph (ONNX and ONNX Runtime only); returns its manifest entry."""
    final = tmp / traced.name / "model.onnx"
    final.parent.mkdir()
    save_checked(traced.raw, final)
    shutil.copy2(traced.config, final.parent / "config.json")
    entry = {"path": f"{traced.name}/model.onnx", "dtype": traced.dtype, **graph_io(final),
             "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in traced.dynamic_axes.items()}}
    if traced.fp16_method:
        entry["fp16_method"] = traced.fp16_method
    if traced.expected is not None:
        atol = DEFAULT_ATOL[traced.dtype] if opts.atol is None else opts.atol
        entry["validation"] = validate_graph(traced.expected, final, traced.dtype == "float16", atol, opts.log)
    return entry


def _export_graphs(specs: list[GraphSpec], tmp: Path, opts: _Options) -> dict[str, dict]:
    """Export the graphs in order, emptying `specs`: once a graph is traced, its spec (and with it the torch module,
    when nothing else holds it) is freed before onnx re-saves and ONNX Runtime loads the exported weights. Peak
    memory is then about one model's weights held twice, not every model's plus two more copies of the largest."""
    entries = {}
    while specs:
        traced = _trace_graph(specs.pop(0), tmp, opts)
        gc.collect()  # torch modules in reference cycles too
        entries[traced.name] = _finish_graph(traced, tmp, opts)
    return entries


def _versions() -> dict[str, str]:
    versions = {}
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "basinguard"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    if versions["basinguard"] == "unknown":
        import basinguard

        versions["basinguard"] = getattr(basinguard, "__version__", "unknown")
    return versions


def _check_lengths(tokenizers: dict[str, dict], models: TorchModels) -> None:
    """Each tokenizer pads to its text encoder's length (SDXL joins both encoders' states token by token)."""
    for name, tokenizer in tokenizers.items():
        encoder = "text_encoder" + name.removeprefix("tokenizer")
        positions = getattr(models, encoder).config.max_position_embeddings
        if tokenizer["max_length"] != positions:
            what = "the text encoder" if encoder == "text_encoder" else encoder
            raise ExportError(f"the {name} pads to {tokenizer['max_length']} tokens but {what} takes {positions} "
                              f"(max_position_embeddings); fix {name}/tokenizer_config.json's model_max_length")


def _build(folder: Path, tmp: Path, opts: _Options, extras: Extras, configs: Path) -> dict:
    """Write everything but the manifest into `tmp`; returns the manifest's export part. `folder` is the diffusers
    source, `configs` where the configs, tokenizers and scheduler are copied from (`folder` itself, or a copy of
    its configs changed for a single file, a --vae or a --prediction-type)."""
    tokenizers = _copy_static(configs, tmp, opts.validate, opts.log)
    loaded = {} if extras.single is not None else _load_models(folder)
    if extras.any:
        loaded = assemble(loaded, configs, extras, opts.log)
    models = _torch_models(loaded, configs)
    del loaded
    _check_lengths(tokenizers, models)
    family, size_multiple = models.family, _unet_size_multiple(models.unet)
    specs = build_specs(models, opts.fp16)
    del models  # each torch module is now held by its spec alone, and freed once its graph is traced
    entries = _export_graphs(specs, tmp, opts)
    shutil.rmtree(tmp / "_raw")
    validation = {name: e.pop("validation") for name, e in entries.items() if "validation" in e}
    validation |= tokenizers
    sources = {"sources": sources_record(extras)} if extras.any else {}
    return {"versions": _versions(), "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            "opset": opts.opset, "fp16": opts.fp16, "model_family": family,
            "latent_size_multiple": size_multiple,
            "models": entries, "validation": validation if opts.validate else None, **sources}


def max_opset() -> int:
    """The highest opset the exporter basinguard uses writes."""
    from torch.onnx import _constants  # private, but the only place torch states it

    # The TorchScript exporter (dynamo=False, graphs.trace_to_onnx) has its own, lower ceiling than torch.onnx's.
    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 20)))


def export_pipeline(src: str | Path, out: Path, *, fp16: bool = False, opset: int = 17, atol: float | None = None,
                    validate: bool = True, log: Callable[[str], object] = print, check_memory: bool = True,
                    config: str | Path | None = None, prediction_type: str | None = None, allow_pickle: bool = False,
                    loras: Sequence[LoraSpec | str] = (), vae: str | Path | None = None,
                    quantize: str | None = None) -> dict:
    """Export the diffusers pipeline `src` (folder or hub id) or the single-file checkpoint `src` to the ONNX folder
    `out`; returns the manifest.

    Only safetensors weights are loaded (a pickled single file with `allow_pickle`, weights-only). `fp16` exports
    the text encoder and UNet in float16 (the UNet's timestep stays float32) and keeps the VAE decoder in float32,
    as SD VAEs overflow in float16.

    A single file (SD 1.x, SD 2.x, SDXL base in the original layout) is configured from `config` (a diffusers
    folder) or the published configs basinguard ships, with the scheduler's `prediction_type` overridden where
    given (SD 2.x needs one or a `config`); see `basinguard.export.single_file`. `loras` (LoraSpec or "FILE[:WEIGHT]")
    are fused into the UNet and text encoders, `vae` (a .safetensors file or a diffusers folder) replaces the VAE;
    basinguard.json's `sources` then records what went in (names, SHA-256, weights).

    Validation: each model is run by ONNX Runtime CPU and by its float32 torch module on random inputs (batch 2
    and 3, non-square latents). An output passes when max |onnx - torch| <= atol * max(1, max |torch|):
    absolute for outputs within [-1, 1], relative to the peak for larger ones (CLIP's hidden states reach ~30).
    Default atol: 1e-3 for float32 graphs (the tiny test models measure <= 5e-6), 2e-2 for float16 graphs
    (~3e-3 measured; ~8e-3 for the UNet through the onnxruntime conversion fallback). A float16 graph that
    ONNX Runtime's CPU provider cannot run is reported through `log` and not validated.

    `quantize` ("int8") stores the UNet's MatMul weights as int8 for ONNX Runtime's CPU provider, after the fp32
    UNet is validated against torch; its deviation from the fp32 graph is recorded (`basinguard.export.quantize`).

    `out` must not exist or be empty; it appears only when everything succeeded (the work happens in a hidden
    sibling folder renamed at the end). Raises ExportError with a one-line message on any failure, and before
    any model loads where the export's estimated peak memory exceeds what is available (`check_memory=False`
    skips that check; see `basinguard.export.memory`).
    """
    if quantize is not None:
        if quantize not in QUANTIZE_MODES:
            raise ExportError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        if fp16:
            raise ExportError(f"--fp16 and --quantize {quantize} do not go together: the int8 UNet is made from the "
                              "float32 one, for ONNX Runtime's CPU provider; float16 is for GPUs")
    if atol is not None and not atol >= 0:
        raise ExportError(f"atol must be a number >= 0, got {atol}")
    highest = max_opset()
    if not MIN_OPSET <= opset <= highest:  # checked before any model loads: torch fails late, after a graph dump
        raise ExportError(f"opset must be in [{MIN_OPSET}, {highest}] (got {opset}): attention exports need "
                          f">= {MIN_OPSET}, and this torch exports up to {highest}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ExportError(f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    extras = Extras([parse_lora(x) if isinstance(x, str) else x for x in loras],
                    Path(vae).expanduser() if vae is not None else None)
    for spec in extras.loras:
        check_lora_file(spec)
    if extras.vae is not None:
        check_vae_source(extras.vae)
    out = Path(out)
    folder = _resolve_source(src, log)
    with tempfile.TemporaryDirectory(prefix="basinguard-export-configs-") as work:
        if folder.is_file():
            extras.single = prepare_single_file(folder, Path(work), config=Path(config) if config else None,
                                                prediction_type=prediction_type, allow_pickle=allow_pickle)
            configs = extras.single.config_folder
            index = read_json(configs / "model_index.json")
            counts: Path | dict[str, int] = extras.single.info.part_parameters()
        else:
            if config is not None or allow_pickle:
                flag = "--config" if config is not None else "--allow-pickle"
                raise ExportError(f"{flag} applies to a single-file checkpoint; {src} is a diffusers folder, whose "
                                  "own configs are used")
            index = check_source(folder)
            configs, counts = folder, folder
            if extras.vae is not None or prediction_type is not None:  # configs to change: a copy of them
                configs = copy_configs(folder, Path(work) / "config")
                if prediction_type is not None:
                    scheduler = configs / "scheduler/scheduler_config.json"
                    scheduler.write_text(json.dumps({**read_json(scheduler), "prediction_type": prediction_type},
                                                    indent=2) + "\n", encoding="utf-8")
        xl = index.get("text_encoder_2", [None, None])[-1] is not None
        for spec in extras.loras:  # readable, and for this family's parts, before the model loads
            lora_modules(pipeline_class("sdxl" if xl else "sd1"), spec, xl)
        problem = scheduler_problem(configs)
        if problem:
            log(f"warning: {problem}")
        if check_memory:  # before minutes of loading and tracing end in the kernel's OOM kill
            estimate = check_export_memory(counts, fp16)
            if quantize is not None:  # at the end, once torch's modules are freed: it stands alone
                check_quantize_memory(4 * estimate.parameters["unet"])
            log(f"memory: the export needs about {estimate.peak / GIB:.1f} GiB ({estimate.describe()})")
        with output_folder(out) as tmp:
            manifest = {"format": "basinguard-onnx", "format_version": 1, "source": str(src),
                        "pipeline_class": index.get("_class_name"),
                        **_build(folder, tmp, _Options(fp16, opset, atol, validate, log), extras, configs)}
            if quantize is not None:
                manifest["models"]["unet"]["quantization"] = quantize_unet(
                    tmp / "unet", log, multiple=manifest["latent_size_multiple"])
            (tmp / "basinguard.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out}")
    return manifest
