"""prompt → tokens → embeddings → loop (UNet, policy, scheduler) → VAE → image + trace.

A `Pipeline` is a `ModelSpec` (the folder read once, its tokenizer, settings and checks) plus loaded sessions:
one object per stage (text encoder(s), UNet, VAE decoder) as NVIDIA's TensorRT demo does, with a per-stage timing
table. The model family's text conditioning is chosen once, at load (`conditioning.FAMILIES`); the loop is
`loop.denoise`, the same for every family.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from basinguard.engine import load_model
from basinguard.outputs.images import PNG_TRACE_KEY, ImageOptions, encode_image
from basinguard.runtime.conditioning import Conditioning
from basinguard.runtime.errors import InputError, ModelFolderError
from basinguard.runtime.guidance import GuidancePolicy, PolicyConfig, make_policy
from basinguard.runtime.loop import UNetStage, check_finite, denoise
from basinguard.runtime.schedulers import GAP_SPACE, Scheduler, step_noise
from basinguard.runtime.settings import SamplingConfig
from basinguard.runtime.spec import ModelSpec
from basinguard.runtime.timer import StageTimer

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["PNG_TRACE_KEY", "Conditioning", "Generation", "Pipeline", "SamplingConfig", "Sampled"]


def _text_list(texts: object, name: str) -> list[str]:
    """`texts` as a list of str: a bare string would otherwise be one prompt per character."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise InputError(f"{name} must be a list of strings, one per image (got {type(texts).__name__})")
    return list(texts)


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


@dataclass
class Sampled:
    """The loop's result for N images: x after the steps run, d and the scale per step (steps, N), and what made
    them (the resolved sampling, the scheduler, the policy)."""

    x: np.ndarray
    gap: np.ndarray
    scale: np.ndarray
    sampling: SamplingConfig
    scheduler: Scheduler
    policy: GuidancePolicy


# Policies whose decisions read d: dtp's local minimum, auto's first-step detection.
READS_D = ("dtp", "og-dtp", "auto")


class Pipeline:
    """An exported model folder (or its `ModelSpec`) loaded on one provider. `static_shapes`: shape-specialised UNet
    sessions on CPU (see `OrtModel`), for jobs that run many generations at the same sizes."""

    def __init__(self, model: Path | str | ModelSpec, provider: str = "cpu", threads: int | None = None,
                 static_shapes: bool = False):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, Integral) or threads < 1):
            # ONNX Runtime took 0 and -1 as its default without a word, and "2" failed in pybind's words
            raise InputError(f"threads must be an integer >= 1, or None for ONNX Runtime's default (got {threads!r})")
        self.spec = model if isinstance(model, ModelSpec) else ModelSpec(model)
        self.folder, self.tokenizer = self.spec.folder, self.spec.tokenizer
        self.provider = provider
        self.timer = StageTimer()
        self._warned_quantized = False
        path = self.folder.path
        if provider != "cpu" and self.folder.unet_quantization:  # its integer ops would fall back to the CPU
            raise ModelFolderError(f"{path}'s UNet is quantized to {self.folder.unet_quantization} for ONNX "
                                   f"Runtime's CPU provider; run it with provider cpu, or use its float export "
                                   f"on {provider}")
        self.text = self.spec.family.load_text(self.folder, self.spec.tokenizers, provider, threads, self.timer)
        unet = load_model(path / "unet/model.onnx", provider, threads, static_shapes)
        missing = [name for name in self.spec.family.unet_inputs if name not in unet.inputs]
        if missing:
            raise ModelFolderError(f"{path / 'unet/model.onnx'} lacks input(s) {', '.join(missing)} that an "
                                   f"{self.spec.family.name.upper()} UNet takes (has {', '.join(unet.inputs)})")
        self.unet = UNetStage(unet, self.timer, self.spec.family.unet_inputs)
        self.vae_decoder = load_model(path / "vae_decoder/model.onnx", provider, threads)

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

    def sample(self, prompts: Sequence[str], sampling: SamplingConfig, *, seeds: Sequence[int] | None = None,
               negative_prompts: Sequence[str] | None = None, latents: np.ndarray | None = None,
               steps: int | None = None) -> Sampled:
        """The loop for N images, prompt i with seed i (or latents[i]), over the first `steps` steps (all: None);
        no image is decoded. `generate` and detection both run it."""
        prompts = _text_list(prompts, "prompts")
        n = len(prompts)
        negative_prompts = _text_list(negative_prompts, "negative_prompts") if negative_prompts is not None else [""] * n
        if n == 0 or len(negative_prompts) != n:
            raise InputError(f"need one or more prompts and as many negative prompts (got {n} and {len(negative_prompts)})")
        if not isinstance(sampling, SamplingConfig) or not isinstance(sampling.policy, PolicyConfig):
            raise InputError(f"sampling must be a SamplingConfig with a PolicyConfig policy (got {type(sampling).__name__})")
        sampling = self.spec.resolve(sampling)
        if self.folder.unet_quantization and sampling.policy.name in READS_D and not self._warned_quantized:
            self._warned_quantized = True
            warnings.warn(f"{self.folder.path}'s UNet is {self.folder.unet_quantization}: its d differs from the "
                          f"float model's (8 % at the first step on the shipped model), which moves {sampling.policy.name}"
                          "'s decisions (dtp's transition step, auto's detection against a threshold calibrated on "
                          "the float model); docs/speed.md#what-int8-does-to-the-shipped-model", UserWarning,
                          stacklevel=3)
        if latents is None:
            if seeds is None or isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or len(seeds) != n:
                raise InputError(f"need a list of one seed per image ({n})")
            latents = self.spec.initial_latents(seeds, sampling.height, sampling.width)
        elif seeds is not None:  # a trace would name a seed the image was not made from
            raise InputError("give seeds or latents, not both")
        else:
            self.spec.check_latents(latents, n, sampling)
        scheduler = self.spec.make_scheduler(sampling, step_noise(seeds, latents))  # image k's step noise: its own
        policy = make_policy(sampling.policy, n, self.folder.num_train_timesteps)
        # [e_∅; e_p] and whatever else the UNet takes
        cond = self.text.encode(prompts, negative_prompts, sampling, self.spec.uncond_kinds(negative_prompts))
        x = latents.astype(np.float32) * np.float32(scheduler.init_noise_sigma)
        with self.timer("loop"):
            x, gap, scale = denoise(self.unet, scheduler, policy, x, cond, steps)
        return Sampled(x, gap, scale, sampling, scheduler, policy)

    def generate(self, prompts: Sequence[str], sampling: SamplingConfig | None = None, *,
                 seeds: Sequence[int] | None = None, negative_prompts: Sequence[str] | None = None,
                 latents: np.ndarray | None = None, **settings: Any) -> list[Generation]:
        """One batch of N images, prompt i with seed i (or latents[i]); each image gets its own trace. Settings come
        from `sampling`, or else from the model's sampling defaults with keyword `settings` applied (`policy="dtp"`,
        `guidance_scale=7.5`, `steps=30`, ...: `settings.SETTINGS`), as a diffusers pipeline applies its configs."""
        if sampling is None:
            sampling = self.spec.sampling(**settings)
        elif settings:
            raise InputError(f"give a SamplingConfig or keyword settings ({', '.join(settings)}), not both")
        prompts = _text_list(prompts, "prompts")
        negative_prompts = [""] * len(prompts) if negative_prompts is None else _text_list(negative_prompts,
                                                                                             "negative_prompts")
        run = self.sample(prompts, sampling, seeds=seeds, negative_prompts=negative_prompts, latents=latents)
        # A NaN/inf (e.g. fp16 overflow) would otherwise become a black or garbage PNG without a word.
        check_finite(run.x, "the denoising loop (UNet outputs, or the latents given)")
        pixels = self.decode(run.x)
        # Each image its own array: one kept image must not keep its whole batch alive.
        return [Generation(pixels[k].copy(), self._trace(k, prompts, negative_prompts, seeds, run))
                for k in range(len(prompts))]

    def _trace(self, k: int, prompts: Sequence[str], negative_prompts: Sequence[str], seeds: Sequence[int] | None,
               run: Sampled) -> dict:
        transition = int(run.policy.transition_step[k])
        score = getattr(run.policy, "score", None)
        sampling = run.sampling
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
            "timesteps": [float(t) for t in run.scheduler.timesteps],
            "gap": [None if np.isnan(v) else float(v) for v in run.gap[:, k]],
            "gap_space": GAP_SPACE,  # ‖ε_p − ε_∅‖ (a v-prediction UNet's gap is converted)
            "scale": [float(v) for v in run.scale[:, k]],
            "transition_step": transition if transition >= 0 else None,
            "detection_score": None if score is None else float(score[k]),
            "model_family": self.folder.family,
            "uncond": self.spec.uncond_kinds(negative_prompts[k:k + 1])[0],  # which e_∅: d is measured against it
            **self.spec.record(sampling),
            # prompts cut to the text encoder's length (as diffusers cuts them): what was dropped, else null
            "truncation": {name: cut.record() for name, text in (("prompt", prompts[k]),
                                                                 ("negative_prompt", negative_prompts[k]))
                           if (cut := self.tokenizer.truncation(text)) is not None} or None,
        }
