"""Euler and Euler ancestral: samplers on the sigma table, as diffusers' Euler(Ancestral)DiscreteScheduler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from basinguard.runtime.schedulers.base import (
    Scheduler,
    _karras_sigmas,
    _python_floats,
    _sigma_to_t,
    _spaced_timesteps,
)


class EulerDiscreteScheduler(Scheduler):
    """Euler ODE step in the VE parameterisation x / sqrt(1 + sigma^2) of the latent (k-diffusion style)."""

    _SUPPORTED = {
        **Scheduler._SUPPORTED,
        "interpolation_type": ("linear",),
        "timestep_type": ("discrete",),
        "rescale_betas_zero_snr": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "use_karras_sigmas": (False, None, True),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
    }

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        self._sigma_table(config, bool(config.get("use_karras_sigmas")),
                          config.get("final_sigmas_type", "zero") == "sigma_min")

    def _sigma_table(self, config: Mapping[str, Any], karras: bool, final_sigma_min: bool) -> None:
        """timesteps (float32, as diffusers keeps them), the n + 1 sigmas, the input scale and x_T's scale."""
        spacing, offset = self._spacing(config, "linspace")
        t = _spaced_timesteps(spacing, self.num_train_timesteps, self.num_inference_steps, offset, False)
        sigma_train = self.sigma_train
        # fractional timesteps interpolate linearly between train sigmas
        s = np.interp(t.astype(np.float32).astype(np.float64), np.arange(len(sigma_train)), sigma_train)
        if karras:  # between the spaced schedule's own end sigmas; fractional timesteps
            s = _karras_sigmas(config, s[-1], s[0], self.num_inference_steps)
            t = _sigma_to_t(s, sigma_train)
        self.timesteps = t.astype(np.float32)
        self.sigmas = np.append(s, sigma_train[0] if final_sigma_min else 0.0)
        self.input_scale = 1.0 / np.sqrt(self.sigmas[:-1] ** 2 + 1.0)
        self.eps_gap_scale = self._gap_scale(self.input_scale)  # the UNet sees the VP sample x / sqrt(1 + s^2)
        # diffusers' rule, kept verbatim: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading
        max_sigma = float(self.sigmas.max())
        self.init_noise_sigma = max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    def scale_model_input(self, x: np.ndarray, index: int) -> np.ndarray:
        return (x.astype(np.float64) * self.input_scale[index]).astype(x.dtype)

    def step(self, eps: np.ndarray, index: int, x: np.ndarray) -> np.ndarray:
        s, s_next = self.sigmas[index], self.sigmas[index + 1]
        xd, out = x.astype(np.float64), eps.astype(np.float64)
        if self.prediction_type == "v_prediction":
            derivative = (xd - (out * (-s / (s**2 + 1) ** 0.5) + xd / (s**2 + 1))) / s
        else:
            derivative = out  # (x - x0) / sigma with x0 = x - sigma * eps
        return (xd + derivative * (s_next - s)).astype(x.dtype)


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1): an Euler step down to sigma_down, then
    fresh noise of scale sigma_up, with sigma_down² + sigma_up² = sigma_next².

    The noise of image k comes from ``noise[k]``, a generator of its own (`step_noise`): one float32 standard
    normal draw of the image's latent shape per step that adds noise (every step but the last), in step order.
    The sigmas are Euler's without Karras or a final sigma_min (diffusers' class has neither option).
    """

    _SUPPORTED = {**Scheduler._SUPPORTED, "rescale_betas_zero_snr": (False,)}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int,
                 noise: Sequence[np.random.Generator] | None = None) -> None:
        Scheduler.__init__(self, config, num_inference_steps)
        self._sigma_table(config, karras=False, final_sigma_min=False)
        self.noise = None if noise is None else list(noise)
        s, s_next = self.sigmas[:-1], self.sigmas[1:]
        sigma_up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        dt = np.sqrt(s_next**2 - sigma_up**2) - s  # sigma_down - sigma
        if self.prediction_type == "v_prediction":  # derivative (x - x0) / s = x s / (s² + 1) + out / sqrt(s² + 1)
            x_x, x_out = 1.0 + dt * s / (s**2 + 1), dt / np.sqrt(s**2 + 1)
        else:  # derivative = eps
            x_x, x_out = np.ones_like(s), dt
        self._coefficients = _python_floats(x_x, x_out, sigma_up)

    def step(self, eps: np.ndarray, index: int, x: np.ndarray) -> np.ndarray:
        self._advance(index)  # each step draws the next noise: order matters
        x_x, x_out, sigma_up = self._coefficients[index]
        prev = x * x_x if x_x != 1.0 else x.copy()
        prev += eps.astype(x.dtype, copy=False) * x_out
        if sigma_up:
            if self.noise is None or len(self.noise) != len(x):
                raise ValueError(f"EulerAncestralDiscreteScheduler needs one noise generator per image ({len(x)}), "
                                 f"got {'none' if self.noise is None else len(self.noise)}; see step_noise")
            for row, generator in zip(prev, self.noise, strict=True):
                row += generator.standard_normal(row.shape, dtype=np.float32) * sigma_up
        return prev


