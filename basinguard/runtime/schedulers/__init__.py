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

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from basinguard.runtime.schedulers.base import (
    GAP_SPACE,
    InvalidConfig,
    Scheduler,
    UnsupportedConfig,
    check_config,
    step_noise,
)
from basinguard.runtime.schedulers.ddim import DDIMScheduler, PNDMScheduler
from basinguard.runtime.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from basinguard.runtime.schedulers.multistep import DPMSolverMultistepScheduler, UniPCMultistepScheduler

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
    "UnsupportedConfig",
    "check_config",
    "make_scheduler",
    "scheduler_name_for_config",
    "step_noise",
]


# ----------------------------------------------------------------------------------------------- shared tables


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
