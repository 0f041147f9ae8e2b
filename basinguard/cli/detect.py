"""`basinguard detect`: memorization scores per prompt, or a calibrated threshold for `--policy auto`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from basinguard.cli.common import calibrated_threshold, model_dir, output_file, refuse_overwriting, sampling_from_args
from basinguard.errors import BasinguardError
from basinguard.files import write_atomic

if TYPE_CHECKING:
    pass


USEFUL_AUC = 0.7  # below it a calibration's threshold is little better than chance (0.5): warn


DETECT_IGNORES = ("--policy", "--pre-scale", "--transition-t", "--opposite-scale", "--mitigation",
                  "--latest-transition-t")


def negative_prompt_record(negative_prompts: list[str]) -> bool | str:
    """A calibration's record of its negative prompts: True (every line had one), False (none) or "some"."""
    given = sum(bool(n) for n in negative_prompts)
    return given == len(negative_prompts) if given in (0, len(negative_prompts)) else "some"


def cmd_detect(args: argparse.Namespace) -> None:
    from basinguard.batch.job import check_settings
    from basinguard.batch.prompts import read_prompts
    from basinguard.runtime.detection import (
        calibrate,
        calibration_mismatch,
        calibration_warnings,
        detection_scores,
    )
    from basinguard.runtime.pipeline import Pipeline
    from basinguard.runtime.spec import ModelSpec
    from basinguard.runtime.tokenizer import quiet_truncation

    # d is scored along plain CFG whatever the policy (`detection_scores`): a policy setting would change nothing.
    ignored = [flag for flag in DETECT_IGNORES if getattr(args, flag[2:].replace("-", "_")) is not None]
    if ignored:
        raise BasinguardError(f"{', '.join(ignored)}: detect scores d along plain CFG whatever the policy; of the "
                              "sampling settings only --guidance-scale (past step 0), --steps, --scheduler and the "
                              "size apply")
    if args.calibrate:
        if not (args.memorized and args.normal and args.out) or args.prompts:
            raise BasinguardError("--calibrate takes --memorized FILE --normal FILE --out FILE.json and no PROMPTS")
    elif not args.prompts:
        raise BasinguardError("give PROMPTS, or --calibrate --memorized FILE --normal FILE --out FILE.json")
    if args.seeds < 1 or args.detect_steps < 1:
        raise BasinguardError(f"--seeds and --detect-steps must be >= 1 (got {args.seeds} and {args.detect_steps})")
    if args.seed < 0:  # as batch's --seed
        raise BasinguardError(f"--seed must be an integer >= 0 (got {args.seed})")
    if args.calibrate and args.fpr is None:
        args.fpr = 0.01
    if args.fpr is not None and not 0 <= args.fpr < 1:
        raise BasinguardError(f"--fpr must be in [0, 1) (got {args.fpr})")
    if not args.calibrate:
        unused = [flag for flag, value in (("--memorized", args.memorized), ("--normal", args.normal),
                                           ("--out", args.out), ("--fpr", args.fpr)) if value is not None]
        if unused:
            raise BasinguardError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} to --calibrate only")
    calibration_out = output_file(args.out, "--out", (".json",)) if args.calibrate else None
    if calibration_out is not None:
        refuse_overwriting(("--out",), [calibration_out], {"--memorized": args.memorized, "--normal": args.normal,
                                                           "--detect-calibration": args.detect_calibration})
    calib = calibrated_threshold(args, args.detect_steps, args.seeds)
    model = model_dir(args.model)
    spec = ModelSpec(model)
    identity = spec.identity  # once: every file scored and the calibration written name it
    sampling = sampling_from_args(args, spec)
    resolved = check_settings(sampling, spec)
    pipe = Pipeline(spec, provider=args.provider, threads=args.threads, static_shapes=args.static_shapes)
    seeds = [args.seed + k for k in range(args.seeds)]
    # How a calibration's scores are made, as it records them: one setting, so every line scored must be at it.
    recorded = {"detect_steps": args.detect_steps, "steps": resolved.steps, "scheduler": resolved.scheduler,
                "height": resolved.height, "width": resolved.width, "guidance_scale": resolved.policy.guidance_scale,
                **spec.record(resolved)}

    def score_file(path: str):  # -> (the first image task of each usable line, its score)
        parsed = read_prompts(Path(path), spec, sampling, long_prompts=args.long_prompts)
        for err in parsed.errors:
            print(f"basinguard detect: {path}: {err}", file=sys.stderr)
        for note in parsed.truncated:
            print(f"basinguard detect: warning: {path}: {note}", file=sys.stderr)
        if parsed.errors and args.on_error == "stop":
            raise BasinguardError(f"{path} {parsed.errors[0]} (--on-error skip scores the good lines)")
        first = [t for t in parsed.tasks if t.index == 0]  # one score per line; num_images does not apply
        if not first:
            raise BasinguardError(f"{path} has no usable prompt")
        for t in first if args.calibrate else []:  # a line's own steps, size... would make the record lie
            names = [d.split(" ", 1)[0] for d in calibration_mismatch(recorded, t.sampling, set())]
            if names:
                flags = ", ".join(f"{name} {recorded[name]}" for name in names)
                raise BasinguardError(f"{path} line {t.line} sets its own {', '.join(names)}; a calibration records "
                                      f"one setting for all its prompts (the flags': {flags}): give it as a flag, or "
                                      "calibrate prompts of other settings apart")
        if calib is not None:
            settings = [(t.line, t.sampling, t.negative_prompt) for t in first]
            for warning in calibration_warnings(Path(args.detect_calibration), calib, settings,
                                                spec.accepted_ids):
                print(f"basinguard detect: warning: {warning}", file=sys.stderr)
        # Lines may set their own steps, scheduler or guidance scale (as in batch); every line is scored on the
        # same seeds, so that scores compare across prompts.
        scores = np.empty(len(first))
        by_settings: dict = {}
        for k, t in enumerate(first):
            by_settings.setdefault(t.sampling, []).append(k)
        for group_sampling, ks in by_settings.items():
            with quiet_truncation():  # each cut prompt was named above, with its line
                scores[ks] = detection_scores(pipe, [first[k].prompt for k in ks], group_sampling, seeds,
                                              steps=args.detect_steps, batch_size=args.batch_size,
                                              negative_prompts=[first[k].negative_prompt for k in ks])
        return first, scores.tolist()

    if not args.calibrate:
        first, scores = score_file(args.prompts)
        # A line's own detect_threshold (else the flag's), as `auto` in batch would gate that line.
        thresholds = [t.sampling.policy.detect_threshold for t in first]
        flagging = any(th is not None for th in thresholds)
        print("line\tscore" + ("\tflagged" if flagging else "") + "\tprompt")
        for t, score, th in zip(first, scores, thresholds, strict=True):
            flag = ("\t-" if th is None else f"\t{'yes' if score > th else 'no'}") if flagging else ""
            # one row per line, whatever the prompt: a reader in text mode also ends a line at a lone \r
            prompt = t.prompt.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            print(f"{t.line}\t{score:.6g}{flag}\t{prompt}")
        return
    memorized, pos = score_file(args.memorized)
    normal, neg = score_file(args.normal)
    try:
        result = calibrate(pos, neg, fpr=args.fpr)
    except ValueError as exc:
        raise BasinguardError(str(exc)) from None
    result |= recorded | {"seeds": args.seeds, "seed": args.seed,
               "memorized_file": str(args.memorized), "normal_file": str(args.normal), "model": identity,
               "negative_prompts": negative_prompt_record([t.negative_prompt for t in (*memorized, *normal)]),
               # which e_∅ d was measured against ("zeros": SDXL's force_zeros_for_empty_prompt)
               "model_family": pipe.folder.family,
               "uncond": sorted(set(spec.uncond_kinds([t.negative_prompt for t in (*memorized, *normal)])))}
    write_atomic(calibration_out, lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
    if result["auc"] < USEFUL_AUC:  # written all the same (a user may want to look), but not without a word
        print(f"basinguard detect: warning: AUC {result['auc']:.2f}: these scores hardly separate {args.memorized} "
              f"from {args.normal} (0.5 is chance, 1 a perfect split); a threshold from them would flag by luck. "
              "Check that the memorized prompts are memorized by this model", file=sys.stderr)
    print(f"AUC {result['auc']:.4f}  TPR {result['tpr']:.4f} at FPR {result['fpr']:.4f} (target {args.fpr})  "
          f"threshold {result['threshold']:.6g}  ({len(pos)} memorized, {len(neg)} normal prompts) -> {args.out}")
