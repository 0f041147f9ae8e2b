"""DDIM and PNDM (PLMS): samplers on the ᾱ table, as diffusers' DDIMScheduler and PNDMScheduler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from basinguard.runtime.schedulers.base import (
    Scheduler,
    UnsupportedConfig,
    _leading_overflow,
    _python_floats,
    _spaced_timesteps,
)


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0), arXiv:2010.02502 eq. 12."""

    _SUPPORTED = {**Scheduler._SUPPORTED, "thresholding": (False,), "rescale_betas_zero_snr": (False,)}

    @classmethod
    def _steps_problem(cls, config: Mapping[str, Any], n: int) -> str | None:
        return _leading_overflow(config, n)

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        spacing, offset = self._spacing(config, "leading")
        t = _spaced_timesteps(spacing, self.num_train_timesteps, self.num_inference_steps, offset)
        self.timesteps = t.astype(np.int64)
        ac = self.alphas_cumprod
        self.eps_gap_scale = self._gap_scale(np.sqrt(ac[self.timesteps]))
        final = 1.0 if config.get("set_alpha_to_one", True) else ac[0]
        # diffusers steps back by the *leading* stride whatever the spacing, so with "linspace" the target alpha
        # is not necessarily the next timestep's; kept for parity.
        prev = self.timesteps - self.num_train_timesteps // self.num_inference_steps
        a = ac[self.timesteps]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        self.clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        # x0 = x0_x x + x0_out out and ε̂ = eps_x x + eps_out out (out: the model output), then
        # x_prev = √ᾱ_prev x0 + √(1-ᾱ_prev) ε̂ — folded into x_x x + x_out out when x0 is not clipped.
        if self.prediction_type == "v_prediction":
            x0_x, x0_out, eps_x, eps_out = a**0.5, -((1 - a) ** 0.5), (1 - a) ** 0.5, a**0.5
        else:
            x0_x, x0_out, eps_x, eps_out = a**-0.5, -((1 - a) ** 0.5) / a**0.5, np.zeros_like(a), np.ones_like(a)
        to_x0, to_eps = a_prev**0.5, (1 - a_prev) ** 0.5
        self._coefficients = _python_floats(
            x0_x, x0_out, eps_x, eps_out, to_x0, to_eps,
            to_x0 * x0_x + to_eps * eps_x, to_x0 * x0_out + to_eps * eps_out,
        )

    def step(self, eps: np.ndarray, index: int, x: np.ndarray) -> np.ndarray:
        x0_x, x0_out, eps_x, eps_out, to_x0, to_eps, x_x, x_out = self._coefficients[index]
        out = eps.astype(x.dtype, copy=False)
        if self.clip is None:
            prev = x * x_x
            prev += out * x_out
            return prev
        x0 = x * x0_x
        x0 += out * x0_out
        np.clip(x0, -self.clip, self.clip, out=x0)  # eps is *not* re-derived from the clipped x0, as in diffusers
        x0 *= to_x0
        if eps_x:  # v-prediction: ε̂ mixes the sample in
            x0 += x * (to_eps * eps_x)
        x0 += out * (to_eps * eps_out)
        return x0



class PNDMScheduler(Scheduler):
    """PLMS (pseudo linear multistep, arXiv:2202.09778) as diffusers runs it with ``skip_prk_steps=True``.

    Index 0 is a plain pseudo step, index 1 re-evaluates the same interval with the averaged noise (a Heun-like
    warm-up, which is why the second timestep appears twice), then Adams-Bashforth of order 2, 3 and 4.
    """

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        if not config.get("skip_prk_steps", False):  # diffusers' default is False; SD configs set it True
            raise UnsupportedConfig(
                "PNDMScheduler: skip_prk_steps=False (Runge-Kutta warm-up) is not supported; set skip_prk_steps=True"
            )
        super().__init__(config, num_inference_steps)
        spacing, offset = self._spacing(config, "leading")
        up = _spaced_timesteps(spacing, self.num_train_timesteps, self.num_inference_steps, offset)[::-1]
        up = up.astype(np.int64)
        self.timesteps = np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1].copy()
        self.eps_gap_scale = self._gap_scale(np.sqrt(self.alphas_cumprod[self.timesteps]))
        stride = self.num_train_timesteps // self.num_inference_steps
        t_from, t_to = self.timesteps.copy(), self.timesteps - stride
        if len(self.timesteps) > 1:  # the repeated step goes from t_1 + stride to t_1, from the saved sample
            t_from[1], t_to[1] = self.timesteps[1] + stride, self.timesteps[1]
        ac = self.alphas_cumprod
        final = 1.0 if config.get("set_alpha_to_one", False) else ac[0]
        self.alpha = ac[t_from]
        self.alpha_prev = np.where(t_to >= 0, ac[np.maximum(t_to, 0)], final)
        self._ets: list[np.ndarray] = []
        self._x_start: np.ndarray | None = None

    def step(self, eps: np.ndarray, index: int, x: np.ndarray) -> np.ndarray:
        self._advance(index)
        xd, out = x.astype(np.float64), eps.astype(np.float64)
        if index == 0:
            self._ets.append(out)
            self._x_start = xd
        elif index == 1:  # average with the first output and redo the first interval from the saved sample
            out, xd = (out + self._ets[-1]) / 2, self._x_start
        else:
            self._ets = self._ets[-3:] + [out]
            e = self._ets
            if len(e) == 2:
                out = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                out = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                out = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        a, a_prev = self.alpha[index], self.alpha_prev[index]
        if self.prediction_type == "v_prediction":  # converted after combining, as diffusers does
            out = a**0.5 * out + (1 - a) ** 0.5 * xd
        # arXiv:2202.09778 eq. 9 (the transfer part of the pseudo numerical method)
        denom = a * (1 - a_prev) ** 0.5 + (a * (1 - a) * a_prev) ** 0.5
        return ((a_prev / a) ** 0.5 * xd - (a_prev - a) * out / denom).astype(x.dtype)

    @classmethod
    def _steps_problem(cls, config: Mapping[str, Any], n: int) -> str | None:
        return _leading_overflow(config, n)


