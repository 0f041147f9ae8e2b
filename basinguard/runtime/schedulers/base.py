"""The shared part of the samplers: config checks, the noise tables, the `Scheduler` base class."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np


class UnsupportedConfig(ValueError):
    """A class-specific scheduler option this runtime does not implement: another scheduler, built from the same
    config, may still run the model. Options every scheduler reads (beta_schedule, timestep_spacing, the base
    class's `_SUPPORTED` keys) raise a plain ValueError: no other scheduler would help."""


class InvalidConfig(ValueError):
    """A scheduler config value that is malformed for every scheduler (a string where a number belongs, betas
    outside (0, 1), ...); the message starts with the field's name so a caller can prefix the file."""


_NUMBERS = ("beta_start", "beta_end", "clip_sample_range")
_OPTIONAL_POSITIVE = ("sigma_min", "sigma_max")  # Karras' schedule end points; null: the trained ones
_FLAGS = ("clip_sample", "set_alpha_to_one", "skip_prk_steps", "lower_order_final", "euler_at_final",
          "use_karras_sigmas", "thresholding", "rescale_betas_zero_snr")
_TEXT = ("beta_schedule", "timestep_spacing", "prediction_type")
MIN_ALPHA_CUMPROD = 1e-30  # ᾱ at the last train step; below, sigma_max**2 nears float32's limit


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: Mapping[str, Any]) -> None:
    """Raise InvalidConfig, naming the field, for a value no scheduler can use: wrong types, a negative
    steps_offset (its timesteps would wrap around the alphas table), trained_betas of the wrong length, betas
    outside (0, 1) (square roots of negative numbers, then NaN images), an ᾱ that underflows, Karras ends in the
    wrong order. A prediction_type no scheduler here implements raises a plain ValueError (valid, unsupported)."""
    if not isinstance(config, Mapping):
        raise InvalidConfig(f"a scheduler config must be a JSON object, not {type(config).__name__}")
    n_train = config.get("num_train_timesteps", 1000)
    if isinstance(n_train, float) and n_train.is_integer():
        n_train = int(n_train)
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 2:
        raise InvalidConfig(f"num_train_timesteps must be an integer >= 2, not {n_train!r}")
    offset = config.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < n_train:
        raise InvalidConfig(f"steps_offset must be an integer in [0, {n_train - 1}], not {offset!r}")
    for key in _NUMBERS:
        if key in config and not _is_number(config[key]):
            raise InvalidConfig(f"{key} must be a number, not {config[key]!r}")
    for key in _OPTIONAL_POSITIVE:
        if config.get(key) is not None and not (_is_number(config[key]) and config[key] > 0):
            raise InvalidConfig(f"{key} must be a positive number or null, not {config[key]!r}")
    for key in _FLAGS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise InvalidConfig(f"{key} must be true or false, not {config[key]!r}")
    for key in _TEXT:
        if key in config and not isinstance(config[key], str):
            raise InvalidConfig(f"{key} must be a string, not {config[key]!r}")
    trained = config.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list | tuple) or not all(_is_number(b) for b in trained):
            raise InvalidConfig("trained_betas must be a list of numbers or null")
        if len(trained) != n_train:
            raise InvalidConfig(f"trained_betas has {len(trained)} values but num_train_timesteps is {n_train}; "
                                "they must match")
    betas = _betas(config)
    bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
    if bad.size:
        where = (f"trained_betas[{bad[0]}] is {betas[bad[0]]:g}" if trained is not None else
                 f"beta_start {config.get('beta_start', 0.0001)!r} and beta_end {config.get('beta_end', 0.02)!r} "
                 f"give beta {betas[bad[0]]:g} at train step {bad[0]}")
        raise InvalidConfig(f"{where}; every beta must lie in (0, 1)")
    last = float(np.cumprod(1.0 - betas)[-1])
    if last < MIN_ALPHA_CUMPROD:  # sigma = sqrt((1 - ᾱ) / ᾱ) overflows float32 in the loop: NaN images
        raise InvalidConfig(f"num_train_timesteps {n_train} with these betas drives ᾱ to {last:.3g} at the last train "
                            f"step; it must stay above {MIN_ALPHA_CUMPROD:g} (Stable Diffusion's ends near 0.005)")
    low, high = config.get("sigma_min"), config.get("sigma_max")
    if low is not None and high is not None and low >= high:  # Karras' schedule would run from low noise to high
        raise InvalidConfig(f"sigma_min {low!r} must be below sigma_max {high!r}")
    prediction = config.get("prediction_type", "epsilon")
    supported = Scheduler._SUPPORTED["prediction_type"]
    if prediction not in supported:  # read by every scheduler: no other one would help
        raise ValueError(f"prediction_type {prediction!r} is not supported (supported: {', '.join(supported)})")


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
        with np.errstate(invalid="ignore"):  # a negative end point: NaN betas, refused by check_config
            return np.linspace(np.sqrt(start), np.sqrt(end), n, dtype=np.float64) ** 2

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


def _multistep_timesteps(spacing: str, n_train: int, n: int, offset: int) -> np.ndarray:
    """DPM-Solver++ and UniPC: trailing as DDIM; linspace/leading lay out n + 1 points and drop t = 0 (or offset)."""
    if spacing == "trailing":
        return _spaced_timesteps(spacing, n_train, n, offset)
    return _spaced_timesteps(spacing, n_train, n + 1, offset)[:-1]


def _karras_sigmas(config: Mapping[str, Any], sigma_low: float, sigma_high: float, n: int) -> np.ndarray:
    """Karras et al. (arXiv:2206.00364) rho = 7 schedule from sigma_max down to sigma_min, as diffusers builds it:
    the config's sigma_min / sigma_max where set, else the given end points."""
    low = config.get("sigma_min") or sigma_low
    high = config.get("sigma_max") or sigma_high
    ramp = np.linspace(0, 1, n)
    rho = 7.0
    return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho


def _sigma_to_t(sigmas: np.ndarray, sigma_train: np.ndarray) -> np.ndarray:
    """Fractional train timesteps of `sigmas`: linear interpolation in log sigma between the two neighbouring
    train sigmas, clamped to the table (diffusers' ``_sigma_to_t``, vectorised)."""
    log_sigmas = np.log(sigma_train)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _reject_unsupported(config: Mapping[str, Any], cls_name: str, allowed: Mapping[str, tuple[Any, ...]]) -> None:
    """Raise for options this runtime does not implement; ``allowed[key][0]`` is the diffusers default."""
    for key, values in allowed.items():
        value = config.get(key, values[0])
        if value not in values:
            error = ValueError if key in Scheduler._SUPPORTED else UnsupportedConfig  # read by every scheduler
            raise error(f"{cls_name}: {key}={value!r} is not supported (supported: {list(values)})")


def _python_floats(*columns: np.ndarray) -> list[tuple[float, ...]]:
    """Per-step coefficient tuples as Python floats. A Python float does not promote a float32 array (numpy 2
    promotion), so the step stays in the sample's dtype; and a step after a UNet call pays 10-70 µs per numpy
    call (cold caches), so the step is a few fused multiply-adds over these rather than a float64 round trip."""
    return list(zip(*(np.asarray(c, dtype=np.float64).tolist() for c in columns), strict=True))


GAP_SPACE = "epsilon"  # d is measured in ε space whatever the model predicts (Scheduler.eps_gap_scale)
NOISE_STREAM = 0x6E6F6973  # "nois": keeps an image's step noise apart from its x_T stream (default_rng(seed))


def step_noise(seeds: Sequence[int] | None, latents: np.ndarray | None) -> list[np.random.Generator]:
    """One generator per image for the noise an ancestral sampler adds at each step, so an image depends only on
    its own seed (or its own x_T), never on its batch: seeded from [seed, NOISE_STREAM], or, for given latents
    without seeds, from the SHA-256 of that image's x_T (as float32) and NOISE_STREAM."""
    if seeds is not None:
        return [np.random.default_rng([int(s), NOISE_STREAM]) for s in seeds]
    assert latents is not None, "step_noise needs seeds or latents"
    return [np.random.default_rng([*np.frombuffer(hashlib.sha256(
        np.ascontiguousarray(x, dtype=np.float32).tobytes()).digest(), dtype=np.uint32).tolist(), NOISE_STREAM])
        for x in latents]


# ----------------------------------------------------------------------------------------------- schedulers


class Scheduler:
    """Common interface: ``timesteps`` to feed the UNet, ``scale_model_input`` before it, ``step`` after it.

    ``eps_gap_scale[i]`` turns a difference of two model outputs at step i (same sample, two conditionings) into
    the difference of the ε they predict: 1 for epsilon prediction; for v-prediction ε = α_t·v + σ_t·x_t with x_t
    shared by both, so the ε gap is α_t = √ᾱ_t times the v gap, ᾱ_t read at the step's own noise level (the
    scheduler's sigma where it has one: ᾱ = 1 / (1 + σ²)).
    """

    timesteps: np.ndarray
    eps_gap_scale: np.ndarray
    init_noise_sigma: float = 1.0
    num_train_timesteps: int
    num_inference_steps: int
    # Options each class checks: key -> (diffusers default, *other supported values). Keys a diffusers class
    # does not have are ignored, as its from_config ignores them.
    _SUPPORTED: dict[str, tuple[Any, ...]] = {"prediction_type": ("epsilon", "v_prediction")}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        check_config(config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.num_inference_steps = self._check_steps(config, num_inference_steps)
        _reject_unsupported(config, type(self).__name__, self._SUPPORTED)
        self.prediction_type: str = config.get("prediction_type", "epsilon")
        self.alphas_cumprod = _alphas_cumprod(config)
        self._next_index = 0

    @property
    def sigma_train(self) -> np.ndarray:
        """Each train step's VE-style sigma √((1 − ᾱ)/ᾱ), the noise scale Euler, DPM-Solver++ and UniPC step in:
        α_t = 1/√(1 + σ²), σ_t = σ α_t."""
        ac = self.alphas_cumprod
        return np.sqrt((1 - ac) / ac)

    @classmethod
    def _steps_problem(cls, config: Mapping[str, Any], n: int) -> str | None:
        """Why `n` steps cannot run with this config (a timestep layout diffusers would fail on), or None."""
        return None

    @classmethod
    def _check_steps(cls, config: Mapping[str, Any], n: int) -> int:
        """`n` if this config runs it; else a ValueError stating the step counts that do run."""
        n_train = int(config.get("num_train_timesteps", 1000))
        what = f"{cls.__name__} with this scheduler config"
        if isinstance(n, bool) or not isinstance(n, Integral):
            raise ValueError(f"steps (--steps) must be an integer, got {n!r}")
        problem = cls._steps_problem(config, int(n)) if 1 <= n <= n_train else None
        if 1 <= n <= n_train and problem is None:
            return int(n)
        top = next(k for k in range(n_train, 0, -1) if cls._steps_problem(config, k) is None)
        if n < 1 or n > top:
            raise ValueError(f"steps (--steps) must be in [1, {top}] for {what}, got {n}"
                             + (f": at {n}, {problem}" if problem else ""))
        below = next(k for k in range(int(n) - 1, 0, -1) if cls._steps_problem(config, k) is None)
        above = next(k for k in range(int(n) + 1, top + 1) if cls._steps_problem(config, k) is None)
        raise ValueError(f"steps (--steps) {n} does not run with {what}: {problem}; {below} or {above} steps do")

    def _gap_scale(self, alpha: np.ndarray) -> np.ndarray:
        """eps_gap_scale from α_t = √ᾱ_t per step (see the class docstring)."""
        return np.asarray(alpha, np.float64) if self.prediction_type == "v_prediction" else np.ones(len(alpha))

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


def _leading_overflow(config: Mapping[str, Any], n: int) -> str | None:
    """DDIM/PNDM look ᾱ up at each timestep: "leading" + steps_offset can push the top one past the table (e.g.
    1000 steps, offset 1); diffusers accepts that in set_timesteps and then fails on the lookup in step."""
    n_train, offset = int(config.get("num_train_timesteps", 1000)), int(config.get("steps_offset", 0))
    top = (n - 1) * (n_train // n) + offset
    if config.get("timestep_spacing", "leading") == "leading" and top >= n_train:
        return (f"timestep_spacing 'leading' with steps_offset {offset} visits timestep {top}, outside the trained "
                f"range [0, {n_train - 1}]")
    return None


