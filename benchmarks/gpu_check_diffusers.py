"""GPU check of the diffusers adapter (basinguard.diffusers.guard), a section of benchmarks/gpu_check.py.

Needs torch with CUDA, diffusers >= 0.30, < 0.37 and transformers (diffusers' SD pipeline module imports it; no
text encoder runs: the prompts are random embeddings) — `pip install 'basinguard[diffusers]'`; the section is
skipped, with what is missing, where they are not importable. On the device:
1. a tiny SD pipeline in float32 under cfg, stp and og-dtp against the same pipeline on the CPU: the same switch
   step per image, the latents within the fp32/TF32 tolerance;
2. an SD 1.5-sized pipeline (random weights, 512², --tiny: the tiny one) in float16 (float32 on the CPU): finite
   latents; seconds of the plain pipeline and of guarded cfg, stp (τ = 500: the steps before it at batch N) and
   dtp; stp/cfg, guarded cfg/plain, and the UNet's batch-N/batch-2N time (benchmarks/diffusers_batch_n.py).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

# (what to import, what to tell) for each module the section needs
NEEDS = (("diffusers", "diffusers>=0.30,<0.37"), ("transformers", "transformers (diffusers' SD pipeline imports it)"))
TINY_N, TINY_SIZE, TINY_STEPS = 3, 64, 10


def missing_modules() -> list[str]:
    """What the section needs and cannot import here."""
    import importlib

    missing = []
    for module, what in NEEDS:
        try:
            importlib.import_module(module)
            if module == "diffusers":
                from diffusers import StableDiffusionPipeline  # noqa: F401  (a lazy import: fails without transformers)
        except Exception:  # absent, or a dependency of it missing
            missing.append(what)
    return missing


def _guarded_latents(pipe: Any, policy: str, settings: dict, n: int, size: int, steps: int) -> tuple[np.ndarray, list]:
    from diffusers_batch_n import embeddings, initial_latents

    from basinguard.diffusers import guard

    out = guard(pipe, policy, guidance_scale=7.5, **settings)(
        latents=initial_latents(pipe, n, size), num_inference_steps=steps, height=size, width=size,
        output_type="latent", **embeddings(pipe, n))
    return out.images.float().cpu().numpy(), [t["transition_step"] for t in out.traces]


def diffusers_section(r: Any, device: str, tiny: bool) -> dict:
    """The adapter on `device` (see the module docstring); `r`: gpu_check.Report."""
    r.say("== diffusers adapter (basinguard.diffusers.guard)")
    result: dict = {}
    missing = missing_modules()
    if missing:
        r.skip("diffusers adapter", f"needs {', '.join(missing)}: pip install 'basinguard[diffusers]'")
        return result
    import torch
    from diffusers_batch_n import build_pipeline, measure

    policies = {"cfg": {}, "stp": {"transition_t": 500}, "og-dtp": {"opposite_scale": 2.0}}
    cpu = build_pipeline("tiny", "cpu")
    here = build_pipeline("tiny", device)
    for policy, settings in policies.items():
        ref, ref_steps = _guarded_latents(cpu, policy, settings, TINY_N, TINY_SIZE, TINY_STEPS)
        got, steps = _guarded_latents(here, policy, settings, TINY_N, TINY_SIZE, TINY_STEPS)
        result[f"tiny {policy} transition steps"] = {"cpu": ref_steps, device: steps}
        r.say(f"  tiny {policy}: transition steps {steps} on {device}, {ref_steps} on cpu")
        r.check(f"adapter tiny {policy} latents on {device} vs cpu", got, ref, "fp32")
        if steps != ref_steps:
            r.check(f"adapter tiny {policy} transition steps on {device} vs cpu", np.array([1.0]), np.array([0.0]), "fp32")
    config = "tiny" if tiny else "sd15"
    size, n, steps = (TINY_SIZE, TINY_N, TINY_STEPS) if tiny else (512, 4, 30)
    if not r.afford(f"adapter timing ({config})", 30 if tiny else 150):
        return result
    dtype = torch.float16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    pipe = build_pipeline(config, device, dtype)
    r.say(f"  {config} pipeline ({str(dtype).removeprefix('torch.')}) built in {time.perf_counter() - start:.1f} s; "
          f"N={n}, {size}x{size}, {steps} DDIM steps")
    latents, _ = _guarded_latents(pipe, "og-dtp", policies["og-dtp"], n, size, steps)
    finite = bool(np.isfinite(latents).all())
    r.data["checks"].append({"what": f"adapter {config} og-dtp latents finite", "ok": finite})
    r.say(f"  {'PASS' if finite else 'FAIL'} adapter {config} og-dtp latents finite")
    timing = measure(pipe, n, size, steps, tau=500, repeats=1 if tiny else 3)
    for name, seconds in timing["seconds"].items():
        r.say(f"  {name:12s} {seconds:.3f} s")
    r.say(f"  stp/cfg {timing['stp_over_cfg']:.3f} ({timing['batch_n_steps']} of {timing['steps']} steps at batch N); "
          f"guarded cfg/plain {timing['guarded_cfg_over_plain']:.3f}; UNet N/2N {timing['unet_batch_n_over_2n']:.3f}")
    result[f"{config} timing"] = timing
    r.save()
    return result
