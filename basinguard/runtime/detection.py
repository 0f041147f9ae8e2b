"""Memorization detection scores (Wen et al., ICLR 2024) and their calibration (numpy only).

The score of a prompt is d = ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂, averaged over the first `steps` denoising steps
and over the given seeds, along the plain CFG trajectory at the sampling's guidance scale (d at step 0 does
not depend on the policy). Only those first steps run (`Pipeline.sample` with a step limit, the same setup as
`generate`), so no image is decoded.

With steps=1 and one seed the score is exactly what `--policy auto` gates on (d at step 0 of each image), so
a threshold meant for `auto` must be calibrated that way; averaging over more steps or seeds narrows the
score distribution and moves the threshold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from basinguard.errors import BasinguardError
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.model_folder import ModelFolder, names_this_model
from basinguard.runtime.pipeline import Pipeline
from basinguard.runtime.schedulers import GAP_SPACE
from basinguard.runtime.settings import FAMILY_SETTINGS, SamplingConfig, family_record


def detection_scores(pipeline: Pipeline, prompts: Sequence[str], sampling: SamplingConfig, seeds: Sequence[int],
                     steps: int = 1, batch_size: int = 8, negative_prompts: Sequence[str] | None = None) -> np.ndarray:
    """Score per prompt: d over the first `steps` steps, mean over steps and seeds; float64 (len(prompts),).
    e_∅ is each prompt's negative prompt (default ""), as in `Pipeline.generate`, so the score is what `auto` sees."""
    if not prompts or not seeds:
        raise BasinguardError(f"need at least one prompt and one seed (got {len(prompts)} and {len(seeds)})")
    negative_prompts = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
    if len(negative_prompts) != len(prompts):
        raise BasinguardError(f"need one negative prompt per prompt (got {len(negative_prompts)} for {len(prompts)})")
    if batch_size < 1:
        raise BasinguardError(f"batch size must be >= 1 (got {batch_size})")
    # Plain CFG: the trajectory the score is defined on; d needs both UNet halves at every measured step.
    sampling = pipeline.spec.resolve(replace(sampling, policy=PolicyConfig("cfg", sampling.policy.guidance_scale)))
    available = len(pipeline.spec.make_scheduler(sampling).timesteps)
    if not 1 <= steps <= available:
        raise BasinguardError(f"detection steps must be in [1, {available}] (the sampling's step count), got {steps}")
    pairs = [(p, neg, s) for p, neg in zip(prompts, negative_prompts, strict=True) for s in seeds]
    d = np.empty((len(pairs), steps))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        run = pipeline.sample([p for p, _, _ in chunk], sampling, seeds=[s for _, _, s in chunk],
                              negative_prompts=[neg for _, neg, _ in chunk], steps=steps)  # as generate, cut short
        d[start:start + len(chunk)] = run.gap.T
    return d.reshape(len(prompts), len(seeds), steps).mean(axis=(1, 2))


def _scores(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"{what} scores must be a non-empty set of finite numbers")
    return a


def roc_auc(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: P(pos > neg) + ½ P(pos = neg) over all pairs (Mann–Whitney U / n_pos n_neg)."""
    p, n = _scores(pos, "positive"), np.sort(_scores(neg, "negative"))
    below = np.searchsorted(n, p, side="left")  # negatives strictly below each positive
    tied = np.searchsorted(n, p, side="right") - below
    return float((below + 0.5 * tied).sum() / (p.size * n.size))


def threshold_at_fpr(neg: Sequence[float] | np.ndarray, fpr: float = 0.01) -> float:
    """The lowest threshold t with #(neg > t) ≤ fpr · len(neg); a score is flagged when score > t (as `auto` does)."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    n = np.sort(_scores(neg, "negative"))[::-1]
    allowed = math.floor(fpr * n.size + 1e-9)  # false positives allowed; the epsilon absorbs 0.29 * 100 = 28.99…
    return float(n[allowed])  # everything above the (allowed+1)-th largest negative: at most `allowed` of them


def tpr_at_fpr(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, fpr: float = 0.01) -> float:
    """True-positive rate at the threshold `threshold_at_fpr(neg, fpr)`."""
    t = threshold_at_fpr(neg, fpr)
    return float((_scores(pos, "positive") > t).mean())


def calibrate(pos_scores: Sequence[float] | np.ndarray, neg_scores: Sequence[float] | np.ndarray,
              fpr: float = 0.01) -> dict:
    """Threshold with FPR ≤ `fpr` on the negatives (memorized = positive), its TPR and achieved FPR, and the AUC."""
    pos, neg = _scores(pos_scores, "memorized"), _scores(neg_scores, "normal")
    t = threshold_at_fpr(neg, fpr)
    return {"threshold": t, "auc": roc_auc(pos, neg), "tpr": float((pos > t).mean()), "fpr": float((neg > t).mean()),
            "target_fpr": fpr, "n_memorized": int(pos.size), "n_normal": int(neg.size), "gap_space": GAP_SPACE}


def load_calibration(path: Path, detect_steps: int | None = None, model: Path | None = None) -> dict:
    """A calibration file written by `basinguard detect --calibrate`; its threshold is checked here. For `auto`
    (`detect_steps` None) it must score d at step 0 alone; for `detect`, as many steps as `detect_steps`.

    d is measured in ε space (`gap_space`); before that, a v-prediction model's d was its v gap, in other units.
    A file without `gap_space` is accepted for an epsilon `model` (its numbers are unchanged) and refused for any
    other; `model` None skips that check."""
    try:
        calib = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BasinguardError(f"cannot read calibration file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BasinguardError(f"calibration file {path} is not JSON: {exc}") from None
    t = calib.get("threshold") if isinstance(calib, dict) else None
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise BasinguardError(f"calibration file {path} has no finite 'threshold' (write one with "
                              "`basinguard detect --calibrate`)")
    made = calib.get("detect_steps", 1)
    if detect_steps is None and made != 1:
        raise BasinguardError(f"calibration file {path} was made with --detect-steps {made}, but --policy auto "
                              "gates on d at step 0; calibrate with --detect-steps 1")
    if detect_steps is not None and made != detect_steps:
        raise BasinguardError(f"calibration file {path} was made with --detect-steps {made}; score with the same "
                              f"--detect-steps (got {detect_steps}), or calibrate again")
    space = calib.get("gap_space")
    if model is not None and space != GAP_SPACE:
        predicts = ModelFolder.open(model).prediction_type
        if space is not None or predicts != "epsilon":
            made_in = f"d in {space!r} space" if space is not None else "d on the UNet's raw output (before d was measured in ε space)"
            raise BasinguardError(f"calibration file {path} was made with {made_in}; this {predicts} model's d is now in "
                                  "ε space, in other units, so its threshold does not apply: calibrate again with "
                                  "`basinguard detect --calibrate`")
    return calib


def calibration_mismatch(calib: dict, sampling: SamplingConfig, model_ids: set[str],
                         negative_prompt: str = "") -> list[str]:
    """What differs between a calibration and a resolved sampling on a model (`accepted_model_ids`), among
    what d at step 0 depends on: the model's files, the image size and step 0's timestep (steps and scheduler) — not
    λ, except for a calibration over more steps, whose later steps follow CFG at λ. The model is compared by
    `model_identity` (the files' content: a copied folder is the same model). A negative prompt takes e_∅'s place
    in d, so whether one is given is compared too. Each difference as "NAME CALIBRATED (here VALUE)"; fields an
    older file lacks are not compared."""
    here = {"steps": sampling.steps, "scheduler": sampling.scheduler, "height": sampling.height,
            "width": sampling.width}
    here |= family_record(sampling, FAMILY_SETTINGS)  # SDXL's time ids and clip_skip condition the UNet as size does
    if calib.get("detect_steps", 1) > 1:  # past step 0 the trajectory is CFG's at λ
        here["guidance_scale"] = sampling.policy.guidance_scale
    differ = [f"{name} {calib[name]} (here {value})" for name, value in here.items()
              if name in calib and calib[name] != value]
    if isinstance(calib.get("negative_prompts"), bool) and calib["negative_prompts"] != bool(negative_prompt):  # not "some"
        differ.append("negative prompts (here none)" if calib["negative_prompts"] else
                      "no negative prompt (here one)")
    recorded = calib.get("model")
    if isinstance(recorded, dict) and recorded.get("id") is not None and not names_this_model(recorded, model_ids):
        differ.append(f"model {recorded.get('path')} (other model files)")
    return differ


def calibration_warnings(path: Path, calib: dict, settings: Sequence[tuple[int, SamplingConfig, str]],
                         model_ids: set[str]) -> list[str]:
    """One warning per distinct way the settings of prompt lines, (line, resolved sampling, negative prompt), differ
    from a calibration's (`calibration_mismatch`), naming the lines: a line may override steps or scheduler, or add
    a negative prompt, and its d at the first step may then differ. One setting (generate) names none."""
    lines_by_difference: dict[tuple[str, ...], list[int]] = {}
    for line, sampling, negative_prompt in settings:
        difference = tuple(calibration_mismatch(calib, sampling, model_ids, negative_prompt))
        if difference:
            lines_by_difference.setdefault(difference, []).append(line)
    warnings = []
    for difference, lines in lines_by_difference.items():
        if len(lines) == len(settings):
            where = ", for every line" if len(settings) > 1 else ""
        else:
            where = f", for line{'s' * (len(lines) > 1)} {', '.join(map(str, lines[:10]))}{' and more' * (len(lines) > 10)}"
        warnings.append(f"{path} was calibrated with {', '.join(difference)}{where}: d may differ here, so its "
                        "threshold may not fit")
    return warnings
