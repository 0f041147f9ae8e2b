"""A1111's `parameters` text ("infotext"): the prompt, a `Negative prompt:` line, then one line of `Key: value` pairs.

stable-diffusion-webui writes it into PNG text chunks and JPEG/WebP EXIF UserComment; civitai, ComfyUI and most
image browsers parse it with webui's `parse_generation_parameters`, which takes the last line as the pairs when it
holds three or more of them, and a value as JSON when it starts and ends with a double quote. Values holding a
comma, a colon or a line break are therefore written as JSON strings, as webui's own `quote` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# basinguard's scheduler names → webui's sampler names; "-karras" becomes `Schedule type: Karras`.
SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM++ 2M", "euler": "Euler", "euler-a": "Euler a", "pndm": "PLMS",
                 "unipc": "UniPC"}
KARRAS = "-karras"
# A policy's parameters (`PolicyConfig.parameters`) → their keys here; λ is webui's own `CFG scale`.
POLICY_KEYS = {"name": "Guidance policy", "transition_t": "Transition t", "pre_scale": "Pre scale",
               "opposite_scale": "Opposite scale", "mitigation": "Mitigation", "detect_threshold": "Detect threshold",
               "latest_transition_t": "Latest transition t"}


def quote(value: object) -> str:
    """A value as webui writes it: as is, or as a JSON string where a comma, colon or line break would end it."""
    text = number(value) if isinstance(value, float) else str(value)
    if not any(c in text for c in ",:\n\r"):
        return text
    return json.dumps(text, ensure_ascii=False)


def number(value: float) -> str:
    """A float as short as it reads back exactly (7.5, not 7.500000)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def sampler_fields(scheduler: str | None) -> dict[str, str]:
    if not scheduler:
        return {}
    base = scheduler.removesuffix(KARRAS)
    # "Automatic": the model's scheduler config decides the timestep spacing, as webui's sampler default does
    return {"Sampler": SAMPLER_NAMES.get(base, base), "Schedule type": "Karras" if scheduler.endswith(KARRAS)
            else "Automatic"}


def a1111_parameters(trace: Mapping[str, Any], *, model_name: str | None = None, model_hash: str | None = None,
                     version: str | None = None) -> str:
    """The `parameters` text of an image from its trace (`Pipeline.generate`'s), webui's fields first, then
    basinguard's guidance policy, its parameters and the step at which the image switched to λ."""
    policy = dict(trace.get("policy") or {})
    fields: dict[str, object] = {"Steps": trace.get("steps"), **sampler_fields(trace.get("scheduler")),
                                 "CFG scale": policy.pop("guidance_scale", None), "Seed": trace.get("seed")}
    if trace.get("width") is not None and trace.get("height") is not None:
        fields["Size"] = f"{trace['width']}x{trace['height']}"
    fields |= {"Model hash": model_hash, "Model": model_name}
    for name, value in policy.items():
        fields[POLICY_KEYS.get(name, name.replace("_", " ").capitalize())] = value
    transition = trace.get("transition_step")
    fields["Transition step"] = "none" if transition is None else transition  # none: never switched to λ
    if trace.get("detection_score") is not None:
        fields["Detection score"] = trace["detection_score"]
    if version:
        fields["Version"] = version
    pairs = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    lines = [str(trace.get("prompt", ""))]
    if trace.get("negative_prompt"):
        lines.append(f"Negative prompt: {trace['negative_prompt']}")
    return "\n".join([*lines, pairs])
