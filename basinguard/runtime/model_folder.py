"""An exported model folder (ours or optimum's): its parts, configs, sampling defaults and identity (by content)."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from basinguard.files import digest_memo, file_digests
from basinguard.model_format import REQUIRED, SDXL_REQUIRED, model_family, read_json
from basinguard.runtime.errors import InputError, ModelFolderError
from basinguard.runtime.guidance import PolicyConfig, PolicyError
from basinguard.runtime.schedulers import SCHEDULERS, InvalidConfig, check_config

MAX_SIDE = 4096  # pixels; beyond this the latent buffers alone exceed any sane memory budget
MAX_LATENT_CHANNELS = 256  # SD uses 4, later families 16; far beyond, x_T alone would take gigabytes per image


# What each sampling default must be (the flag it stands in for); unknown keys are left to the commands.
_DEFAULT_TYPES: dict[str, type | tuple[type, ...]] = {
    "policy": str, "mitigation": str, "scheduler": str, "steps": int, "transition_t": int,
    "guidance_scale": (int, float), "pre_scale": (int, float), "opposite_scale": (int, float),
    "detect_threshold": (int, float), "latest_transition_t": int, "guidance_end_t": int,
}
# null: the model's own scheduler, the usual default (opposite_scale: λ; latest_transition_t: no fallback)
# sampling_defaults key -> PolicyConfig field
_POLICY_FIELDS = {"policy": "name", **{k: k for k in ("guidance_scale", "transition_t", "pre_scale", "opposite_scale",
                                                       "detect_threshold", "mitigation", "latest_transition_t",
                                                       "guidance_end_t")}}
_MAY_BE_UNSET = ("scheduler", "mitigation", "detect_threshold", "opposite_scale", "latest_transition_t",
                 "guidance_end_t")


def _positive_int(value: object, what: str, path: Path, most: int | None = None) -> int:
    """`value` as an int (1000.0 too) in [1, most], or a ModelFolderError naming the file and the field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or most is not None and value > most:
        bound = "a positive integer" if most is None else f"an integer in [1, {most}]"
        raise ModelFolderError(f"corrupt config {path}: {what} must be {bound}, not {value!r}")
    return value


def _levels(config: dict, path: Path, default: int) -> int:
    """How many resolution levels a UNet or VAE config's block_out_channels lists."""
    blocks = config.get("block_out_channels", [0] * default)
    if not isinstance(blocks, list) or not blocks:
        raise ModelFolderError(f"corrupt config {path}: block_out_channels must be a non-empty list, not {blocks!r}")
    return len(blocks)


@dataclass
class ModelFolder:
    path: Path
    scheduler_config: dict
    unet_config: dict
    vae_config: dict
    manifest: dict = field(default_factory=dict)  # basinguard.json: export record and sampling defaults
    model_index: dict = field(default_factory=dict)  # model_index.json: the diffusers pipeline's own settings

    @classmethod
    def open(cls, path: Path) -> ModelFolder:
        if not isinstance(path, str | os.PathLike):  # Path() would raise a TypeError from pathlib's depths
            raise ModelFolderError(f"a model folder is a path (str or Path), not {type(path).__name__}")
        path = Path(path)
        if not path.is_dir():
            raise ModelFolderError(f"model folder not found: {path}")
        missing = [p for p in REQUIRED if not (path / p).exists()]
        if missing:
            raise ModelFolderError(f"model folder {path} is missing {', '.join(missing)} "
                                   "(export a diffusers pipeline with `basinguard export SRC OUT`)")
        manifest = read_json(path / "basinguard.json") if (path / "basinguard.json").exists() else {}
        index = read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
        folder = cls(path, read_json(path / "scheduler/scheduler_config.json"), read_json(path / "unet/config.json"),
                     read_json(path / "vae_decoder/config.json"), manifest, index)
        if folder.family == "sdxl":
            missing = [p for p in SDXL_REQUIRED if not (path / p).exists()]
            if missing:
                raise ModelFolderError(f"model folder {path} is an SDXL model (its UNet takes text_embeds and "
                                       f"time_ids) but is missing {', '.join(missing)} (export the whole SDXL "
                                       "pipeline with `basinguard export SRC OUT`)")
        # Read every config value used later once now: a corrupt one is reported at open, naming its file.
        _ = (folder.default_image, folder.size_multiple, folder.latent_channels, folder.num_train_timesteps,
             folder.sampling_defaults, folder.latent_scaling, folder.force_zeros_for_empty_prompt,
             folder.latent_statistics)
        folder._check_sizes()
        where = path / "scheduler/scheduler_config.json"
        try:  # here, naming the file, rather than as a traceback or NaN image at the first step
            check_config(folder.scheduler_config)
        except InvalidConfig as exc:
            raise ModelFolderError(f"corrupt config {where}: {exc}") from None
        except ValueError as exc:  # a beta_schedule no scheduler here implements
            raise ModelFolderError(f"unsupported scheduler config {where}: {exc}") from None
        return folder

    @property
    def family(self) -> str:
        """The model family (`model_family`), from the UNet's config, which both our and optimum's exports carry."""
        return model_family(self.unet_config)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts ("epsilon", "v_prediction"), as the scheduler config says (diffusers' default)."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: with no negative prompt, e_∅ and its pooled embedding are zeros rather than the empty prompt's
        encoding (model_index.json; diffusers' default, true, where it does not say)."""
        value = self.model_index.get("force_zeros_for_empty_prompt", True)
        if not isinstance(value, bool):
            raise ModelFolderError(f"corrupt config {self.path / 'model_index.json'}: force_zeros_for_empty_prompt "
                                   f"must be true or false, not {value!r}")
        return self.family == "sdxl" and value

    @property
    def unet_quantization(self) -> str | None:
        """How the UNet's weights were quantized (`basinguard export --quantize`: "int8"), or None for a float one."""
        record = self.manifest.get("models", {}).get("unet", {}).get("quantization")
        return record.get("mode") if isinstance(record, dict) else None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (_levels(self.vae_config, self.path / "vae_decoder/config.json", 4) - 1)

    @property
    def latent_scaling(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor) of the VAE latents: the decoder gets latents / scaling + shift (diffusers')."""
        where = self.path / "vae_decoder/config.json"
        scale, shift = self.vae_config.get("scaling_factor", 0.18215), self.vae_config.get("shift_factor") or 0.0
        for name, value in (("scaling_factor", scale), ("shift_factor", shift)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
                    name == "scaling_factor" and value == 0):
                raise ModelFolderError(f"corrupt config {where}: {name} must be a finite number"
                                       f"{' other than 0' if name == 'scaling_factor' else ''}, not {value!r}")
        return float(scale), float(shift)

    @property
    def latent_statistics(self) -> tuple[np.ndarray, np.ndarray] | None:
        """SDXL VAEs that state per-channel latents_mean and latents_std: (mean, std), each (C, 1, 1), and diffusers'
        SDXL pipeline decodes latents * std / scaling + mean instead; None where not both are set, or for SD (whose
        pipeline ignores them)."""
        where = self.path / "vae_decoder/config.json"
        mean, std = self.vae_config.get("latents_mean"), self.vae_config.get("latents_std")
        if self.family != "sdxl" or mean is None or std is None:
            return None
        stats = []
        for name, value in (("latents_mean", mean), ("latents_std", std)):
            ok = isinstance(value, list) and len(value) == self.latent_channels and all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            if not ok:
                raise ModelFolderError(f"corrupt config {where}: {name} must be {self.latent_channels} finite numbers "
                                       f"(one per latent channel), not {value!r}")
            stats.append(np.asarray(value, np.float32).reshape(-1, 1, 1))
        return stats[0], stats[1]

    @property
    def latent_channels(self) -> int:
        return _positive_int(self.unet_config.get("in_channels", 4), "in_channels", self.path / "unet/config.json",
                             MAX_LATENT_CHANNELS)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's and the UNet's downsampling together."""
        unet_down = 2 ** (_levels(self.unet_config, self.path / "unet/config.json", 1) - 1)
        return self.vae_scale_factor * unet_down

    @property
    def default_image(self) -> tuple[int, int]:
        """The native (height, width) in pixels: the UNet's sample_size, an integer or [height, width] as diffusers
        writes it (basinguard.export.graphs reads it the same way; not imported here: it needs torch)."""
        where = self.path / "unet/config.json"
        size = self.unet_config.get("sample_size", 64)
        if isinstance(size, list) and len(size) == 2:
            h, w = (_positive_int(v, "sample_size", where) for v in size)
        elif isinstance(size, int | float) and not isinstance(size, bool):
            h = w = _positive_int(size, "sample_size", where)  # 64.0 too, as int() read it before
        else:
            raise ModelFolderError(f"corrupt config {where}: sample_size must be a positive integer or "
                                   f"[height, width], not {size!r}")
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def default_size(self) -> int:
        """The native image side; for a model with a non-square sample_size its height (see `default_image`)."""
        return self.default_image[0]

    @property
    def num_train_timesteps(self) -> int:
        return _positive_int(self.scheduler_config.get("num_train_timesteps", 1000), "num_train_timesteps",
                             self.path / "scheduler/scheduler_config.json")

    @property
    def sampling_defaults(self) -> dict:
        """Defaults the model carries (guidance scale, scheduler, steps, τ…), used where no flag says otherwise."""
        where = self.path / "basinguard.json"
        defaults = self.manifest.get("sampling_defaults", {})
        if not isinstance(defaults, dict):
            raise ModelFolderError(f"corrupt config {where}: sampling_defaults must be an object, not {defaults!r}")
        for key, value in defaults.items():  # a hand-edited "7" would otherwise fail deep inside a policy
            want = _DEFAULT_TYPES.get(key)
            if value is None and key in _MAY_BE_UNSET:
                continue
            if want is not None and (isinstance(value, bool) or not isinstance(value, want)):
                kind = {str: "text", int: "an integer"}.get(want, "a number")
                raise ModelFolderError(f"corrupt config {where}: sampling_defaults.{key} must be {kind}, not {value!r}")
        # Ranges too, here: a bad default would otherwise be reported as if the user had given a bad flag.
        if defaults.get("steps", 1) < 1:
            raise ModelFolderError(f"corrupt config {where}: sampling_defaults.steps must be >= 1, not {defaults['steps']}")
        if defaults.get("scheduler") is not None and defaults["scheduler"] not in SCHEDULERS:
            raise ModelFolderError(f"corrupt config {where}: sampling_defaults.scheduler {defaults['scheduler']!r} is not "
                                   f"one of {', '.join(SCHEDULERS)}")
        policy = {_POLICY_FIELDS[k]: v for k, v in defaults.items() if k in _POLICY_FIELDS and v is not None}
        if policy.get("name") == "auto":
            policy.setdefault("detect_threshold", 0.0)  # auto's threshold may come from a flag or a calibration
        try:
            PolicyConfig(**policy).validate(self.num_train_timesteps)
        except PolicyError as exc:
            raise ModelFolderError(f"corrupt config {where}: sampling_defaults: {exc}") from None
        return dict(defaults)

    def _check_sizes(self) -> None:
        """The VAE factor, size multiple and native size the configs give must lie within MAX_SIDE pixels: otherwise
        every run is refused with a size error that blames --height/--width, or states an empty range."""
        for part, key, what, value in (
                ("vae_decoder", "block_out_channels", "a VAE scale factor", self.vae_scale_factor),
                ("unet", "block_out_channels", "a size multiple", self.size_multiple),
                ("unet", "sample_size", "a native image side", max(self.default_image))):
            if value > MAX_SIDE:
                raise ModelFolderError(f"corrupt config {self.path / part / 'config.json'}: its {key} gives {what} "
                                       f"of {value} pixels, beyond the {MAX_SIDE} an image side may have")

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        for side, value in (("height", height), ("width", width)):
            if value % m or not m <= value <= MAX_SIDE:
                raise InputError(f"{side} {value} not allowed: must be a multiple of {m} in [{m}, {MAX_SIDE}] "
                                       f"for this model (its native size is {self.default_size})")


def _model_files(folder: Path) -> list[Path]:
    """The files that make a model folder's images: basinguard.json, each part's ONNX files (with external data)
    and JSON configs, the scheduler config and the tokenizer. Not caches a backend writes beside them, such as the
    CPU's fused-attention graph, or a CPU run would make every earlier job on the folder "another model"."""
    from basinguard.engine.base import onnx_files  # the same rule the TensorRT plan key uses

    files = [folder / "basinguard.json"]
    for part in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        if (folder / part).is_dir():  # text_encoder_2: SDXL only
            files += [*onnx_files(folder / part / "model.onnx"), *sorted((folder / part).glob("*.json"))]
    if (folder / "model_index.json").is_file() and (folder / "text_encoder_2").is_dir():  # force_zeros_for_empty_prompt
        files.append(folder / "model_index.json")
    for part in ("scheduler", "tokenizer", "tokenizer_2"):
        files += sorted(p for p in (folder / part).glob("*") if not p.name.startswith("."))
    return [f for f in files if f.is_file()]


def model_identity(folder: Path) -> dict:
    """A model folder's identity: its path, and a hash of its files' content (`_model_files`), so a copied, moved
    or reinstalled folder is the same model and a re-exported one is not. File hashes are remembered in the user's
    cache (`files.digest_memo`): a multi-GB UNet is read once per change."""
    folder = Path(folder).resolve()
    files = _model_files(folder)
    h = hashlib.sha256()
    for f, digest in zip(files, file_digests(files, digest_memo())):
        h.update(f"{f.relative_to(folder).as_posix()}:{digest}\n".encode())
    return {"path": str(folder), "id": h.hexdigest()[:16]}


def accepted_model_ids(identity: dict) -> set[str]:
    """The ids that name this model in manifests and calibrations: its own, and the one basinguard recorded before
    ids were content hashes (basinguard.json's bytes and each part's file sizes and mtimes), so jobs and
    calibrations made then still match while those files are untouched."""
    from basinguard.engine.base import onnx_files

    folder = Path(identity["path"])
    h = hashlib.sha256()
    if (folder / "basinguard.json").is_file():
        h.update((folder / "basinguard.json").read_bytes())
    for part in ("text_encoder", "unet", "vae_decoder"):
        for f in (*onnx_files(folder / part / "model.onnx"), *sorted((folder / part).glob("*.json"))):
            if f.is_file():
                st = f.stat()
                h.update(f"{part}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return {identity["id"], h.hexdigest()[:16]}


def names_this_model(recorded: object, ids: set[str]) -> bool:
    """Whether a model identity recorded in a manifest entry or a calibration (`{"path": ..., "id": ...}`) names the
    model of `ids` (`accepted_model_ids`); anything else, hand-edited ids included, names another model."""
    recorded_id = recorded.get("id") if isinstance(recorded, dict) else None
    return isinstance(recorded_id, str) and recorded_id in ids
