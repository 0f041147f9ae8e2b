"""A diffusers pipeline whose UNet call applies a per-image guidance policy.

The pipeline's denoising loop is not copied: while a guarded call runs, the UNet's `forward` is replaced (on that
instance only, restored after) by `GuidedRun`, which sees the batched [ε_∅; ε_p] call that classifier-free guidance
makes, runs the UNet on just the rows each image's policy needs at this step (`guidance.Rows`: ε_∅ alone where its
scale is 0, ε_p alone past an end of guidance, both otherwise), measures d per image where both were made, asks the
runtime's policy for each image's scale s_k and returns ε̂_k = ε_∅ + s_k (ε_p − ε_∅) as both halves, so that the
pipeline's own combination ε̂ + g (ε̂ − ε̂), at its guidance scale g, is ε̂ per image.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from basinguard.diffusers.errors import AdapterError
from basinguard.runtime.guidance import GuidancePolicy, PolicyConfig, make_policy

SUPPORTED_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline)
PREDICTION_TYPES = ("epsilon", "v_prediction")  # as the runtime: d is converted to ε space from either
# UNet2DConditionModel.forward arguments that hold one row per CFG batch row (added_cond_kwargs: SDXL's text_embeds
# and time_ids, IP-Adapter image embeddings); halved with the batch where the conditional branch is skipped.
BATCHED_ARGUMENTS = ("sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
                     "added_cond_kwargs", "encoder_attention_mask")
# The pipeline's guidance scale g when λ <= 1: diffusers turns CFG (the batched UNet call) off at g <= 1; both
# returned halves are ε̂, so any g > 1 gives the same ε̂.
CFG_ON_SCALE = 2.0
DEPRECATED_ARGUMENTS = ("callback", "callback_steps")  # what the pipelines' **kwargs still take
GAP_SPACE = "epsilon"  # as the runtime's traces: d is ‖ε_p − ε_∅‖ whatever the UNet predicts


def _pick_rows(value: Any, rows: int, index: torch.Tensor) -> Any:
    """`value` with every tensor of `rows` rows cut to the rows of `index`, nested dicts and lists alike; anything
    else as it is."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim >= 1 and len(value) == rows else value
    if isinstance(value, dict):
        return {key: _pick_rows(item, rows, index) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pick_rows(item, rows, index) for item in value)
    return value


def _with_prediction(out: Any, prediction: torch.Tensor) -> Any:
    """The UNet's output in its own form (a tuple with return_dict=False, else UNet2DConditionOutput) holding
    `prediction`."""
    if isinstance(out, tuple):
        return (prediction, *out[1:])
    return type(out)(sample=prediction)


def _timestep_value(timestep: Any) -> float:
    """t as the runtime's policies take it: the timestep the pipeline passes (a scalar, 0-d or per-row tensor)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0])
    return float(timestep)


class GuidedRun:
    """One pipeline call: its policy (made at the first UNet call, when the batch size is known) and per step the
    timestep, d and each image's scale."""

    def __init__(self, pipe: Any, config: PolicyConfig):
        self.pipe, self.config = pipe, config
        self.policy: GuidancePolicy | None = None
        self.timesteps: list[float] = []
        self.gaps: list[np.ndarray] = []  # per step, (N,) float64; NaN where d was not measured
        self.scales: list[np.ndarray] = []
        self.sample_shape: tuple[int, ...] | None = None
        self.prediction_type = "epsilon"  # the scheduler's, read at the first step

    def eps_gap_scale(self, step: int, t: float) -> float:
        """What turns a difference of two UNet outputs at this step into one of ε, as the runtime's schedulers do:
        1 for ε-prediction; α_t = √ᾱ_t for v-prediction (ε_p − ε_∅ = α_t (v_p − v_∅) at the same x_t), with ᾱ from
        the scheduler's sigma where it steps in sigmas (ᾱ = 1 / (1 + σ²)), else from alphas_cumprod at t."""
        scheduler = self.pipe.scheduler
        if self.prediction_type == "epsilon":
            return 1.0
        sigmas = getattr(scheduler, "sigmas", None)
        index = getattr(scheduler, "step_index", None)
        index = step if index is None else index  # None before a multistep scheduler's first step
        if isinstance(sigmas, torch.Tensor) and index < len(sigmas):
            sigma = float(sigmas[index])
            return 1.0 / math.sqrt(1.0 + sigma * sigma)
        alphas_cumprod = scheduler.alphas_cumprod
        return math.sqrt(float(alphas_cumprod[min(round(t), len(alphas_cumprod) - 1)]))

    def __call__(self, forward: Callable[..., Any], signature: inspect.Signature, args: tuple,
                 kwargs: dict[str, Any]) -> Any:
        if not self.pipe.do_classifier_free_guidance:
            raise AdapterError("the pipeline ran its UNet without classifier-free guidance (a callback set its "
                               "guidance_scale to 1 or below?); the guard's policy sets every image's scale, so "
                               "CFG must stay on")
        bound = signature.bind(*args, **kwargs)
        sample = bound.arguments["sample"]
        rows = len(sample)
        if rows % 2:
            raise AdapterError(f"the UNet was called with {rows} rows; classifier-free guidance batches [uncond; cond]")
        n = rows // 2
        if self.policy is None:  # the first step: the scheduler is the one this call runs
            self.prediction_type = self.pipe.scheduler.config.get("prediction_type", "epsilon")
            if self.prediction_type not in PREDICTION_TYPES:
                raise AdapterError(f"prediction_type {self.prediction_type!r} is not supported (supported: "
                                   f"{', '.join(PREDICTION_TYPES)})")
            num_train = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
            self.policy = make_policy(self.config, n, num_train)
            self.sample_shape = tuple(sample.shape[1:])
        elif n != self.policy.n:
            raise AdapterError(f"the UNet's batch changed from {self.policy.n} to {n} images within one call")
        policy, step = self.policy, len(self.timesteps)
        t = _timestep_value(bound.arguments["timestep"])
        need = policy.rows(step, t)  # which of ε_∅ and ε_p each image needs at this step
        if need.kind == "both":
            out = forward(*args, **kwargs)
            prediction = out[0]
            eps_uncond, eps_cond = prediction[:n].float(), prediction[n:].float()
        else:  # only the rows the images need: [their ε_∅ rows; their ε_p rows]
            uncond_rows, cond_rows = np.flatnonzero(need.uncond), np.flatnonzero(need.cond)
            index = torch.as_tensor(np.concatenate([uncond_rows, n + cond_rows]), dtype=torch.long)
            for name in BATCHED_ARGUMENTS:
                if name in bound.arguments:
                    bound.arguments[name] = _pick_rows(bound.arguments[name], rows, index)
            out = forward(*bound.args, **bound.kwargs)
            prediction = out[0]
            picked = prediction.float()
            eps_uncond = torch.zeros((n, *picked.shape[1:]), dtype=picked.dtype, device=picked.device)
            eps_cond = torch.zeros_like(eps_uncond)
            eps_uncond[torch.as_tensor(uncond_rows, dtype=torch.long)] = picked[:len(uncond_rows)]
            eps_cond[torch.as_tensor(cond_rows, dtype=torch.long)] = picked[len(uncond_rows):]
        both = need.uncond & need.cond
        gap = np.full(n, np.nan)
        guidance = eps_cond - eps_uncond  # ε_p − ε_∅ (or v_p − v_∅) where both were made
        if both.any():
            norms = guidance.flatten(1).norm(dim=1).double().cpu().numpy()
            gap[both] = norms[both] * self.eps_gap_scale(step, t)
        scale = np.asarray(policy.scale(step, t, None if need.kind == "uncond" else gap), np.float64)
        scale = np.broadcast_to(scale, (n,))
        if scale[need.uncond & ~need.cond].any() or (scale[need.cond & ~need.uncond] != 1).any():
            raise AssertionError("a sample with one branch must use scale 0 (ε_∅ alone) or 1 (ε_p alone)")
        per_image = (-1, *[1] * (guidance.ndim - 1))
        s_view = torch.as_tensor(scale, dtype=torch.float32, device=guidance.device).view(per_image)
        has_uncond = torch.as_tensor(need.uncond, device=guidance.device).view(per_image)
        # ε̂ per image: ε_∅ + s (ε_p − ε_∅) where ε_∅ was made, else ε_p; both halves are ε̂, so the pipeline's own
        # combination ε̂ + g (ε̂ − ε̂) is ε̂ whatever its g.
        eps_hat = torch.where(has_uncond, eps_uncond + s_view * guidance, eps_cond).to(prediction.dtype)
        adjusted = torch.cat([eps_hat, eps_hat])
        self.timesteps.append(t)
        self.gaps.append(gap)
        self.scales.append(np.broadcast_to(scale, (n,)).copy())
        return _with_prediction(out, adjusted)

    def traces(self, prompts: Sequence[str | None], negative_prompts: Sequence[str | None],
               uncond: Sequence[str], extra: dict[str, Any]) -> list[dict[str, Any]]:
        """One trace per image with the runtime's fields (Pipeline._trace), for the steps that ran; `extra`: the
        fields of one model family (SDXL's micro-conditioning)."""
        if self.policy is None:  # the pipeline ran no step (interrupted before the first)
            return []
        policy, n = self.policy, self.policy.n
        gap = np.array(self.gaps).reshape(-1, n)
        scale = np.array(self.scales).reshape(-1, n)
        score = getattr(policy, "score", None)
        scheduler = self.pipe.scheduler
        family = "sdxl" if isinstance(self.pipe, StableDiffusionXLPipeline) else "sd"
        assert self.sample_shape is not None
        factor = self.pipe.vae_scale_factor
        traces = []
        for k in range(n):
            transition = int(policy.transition_step[k])
            traces.append({
                "prompt": prompts[k], "negative_prompt": negative_prompts[k], "seed": None,
                "policy": self.config.parameters(),
                "scheduler": type(scheduler).__name__,
                "steps": len(self.timesteps),
                "height": self.sample_shape[-2] * factor, "width": self.sample_shape[-1] * factor,
                "provider": f"torch-{self.pipe.unet.device.type}",
                "timesteps": list(self.timesteps),
                "gap": [None if np.isnan(v) else float(v) for v in gap[:, k]],
                "gap_space": GAP_SPACE,
                "scale": [float(v) for v in scale[:, k]],
                "transition_step": transition if transition >= 0 else None,
                "detection_score": None if score is None else float(score[k]),
                "model_family": family,
                "uncond": uncond[k],
                **extra,
            })
        return traces


@contextmanager
def intercepted(unet: torch.nn.Module, run: GuidedRun) -> Iterator[None]:
    """`unet` calls go through `run` until the block ends, whatever happens in it. Only this instance's `forward`
    is replaced, as accelerate's offload hooks replace it (a hook's forward is kept and called inside)."""
    own = unet.__dict__.get("forward")  # an instance-level forward already there (accelerate), else None
    inner = unet.forward
    signature = inspect.signature(type(unet).forward.__get__(unet))  # the class's arguments, whatever wraps them

    def forward(*args: Any, **kwargs: Any) -> Any:
        return run(inner, signature, args, kwargs)

    unet.forward = forward
    try:
        yield
    finally:
        if own is None:
            del unet.forward
        else:
            unet.forward = own


def _per_image(value: str | list[str] | None, count: int, per_prompt: int) -> list[str | None]:
    """A prompt argument (one string, a list, or None) as one entry per image, in the pipeline's order: each
    prompt's images together."""
    values: list[str | None] = [value] if value is None or isinstance(value, str) else list(value)
    if len(values) == 1:
        values = values * (count // per_prompt)
    return [values[k // per_prompt] if k // per_prompt < len(values) else None for k in range(count)]


class GuardedPipeline:
    """`pipe` called with a guidance policy (`basinguard.diffusers.guard`)."""

    def __init__(self, pipe: Any, config: PolicyConfig):
        if not isinstance(pipe, SUPPORTED_PIPELINES):
            raise AdapterError(f"guard takes a StableDiffusionPipeline or StableDiffusionXLPipeline (got "
                               f"{type(pipe).__name__})")
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise AdapterError("this UNet takes the guidance scale as an input (time_cond_proj_dim: a guidance-"
                               "distilled model such as LCM); it runs without classifier-free guidance to guard")
        if not isinstance(pipe.unet, torch.nn.Module) or not hasattr(type(pipe.unet), "forward"):
            raise AdapterError(f"pipe.unet must be a torch module (got {type(pipe.unet).__name__})")
        config.validate(int(pipe.scheduler.config.get("num_train_timesteps", 1000)))
        self.pipe, self.config = pipe, config
        self._signature = inspect.signature(pipe.__call__)

    @property
    def pipeline_guidance_scale(self) -> float:
        """The scale g the pipeline is called with: λ, or CFG_ON_SCALE where λ <= 1 would turn CFG off."""
        return self.config.guidance_scale if self.config.guidance_scale > 1 else CFG_ON_SCALE

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise AdapterError(f"{type(self.pipe).__name__} does not take these arguments: {exc}") from None
        given = bound.arguments
        # diffusers' __call__ takes **kwargs for its deprecated callbacks and ignores any other name without a word
        extra = [name for parameter in self._signature.parameters.values() if parameter.kind is parameter.VAR_KEYWORD
                 for name in given.get(parameter.name, {}) if name not in DEPRECATED_ARGUMENTS]
        if extra:
            raise AdapterError(f"{type(self.pipe).__name__} does not take the argument {extra[0]!r}")
        if "guidance_scale" in given:
            raise AdapterError("guidance_scale is set by guard(pipe, guidance_scale=...), not per call")
        if given.get("guidance_rescale", 0.0):
            raise AdapterError("guidance_rescale is not supported: it rescales the guided prediction against the "
                               "conditional one, which the guard has already combined per image")
        given["guidance_scale"] = self.pipeline_guidance_scale
        run = GuidedRun(self.pipe, self.config)
        with intercepted(self.pipe.unet, run):
            out = self.pipe(*bound.args, **bound.kwargs)
        n = 0 if run.policy is None else run.policy.n
        per_prompt = int(given.get("num_images_per_prompt") or 1)
        prompts = _per_image(given.get("prompt"), n, per_prompt)
        negatives = _per_image(given.get("negative_prompt"), n, per_prompt)
        traces = run.traces(prompts, negatives, self._uncond_kinds(given, negatives), self._sdxl_record(given, run))
        if isinstance(out, tuple):  # return_dict=False: the traces come last
            return (*out, traces)
        out.traces = traces
        return out

    def _sdxl_record(self, given: dict[str, Any], run: GuidedRun) -> dict[str, Any]:
        """SDXL's micro-conditioning and clip_skip as the runtime's traces record them (diffusers' defaults: the
        image's size and (0, 0)); nothing for SD."""
        if not isinstance(self.pipe, StableDiffusionXLPipeline) or run.sample_shape is None:
            return {}
        size = [run.sample_shape[-2] * self.pipe.vae_scale_factor, run.sample_shape[-1] * self.pipe.vae_scale_factor]

        def pair(name: str, default: list[int]) -> list[int]:
            value = given.get(name)
            return default if value is None else [int(v) for v in value]

        return {"original_size": pair("original_size", size), "crops_coords_top_left": pair("crops_coords_top_left", [0, 0]),
                "target_size": pair("target_size", size), "clip_skip": given.get("clip_skip")}

    def _uncond_kinds(self, given: dict[str, Any], negatives: Sequence[str | None]) -> list[str]:
        """Which e_∅ each image's d is measured against, as the runtime's traces name it."""
        if given.get("negative_prompt_embeds") is not None:
            return ["negative prompt embeddings"] * len(negatives)
        # SDXL encodes no negative prompt as zeros (force_zeros_for_empty_prompt); SD encodes the empty prompt
        zeros = (isinstance(self.pipe, StableDiffusionXLPipeline) and given.get("negative_prompt") is None
                 and bool(self.pipe.config.get("force_zeros_for_empty_prompt", True)))
        return ["zeros" if zeros else "negative prompt" if negative else "empty prompt" for negative in negatives]
