"""Single-file checkpoints in the original (LDM/SGM) layout: SD 1.x, SD 2.x and SDXL base, as A1111, ComfyUI and
the model hubs pass them around.

The family is read from the checkpoint's tensor names (which text encoders it holds) before anything loads; the
parts are configured from `--config` (a diffusers folder: only its configs, tokenizers and scheduler are read) or
from the published configs basinguard ships (`basinguard.export.configs`), and loaded by diffusers'
`from_single_file` with those configs, offline. basinguard has no key mapping of its own: diffusers converts.

Safetensors files are inspected from their header alone (names, shapes, byte offsets), so a truncated file, a file
that is no checkpoint, a family basinguard does not export, or a checkpoint the configs do not fit is one line
before any weights are read. Pickled checkpoints (.ckpt, .pt, .bin, .pth) can run code when unpickled: they are
refused unless `allow_pickle`, and then loaded with torch's weights-only unpickler.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basinguard.export.configs import DESCRIPTIONS, write_config_folder
from basinguard.export.errors import ExportError, first_line

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each part lives in an original-layout checkpoint, for counting parameters and naming what is missing.
PART_PREFIXES = {"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,),
                 "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
                 "text_encoder_2": ("conditioner.embedders.1.",)}
FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class CheckpointInfo:
    """What a checkpoint file holds, read without loading its weights (safetensors) or weights-only (pickle)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    nbytes: int  # the tensors' bytes as stored
    pickled: bool
    metadata: dict[str, str]

    def part_parameters(self) -> dict[str, int]:
        """Parameter count per part (unet, vae, text_encoder, text_encoder_2) by where its tensors live."""
        counts: dict[str, int] = {}
        for name, shape in self.shapes.items():
            part = next((p for p, heads in PART_PREFIXES.items() if name.startswith(heads)), None)
            if part is not None:
                counts[part] = counts.get(part, 0) + _count(shape)
        return counts


def _safetensors_info(path: Path) -> CheckpointInfo:
    size = path.stat().st_size
    try:
        with path.open("rb") as stream:
            raw = stream.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20 or length + 8 > size:
                raise ValueError("no safetensors header at its start")
            header = json.loads(stream.read(length))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        shapes = {name: tuple(int(d) for d in entry["shape"]) for name, entry in header.items()}
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as exc:
        raise ExportError(f"{path} is not a readable safetensors file ({exc}); export takes a .safetensors "
                          "checkpoint in the original layout or a diffusers pipeline folder") from None
    if 8 + length + end > size:
        raise ExportError(f"{path} is truncated: its header describes {8 + length + end:,} bytes, the file holds "
                          f"{size:,}; download or copy it again")
    nbytes = sum(_DTYPE_BYTES.get(entry.get("dtype", "F32"), 4) * _count(shape)
                 for entry, shape in zip(header.values(), shapes.values()))
    return CheckpointInfo(path, shapes, nbytes, False, {str(k): str(v) for k, v in metadata.items()})


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def load_pickled_state(path: Path) -> dict[str, Any]:
    """A pickled checkpoint's tensors by torch's weights-only unpickler (no code runs), unwrapped from
    "state_dict" as diffusers does."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # a truncated file, a pickle with code in it, not a torch file at all
        raise ExportError(f"cannot load {path} with torch's weights-only unpickler: {first_line(exc)}") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExportError(f"{path} holds a {type(state).__name__}, not a checkpoint's tensors")
    return state


def _is_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def inspect_checkpoint(path: Path, allow_pickle: bool) -> CheckpointInfo:
    """The tensors' names and shapes; refuses pickles unless `allow_pickle`."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ExportError(f"{path} is a pickle checkpoint, which can run code when loaded; pass --allow-pickle to "
                              "load its tensors with torch's weights-only unpickler, or use a .safetensors file")
        import torch

        state = load_pickled_state(path)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return CheckpointInfo(path, {k: tuple(v.shape) for k, v in tensors.items()},
                              sum(v.numel() * v.element_size() for v in tensors.values()), True, {})
    return _safetensors_info(path)


def checkpoint_family(info: CheckpointInfo) -> str:
    """"sd1", "sd2" or "sdxl" from which text encoders the checkpoint holds; anything else is one line."""
    names = info.shapes
    where = info.path
    unet_in = names.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if unet_in is None:
        diffusers_like = any(n.startswith(("down_blocks.", "unet.", "text_model.", "encoder.down_blocks.")) for n in names)
        hint = (" (its names are diffusers'; export the diffusers folder it came from)" if diffusers_like else "")
        raise ExportError(f"{where} is not a Stable Diffusion checkpoint in the original layout: it has no "
                          f"{UNET_PREFIX}* tensors{hint}; export takes SD 1.x, SD 2.x or SDXL base checkpoints")
    if "edm_mean" in names or "edm_vpred" in names:
        raise ExportError(f"{where} is an EDM model (Playground v2.5 and the like); export takes SD 1.x, SD 2.x or "
                          "SDXL base checkpoints")
    if len(unet_in) != 4 or unet_in[1] != 4:
        channels = unet_in[1] if len(unet_in) == 4 else "?"
        raise ExportError(f"{where}'s UNet takes {channels} input channels (an inpainting or image-conditioned model); "
                          "export takes text-to-image checkpoints, whose UNet takes 4")
    has = {prefix: any(n.startswith(prefix) for n in names) for prefix in
           ("cond_stage_model.transformer.", "cond_stage_model.model.", "conditioner.embedders.0.transformer.",
            "conditioner.embedders.0.model.", "conditioner.embedders.1.model.")}
    if has["conditioner.embedders.0.transformer."] and has["conditioner.embedders.1.model."]:
        return "sdxl"
    if has["conditioner.embedders.0.model."]:
        raise ExportError(f"{where} is an SDXL refiner (one OpenCLIP text encoder); export takes SDXL base")
    if has["cond_stage_model.model."]:
        return "sd2"
    if has["cond_stage_model.transformer."]:
        return "sd1"
    raise ExportError(f"{where} has a UNet but no text encoder basinguard knows (cond_stage_model.* for SD 1.x/2.x, "
                      "conditioner.embedders.* for SDXL); export takes SD 1.x, SD 2.x or SDXL base checkpoints")


def shipped_config_name(family: str, prediction_type: str | None, path: Path) -> str:
    """The published config a family is configured from when no --config is given."""
    if family == "sd1":
        return "sd15"
    if family == "sdxl":
        return "sdxl"
    if prediction_type is None:
        raise ExportError(f"{path} is an SD 2.x checkpoint, whose tensors do not say what its UNet predicts: pass "
                          "--prediction-type epsilon (SD 2.x-base, 512²) or v_prediction (SD 2.x 768-v, 768²), or "
                          "--config with its diffusers configs")
    return "sd21-base" if prediction_type == "epsilon" else "sd21-768v"


def _read_config(folder: Path, part: str) -> dict[str, Any]:
    path = folder / part / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path} is not a JSON object")
    return config


def _blocks(names: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m[1] for n in names if (m := pattern.match(n))})


def fit_problems(info: CheckpointInfo, family: str, folder: Path) -> list[str]:
    """Where the checkpoint's tensor shapes disagree with the configs in `folder` (a few telling shapes per part,
    read from the header: diffusers' own load would fail later and less clearly)."""
    names, problems = info.shapes, []
    unet = _read_config(folder, "unet")
    channels = unet.get("block_out_channels", [])
    conv_in = names.get(UNET_PREFIX + "input_blocks.0.0.weight", ())
    if channels and conv_in[:1] != (channels[0],):
        problems.append(f"its UNet's first block has {conv_in[0]} channels, the config {channels[0]}")
    per_block = unet.get("layers_per_block", 2)
    if channels and isinstance(per_block, int):
        want, got = len(channels) * (per_block + 1), _blocks(names, UNET_PREFIX + "input_blocks.")
        if got != want:
            problems.append(f"its UNet has {got} input blocks, the config {want} ({len(channels)} blocks of "
                            f"{per_block} layers)")
    to_k = next((shape for n, shape in names.items() if n.startswith(UNET_PREFIX) and n.endswith("attn2.to_k.weight")),
                None)
    if to_k is not None and "cross_attention_dim" in unet and to_k[1] != unet["cross_attention_dim"]:
        problems.append(f"its UNet's cross-attention takes {to_k[1]} features, the config "
                        f"{unet['cross_attention_dim']}")
    vae = _read_config(folder, "vae")
    vae_in = names.get(VAE_PREFIX + "decoder.conv_in.weight")
    if vae_in is not None and vae.get("block_out_channels") and vae_in[0] != vae["block_out_channels"][-1]:
        problems.append(f"its VAE decoder starts at {vae_in[0]} channels, the config {vae['block_out_channels'][-1]}")
    encoders = {"sd1": {"text_encoder": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"},
                "sd2": {"text_encoder": "cond_stage_model.model.token_embedding.weight"},
                "sdxl": {"text_encoder":
                         "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                         "text_encoder_2": "conditioner.embedders.1.model.token_embedding.weight"}}[family]
    for part, name in encoders.items():
        config, shape = _read_config(folder, part), names.get(name)
        if shape is not None and tuple(shape) != (config.get("vocab_size"), config.get("hidden_size")):
            problems.append(f"its {part} embeds {shape[0]} tokens in {shape[1]} features, the config "
                            f"{config.get('vocab_size')} in {config.get('hidden_size')}")
    return problems


@dataclass
class SingleFileSource:
    """A checkpoint ready to load: its family, the config folder diffusers reads, and where that came from."""

    info: CheckpointInfo
    family: str
    config_folder: Path  # a diffusers folder's configs, tokenizers and scheduler
    config_origin: str  # "shipped sd15" or the --config folder
    prediction_type: str


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.pth", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5",
                   "*.index.json")


def copy_configs(src: Path, dest: Path) -> Path:
    """A diffusers folder's configs, tokenizers and scheduler, without its weights (gigabytes, and not read)."""
    import shutil

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*WEIGHT_PATTERNS))
    return dest


def _config_index(folder: Path, family: str) -> dict[str, Any]:
    from basinguard.model_format import read_json

    needed = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer",
              "scheduler/scheduler_config.json"]
    if family == "sdxl":
        needed += ["text_encoder_2/config.json", "tokenizer_2"]
    missing = [n for n in needed if not (folder / n).exists()]
    if missing:
        raise ExportError(f"--config {folder} is not a diffusers folder for this {FAMILIES[family]} checkpoint: "
                          f"missing {', '.join(missing)}")
    return read_json(folder / "model_index.json")


def prepare_single_file(path: Path, work: Path, *, config: Path | None, prediction_type: str | None,
                        allow_pickle: bool) -> SingleFileSource:
    """Inspect `path`, find its family and the configs it loads with (written into `work` when shipped ones are
    used, or `config` with the scheduler's prediction type overridden in a copy), and check they fit."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ExportError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    info = inspect_checkpoint(path, allow_pickle)
    family = checkpoint_family(info)
    if config is None:
        name = shipped_config_name(family, prediction_type, path)
        folder = write_config_folder(name, work / "config", prediction_type)
        origin = f"shipped {name} ({DESCRIPTIONS[name]})"
    else:
        if not config.is_dir():
            raise ExportError(f"--config {config} is not a folder (a diffusers pipeline folder with the model's configs)")
        index = _config_index(config, family)
        is_xl = index.get("text_encoder_2", [None, None])[-1] is not None
        if is_xl != (family == "sdxl"):
            what = "an SDXL" if is_xl else "an SD 1.x/2.x"
            raise ExportError(f"--config {config} is {what} pipeline but {path} is an {FAMILIES[family]} checkpoint")
        folder, origin = copy_configs(config, work / "config"), str(config)
        if prediction_type is not None:
            scheduler = folder / "scheduler/scheduler_config.json"
            settings = json.loads(scheduler.read_text(encoding="utf-8"))
            scheduler.write_text(json.dumps({**settings, "prediction_type": prediction_type}, indent=2) + "\n",
                                 encoding="utf-8")
    problems = fit_problems(info, family, folder)
    if problems:
        where = f"the configs in --config {config}" if config else f"the {origin.removeprefix('shipped ')} configs"
        advice = ("" if config else "; pass --config DIFFUSERS_FOLDER holding this model's configs")
        raise ExportError(f"{path} does not fit {where}: {'; '.join(problems)}{advice}")
    chosen = json.loads((folder / "scheduler/scheduler_config.json").read_text(encoding="utf-8"))
    return SingleFileSource(info, family, folder, origin, str(chosen.get("prediction_type", "epsilon")))


def pipeline_class(family: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def load_single_file(source: SingleFileSource, components: Mapping[str, Any],
                     log: Callable[[str], object]) -> Any:
    """The diffusers pipeline `from_single_file` makes of the checkpoint with `source.config_folder`'s configs,
    offline and in float32; `components` (e.g. a replacement VAE) are used as given, not read from the file."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    if "vae" not in components and not any(name.startswith(VAE_PREFIX) for name in source.info.shapes):
        raise ExportError(f"{source.info.path} has no VAE ({VAE_PREFIX}* tensors); pass --vae FILE_OR_FOLDER with "
                          "the VAE it was trained with")
    cls = pipeline_class(source.family)
    log(f"loading {source.info.path.name} ({FAMILIES[source.family]}, configs: {source.config_origin})")
    extra: dict[str, Any] = {}
    if source.family != "sdxl":
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    bar = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a bar per part on stderr, between the export's own lines
    try:  # a pickle is unpickled weights-only by from_single_file too
        pipe = cls.from_single_file(str(source.info.path), config=str(source.config_folder), local_files_only=True,
                                    torch_dtype=torch.float32, **extra, **components)
    except Exception as exc:  # shapes that do not fit, missing tensors, a corrupt file
        raise ExportError(f"cannot load {source.info.path} with diffusers' from_single_file: {first_line(exc)}") \
            from None
    finally:
        if bar:
            diffusers_logging.enable_progress_bar()
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is None:
            continue
        empty = [name for name, p in module.named_parameters() if p.device.type == "meta"]
        if empty:
            raise ExportError(f"{source.info.path} lacks {len(empty)} of {part}'s tensors (e.g. {empty[0]}): a pruned "
                              "or damaged checkpoint, or configs of another model")
    return pipe
