"""LoRA files fused into a pipeline's UNet and text encoders before export, by diffusers' own loaders.

`--lora FILE[:WEIGHT]` takes the formats diffusers' `load_lora_weights` reads: diffusers/PEFT
(`unet.….lora_A.weight`) and kohya/A1111 (`lora_unet_….lora_down.weight` with `.alpha`), among others. Each file
is loaded as its own adapter, checked to have landed whole (every LoRA module of the file on a module of the model,
shapes equal), fused at its weight (W + weight · ΔW, as `fuse_lora(lora_scale=weight)`), and at the end the
adapters are unloaded, leaving the fused weights in plain modules that export as any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from basinguard.export.errors import ExportError, first_line

# A module's down (A) matrix in diffusers' converted LoRA state dicts: `lora_A.weight` (PEFT), `lora.down.weight`,
# `lora_linear_layer.down.weight`, `processor.to_q_lora.down.weight` (kohya's, converted), one per adapted module.
_DOWN = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)(lora_A|[._]down)\.weight$")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


@dataclass(frozen=True)
class LoraSpec:
    """One --lora: a file and the weight it is fused at."""

    path: Path
    weight: float = 1.0


def parse_lora(text: str) -> LoraSpec:
    """FILE[:WEIGHT]; a path that itself holds ':' works when no weight follows (the part after the last ':' must
    be a number to be taken as the weight)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            path, weight = text, 1.0
    else:
        path, weight = text, 1.0
    if weight != weight or abs(weight) == float("inf"):
        raise ExportError(f"--lora {text}: the weight must be a finite number")
    return LoraSpec(Path(path).expanduser(), weight)


def check_lora_file(spec: LoraSpec) -> None:
    """Before anything loads: the file exists and is safetensors (LoRA pickles are not loaded)."""
    if not spec.path.is_file():
        raise ExportError(f"--lora {spec.path}: no such file")
    if spec.path.suffix.lower() in PICKLE_SUFFIXES:
        raise ExportError(f"--lora {spec.path} is a pickle file, which can run code when loaded; LoRAs are read from "
                          ".safetensors files only")


def lora_modules(pipeline_cls: Any, spec: LoraSpec, has_text_encoder_2: bool) -> dict[str, set[str]]:
    """The LoRA modules a file holds, per component, as diffusers' converter (the pipeline class's
    `lora_state_dict`) names them; a file for SDXL's second text encoder on a model without one is refused here,
    before any model loads."""
    try:
        state, _ = pipeline_cls.lora_state_dict(str(spec.path))
    except Exception as exc:  # not a LoRA, an unknown naming, a corrupt file
        raise ExportError(f"--lora {spec.path} is not a LoRA diffusers can read: {first_line(exc)}") from None
    modules: dict[str, set[str]] = {}
    for key in state:
        if m := _DOWN.match(key):
            modules.setdefault(m[1], set()).add(m[2])
    if not modules:
        raise ExportError(f"--lora {spec.path} holds no LoRA modules diffusers recognises "
                          f"({len(state)} tensors, e.g. {next(iter(state), 'none')})")
    if "text_encoder_2" in modules and not has_text_encoder_2:
        raise ExportError(f"--lora {spec.path} has text_encoder_2 layers (an SDXL LoRA) but the model is SD 1.x/2.x")
    return modules


@contextmanager
def _diffusers_quiet() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _telling_line(exc: BaseException) -> str:
    """torch's load_state_dict heads its message "Error(s) in loading state_dict for X:"; the first size mismatch
    below it says what does not fit."""
    mismatch = next((line.strip() for line in str(exc).splitlines() if line.strip().startswith("size mismatch")), None)
    return mismatch or first_line(exc)


def _loaded_modules(model: Any, adapter: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}))


def fuse_loras(pipe: Any, loras: list[LoraSpec], log: Callable[[str], object]) -> None:
    """Load each LoRA as its own adapter, check it fits, fuse it at its weight; then drop the adapters."""
    if not loras:
        return
    try:
        import peft  # noqa: F401  diffusers' LoRA loading needs it
    except ImportError as exc:
        raise ExportError(f"--lora needs peft: pip install 'basinguard[export]' ({exc})") from None
    adapters, found = [], []
    for k, spec in enumerate(loras):
        adapter = f"basinguard_lora_{k}"
        expected = lora_modules(type(pipe), spec, getattr(pipe, "text_encoder_2", None) is not None)
        try:
            with _diffusers_quiet():  # its warnings and errors about keys: the check below says it in one line
                pipe.load_lora_weights(str(spec.path), adapter_name=adapter)
        except Exception as exc:  # shapes that differ, target modules the model lacks
            raise ExportError(f"--lora {spec.path} does not fit this model (a LoRA for another family or size?): "
                              f"{_telling_line(exc)}") from None
        for part, names in expected.items():
            landed = _loaded_modules(getattr(pipe, part), adapter)
            if landed != len(names):
                raise ExportError(f"--lora {spec.path} does not fit this model (a LoRA for another family?): "
                                  f"{landed} of its {len(names)} {part} modules found a layer to adapt")
        adapters.append(adapter)
        found.append(", ".join(f"{len(n)} {p} modules" for p, n in sorted(expected.items())))
    # All adapters at their weights, merged at once: loading an adapter into a merged model unmerges it first.
    try:
        pipe.set_adapters(adapters, adapter_weights=[spec.weight for spec in loras])
        pipe.fuse_lora(lora_scale=1.0, adapter_names=adapters)
    except Exception as exc:
        raise ExportError(f"fusing the LoRAs failed: {first_line(exc)}") from None
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    for spec, what in zip(loras, found):
        log(f"  fused {spec.path.name} at weight {spec.weight:g} ({what})")
