"""An exported model folder (ours or optimum's): its parts, configs and sampling defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from basinguard.runtime.errors import InputError, ModelFolderError

REQUIRED = ("text_encoder/model.onnx", "unet/model.onnx", "vae_decoder/model.onnx", "tokenizer",
            "scheduler/scheduler_config.json")
MAX_SIDE = 4096  # pixels; beyond this the latent buffers alone exceed any sane memory budget


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"corrupt JSON in {path}: {exc}") from None


@dataclass
class ModelFolder:
    path: Path
    scheduler_config: dict
    unet_config: dict
    vae_config: dict
    manifest: dict = field(default_factory=dict)  # basinguard.json: export record and sampling defaults

    @classmethod
    def open(cls, path: Path) -> ModelFolder:
        path = Path(path)
        if not path.is_dir():
            raise ModelFolderError(f"model folder not found: {path}")
        missing = [p for p in REQUIRED if not (path / p).exists()]
        if missing:
            raise ModelFolderError(f"model folder {path} is missing {', '.join(missing)} "
                                   "(export a diffusers pipeline with `basinguard export SRC OUT`)")
        manifest = read_json(path / "basinguard.json") if (path / "basinguard.json").exists() else {}
        return cls(path, read_json(path / "scheduler/scheduler_config.json"), read_json(path / "unet/config.json"),
                   read_json(path / "vae_decoder/config.json"), manifest)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet_config.get("in_channels", 4))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's and the UNet's downsampling together."""
        unet_down = 2 ** (len(self.unet_config.get("block_out_channels", [0])) - 1)
        return self.vae_scale_factor * unet_down

    @property
    def default_size(self) -> int:
        return int(self.unet_config.get("sample_size", 64)) * self.vae_scale_factor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def sampling_defaults(self) -> dict:
        """Defaults the model carries (guidance scale, scheduler, steps, τ…), used where no flag says otherwise."""
        return dict(self.manifest.get("sampling_defaults", {}))

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        for side, value in (("height", height), ("width", width)):
            if value % m or not m <= value <= MAX_SIDE:
                raise InputError(f"{side} {value} not allowed: must be a multiple of {m} in [{m}, {MAX_SIDE}] "
                                       f"for this model (its native size is {self.default_size})")
