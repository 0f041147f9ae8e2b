"""The method inside diffusers pipelines: `guard(pipe, policy="dtp")` gives a StableDiffusionPipeline or
StableDiffusionXLPipeline per-image guidance by the runtime's own policies (STP, DTP, opposite guidance, `auto`),
with d = ‖ε_p − ε_∅‖ measured in ε space as the runtime measures it, and a trace per image.

    from basinguard.diffusers import guard
    guarded = guard(pipe, policy="dtp", guidance_scale=7.5)
    out = guarded(["a photo of a cat", "a castle"], num_inference_steps=30)
    out.images, out.traces  # traces: one dict per image (gap, scale, transition_step, ...)

The pipeline's own denoising loop runs unchanged; only its UNet call is intercepted (`guarded.py`). This module
imports neither torch nor diffusers, so `import basinguard.diffusers` works on a runtime-only install; `guard`
says what to install when they are missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any

from basinguard.diffusers.errors import AdapterError
from basinguard.errors import first_line
from basinguard.runtime.guidance import USED_BY, PolicyConfig, setting_problem

if TYPE_CHECKING:
    from basinguard.diffusers.guarded import GuardedPipeline

__all__ = ["AdapterError", "guard", "policy_config"]

INSTALL_HINT = "pip install 'basinguard[diffusers]' (torch, diffusers>=0.30,<0.37, transformers)"


def policy_config(policy: str, guidance_scale: float, settings: Mapping[str, Any]) -> PolicyConfig:
    """The runtime's PolicyConfig from guard()'s arguments. Settings are PolicyConfig's own fields, so a field the
    runtime gains (an end of guidance, say) is taken here without a change; a setting the policy would ignore is
    refused as the CLI refuses its flag (a None value sets nothing and passes)."""
    known = sorted(f.name for f in dataclass_fields(PolicyConfig) if f.name not in ("name", "guidance_scale"))
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise AdapterError(f"unknown policy setting {unknown[0]!r}; the settings are {', '.join(known)}")
    mitigation = settings.get("mitigation") or PolicyConfig.mitigation
    for name, value in settings.items():
        if value is not None and (name in USED_BY or name == "mitigation"):
            problem = setting_problem(name, policy, mitigation, name)
            if problem is not None:
                raise AdapterError(problem)
    return PolicyConfig(policy, guidance_scale, **settings)


def guard(pipe: Any, policy: str = "dtp", guidance_scale: float = 7.5, **settings: Any) -> GuardedPipeline:
    """`pipe` (a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline) called through a guidance policy:
    `policy` is one of cfg, stp, dtp, og-stp, og-dtp, auto; `guidance_scale` is λ; `settings` are the runtime's
    PolicyConfig fields (transition_t, pre_scale, opposite_scale, detect_threshold, mitigation,
    latest_transition_t, ...). The returned object takes the pipeline's own call arguments (except guidance_scale
    and guidance_rescale) and returns its usual output with `.traces`, one dict per image."""
    config = policy_config(policy, guidance_scale, settings)
    try:
        from basinguard.diffusers.guarded import GuardedPipeline
    except ImportError as exc:
        raise AdapterError(f"basinguard.diffusers needs torch and diffusers: {INSTALL_HINT} "
                           f"({first_line(exc)})") from None
    return GuardedPipeline(pipe, config)
