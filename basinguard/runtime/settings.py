"""Sampling settings, with one owner: the library's defaults, then the model's (`sampling_defaults` in its
basinguard.json), then explicit overrides (CLI flags, API keywords, a prompt file's fields). Each override is
checked here against the policy it would apply to; the model checks the ranges once (`ModelSpec.resolve`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from basinguard.runtime.errors import InputError
from basinguard.runtime.guidance import PolicyConfig, setting_problem


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 50
    scheduler: str | None = None  # None: the model's own scheduler config
    height: int | None = None  # None: the model's native size
    width: int | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # SDXL's micro-conditioning (time_ids), in pixels: (height, width), (top, left), (height, width). None: diffusers'
    # defaults, the image's own size and (0, 0). SD models take none of them.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    # SDXL: each text encoder's hidden_states[-(clip_skip + 2)] for the prompts (negative prompts keep the penultimate
    # layer), as diffusers' clip_skip; None: the penultimate layer
    clip_skip: int | None = None


# Setting name (flag, keyword and prompt-file field alike) -> the PolicyConfig field it sets.
POLICY_SETTINGS = {"policy": "name", **{name: name for name in (
    "guidance_scale", "transition_t", "pre_scale", "opposite_scale", "mitigation", "detect_threshold",
    "latest_transition_t", "guidance_end_t")}}
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")  # SDXL's time_ids, in this order
FAMILY_SETTINGS = (*MICRO_CONDITIONING, "clip_skip")  # settings a model family may take (see conditioning.py)
SAMPLING_SETTINGS = ("steps", "scheduler", "height", "width", *FAMILY_SETTINGS)
SETTINGS = (*POLICY_SETTINGS, *SAMPLING_SETTINGS)
# What a setting is when neither the model nor the user says (None: the model's own scheduler, its native size, λ
# for λ_og, no threshold, no fallback).
LIBRARY_DEFAULTS: dict[str, Any] = {"policy": "cfg", "guidance_scale": 7.5, "transition_t": 500, "pre_scale": 0.0,
                                    "opposite_scale": None, "mitigation": "og-dtp", "detect_threshold": None,
                                    "latest_transition_t": None, "guidance_end_t": None, "steps": 50, "scheduler": None}
_CHECKED = ("pre_scale", "transition_t", "opposite_scale", "mitigation", "latest_transition_t")


def _check_overrides(overrides: Mapping[str, Any], policy: PolicyConfig, name: Callable[[str], str]) -> None:
    """A transition setting given where its policy does not use it would be ignored without a word: refused."""
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise InputError(f"unknown sampling setting {unknown[0]!r} (settings: {', '.join(SETTINGS)})")
    for setting in _CHECKED:
        problem = setting in overrides and setting_problem(setting, policy.name, policy.mitigation, name(setting))
        if problem:
            raise InputError(problem)


def sampling_from(model_defaults: Mapping[str, Any], overrides: Mapping[str, Any],
                  name: Callable[[str], str] = lambda setting: setting) -> SamplingConfig:
    """The settings of a run: the library's defaults, then the model's, then `overrides` (None values are unset).
    `name` says how the user wrote a setting (a flag, a keyword), for the errors."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    merged = {**LIBRARY_DEFAULTS, **{k: v for k, v in model_defaults.items() if k in SETTINGS}, **overrides}
    # A model's default threshold is for its default auto policy; under another policy it would refuse every job.
    if merged["policy"] != "auto" and "detect_threshold" not in overrides:
        merged["detect_threshold"] = None
    merged["mitigation"] = merged["mitigation"] or LIBRARY_DEFAULTS["mitigation"]
    policy = PolicyConfig(**{attr: merged[setting] for setting, attr in POLICY_SETTINGS.items()})
    _check_overrides(overrides, policy, name)
    return SamplingConfig(policy=policy, **{k: merged.get(k) for k in SAMPLING_SETTINGS})


def with_overrides(base: SamplingConfig, overrides: Mapping[str, Any],
                   name: Callable[[str], str] = lambda setting: setting) -> SamplingConfig:
    """`base` (a job's settings) with some settings replaced (a prompt line's fields; None values are unset)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    policy = replace(base.policy, **{POLICY_SETTINGS[k]: v for k, v in overrides.items() if k in POLICY_SETTINGS})
    _check_overrides(overrides, policy, name)
    return replace(base, policy=policy, **{k: v for k, v in overrides.items() if k in SAMPLING_SETTINGS})


def family_record(sampling: SamplingConfig, settings: tuple[str, ...]) -> dict[str, object]:
    """A resolved sampling's family settings as traces, manifests and calibrations record them (pairs as lists)."""
    values = {name: getattr(sampling, name) for name in settings}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}
