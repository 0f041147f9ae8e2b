"""`basinguard generate`: images for one prompt, each written before the next batch runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from basinguard.cli.common import (
    IMAGE_SUFFIXES,
    calibrated_threshold,
    image_options,
    indexed,
    model_dir,
    output_file,
    read_latents,
    refuse_overwriting,
    remove_leftovers,
    sampling_from_args,
)
from basinguard.errors import BasinguardError
from basinguard.files import write_atomic
from basinguard.runtime.guidance import PolicyConfig

if TYPE_CHECKING:
    from basinguard.outputs.images import ImageOptions
    from basinguard.runtime.pipeline import Generation


def save_image(generation, path: Path, raw: bool = False) -> None:
    """PNG, or with `raw` the float32 pixels in [0, 1] as .npy (for parity checks without 8-bit rounding)."""
    if raw:
        with open(path, "wb") as f:
            np.save(f, generation.pixels)
    else:
        generation.save_png(path)


def cmd_generate(args: argparse.Namespace) -> None:
    from basinguard.batch.prompts import MAX_IMAGES_PER_LINE
    from basinguard.runtime.detection import calibration_warnings
    from basinguard.runtime.pipeline import Pipeline
    from basinguard.runtime.spec import ModelSpec
    from basinguard.runtime.tokenizer import prompt_text, quiet_truncation

    if not 1 <= args.num_images <= MAX_IMAGES_PER_LINE:
        raise BasinguardError(f"--num-images must be in [1, {MAX_IMAGES_PER_LINE}] (got {args.num_images}; "
                              "for more, `basinguard batch`)")
    if args.batch_size < 1:
        raise BasinguardError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.latents and args.seed is not None:  # as Pipeline.generate: a trace would name a seed not used
        raise BasinguardError("give --seed or --latents, not both (the latents are x_T itself; a seed makes x_T)")
    prompt, negative_prompt = prompt_text(args.prompt), prompt_text(args.negative_prompt)
    if not prompt:  # as a prompt file's empty line is refused
        raise BasinguardError("--prompt is empty; give the text to generate (a blank prompt is refused in prompt "
                              "files too)")
    latents = read_latents(args.latents, args.num_images) if args.latents else None
    n = args.num_images if latents is None else len(latents)
    if n > MAX_IMAGES_PER_LINE:
        raise BasinguardError(f"--latents holds {n} images; at most {MAX_IMAGES_PER_LINE} a run (for more, "
                              "`basinguard batch`)")
    out = output_file(args.out, "--out", (*IMAGE_SUFFIXES, ".npy"), n)
    trace = output_file(args.trace, "--trace", (".json",), n) if args.trace else None
    outputs = [indexed(out, k, n) for k in range(n)] + ([indexed(trace, k, n) for k in range(n)] if trace else [])
    refuse_overwriting(("--out", "--trace"), outputs, {"--latents": args.latents,
                                                       "--detect-calibration": args.detect_calibration})
    calib = calibrated_threshold(args)
    model = model_dir(args.model)
    spec = ModelSpec(model)  # every check that needs only the folder's configs, before any model loads
    options = image_options(args, {out.suffix.lower()}, lambda: spec.identity)
    cuts = [(flag, text, cut) for flag, text in (("--prompt", prompt), ("--negative-prompt", negative_prompt))
            if (cut := spec.tokenizer.truncation(text)) is not None]
    if cuts and args.long_prompts == "error":
        raise BasinguardError(cuts[0][2].refusal(cuts[0][0]))
    sampling = sampling_from_args(args, spec)
    if args.detect_threshold is not None and sampling.policy.name != "auto":  # batch and detect flag with it
        flag = "--detect-calibration" if calib is not None else "--detect-threshold"
        raise BasinguardError(f"{flag} applies to policy auto only here, not {sampling.policy.name}")
    resolved = spec.resolve(sampling)
    spec.make_scheduler(resolved)
    if latents is not None:  # the whole file, once, rather than a batch's slice of it
        spec.check_latents(latents, len(latents), resolved)
    if calib is not None:
        for warning in calibration_warnings(Path(args.detect_calibration), calib, [(1, resolved, negative_prompt)],
                                            spec.accepted_ids):
            print(f"basinguard generate: warning: {warning}", file=sys.stderr)
    for flag, text, cut in cuts:  # named once here, with the flag; the tokenizer's own warning is silenced below
        what = "negative prompt" if flag == "--negative-prompt" else "prompt"
        print(f"basinguard generate: warning: {what} cut to the text encoder's length: {cut.describe(text)}",
              file=sys.stderr)
    remove_leftovers(outputs)
    pipe = Pipeline(spec, provider=args.provider, threads=args.threads, static_shapes=args.static_shapes)
    seeds = [(args.seed or 0) + k for k in range(n)]
    # Image k has seed + k (or latents[k]) whatever the batch it runs in; each batch's images are written before
    # the next batch starts, so an interrupted run keeps what it made.
    never_switched = 0
    for start in range(0, n, args.batch_size):
        m = min(args.batch_size, n - start)
        with quiet_truncation():
            gens = pipe.generate([prompt] * m, sampling,
                                 seeds=None if latents is not None else seeds[start:start + m],
                                 negative_prompts=[negative_prompt] * m,
                                 latents=None if latents is None else latents[start:start + m])
        for k, g in enumerate(gens, start=start):
            write_generation(out, trace, k, n, g, options)
        never_switched += sum(g.trace["transition_step"] is None for g in gens)
    times = pipe.timer.summary()
    print("  ".join(f"{k} {v:.3f}s" for k, v in times.items()))
    if never_switched:
        print(f"never switched to guidance: {never_switched} of {n}")
        print(f"basinguard generate: warning: {never_switched_warning(never_switched, n, resolved.policy)}",
              file=sys.stderr)


def never_switched_warning(count: int, total: int, policy: PolicyConfig) -> str:
    """Why `count` of `total` images never reached λ, and what to do about it."""
    name = policy.mitigation if policy.name == "auto" else policy.name
    if name in ("dtp", "og-dtp"):
        before = "steered away from the prompt" if name == "og-dtp" else f"ran at pre-scale {policy.pre_scale:g}"
        if policy.latest_transition_t is not None:  # the fallback was given: t never came down to it
            return (f"{count} of {total} images never switched to guidance: d had no local minimum and no step's t "
                    f"was <= --latest-transition-t {policy.latest_transition_t}, so {name} {before} at every step")
        return (f"{count} of {total} images never switched to guidance: d had no local minimum, so {name} "
                f"{before} at every step; --latest-transition-t T switches such images once t <= T")
    return f"{count} of {total} images never switched to guidance: t never reached τ = {policy.transition_t}"


def write_generation(out: Path, trace: Path | None, k: int, n: int, g: Generation,
                     options: ImageOptions | None = None) -> None:
    """Image k of n (and its trace), each written atomically; `out`'s suffix picks the format (.npy: raw pixels)."""
    from basinguard.outputs.images import write_image

    if out.suffix.lower() == ".npy":
        write_atomic(indexed(out, k, n), lambda p: save_image(g, p, raw=True))
    else:
        write_image(indexed(out, k, n), g.to_pil(), g.trace, options)
    if trace is not None:
        write_atomic(indexed(trace, k, n), lambda p: p.write_text(json.dumps(g.trace, indent=1)))
    ts = g.trace["transition_step"]
    print(f"{indexed(out, k, n)}  seed={g.trace['seed']}  transition_step={ts}")
