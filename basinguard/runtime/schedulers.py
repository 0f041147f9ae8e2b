"""NumPy re-implementations of the diffusers samplers Stable Diffusion pipelines use.

Each scheduler is configured from a diffusers ``scheduler_config.json`` dict and reproduces what the matching
diffusers class does after ``set_timesteps(num_inference_steps)``: the same timesteps and the same ``step``
arithmetic (eta = 0, no stochastic churn). Per-step coefficients are tabulated once in float64 in ``__init__``;
``step`` is a few array operations and returns the dtype of the sample it was given.

A scheduler instance holds the state of one generation (multistep history), so make a fresh one per generation
and call ``step`` with ``index = 0, 1, ..., len(timesteps) - 1`` in order.

Deviations a caller must know about, all inherited from diffusers:

* ``PNDMScheduler`` with ``skip_prk_steps=True`` runs ``num_inference_steps + 1`` model evaluations (the second
  timestep is repeated for its pseudo-improved-Euler warm-up), so ``len(timesteps)`` can exceed the request.
* ``EulerDiscreteScheduler`` timesteps are float32 and, with ``"linspace"`` spacing, fractional; the UNet is
  called with those fractional values.
* Missing config keys take the defaults of the class being built, exactly like diffusers' ``from_config`` on a
  plain dict: e.g. ``timestep_spacing`` defaults to ``"leading"`` for DDIM/PNDM but ``"linspace"`` for DPM++/Euler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral
from typing import Any

import numpy as np

__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "PNDMScheduler",
    "Scheduler",
    "make_scheduler",
    "scheduler_name_for_config",
]


# ----------------------------------------------------------------------------------------------- shared tables


class UnsupportedConfig(ValueError):
    """A class-specific scheduler option this runtime does not implement: another scheduler, built from the same
    config, may still run the model. Options every scheduler reads (beta_schedule, timestep_spacing, the base
    class's `_SUPPORTED` keys) raise a plain ValueError: no other scheduler would help."""


def _betas(config: Mapping[str, Any]) -> np.ndarray:
    """Per-train-step betas in float64 (diffusers builds them in float32; the difference is < 3e-7 relative)."""
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float64)
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2

    if schedule == "squaredcos_cap_v2":  # GLIDE cosine schedule, beta capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)])
    raise ValueError(
        f"beta_schedule {schedule!r} is not supported; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
    )


def _alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    return np.cumprod(1.0 - _betas(config))


def _spaced_timesteps(spacing: str, n_train: int, n: int, offset: int, round_linspace: bool = True) -> np.ndarray:
    """Descending timesteps (float64 values) for the three spacings of arXiv:2305.08891 Table 2.

    This is the DDIM form; the other schedulers are expressed through it (PNDM reverses it, DPM++ asks for one
    extra step and drops the last, Euler keeps linspace unrounded). ``np.arange`` with a float step is kept on
    purpose: it is what diffusers evaluates, including its length.
    """
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, n)
        return (ts.round() if round_linspace else ts)[::-1].copy()
    if spacing == "leading":  # integer ratio: the last train steps are never visited, steps_offset shifts all
        return (np.arange(0, n) * (n_train // n)).round()[::-1].astype(np.float64) + offset
    if spacing == "trailing":  # float ratio counted down from n_train, so the first timestep is n_train - 1
        return np.round(np.arange(n_train, 0, -n_train / n)) - 1.0
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; use 'leading', 'trailing' or 'linspace'")


def _reject_unsupported(config: Mapping[str, Any], cls_name: str, allowed: Mapping[str, tuple[Any, ...]]) -> None:
    """Raise for options this runtime does not implement; ``allowed[key][0]`` is the diffusers default."""
    for key, values in allowed.items():
        value = config.get(key, values[0])
        if value not in values:
            error = ValueError if key in Scheduler._SUPPORTED else UnsupportedConfig  # read by every scheduler
            raise error(f"{cls_name}: {key}={value!r} is not supported (supported: {list(values)})")


def _check_indexable(cls_name: str, timesteps: np.ndarray, n_train: int) -> None:
    """Fail early on a timestep past the alphas_cumprod table.

    With "leading" spacing, steps_offset can push the top timestep to n_train (e.g. 1000 steps, offset 1); diffusers
    accepts that in set_timesteps and then fails on an out-of-range lookup in step.
    """
    if timesteps.max() >= n_train:
        raise ValueError(
            f"{cls_name}: this timestep_spacing/steps_offset/num_inference_steps combination yields timestep "
            f"{int(timesteps.max())}, outside the trained range [0, {n_train - 1}]; use fewer steps or steps_offset=0"
        )


def _check_steps(config: Mapping[str, Any], num_inference_steps: int) -> int:
    n_train = int(config.get("num_train_timesteps", 1000))
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, Integral):
        raise ValueError(f"num_inference_steps must be an integer in [1, {n_train}], got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= n_train:
        raise ValueError(
            f"num_inference_steps must be in [1, {n_train}] (num_train_timesteps), got {num_inference_steps}"
        )
    return int(num_inference_steps)


def _python_floats(*columns: np.ndarray) -> list[tuple[float, ...]]:
    """Per-step coefficient tuples as Python floats. A Python float does not promote a float32 array (numpy 2
    promotion), so the step stays in the sample's dtype; and a step after a UNet call pays 10-70 µs per numpy
    call (cold caches), so the step is a few fused multiply-adds over these rather than a float64 round trip."""
    return list(zip(*(np.asarray(c, dtype=np.float64).tolist() for c in columns), strict=True))


# ----------------------------------------------------------------------------------------------- schedulers


class Scheduler:
    """Common interface: ``timesteps`` to feed the UNet, ``scale_model_input`` before it, ``step`` after it."""

    timesteps: np.ndarray
    init_noise_sigma: float = 1.0
    num_train_timesteps: int
    num_inference_steps: int
    # Options each class checks: key -> (diffusers default, *other supported values). Keys a diffusers class
    # does not have are ignored, as its from_config ignores them.
    _SUPPORTED: dict[str, tuple[Any, ...]] = {"prediction_type": ("epsilon", "v_prediction")}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        self.num_inference_steps = _check_steps(config, num_inference_steps)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        _reject_unsupported(config, type(self).__name__, self._SUPPORTED)
        self.prediction_type: str = config.get("prediction_type", "epsilon")
        self.alphas_cumprod = _alphas_cumprod(config)
        self._next_index = 0

    def _spacing(self, config: Mapping[str, Any], default: str) -> tuple[str, int]:
        return config.get("timestep_spacing", default), int(config.get("steps_offset", 0))

    def _advance(self, index: int) -> None:
        """Multistep schedulers keep history, so a skipped or repeated index would silently corrupt it."""
        if index != self._next_index:
            raise RuntimeError(
                f"{type(self).__name__}.step called with index {index}, expected {self._next_index}: steps must run "
                "in order 0..len(timesteps)-1 on a fresh scheduler per generation"
            )
        self._next_index += 1

    def scale_model_input(self, x: np.ndarray, index: int) -> np.ndarray:
        return x

    def step(self, eps: np.ndarray, index: int, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0), arXiv:2010.02502 eq. 12."""

    _SUPPORTED = {**Scheduler._SUPPORTED, "thresholding": (False,), "rescale_betas_zero_snr": (False,)}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        spacing, offset = self._spacing(config, "leading")
        t = _spaced_timesteps(spacing, self.num_train_timesteps, self.num_inference_steps, offset)
        self.timesteps = t.astype(np.int64)
        _check_indexable(type(self).__name__, self.timesteps, self.num_train_timesteps)
        ac = self.alphas_cumprod
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


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M), data-prediction form with the midpoint second-order update (arXiv:2211.01095)."""

    _SUPPORTED = {
        **Scheduler._SUPPORTED,
        "algorithm_type": ("dpmsolver++",),
        "solver_order": (2,),
        "solver_type": ("midpoint",),
        "thresholding": (False,),
        "rescale_betas_zero_snr": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "use_karras_sigmas": (False, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "use_lu_lambdas": (False, None),
        "use_flow_sigmas": (False, None),
        "use_dynamic_shifting": (False,),
        "variance_type": (None,),
        "lambda_min_clipped": (-math.inf,),
    }

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        n_train, n = self.num_train_timesteps, self.num_inference_steps
        spacing, offset = self._spacing(config, "linspace")
        if spacing == "trailing":
            t = _spaced_timesteps(spacing, n_train, n, offset)
        else:  # linspace/leading: lay out n + 1 points and drop t = 0 (or offset), as diffusers does
            t = _spaced_timesteps(spacing, n_train, n + 1, offset)[:-1]
        self.timesteps = t.astype(np.int64)
        ac = self.alphas_cumprod
        sigma_train = np.sqrt((1 - ac) / ac)  # VE-style sigma; alpha_t = 1/sqrt(1+s^2), sigma_t = s * alpha_t
        last = sigma_train[0] if config.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
        # np.interp clamps, so a "leading" + steps_offset timestep of num_train_timesteps reuses the last sigma
        s = np.interp(self.timesteps, np.arange(n_train), sigma_train)
        if np.any(np.diff(s) >= 0):  # e.g. "leading" with n >= num_train_timesteps - steps_offset: h = 0
            raise ValueError(
                f"DPMSolverMultistepScheduler: timestep_spacing={spacing!r}, steps_offset={offset} and "
                f"num_inference_steps={n} give repeated timesteps/sigmas (the 2M update would divide by zero); "
                "use fewer steps or another spacing"
            )
        s = np.append(s, last)
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


class EulerDiscreteScheduler(Scheduler):
    """Euler ODE step in the VE parameterisation x / sqrt(1 + sigma^2) of the latent (k-diffusion style)."""

    _SUPPORTED = {
        **Scheduler._SUPPORTED,
        "interpolation_type": ("linear",),
        "timestep_type": ("discrete",),
        "rescale_betas_zero_snr": (False,),
        "final_sigmas_type": ("zero", "sigma_min"),
        "use_karras_sigmas": (False, None),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
    }

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        spacing, offset = self._spacing(config, "linspace")
        t = _spaced_timesteps(spacing, self.num_train_timesteps, self.num_inference_steps, offset, False)
        self.timesteps = t.astype(np.float32)  # diffusers keeps float32 (fractional for linspace)
        ac = self.alphas_cumprod
        sigma_train = np.sqrt((1 - ac) / ac)
        last = sigma_train[0] if config.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
        # fractional timesteps interpolate linearly between train sigmas
        s = np.interp(self.timesteps.astype(np.float64), np.arange(len(sigma_train)), sigma_train)
        self.sigmas = np.append(s, last)
        self.input_scale = 1.0 / np.sqrt(self.sigmas[:-1] ** 2 + 1.0)
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
        _check_indexable(type(self).__name__, self.timesteps, self.num_train_timesteps)
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


# ----------------------------------------------------------------------------------------------- factory

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
}

_CLASS_NAMES: dict[str, str] = {cls.__name__: key for key, cls in SCHEDULERS.items()}


def scheduler_name_for_config(config: Mapping[str, Any]) -> str:
    """Key in ``SCHEDULERS`` for the diffusers class named by ``config["_class_name"]``."""
    class_name = config.get("_class_name")
    if class_name not in _CLASS_NAMES:
        raise ValueError(f"unsupported scheduler class {class_name!r}; supported: {sorted(_CLASS_NAMES)}")
    return _CLASS_NAMES[class_name]


def make_scheduler(config: Mapping[str, Any], num_inference_steps: int, name: str | None = None) -> Scheduler:
    """Build a fresh scheduler for one generation.

    ``name=None`` uses the config's own class; otherwise the named scheduler is built from the same dict,
    ignoring keys that do not apply to it (like diffusers' ``from_config``).
    """
    key = scheduler_name_for_config(config) if name is None else name
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {key!r}; choose one of {sorted(SCHEDULERS)}")
    if key == "pndm" and config.get("_class_name") != "PNDMScheduler":
        # Another class's config has no skip_prk_steps, and PNDM's default (False) is the Runge-Kutta warm-up this
        # runtime does not implement; SD's own PNDM configs set it True, so switching to "pndm" means that.
        config = {"skip_prk_steps": True, **config}
    return SCHEDULERS[key](config, num_inference_steps)
