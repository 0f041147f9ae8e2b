"""prompt → tokens → embeddings → loop (UNet, policy, scheduler) → VAE → image + trace.

One object per stage (text encoder, UNet, VAE decoder) as NVIDIA's TensorRT demo does, with a
per-stage timing table; the denoising loop is `denoise`, Algorithm 1 of Jain et al. over any scheduler.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from numbers import Integral
from pathlib import Path

import numpy as np

from basinguard.engine import EngineError, LoadedModel, load_model
from basinguard.runtime.errors import InputError
from basinguard.runtime.guidance import GuidancePolicy, PolicyConfig, make_policy
from basinguard.runtime.model_folder import ModelFolder
from basinguard.runtime.schedulers import (
    SCHEDULERS,
    Scheduler,
    UnsupportedConfig,
    make_scheduler,
    scheduler_name_for_config,
)
from basinguard.runtime.tokenizer import PromptTokenizer

PNG_TRACE_KEY = "basinguard"
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


@dataclass
class Generation:
    pixels: np.ndarray  # float32 (H, W, 3) in [0, 1]
    trace: dict

    def to_pil(self):  # -> PIL.Image.Image
        from PIL import Image

        return Image.fromarray((self.pixels * 255).round().astype(np.uint8))

    def save_png(self, path: Path) -> None:
        """The image as PNG carrying its trace (prompt, seed, policy, d and scale per step, transition step) as
        compressed JSON in a text chunk named "basinguard", so how an image was made, and whether it was
        mitigated, travels with it."""
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text(PNG_TRACE_KEY, json.dumps(self.trace, separators=(",", ":")), zip=True)
        self.to_pil().save(path, format="PNG", pnginfo=info)


def denoise(unet: UNetStage, scheduler: Scheduler, policy: GuidancePolicy, x: np.ndarray,
            e_uncond: np.ndarray, e_pair: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
            eps = unet(pair_batch, t, e_pair)  # [ε(x, e_∅); ε(x, e_p)]
            eps_uncond, guidance = eps[:n], np.subtract(eps[n:], eps[:n], out=eps[n:])  # ε(x, e_p) − ε(x, e_∅)
            flat = guidance.reshape(n, -1)
            np.sqrt(np.vecdot(flat, flat), out=gap[i])  # d_t, free: both halves are here
            scale[i] = policy.scale(i, t, gap[i])
            # ε̂ = ε_∅ + s · (ε_p − ε_∅), per sample
            np.multiply(guidance, scale[i, :, None, None, None].astype(x.dtype), out=guidance)
            eps = np.add(eps_uncond, guidance, out=eps_uncond)
        else:  # the policy guarantees scale 0 here: ε̂ = ε_∅, at batch N
            eps = unet(x_in, t, e_uncond)
            scale[i] = policy.scale(i, t, None)
            assert not scale[i].any(), "a policy that skips the conditional branch must use scale 0"
        x = scheduler.step(eps, i, x)
    return x, gap, scale


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

    def __call__(self, x: np.ndarray, t: float, embeddings: np.ndarray) -> np.ndarray:
        timestep = self._timesteps.get((len(x), t))
        if timestep is None:
            if len(self._timesteps) > 4096:  # schedules of many step counts: start over rather than grow
                self._timesteps.clear()
            timestep = self._timesteps[len(x), t] = np.full(len(x), t, np.float32)
            timestep.flags.writeable = False
        start = time.perf_counter()  # not the timer's context manager: its overhead would count 50-100 times
        out = self.model.run({"sample": x, "timestep": timestep, "encoder_hidden_states": embeddings})[self.output]
        self.timer.add("unet", time.perf_counter() - start)
        return out if out.dtype == np.float32 else out.astype(np.float32)


class Pipeline:
    """An exported model folder loaded on one provider. `static_shapes`: shape-specialised UNet sessions on CPU
    (see `OrtModel`), for jobs that run many generations at the same sizes."""

    def __init__(self, folder: Path, provider: str = "cpu", threads: int | None = None, static_shapes: bool = False):
        self.folder = ModelFolder.open(folder)
        self.provider = provider
        self.timer = StageTimer()
        self.tokenizer = PromptTokenizer.from_folder(self.folder.path / "tokenizer")
        self.text_encoder = load_model(self.folder.path / "text_encoder/model.onnx", provider, threads)
        self.unet = UNetStage(load_model(self.folder.path / "unet/model.onnx", provider, threads, static_shapes), self.timer)
        self.vae_decoder = load_model(self.folder.path / "vae_decoder/model.onnx", provider, threads)
        outs = self.text_encoder.outputs
        self._text_output = "last_hidden_state" if "last_hidden_state" in outs else next(iter(outs))

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer.encode(list(prompts))
        with self.timer("text_encoder"):
            out = self.text_encoder.run({"input_ids": ids})[self._text_output]
        return out.astype(np.float32, copy=False)

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
        z = latents / np.float32(scaling) + np.float32(shift)
        with self.timer("vae"):
            img = self.vae_decoder.run({"latent_sample": z})["sample"].astype(np.float32, copy=False)
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
        return replace(sampling, height=height, width=width, scheduler=scheduler)

    def make_scheduler(self, sampling: SamplingConfig) -> Scheduler:
        try:
            return make_scheduler(self.folder.scheduler_config, sampling.steps, sampling.scheduler)
        except UnsupportedConfig as exc:
            raise InputError(f"{exc}; another scheduler may run this model: --scheduler "
                             f"{'|'.join(k for k in SCHEDULERS if k != sampling.scheduler)}") from None
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
        scheduler = self.make_scheduler(sampling)
        if latents is None:
            if seeds is None or isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != n:
                raise InputError(f"need a list of one seed per image ({n})")
            latents = self.initial_latents(seeds, sampling.height, sampling.width)
        elif seeds is not None:  # a trace would name a seed the image was not made from
            raise InputError("give seeds or latents, not both")
        else:
            self.check_latents(latents, n, sampling)
        policy = make_policy(sampling.policy, n, self.folder.num_train_timesteps)

        e = self.encode_text([*negative_prompts, *prompts])  # [e_∅; e_p], one text-encoder call
        x = latents.astype(np.float32) * np.float32(scheduler.init_noise_sigma)
        with self.timer("loop"):
            x, gap, scale = denoise(self.unet, scheduler, policy, x, e[:n], e)
        # A NaN/inf (e.g. fp16 overflow) would otherwise become a black or garbage PNG without a word.
        check_finite(x, "the denoising loop (UNet outputs, or the latents given)")
        pixels = self.decode(x)
        # Each image its own array: one kept image must not keep its whole batch alive.
        return [Generation(pixels[k].copy(), self._trace(k, prompts, negative_prompts, seeds, sampling, scheduler,
                                                   policy, gap, scale)) for k in range(n)]

    def _trace(self, k: int, prompts, negative_prompts, seeds, sampling: SamplingConfig, scheduler: Scheduler,
               policy: GuidancePolicy, gap: np.ndarray, scale: np.ndarray) -> dict:
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
            "scale": [float(v) for v in scale[:, k]],
            "transition_step": transition if transition >= 0 else None,
            "detection_score": None if score is None else float(score[k]),
        }
