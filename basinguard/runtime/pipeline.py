"""prompt → tokens → embeddings → loop (UNet, policy, scheduler) → VAE → image + trace.

One object per stage (text encoder(s), UNet, VAE decoder) as NVIDIA's TensorRT demo does, with a
per-stage timing table; the denoising loop is `denoise`, Algorithm 1 of Jain et al. over any scheduler.
A model family's conditioning (SD: text embeddings; SDXL: two encoders' states, pooled text, size ids)
reaches the loop as one `Conditioning`, so the loop is the same for every family.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from numbers import Integral
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from basinguard.engine import EngineError, LoadedModel, load_model
from basinguard.outputs.images import PNG_TRACE_KEY, ImageOptions, encode_image  # noqa: F401 - PNG_TRACE_KEY: named here as before
from basinguard.runtime.errors import InputError, ModelFolderError
from basinguard.runtime.guidance import GuidancePolicy, PolicyConfig, make_policy
from basinguard.runtime.model_folder import ModelFolder, read_json
from basinguard.runtime.schedulers import (
    GAP_SPACE,
    SCHEDULERS,
    Scheduler,
    UnsupportedConfig,
    make_scheduler,
    scheduler_name_for_config,
    step_noise,
)
from basinguard.runtime.tokenizer import PromptTokenizer, text_encoder_length

if TYPE_CHECKING:
    import PIL.Image

MAX_LATENT = 1e4  # |x_T| bound: standard normal noise stays within ±10; far beyond it the UNet overflows


def _text_list(texts: object, name: str) -> list[str]:
    """`texts` as a list of str: a bare string would otherwise be one prompt per character."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise InputError(f"{name} must be a list of strings, one per image (got {type(texts).__name__})")
    return list(texts)


class StageTimer:
    """Wall time and call count per stage; `loop` minus `unet` is the scheduler + policy cost."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds
        self.calls[stage] += 1

    def summary(self) -> dict[str, float]:
        s = dict(self.seconds)
        if "loop" in s:
            s["scheduler+policy"] = s.pop("loop") - s.get("unet", 0.0)
        return s

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 50
    scheduler: str | None = None  # None: the model's own scheduler config
    height: int | None = None  # None: the model's native size
    width: int | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # SDXL's micro-conditioning (time_ids), in pixels: (height, width), (top, left), (height, width). None: diffusers'
    # defaults, the image's own size and (0, 0). SD models take none of them.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    # SDXL: each text encoder's hidden_states[-(clip_skip + 2)] for the prompts (negative prompts keep the penultimate
    # layer), as diffusers' clip_skip; None: the penultimate layer
    clip_skip: int | None = None


@dataclass
class Generation:
    pixels: np.ndarray  # float32 (H, W, 3) in [0, 1]
    trace: dict

    def to_pil(self) -> PIL.Image.Image:
        from PIL import Image

        return Image.fromarray((self.pixels * 255).round().astype(np.uint8))

    def save_png(self, path: Path, options: ImageOptions | None = None) -> None:
        """The image as PNG carrying its trace (prompt, seed, policy, d and scale per step, transition step) as
        compressed JSON in a text chunk named "basinguard", so how an image was made, and whether it was
        mitigated, travels with it; and, unless `options` turn provenance off, A1111's parameters and an XMP packet
        marking it as generated (`basinguard.outputs`)."""
        Path(path).write_bytes(encode_image(self.to_pil(), self.trace, "png", options, title=Path(path).name))


@dataclass(frozen=True)
class Conditioning:
    """Every UNet input besides (sample, timestep), batched [uncond; cond] at 2N: SD's encoder_hidden_states, SDXL's
    also text_embeds and time_ids. `uncond` holds the uncond halves at N as views made once, so the loop slices
    halves without knowing the model family. The arrays are read-only: constant across the loop (an engine may
    keep them on the device between calls)."""

    pair: Mapping[str, np.ndarray]
    uncond: Mapping[str, np.ndarray]

    @classmethod
    def of(cls, pair: Mapping[str, np.ndarray]) -> Conditioning:
        arrays = {name: np.ascontiguousarray(value) for name, value in pair.items()}
        n, odd = divmod(len(next(iter(arrays.values()))), 2)
        if odd or any(len(value) != 2 * n for value in arrays.values()):
            raise ValueError(f"conditioning must be batched [uncond; cond] at 2N (got {[v.shape for v in arrays.values()]})")
        for value in arrays.values():
            value.flags.writeable = False
        return cls(MappingProxyType(arrays), MappingProxyType({name: value[:n] for name, value in arrays.items()}))


def denoise(unet: UNetStage, scheduler: Scheduler, policy: GuidancePolicy, x: np.ndarray,
            cond: Conditioning) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reverse diffusion with a per-sample guidance policy. Returns x_0, d per step (NaN where not
    measured) and the scale applied per step, both (steps, N)."""
    n = len(x)
    gap = np.full((len(scheduler.timesteps), n), np.nan)
    scale = np.zeros_like(gap)
    # Right after a UNet call each numpy call costs 10-70 µs (cold caches), so each step below is a few in-place
    # calls on buffers made once: the CFG batch [x; x] is filled by one broadcast copy.
    pair = np.empty((2, *x.shape), x.dtype)
    pair_batch = pair.reshape(2 * n, *x.shape[1:])
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, i)
        if policy.needs_cond(i, t):
            pair[:] = x_in
            eps = unet(pair_batch, t, cond.pair)  # [ε(x, e_∅); ε(x, e_p)]
            eps_uncond, guidance = eps[:n], np.subtract(eps[n:], eps[:n], out=eps[n:])  # ε(x, e_p) − ε(x, e_∅)
            flat = guidance.reshape(n, -1)
            np.sqrt(np.vecdot(flat, flat), out=gap[i])  # d_t, free: both halves are here
            gap[i] *= scheduler.eps_gap_scale[i]  # in ε space, as the paper's d, whatever the UNet predicts
            scale[i] = policy.scale(i, t, gap[i])
            # ε̂ = ε_∅ + s · (ε_p − ε_∅), per sample
            np.multiply(guidance, scale[i, :, None, None, None].astype(x.dtype), out=guidance)
            eps = np.add(eps_uncond, guidance, out=eps_uncond)
        else:  # the policy guarantees scale 0 here: ε̂ = ε_∅, at batch N
            eps = unet(x_in, t, cond.uncond)
            scale[i] = policy.scale(i, t, None)
            assert not scale[i].any(), "a policy that skips the conditional branch must use scale 0"
        x = scheduler.step(eps, i, x)
    return x, gap, scale


def _builds(config: dict, name: str, steps: int) -> bool:
    """Whether scheduler `name` can be built from `config` (for the hint after an unsupported one)."""
    try:
        make_scheduler(config, steps, name)
    except ValueError:
        return False
    return True


def check_finite(values: np.ndarray, stage: str) -> None:
    if not np.isfinite(values).all():
        raise EngineError(f"{stage} produced NaN or infinite values; no image is written (with fp16 models, "
                          "export in fp32 or keep the VAE in fp32)")


class UNetStage:
    def __init__(self, model: LoadedModel, timer: StageTimer):
        for name in ("sample", "timestep", "encoder_hidden_states"):
            if name not in model.inputs:
                raise InputError(f"unet model lacks input {name!r} (has {', '.join(model.inputs)})")
        self.model, self.timer = model, timer
        self.output = next(iter(model.outputs))
        self._timesteps: dict[tuple[int, float], np.ndarray] = {}  # (batch, t) -> the timestep input, made once

    def __call__(self, x: np.ndarray, t: float, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """ε (or v) for samples `x` at timestep t; `inputs`: the conditioning at len(x) (`Conditioning`)."""
        timestep = self._timesteps.get((len(x), t))
        if timestep is None:
            if len(self._timesteps) > 4096:  # schedules of many step counts: start over rather than grow
                self._timesteps.clear()
            timestep = self._timesteps[len(x), t] = np.full(len(x), t, np.float32)
            timestep.flags.writeable = False
        start = time.perf_counter()  # not the timer's context manager: its overhead would count 50-100 times
        out = self.model.run({"sample": x, "timestep": timestep, **inputs})[self.output]
        self.timer.add("unet", time.perf_counter() - start)
        return out if out.dtype == np.float32 else out.astype(np.float32)


MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")  # SDXL's time_ids, in this order
SDXL_SETTINGS = (*MICRO_CONDITIONING, "clip_skip")  # the sampling settings only SDXL models take


SDXL_UNET_INPUTS = ("text_embeds", "time_ids")  # an SDXL UNet's conditioning beside encoder_hidden_states


def sdxl_record(sampling: SamplingConfig) -> dict[str, object]:
    """SDXL's settings of a resolved sampling as traces, manifests and calibrations record them (pairs as lists);
    each is None for an SD sampling, which takes none."""
    values = {name: getattr(sampling, name) for name in SDXL_SETTINGS}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


def load_tokenizer(folder: Path, encoder_folder: Path, encoder: LoadedModel) -> PromptTokenizer:
    """A tokenizer folder for the text encoder loaded from `encoder_folder`, padding to the length it takes."""
    tokenizer = PromptTokenizer.from_folder(folder, text_encoder_length(encoder_folder))
    width = getattr(encoder.inputs.get("input_ids"), "shape", (None,))[-1]
    if isinstance(width, int) and width > 0 and width != tokenizer.max_length:  # a fixed ONNX input
        tokenizer = PromptTokenizer.from_folder(folder, width, exact=True)
    return tokenizer


def hidden_state_outputs(model: LoadedModel, path: Path) -> list[str]:
    """A text encoder's hidden_states.0 … .L outputs (optimum's names), in layer order: SDXL takes one of them."""
    layers = sorted(int(name.rsplit(".", 1)[1]) for name in model.outputs if re.fullmatch(r"hidden_states\.\d+", name))
    if len(layers) < 2:
        raise ModelFolderError(f"{path} has no hidden_states.K outputs (SDXL takes each text encoder's penultimate "
                               "layer); export the pipeline with `basinguard export` or optimum's exporter")
    return [f"hidden_states.{k}" for k in layers]


@dataclass
class SDXLText:
    """SDXL's two tokenizers and text encoders, as diffusers' StableDiffusionXLPipeline.encode_prompt uses them
    (prompt_2 = prompt): encoder_hidden_states is both encoders' penultimate hidden states side by side (or earlier
    ones with clip_skip), text_embeds the second encoder's pooled, projected output."""

    tokenizers: tuple[PromptTokenizer, PromptTokenizer]
    encoders: tuple[LoadedModel, LoadedModel]
    hidden_layers: tuple[list[str], list[str]]  # each encoder's hidden-state outputs (`hidden_state_outputs`)

    def hidden_outputs(self, clip_skip: int | None = None) -> tuple[str, str]:
        """The outputs diffusers takes: hidden_states[-(clip_skip + 2)], the penultimate layer when clip_skip is unset
        ("2" because SDXL always indexes from the penultimate layer)."""
        back = 2 + (clip_skip or 0)
        return self.hidden_layers[0][-back], self.hidden_layers[1][-back]

    @classmethod
    def load(cls, folder: ModelFolder, tokenizer: PromptTokenizer, text_encoder: LoadedModel, provider: str,
             threads: int | None) -> SDXLText:
        path = folder.path / "text_encoder_2/model.onnx"
        encoder_2 = load_model(path, provider, threads)
        if "text_embeds" not in encoder_2.outputs:
            raise ModelFolderError(f"{path} has no text_embeds output (SDXL's second text encoder is a "
                                   "CLIPTextModelWithProjection)")
        tokenizer_2 = load_tokenizer(folder.path / "tokenizer_2", folder.path / "text_encoder_2", encoder_2)
        if tokenizer_2.max_length != tokenizer.max_length:  # the two encoders' states are joined token by token
            raise ModelFolderError(f"{folder.path}: tokenizer pads to {tokenizer.max_length} tokens but tokenizer_2 "
                                   f"to {tokenizer_2.max_length}; their model_max_length must agree")
        hidden = (hidden_state_outputs(text_encoder, folder.path / "text_encoder/model.onnx"),
                  hidden_state_outputs(encoder_2, path))
        for part, layers in zip(("text_encoder", "text_encoder_2"), hidden, strict=True):
            config = folder.path / part / "config.json"  # clip_skip's range comes from it (`check_clip_skip`)
            stated = read_json(config).get("num_hidden_layers") if config.is_file() else None
            if stated is not None and stated != len(layers) - 1:
                raise ModelFolderError(f"corrupt config {config}: num_hidden_layers is {stated!r}, but "
                                       f"{part}/model.onnx has {len(layers) - 1} layers (hidden_states.0 to "
                                       f".{len(layers) - 1})")
        return cls((tokenizer, tokenizer_2), (text_encoder, encoder_2), hidden)

    def encode(self, texts: Sequence[str], clip_skip: int | None = None,
               skip_from: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(encoder_hidden_states, text_embeds) of `texts`, float32; clip_skip applies to rows from `skip_from` on, the
        prompts: diffusers' SDXL pipeline encodes negative prompts from the penultimate layer whatever clip_skip is."""
        hidden, out = [], {}
        outputs = zip(self.hidden_outputs(), self.hidden_outputs(clip_skip), strict=True)
        for tokenizer, encoder, (penultimate, skipped) in zip(self.tokenizers, self.encoders, outputs, strict=True):
            out = encoder.run({"input_ids": tokenizer.encode(list(texts))})
            states = out[penultimate]
            if skipped != penultimate:
                states = np.concatenate([states[:skip_from], out[skipped][skip_from:]])
            hidden.append(states.astype(np.float32, copy=False))
        return np.concatenate(hidden, axis=-1), out["text_embeds"].astype(np.float32, copy=False)


class Pipeline:
    """An exported model folder loaded on one provider. `static_shapes`: shape-specialised UNet sessions on CPU
    (see `OrtModel`), for jobs that run many generations at the same sizes."""

    def __init__(self, folder: Path, provider: str = "cpu", threads: int | None = None, static_shapes: bool = False):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, Integral) or threads < 1):
            # ONNX Runtime took 0 and -1 as its default without a word, and "2" failed in pybind's words
            raise InputError(f"threads must be an integer >= 1, or None for ONNX Runtime's default (got {threads!r})")
        self.folder = ModelFolder.open(folder)
        self.provider = provider
        self.timer = StageTimer()
        self.text_encoder = load_model(self.folder.path / "text_encoder/model.onnx", provider, threads)
        self.tokenizer = load_tokenizer(self.folder.path / "tokenizer", self.folder.path / "text_encoder",
                                        self.text_encoder)
        self.unet = UNetStage(load_model(self.folder.path / "unet/model.onnx", provider, threads, static_shapes), self.timer)
        self.vae_decoder = load_model(self.folder.path / "vae_decoder/model.onnx", provider, threads)
        outs = self.text_encoder.outputs
        self._text_output = "last_hidden_state" if "last_hidden_state" in outs else next(iter(outs))
        self.sdxl_text: SDXLText | None = None
        if self.folder.family == "sdxl":
            self.sdxl_text = SDXLText.load(self.folder, self.tokenizer, self.text_encoder, provider, threads)
            missing = [name for name in SDXL_UNET_INPUTS if name not in self.unet.model.inputs]
            if missing:
                raise ModelFolderError(f"{self.folder.path / 'unet/model.onnx'} lacks input(s) {', '.join(missing)} "
                                       "that an SDXL UNet takes (has " + ", ".join(self.unet.model.inputs) + ")")

    def uncond_kinds(self, negative_prompts: Sequence[str]) -> list[str]:
        """Which e_∅ each image's unconditional branch gets: its negative prompt's encoding, else zeros (SDXL with
        force_zeros_for_empty_prompt, as diffusers' pipeline without a negative prompt) or the empty prompt's."""
        none = "zeros" if self.folder.force_zeros_for_empty_prompt else "empty prompt"
        return ["negative prompt" if negative else none for negative in negative_prompts]

    def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str],
                     sampling: SamplingConfig) -> Conditioning:
        """The UNet's conditioning for N images, [e_∅; e_p] (`uncond_kinds` says which e_∅), at a resolved
        sampling; one text-encoder call per encoder."""
        if self.sdxl_text is None:  # SD: the text encoder's last hidden state
            ids = self.tokenizer.encode([*negative_prompts, *prompts])
            with self.timer("text_encoder"):
                e = self.text_encoder.run({"input_ids": ids})[self._text_output]
            return Conditioning.of({"encoder_hidden_states": e.astype(np.float32, copy=False)})
        n = len(prompts)
        encoded = [k for k, kind in enumerate(self.uncond_kinds(negative_prompts)) if kind != "zeros"]
        with self.timer("text_encoder"):  # zero rows need no encoding
            hidden, pooled = self.sdxl_text.encode([negative_prompts[k] for k in encoded] + list(prompts),
                                                   sampling.clip_skip, skip_from=len(encoded))
        pair_hidden = np.zeros((2 * n, *hidden.shape[1:]), np.float32)
        pair_pooled = np.zeros((2 * n, *pooled.shape[1:]), np.float32)
        pair_hidden[encoded], pair_pooled[encoded] = hidden[:len(encoded)], pooled[:len(encoded)]
        pair_hidden[n:], pair_pooled[n:] = hidden[len(encoded):], pooled[len(encoded):]
        # diffusers' _get_add_time_ids: original size + crop top-left + target size, the same for both halves
        time_ids = [*sampling.original_size, *sampling.crops_coords_top_left, *sampling.target_size]
        return Conditioning.of({"encoder_hidden_states": pair_hidden, "text_embeds": pair_pooled,
                                "time_ids": np.tile(np.array(time_ids, np.float32), (2 * n, 1))})

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

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents → float32 images (N, H, W, 3) in [0, 1], with the VAE's own scaling (and shift)."""
        scaling, shift = self.folder.latent_scaling
        stats = self.folder.latent_statistics
        if stats is None:
            z = latents / np.float32(scaling) + np.float32(shift)
        else:  # an SDXL VAE with per-channel statistics, as diffusers' SDXL pipeline decodes it
            z = latents * stats[1] / np.float32(scaling) + stats[0]
        with self.timer("vae"):
            img = self.vae_decoder.run({"latent_sample": z})["sample"].astype(np.float32, copy=False)
        f = self.folder.vae_scale_factor
        if img.shape[2:] != (latents.shape[2] * f, latents.shape[3] * f):  # a trace would state another size
            raise ModelFolderError(
                f"{self.folder.path / 'vae_decoder/config.json'}: block_out_channels gives a scale factor of {f}, "
                f"but vae_decoder/model.onnx turned {latents.shape[2]}x{latents.shape[3]} latents into "
                f"{img.shape[2]}x{img.shape[3]} pixels; the config does not belong to this decoder")
        check_finite(img, "the VAE decoder")  # before the clip, which would turn an inf into a white pixel
        return np.clip(img / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def resolve(self, sampling: SamplingConfig) -> SamplingConfig:
        """Fill unset size and validate everything before any model runs."""
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
        micro = self.folder.micro_conditioning(height, width, sampling.original_size, sampling.crops_coords_top_left,
                                               sampling.target_size)
        self.folder.check_clip_skip(sampling.clip_skip)
        clip_skip = sampling.clip_skip or None  # 0 skips nothing, as unset does: one record, so resume and calibration agree
        return replace(sampling, height=height, width=width, scheduler=scheduler, clip_skip=clip_skip, **micro)

    def make_scheduler(self, sampling: SamplingConfig, noise: Sequence[np.random.Generator] | None = None) -> Scheduler:
        """`noise`: one generator per image (`step_noise`) for samplers that add noise each step (euler-a)."""
        try:
            return make_scheduler(self.folder.scheduler_config, sampling.steps, sampling.scheduler, noise)
        except UnsupportedConfig as exc:
            runnable = [k for k in SCHEDULERS if k != sampling.scheduler and _builds(self.folder.scheduler_config, k, sampling.steps)]
            hint = f"another scheduler runs this model: --scheduler {'|'.join(runnable)}" if runnable else (
                "no scheduler here runs this config")
            raise InputError(f"{exc}; {hint}") from None
        except ValueError as exc:  # steps out of range, unknown scheduler: the scheduler names the range
            raise InputError(str(exc)) from None

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig, *, seeds: Sequence[int] | None = None,
                 negative_prompts: Sequence[str] | None = None, latents: np.ndarray | None = None) -> list[Generation]:
        """One batch of N images, prompt i with seed i (or latents[i]); each image gets its own trace."""
        prompts = _text_list(prompts, "prompts")
        n = len(prompts)
        negative_prompts = _text_list(negative_prompts, "negative_prompts") if negative_prompts is not None else [""] * n
        if n == 0 or len(negative_prompts) != n:
            raise InputError(f"need one or more prompts and as many negative prompts (got {n} and {len(negative_prompts)})")
        if not isinstance(sampling, SamplingConfig) or not isinstance(sampling.policy, PolicyConfig):
            raise InputError(f"sampling must be a SamplingConfig with a PolicyConfig policy (got {type(sampling).__name__})")
        sampling = self.resolve(sampling)
        if latents is None:
            if seeds is None or isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != n:
                raise InputError(f"need a list of one seed per image ({n})")
            latents = self.initial_latents(seeds, sampling.height, sampling.width)
        elif seeds is not None:  # a trace would name a seed the image was not made from
            raise InputError("give seeds or latents, not both")
        else:
            self.check_latents(latents, n, sampling)
        scheduler = self.make_scheduler(sampling, step_noise(seeds, latents))  # image k's step noise: its own
        policy = make_policy(sampling.policy, n, self.folder.num_train_timesteps)

        cond = self.conditioning(prompts, negative_prompts, sampling)  # [e_∅; e_p] and what else the UNet takes
        x = latents.astype(np.float32) * np.float32(scheduler.init_noise_sigma)
        with self.timer("loop"):
            x, gap, scale = denoise(self.unet, scheduler, policy, x, cond)
        # A NaN/inf (e.g. fp16 overflow) would otherwise become a black or garbage PNG without a word.
        check_finite(x, "the denoising loop (UNet outputs, or the latents given)")
        pixels = self.decode(x)
        # Each image its own array: one kept image must not keep its whole batch alive.
        return [Generation(pixels[k].copy(), self._trace(k, prompts, negative_prompts, seeds, sampling, scheduler,
                                                   policy, gap, scale)) for k in range(n)]

    def _trace(self, k: int, prompts: Sequence[str], negative_prompts: Sequence[str], seeds: Sequence[int] | None,
               sampling: SamplingConfig, scheduler: Scheduler, policy: GuidancePolicy, gap: np.ndarray,
               scale: np.ndarray) -> dict:
        transition = int(policy.transition_step[k])
        score = getattr(policy, "score", None)
        return {
            "prompt": prompts[k],
            "negative_prompt": negative_prompts[k],
            "seed": None if seeds is None else int(seeds[k]),
            "policy": sampling.policy.parameters(),
            "scheduler": sampling.scheduler,
            "steps": sampling.steps,
            "height": sampling.height,
            "width": sampling.width,
            "provider": self.unet.model.provider,
            "timesteps": [float(t) for t in scheduler.timesteps],
            "gap": [None if np.isnan(v) else float(v) for v in gap[:, k]],
            "gap_space": GAP_SPACE,  # ‖ε_p − ε_∅‖ (a v-prediction UNet's gap is converted)
            "scale": [float(v) for v in scale[:, k]],
            "transition_step": transition if transition >= 0 else None,
            "detection_score": None if score is None else float(score[k]),
            "model_family": self.folder.family,
            "uncond": self.uncond_kinds(negative_prompts[k:k + 1])[0],  # which e_∅: d is measured against it
            **(sdxl_record(sampling) if self.sdxl_text is not None else {}),
            # prompts cut to the text encoder's length (as diffusers cuts them): what was dropped, else null
            "truncation": {name: cut.record() for name, text in (("prompt", prompts[k]),
                                                                 ("negative_prompt", negative_prompts[k]))
                           if (cut := self.tokenizer.truncation(text)) is not None} or None,
        }
