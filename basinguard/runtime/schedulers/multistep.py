"""DPM-Solver++ (2M) and UniPC (bh2): multistep samplers on one table of sigma-schedule options."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from basinguard.runtime.schedulers.base import (
    Scheduler,
    _karras_sigmas,
    _multistep_timesteps,
    _python_floats,
    _sigma_to_t,
)


def _repeated_sigmas(config: Mapping[str, Any], n: int) -> str | None:
    """DPM-Solver++ and UniPC divide by the log-SNR step: a layout whose timesteps repeat (after clamping to the
    table, as np.interp does) is refused. Karras sigmas never repeat."""
    if config.get("use_karras_sigmas"):
        return None
    n_train, offset = int(config.get("num_train_timesteps", 1000)), int(config.get("steps_offset", 0))
    spacing = config.get("timestep_spacing", "linspace")
    if spacing not in ("leading", "trailing", "linspace"):
        return None  # refused with its own message when the scheduler is built
    t = np.minimum(_multistep_timesteps(spacing, n_train, n, offset), n_train - 1)
    repeats = np.flatnonzero(np.diff(t) >= 0)
    if repeats.size:
        return (f"timestep_spacing {spacing!r} with steps_offset {offset} repeats timestep {int(t[repeats[0]])} "
                "(the multistep update would divide by zero)")
    return None


def _multistep_sigmas(sched: Scheduler, config: Mapping[str, Any], unipc: bool) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps (int64) and the n + 1 VE sigmas of DPM-Solver++ / UniPC (the last one 0 or sigma_min).

    Without Karras sigmas: the spaced timesteps and the train sigmas there. With them: the rho = 7 schedule between
    the train table's ends, and each sigma's timestep rounded, except that DPM-Solver++ on the cosine schedule
    truncates it (diffusers skips its round() there and casts to int64); UniPC's sigma_min final sigma is then
    the schedule's own last one (sigma_max itself at one step), DPM-Solver++'s the table's first."""
    n_train, n = sched.num_train_timesteps, sched.num_inference_steps
    sigma_train = sched.sigma_train
    if config.get("use_karras_sigmas"):
        s = _karras_sigmas(config, sigma_train[0], sigma_train[-1], n)
        t = _sigma_to_t(s, sigma_train)
        timesteps = np.trunc(t) if not unipc and config.get("beta_schedule") == "squaredcos_cap_v2" else t.round()
    else:
        spacing, offset = sched._spacing(config, "linspace")
        timesteps = _multistep_timesteps(spacing, n_train, n, offset)
        # np.interp clamps, so a "leading" + steps_offset timestep of num_train_timesteps reuses the last sigma
        s = np.interp(timesteps, np.arange(n_train), sigma_train)
    last = 0.0
    if config.get("final_sigmas_type", "zero") == "sigma_min":
        last = s[-1] if unipc and config.get("use_karras_sigmas") else sigma_train[0]
    return timesteps.astype(np.int64), np.append(s, last)


# The sigma-schedule options DPM-Solver++ and UniPC share in diffusers: Karras sigmas and the final sigma run here.
_MULTISTEP_SIGMAS: dict[str, tuple[Any, ...]] = {
    "final_sigmas_type": ("zero", "sigma_min"),
    "use_karras_sigmas": (False, None, True),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_flow_sigmas": (False, None),
    "use_dynamic_shifting": (False,),
}


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M), data-prediction form with the midpoint second-order update (arXiv:2211.01095)."""

    _SUPPORTED = {
        **Scheduler._SUPPORTED,
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (2,),
        "solver_type": ("midpoint",),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
        **_MULTISTEP_SIGMAS,
        "use_lu_lambdas": (False, None),
        "variance_type": (None,),
        "lambda_min_clipped": (-math.inf,),
    }

    @classmethod
    def _steps_problem(cls, config: Mapping[str, Any], n: int) -> str | None:
        return _repeated_sigmas(config, n)

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        self.timesteps, s = _multistep_sigmas(self, config, unipc=False)
        self.alpha_t = 1.0 / np.sqrt(s**2 + 1.0)
        self.sigma_t = s * self.alpha_t
        with np.errstate(divide="ignore"):  # a final sigma of 0 gives lambda = +inf; only first-order uses it
            lam = np.log(self.alpha_t) - np.log(self.sigma_t)
        steps = len(self.timesteps)
        idx = np.arange(steps)
        # exp(-h) with h = lambda_{i+1} - lambda_i, written as a ratio so sigma = 0 gives exactly 0
        exp_neg_h = (self.sigma_t[1:] * self.alpha_t[:-1]) / (self.sigma_t[:-1] * self.alpha_t[1:])
        self.c_x = self.sigma_t[1:] / self.sigma_t[:-1]
        self.c_x0 = -self.alpha_t[1:] * (exp_neg_h - 1.0)
        # Second order needs one stored x0; the last step drops to first order when the final sigma is zero
        # (always, in diffusers) or, with lower_order_final, for short (< 15 step) schedules.
        lower_final = (
            bool(config.get("euler_at_final", False))
            or (bool(config.get("lower_order_final", True)) and steps < 15)
            or config.get("final_sigmas_type", "zero") == "zero"
        )
        self.second_order = (idx >= 1) & ~((idx == steps - 1) & lower_final)
        # Midpoint: x_{i+1} = c_x x + c_x0 (D0 + D1/2), D1 = (m0 - m1) h / h_0.
        h = lam[1:] - lam[:-1]
        h_prev = np.concatenate([[np.nan], h[:-1]])
        with np.errstate(invalid="ignore"):
            self.c_d1 = np.where(self.second_order, 0.5 * self.c_x0 * h / h_prev, 0.0)
        # x0 = x0_x x + x0_out out; x_next = x_x x + x0_now x0 - x0_before x0_prev (midpoint form expanded).
        alpha, sigma = self.alpha_t[:-1], self.sigma_t[:-1]
        self.eps_gap_scale = self._gap_scale(alpha)
        if self.prediction_type == "v_prediction":
            x0_x, x0_out = alpha, -sigma
        else:
            x0_x, x0_out = 1.0 / alpha, -sigma / alpha
        self._coefficients = _python_floats(x0_x, x0_out, self.c_x, self.c_x0 + self.c_d1, self.c_d1)
        self._x0_prev: np.ndarray | None = None

    def step(self, eps: np.ndarray, index: int, x: np.ndarray) -> np.ndarray:
        self._advance(index)
        x0_x, x0_out, x_x, x0_now, x0_before = self._coefficients[index]
        x0 = x * x0_x
        x0 += eps.astype(x.dtype, copy=False) * x0_out
        prev = x * x_x
        prev += x0 * x0_now
        if self.second_order[index]:
            prev -= self._x0_prev * x0_before
        self._x0_prev = x0
        return prev



class UniPCMultistepScheduler(Scheduler):
    """UniPC (arXiv:2302.04867) as diffusers runs it by default: data prediction, B(h) = e^h - 1 ("bh2"), order 2
    with a first-order first and last step, and the UniC corrector after every step but the first.

    Step i converts the output to x0 (m_i) from the sample it was given, corrects that sample from the previous
    one with m_i (UniC), then predicts the next from the corrected sample (UniP). Both are linear in the stored
    samples and x0s, so the table holds per-step weights:
        x_i' = cx x_{i-1}' + cm_now m_i + cm_prev m_{i-1} + cm_prev2 m_{i-2}
        x_{i+1} = px x_i' + pm_now m_i + pm_prev m_{i-1}.
    """

    _SUPPORTED = {
        **Scheduler._SUPPORTED,
        "solver_order": (2,),
        # diffusers maps DPM-Solver's solver types to bh2, so a DPM++ config switched to UniPC runs bh2
        "solver_type": ("bh2", "midpoint", "heun", "logrho"),
        "predict_x0": (True,),
        "lower_order_final": (True,),
        "disable_corrector": ([],),
        "solver_p": (None,),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
        **_MULTISTEP_SIGMAS,
    }

    @classmethod
    def _steps_problem(cls, config: Mapping[str, Any], n: int) -> str | None:
        return _repeated_sigmas(config, n)

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        self.timesteps, s = _multistep_sigmas(self, config, unipc=True)
        steps = len(self.timesteps)
        alpha = 1.0 / np.sqrt(s**2 + 1.0)
        sigma = s * alpha
        with np.errstate(divide="ignore"):  # a final sigma of 0: lambda = +inf, h = inf, e^-h = 0
            lam = np.log(alpha) - np.log(sigma)
        # UniP from i to i+1: first order at the first and last step (warm-up, lower_order_final), else order 2
        h = lam[1:] - lam[:-1]
        phi = np.expm1(-h)  # h·φ1(-h) = B(h) for bh2
        order2 = (np.arange(steps) >= 1) & (np.arange(steps) < steps - 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            # D1 = (m_{i-1} - m_i) / r with r = (λ_{i-1} - λ_i) / h, weighted by ρ = 1/2
            r = np.concatenate([[np.nan], lam[:-2] - lam[1:-1]]) / h
            d1 = np.where(order2, -alpha[1:] * phi * 0.5 / r, 0.0)
        px = sigma[1:] / sigma[:-1]
        pm_now, pm_prev = -alpha[1:] * phi - d1, d1
        # UniC at i >= 1 over the interval i-1 -> i, of the order UniP used there (1 or 2)
        cx, cm_now, cm_prev, cm_prev2 = (np.zeros(steps) for _ in range(4))
        for i in range(1, steps):
            hc = lam[i] - lam[i - 1]
            hh = -hc
            b_h = np.expm1(hh)
            phi_k = b_h / hh - 1  # h φ_1 / h - 1, then the next φ_k by the recursion diffusers uses
            b1 = phi_k / b_h
            b2 = (phi_k / hh - 0.5) * 2 / b_h
            if order2[i - 1]:  # ρ solves [[1, 1], [r, 1]] ρ = [b1, b2]
                rc = (lam[i - 2] - lam[i - 1]) / hc
                rho0 = (b1 - b2) / (1 - rc)
                rho_now = b1 - rho0
                cm_prev2[i] = -alpha[i] * b_h * rho0 / rc
            else:
                rho0, rc, rho_now = 0.0, 1.0, 0.5
            cx[i] = sigma[i] / sigma[i - 1]
            cm_now[i] = -alpha[i] * b_h * rho_now
            cm_prev[i] = -alpha[i] * b_h + alpha[i] * b_h * rho_now + alpha[i] * b_h * rho0 / rc
        a_now, s_now = alpha[:-1], sigma[:-1]
        self.eps_gap_scale = self._gap_scale(a_now)
        if self.prediction_type == "v_prediction":
            x0_x, x0_out = a_now, -s_now
        else:
            x0_x, x0_out = 1.0 / a_now, -s_now / a_now
        self._coefficients = _python_floats(x0_x, x0_out, cx, cm_now, cm_prev, cm_prev2, px, pm_now, pm_prev)
        self._x_prev: np.ndarray | None = None  # the corrected sample of the previous step
        self._m: list[np.ndarray] = []  # x0 of the last two steps, oldest first

    def step(self, eps: np.ndarray, index: int, x: np.ndarray) -> np.ndarray:
        self._advance(index)
        x0_x, x0_out, cx, cm_now, cm_prev, cm_prev2, px, pm_now, pm_prev = self._coefficients[index]
        m = x * x0_x
        m += eps.astype(x.dtype, copy=False) * x0_out
        if index:  # UniC: x_i' from x_{i-1}' and the x0s, replacing the given sample
            x = self._x_prev * cx
            x += m * cm_now
            x += self._m[-1] * cm_prev
            if cm_prev2:
                x += self._m[-2] * cm_prev2
        prev = x * px
        prev += m * pm_now
        if pm_prev:
            prev += self._m[-1] * pm_prev
        self._x_prev, self._m = x, [*self._m[-1:], m]
        return prev


# ----------------------------------------------------------------------------------------------- factory
