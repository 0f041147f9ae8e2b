"""NumPy re-implementations of the diffusers samplers Stable Diffusion pipelines use.

Each scheduler is configured from a diffusers ``scheduler_config.json`` dict and reproduces what the matching
diffusers class does after ``set_timesteps(num_inference_steps)``: the same timesteps and the same ``step``
arithmetic (eta = 0, no stochastic churn; Euler ancestral's noise comes from one generator per image, see
`step_noise`). Per-step coefficients are tabulated once in float64 in ``__init__``; ``step`` is a few array
operations and returns the dtype of the sample it was given. ``eps_gap_scale`` per step converts a difference of
two model outputs into ε space (see `Scheduler`).

A scheduler instance holds the state of one generation (multistep history), so make a fresh one per generation
and call ``step`` with ``index = 0, 1, ..., len(timesteps) - 1`` in order.

Deviations a caller must know about, all inherited from diffusers:

* ``PNDMScheduler`` with ``skip_prk_steps=True`` runs ``num_inference_steps + 1`` model evaluations (the second
  timestep is repeated for its pseudo-improved-Euler warm-up), so ``len(timesteps)`` can exceed the request.
* ``EulerDiscreteScheduler`` timesteps are float32 and, with ``"linspace"`` spacing or Karras sigmas, fractional;
  the UNet is called with those fractional values. With Karras sigmas the timesteps are mapped from the sigmas
  through float64 tables, so they may differ from diffusers' (float32 tables) in the last float32 digit.
* Missing config keys take the defaults of the class being built, exactly like diffusers' ``from_config`` on a
  plain dict: e.g. ``timestep_spacing`` defaults to ``"leading"`` for DDIM/PNDM but ``"linspace"`` for DPM++/Euler.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Any

import numpy as np

__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "GAP_SPACE",
    "InvalidConfig",
    "PNDMScheduler",
    "Scheduler",
    "UniPCMultistepScheduler",
    "check_config",
    "make_scheduler",
    "scheduler_name_for_config",
    "step_noise",
]


# ----------------------------------------------------------------------------------------------- shared tables


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

KARRAS = "-karras"  # a name ending in it runs the class with use_karras_sigmas; the plain name without
SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "dpm++2m-karras": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-karras": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
    "unipc-karras": UniPCMultistepScheduler,
}

_CLASS_NAMES: dict[str, str] = {cls.__name__: key for key, cls in SCHEDULERS.items() if not key.endswith(KARRAS)}


def scheduler_name_for_config(config: Mapping[str, Any]) -> str:
    """Key in ``SCHEDULERS`` for the diffusers class named by ``config["_class_name"]`` (its ``-karras`` name
    where the config sets use_karras_sigmas and the class has them)."""
    class_name = config.get("_class_name")
    if class_name not in _CLASS_NAMES:
        raise ValueError(f"unsupported scheduler class {class_name!r}; supported: {sorted(_CLASS_NAMES)}")
    key = _CLASS_NAMES[class_name]
    return key + KARRAS if config.get("use_karras_sigmas") is True and key + KARRAS in SCHEDULERS else key


def make_scheduler(config: Mapping[str, Any], num_inference_steps: int, name: str | None = None,
                   noise: Sequence[np.random.Generator] | None = None) -> Scheduler:
    """Build a fresh scheduler for one generation.

    ``name=None`` uses the config's own class; otherwise the named scheduler is built from the same dict,
    ignoring keys that do not apply to it (like diffusers' ``from_config``). ``noise``: one generator per image
    (`step_noise`) for a sampler that adds noise at each step (euler-a); the others ignore it, and euler-a built
    without it can be checked but not stepped.
    """
    key = scheduler_name_for_config(config) if name is None else name
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {key!r}; choose one of {sorted(SCHEDULERS)}")
    if key == "pndm" and config.get("_class_name") != "PNDMScheduler":
        # Another class's config has no skip_prk_steps, and PNDM's default (False) is the Runge-Kutta warm-up this
        # runtime does not implement; SD's own PNDM configs set it True, so switching to "pndm" means that.
        config = {"skip_prk_steps": True, **config}
    if "use_karras_sigmas" in SCHEDULERS[key]._SUPPORTED:  # the name says whether Karras sigmas run
        config = {**config, "use_karras_sigmas": key.endswith(KARRAS)}
    if SCHEDULERS[key] is EulerAncestralDiscreteScheduler:
        return EulerAncestralDiscreteScheduler(config, num_inference_steps, noise)
    return SCHEDULERS[key](config, num_inference_steps)
