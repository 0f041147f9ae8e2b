"""The denoising loop: Algorithm 1 of Jain et al. over any scheduler, policy and model family."""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from basinguard.engine import EngineError, LoadedModel
from basinguard.runtime.conditioning import Conditioning
from basinguard.runtime.errors import InputError
from basinguard.runtime.guidance import GuidancePolicy, Rows
from basinguard.runtime.schedulers import Scheduler
from basinguard.runtime.timer import StageTimer


def denoise(unet: UNetStage, scheduler: Scheduler, policy: GuidancePolicy, x: np.ndarray, cond: Conditioning,
            steps: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reverse diffusion with a per-sample guidance policy, over the scheduler's first `steps` steps (all: None).
    Returns x, d per step (NaN where not measured) and the scale applied per step, both (steps, N)."""
    n = len(x)
    timesteps = scheduler.timesteps[:steps]
    gap = np.full((len(timesteps), n), np.nan)
    scale = np.zeros_like(gap)
    # Right after a UNet call each numpy call costs 10-70 µs (cold caches), so each step below is a few in-place
    # calls on buffers made once: the CFG batch [x; x] is filled by one broadcast copy.
    pair = np.empty((2, *x.shape), x.dtype)
    pair_batch = pair.reshape(2 * n, *x.shape[1:])
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, i)
        rows = policy.rows(i, t)
        if rows.kind == "both":  # every sample: ε_∅ and ε_p in one call at 2N
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
        elif rows.kind == "uncond":  # the policy guarantees scale 0 here: ε̂ = ε_∅, at batch N
            eps = unet(x_in, t, cond.uncond)
            scale[i] = policy.scale(i, t, None)
            assert not scale[i].any(), "a policy that skips the conditional branch must use scale 0"
        else:  # each sample its own rows (an end of guidance, a batch of flagged and clean prompts)
            eps = guided_rows(unet, x_in, t, cond, rows, policy, i, gap[i], scale[i], scheduler.eps_gap_scale[i])
        x = scheduler.step(eps, i, x)
    return x, gap, scale


def guided_rows(unet: UNetStage, x: np.ndarray, t: float, cond: Conditioning, rows: Rows, policy: GuidancePolicy,
                step: int, gap: np.ndarray, scale: np.ndarray, eps_gap_scale: float) -> np.ndarray:
    """One step where samples need different predictions: one UNet call on just the rows they need (ε_∅ rows first,
    then ε_p rows), d where a sample has both, and ε̂ per sample; `gap` and `scale` (this step's, (N,)) are filled."""
    uncond, cond_rows = np.flatnonzero(rows.uncond), np.flatnonzero(rows.cond)
    out = unet(np.concatenate([x[uncond], x[cond_rows]]), t, cond.rows(rows))
    eps_uncond = np.zeros_like(x)
    eps_cond = np.zeros_like(x)
    eps_uncond[uncond], eps_cond[cond_rows] = out[:len(uncond)], out[len(uncond):]
    both = rows.uncond & rows.cond
    guidance = eps_cond - eps_uncond
    if both.any():
        flat = guidance[both].reshape(int(both.sum()), -1)
        gap[both] = np.sqrt(np.vecdot(flat, flat)) * eps_gap_scale
    scale[:] = policy.scale(step, t, gap)
    assert not scale[rows.uncond & ~rows.cond].any(), "a sample without the conditional branch must use scale 0"
    assert (scale[rows.cond & ~rows.uncond] == 1).all(), "a sample without the unconditional branch must use scale 1"
    # ε̂ = ε_∅ + s · (ε_p − ε_∅): ε_∅ where s = 0, ε_p where only it was made
    return np.where(rows.uncond[:, None, None, None], eps_uncond + scale[:, None, None, None].astype(x.dtype) * guidance,
                    eps_cond).astype(x.dtype, copy=False)


def check_finite(values: np.ndarray, stage: str) -> None:
    if not np.isfinite(values).all():
        raise EngineError(f"{stage} produced NaN or infinite values; no image is written (with fp16 models, "
                          "export in fp32 or keep the VAE in fp32)")


class UNetStage:
    """The UNet as the loop calls it: (x, t, conditioning) → ε (or v), timed."""

    def __init__(self, model: LoadedModel, timer: StageTimer, inputs: tuple[str, ...]):
        for name in inputs:  # what the model family feeds it
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
