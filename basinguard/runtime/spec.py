"""A model spec: an exported model folder read once, with everything that needs no ONNX session — its family,
its tokenizer(s) built by one rule, sampling settings resolved and validated against it, its scheduler, latents
and identity. `generate`, `batch`, `detect` and `build-engines` share it; a `Pipeline` is a spec plus loaded
sessions, and a Ray driver checks a whole prompt file on a spec alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from basinguard.model_format import onnx_input_shapes, read_json
from basinguard.runtime.conditioning import FAMILIES, Family
from basinguard.runtime.errors import InputError, ModelFolderError
from basinguard.runtime.model_folder import ModelFolder, accepted_model_ids, model_identity
from basinguard.runtime.schedulers import (
    SCHEDULERS,
    Scheduler,
    UnsupportedConfig,
    make_scheduler,
    scheduler_name_for_config,
)
from basinguard.runtime.settings import SamplingConfig, sampling_from
from basinguard.runtime.tokenizer import PromptTokenizer, text_encoder_length

if TYPE_CHECKING:
    from basinguard.engine.plans import ModelGeometry

MAX_LATENT = 1e4  # |x_T| bound: standard normal noise stays within ±10; far beyond it the UNet overflows
LEGACY_CLIP_IDS = (0, 2)  # bos/eos ids older CLIP configs state (SD 1.x), whatever the tokenizer's


def load_tokenizer(folder: Path, tokenizer_part: str, encoder_part: str) -> PromptTokenizer:
    """The one rule: a tokenizer pads to the length its text encoder takes — the ONNX input's fixed width where it
    has one, else the encoder config's max_position_embeddings — and must fit that encoder (`check_fits`)."""
    encoder = folder / encoder_part
    config_length = text_encoder_length(encoder)  # read (and checked) either way
    width = onnx_input_shapes(encoder / "model.onnx").get("input_ids", (None, None))[-1]
    if isinstance(width, int) and width > 0:
        tokenizer = PromptTokenizer.from_folder(folder / tokenizer_part, width, exact=True)
    else:
        tokenizer = PromptTokenizer.from_folder(folder / tokenizer_part, config_length)
    check_fits(tokenizer, folder / tokenizer_part, encoder / "config.json")
    return tokenizer


def check_fits(tokenizer: PromptTokenizer, tokenizer_folder: Path, encoder_config: Path) -> None:
    """A tokenizer made for another text encoder feeds it ids it reads as other words (a wrong image without a
    word) or ids beyond its embedding table (ONNX Runtime's "indices element out of data bounds"): refused, naming
    both files."""
    if not encoder_config.is_file():
        return
    config = read_json(encoder_config)
    vocab = config.get("vocab_size")
    size = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and size > vocab:
        raise ModelFolderError(f"{tokenizer_folder} does not fit {encoder_config}: the tokenizer has {size} ids, the "
                               f"text encoder's vocab_size is {vocab} (ids {vocab}-{size - 1} are beyond its "
                               "embeddings); the tokenizer belongs to another model")
    stated = (config.get("bos_token_id"), config.get("eos_token_id"))
    if stated == LEGACY_CLIP_IDS:  # SD 1.x's text encoder config: not the tokenizer's ids (transformers' legacy)
        return
    for what, want, have in (("bos", stated[0], tokenizer.bos_id), ("eos", stated[1], tokenizer.eos_id)):
        if isinstance(want, int) and not isinstance(want, bool) and want != have:
            raise ModelFolderError(f"{tokenizer_folder} does not fit {encoder_config}: the tokenizer's {what} token is "
                                   f"id {have}, the text encoder's {what}_token_id is {want}; the tokenizer belongs "
                                   "to another model")


def _builds(config: dict, name: str, steps: int) -> bool:
    """Whether scheduler `name` can be built from `config` (for the hint after an unsupported one)."""
    try:
        make_scheduler(config, steps, name)
    except ValueError:
        return False
    return True


class ModelSpec:
    """An exported model folder read once (see the module docstring)."""

    def __init__(self, path: Path | str | os.PathLike):
        self.folder = ModelFolder.open(path)  # type: ignore[arg-type]
        self.family: Family = FAMILIES[self.folder.family]
        self.tokenizers = tuple(load_tokenizer(self.folder.path, tok, enc) for tok, enc in self.family.tokenizer_parts)
        if any(t.max_length != self.tokenizers[0].max_length for t in self.tokenizers):
            # the encoders' states are joined token by token
            raise ModelFolderError(f"{self.folder.path}: tokenizer pads to {self.tokenizers[0].max_length} tokens but "
                                   f"tokenizer_2 to {self.tokenizers[1].max_length}; their model_max_length must agree")

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The first tokenizer: every tokenizer of a model pads to one length, so it decides truncation."""
        return self.tokenizers[0]

    @cached_property
    def identity(self) -> dict:
        """The folder's identity by content (`model_identity`), computed once."""
        return model_identity(self.folder.path)

    @cached_property
    def accepted_ids(self) -> set[str]:
        return accepted_model_ids(self.identity)

    def sampling(self, **overrides: Any) -> SamplingConfig:
        """The model's sampling defaults with `overrides` (keyword settings, as `SETTINGS` names them) applied, not
        yet resolved; as a diffusers pipeline applies its configs, explicit values win."""
        return sampling_from(self.folder.sampling_defaults, overrides)

    def resolve(self, sampling: SamplingConfig) -> SamplingConfig:
        """Fill unset size, scheduler and family settings and validate everything before any model runs."""
        if not isinstance(sampling, SamplingConfig):
            raise InputError(f"sampling must be a SamplingConfig (got {type(sampling).__name__})")
        native_height, native_width = self.folder.default_image
        height = native_height if sampling.height is None else sampling.height
        width = native_width if sampling.width is None else sampling.width
        for name, value in (("height", height), ("width", width), ("steps", sampling.steps)):
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise InputError(f"{name} must be an integer (got {value!r})")
        self.folder.check_size(height, width)
        sampling.policy.validate(self.folder.num_train_timesteps)
        try:  # the model's own scheduler by name, so traces and resumed jobs compare like with like
            scheduler = sampling.scheduler or scheduler_name_for_config(self.folder.scheduler_config)
        except ValueError as exc:
            raise InputError(f"{exc}; choose one with --scheduler") from None
        family = self.family.resolve_settings(self.folder, height, width, sampling)
        return replace(sampling, height=height, width=width, scheduler=scheduler, **family)

    def make_scheduler(self, sampling: SamplingConfig, noise: Sequence[np.random.Generator] | None = None) -> Scheduler:
        """The resolved sampling's scheduler. `noise`: one generator per image (`step_noise`) for samplers that add
        noise each step (euler-a)."""
        config = self.folder.scheduler_config
        try:
            return make_scheduler(config, sampling.steps, sampling.scheduler, noise)
        except UnsupportedConfig as exc:
            runnable = [k for k in SCHEDULERS if k != sampling.scheduler and _builds(config, k, sampling.steps)]
            hint = f"another scheduler runs this model: --scheduler {'|'.join(runnable)}" if runnable else (
                "no scheduler here runs this config")
            raise InputError(f"{exc}; {hint}") from None
        except ValueError as exc:  # steps out of range, unknown scheduler: the scheduler names the range
            raise InputError(str(exc)) from None

    def record(self, sampling: SamplingConfig) -> dict[str, object]:
        """The family's settings of a resolved sampling as traces, manifests and calibrations record them."""
        return self.family.record(sampling)

    def uncond_kinds(self, negative_prompts: Sequence[str]) -> list[str]:
        """Which e_∅ each image's unconditional branch gets: its negative prompt's encoding, else zeros (SDXL with
        force_zeros_for_empty_prompt, as diffusers' pipeline without a negative prompt) or the empty prompt's."""
        none = "zeros" if self.folder.force_zeros_for_empty_prompt else "empty prompt"
        return ["negative prompt" if negative else none for negative in negative_prompts]

    def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> np.ndarray:
        """x_T per image from its own seed, so an image does not depend on what it was batched with."""
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, Integral) or s < 0]
        if bad:  # numpy's seeding would fail deep inside with "expected non-negative integer"
            raise InputError(f"seed {bad[0]!r} not allowed: seeds must be integers >= 0")
        f = self.folder.vae_scale_factor
        shape = (self.folder.latent_channels, height // f, width // f)
        return np.stack([np.random.default_rng(s).standard_normal(shape, dtype=np.float32) for s in seeds])

    def check_latents(self, latents: np.ndarray, count: int, sampling: SamplingConfig) -> None:
        """Given x_T, one per image: a finite real array (count, C, h, w) for this model at the (resolved) sampling's
        size."""
        if not isinstance(latents, np.ndarray) or latents.dtype.kind not in "fiu":
            what = f"{latents.dtype} array" if isinstance(latents, np.ndarray) else type(latents).__name__
            raise InputError(f"latents must be a real numpy array (float32 preferred), not a {what}")
        f = self.folder.vae_scale_factor
        want = (count, self.folder.latent_channels, sampling.height // f, sampling.width // f)
        if latents.shape != want:
            raise InputError(f"latents have shape {latents.shape}; this model at {sampling.height}x{sampling.width} "
                             f"with {count} images needs {want}")
        if not np.isfinite(latents).all() or np.abs(latents).max(initial=0) > MAX_LATENT:
            raise InputError(f"latents must be finite and within ±{MAX_LATENT:g} (x_T is standard normal noise)")

    def engine_geometry(self) -> ModelGeometry:
        """What TensorRT profiles need (`basinguard build-engines`): the VAE factor, native size, size multiple and
        the length prompts are padded to (the tokenizer's)."""
        from basinguard.engine.plans import ModelGeometry

        folder = self.folder
        return ModelGeometry(folder.vae_scale_factor, folder.default_image, folder.size_multiple,
                             self.tokenizer.max_length)
