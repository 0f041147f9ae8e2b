"""What an export is made from beyond a plain diffusers folder: a single-file checkpoint, LoRAs fused in, another
VAE. Here the torch modules are assembled into a diffusers pipeline, changed, and handed to the exporter; and what
went in is recorded (file names, SHA-256, weights) for basinguard.json's `sources`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from basinguard.export.errors import ExportError, first_line
from basinguard.export.lora import LoraSpec, fuse_loras
from basinguard.export.single_file import PICKLE_SUFFIXES, SingleFileSource, load_single_file, pipeline_class
from basinguard.files import digest_memo, file_digests


def sha256(path: Path) -> str:
    """The file's SHA-256, remembered in the user cache (a multi-GB checkpoint is read once per change)."""
    return file_digests([path], digest_memo())[0]


@dataclass
class Extras:
    """LoRAs and a VAE to apply, and the single-file source if the model is one."""

    loras: list[LoraSpec] = field(default_factory=list)
    vae: Path | None = None
    single: SingleFileSource | None = None

    @property
    def any(self) -> bool:
        return bool(self.loras) or self.vae is not None or self.single is not None


def check_vae_source(vae: Path) -> None:
    if not vae.exists():
        raise ExportError(f"--vae {vae}: no such file or folder")
    if vae.is_file() and vae.suffix.lower() in PICKLE_SUFFIXES:
        raise ExportError(f"--vae {vae} is a pickle file, which can run code when loaded; use a .safetensors file or "
                          "a diffusers VAE folder")
    if vae.is_dir() and not ((vae / "config.json").is_file() or (vae / "vae/config.json").is_file()):
        raise ExportError(f"--vae {vae} is a folder without config.json (nor vae/config.json): a diffusers "
                          "AutoencoderKL folder, or a pipeline folder with vae/, or a .safetensors file")


def load_vae(vae: Path, config_folder: Path) -> Any:
    """A float32 AutoencoderKL from a diffusers folder (its own config) or a .safetensors file: diffusers-named
    tensors load into `config_folder`'s VAE config as they are, original-layout ones through diffusers'
    `from_single_file` with that config."""
    import torch
    from diffusers import AutoencoderKL

    from basinguard.export.single_file import inspect_checkpoint

    try:
        if vae.is_dir():
            sub = {} if (vae / "config.json").is_file() else {"subfolder": "vae"}
            model = AutoencoderKL.from_pretrained(vae, use_safetensors=True, low_cpu_mem_usage=False, **sub)
        else:
            names = inspect_checkpoint(vae, allow_pickle=False).shapes
            if any(n.startswith("decoder.up_blocks.") for n in names):  # diffusers' own names
                from safetensors.torch import load_file

                model = AutoencoderKL.from_config(AutoencoderKL.load_config(config_folder / "vae"))
                model.load_state_dict(load_file(str(vae)), strict=True)
            else:
                model = AutoencoderKL.from_single_file(str(vae), config=str(config_folder), subfolder="vae",
                                                       local_files_only=True, torch_dtype=torch.float32)
    except ExportError:
        raise
    except Exception as exc:  # shapes that do not fit the config, missing tensors, a corrupt file
        raise ExportError(f"--vae {vae} cannot be loaded as this model's VAE: {first_line(exc)}") from None
    empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise ExportError(f"--vae {vae} lacks {len(empty)} of the VAE's tensors (e.g. {empty[0]})")
    return model.float().eval()


def _scheduler(folder: Path) -> Any:
    import diffusers

    settings = json.loads((folder / "scheduler/scheduler_config.json").read_text(encoding="utf-8"))
    cls = getattr(diffusers, str(settings.get("_class_name")), diffusers.DDIMScheduler)
    return cls.from_config(settings)


def assemble(models: dict[str, Any], folder: Path, extras: Extras, log: Callable[[str], object]) -> dict[str, Any]:
    """The torch modules to export: from the single file (or `models`, a folder's), with the VAE replaced and the
    LoRAs fused. `folder` is the writable config folder the export copies configs from; the replaced VAE's config
    is written there."""
    vae = load_vae(extras.vae, folder) if extras.vae is not None else None
    if extras.single is not None:
        pipe = load_single_file(extras.single, {"vae": vae} if vae is not None else {}, log)
    else:
        xl = "text_encoder_2" in models
        parts = {**models, "tokenizer": None, "scheduler": _scheduler(folder)}
        if xl:
            parts |= {"tokenizer_2": None}
        else:
            parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if vae is not None:
            parts["vae"] = vae
        pipe = pipeline_class("sdxl" if xl else "sd1")(**parts)
    if vae is not None:
        log(f"  VAE from {extras.vae}")
        vae.save_config(folder / "vae")
    fuse_loras(pipe, extras.loras, log)
    names = ("text_encoder", "unet", "vae", "text_encoder_2")
    return {n: getattr(pipe, n).float().eval() for n in names if getattr(pipe, n, None) is not None}


def _vae_record(vae: Path) -> dict[str, Any]:
    if vae.is_file():
        return {"file": vae.name, "sha256": sha256(vae)}
    folder = vae if (vae / "config.json").is_file() else vae / "vae"
    weights = sorted(folder.glob("*.safetensors"))
    return {"folder": str(vae), "files": {p.name: sha256(p) for p in weights}}


def sources_record(extras: Extras) -> dict[str, Any]:
    """basinguard.json's `sources`: what the export was made from, by content."""
    record: dict[str, Any] = {}
    if extras.single is not None:
        single = extras.single
        record["checkpoint"] = {"file": single.info.path.name, "sha256": sha256(single.info.path),
                                "family": single.family, "configs": single.config_origin,
                                "prediction_type": single.prediction_type}
    record["loras"] = [{"file": spec.path.name, "sha256": sha256(spec.path), "weight": spec.weight}
                       for spec in extras.loras]
    record["vae"] = _vae_record(extras.vae) if extras.vae is not None else None
    return record
