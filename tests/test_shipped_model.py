"""Regression test on the shipped model: plain CFG copies its duplicated training images, the
mitigation escapes them. Similarity is measured against each caption's own training image."""

from __future__ import annotations

import numpy as np
import pytest

from basinguard.cli import SHIPPED_MODEL
from basinguard.demo import load_memorization
from basinguard.evaluation import EdgeDescriptor
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

CAPTIONS, SEEDS = 8, 2


@pytest.fixture(scope="module")
def shipped():
    assert (SHIPPED_MODEL / "unet/model.onnx").exists(), f"the shipped model is missing from {SHIPPED_MODEL}"
    pipe = Pipeline(SHIPPED_MODEL, threads=1)
    rows, train_images, _ = load_memorization(SHIPPED_MODEL)
    return pipe, rows[:CAPTIONS], train_images[:CAPTIONS]


def own_similarity(shipped, policy: PolicyConfig) -> np.ndarray:
    pipe, rows, train_images = shipped
    defaults = pipe.folder.sampling_defaults
    prompts = [r["caption"] for r in rows for _ in range(SEEDS)]
    gens = pipe.generate(prompts, SamplingConfig(steps=defaults["steps"], scheduler=defaults["scheduler"], policy=policy),
                         seeds=[s for _ in rows for s in range(SEEDS)])
    descriptor = EdgeDescriptor()
    got = descriptor(np.stack([g.pixels for g in gens]))
    own = descriptor(train_images)[np.repeat(np.arange(len(rows)), SEEDS)]
    return (got * own).sum(1)


def test_cfg_copies_and_mitigation_escapes(shipped):
    defaults = shipped[0].folder.sampling_defaults
    lam = defaults["guidance_scale"]
    cfg = own_similarity(shipped, PolicyConfig("cfg", guidance_scale=lam))
    mitigated = own_similarity(shipped, PolicyConfig(defaults["mitigation"], guidance_scale=lam,
                                                     transition_t=defaults["transition_t"],
                                                     opposite_scale=defaults["opposite_scale"]))
    # Measured on these 8 captions × 2 seeds (docs/memorization.md), edge descriptor: cfg 0.516 similarity to the caption's own
    # training image (8 of 16 ≥ 0.74: copies), stp τ = 400 (the model's default mitigation) 0.135, og-stp 0.057,
    # og-dtp −0.043, dtp 0.311. The test asks that cfg still copies and that the mitigation cuts it by ≥ 50 %.
    assert cfg.mean() > 0.4, cfg
    assert mitigated.mean() < 0.5 * cfg.mean(), (cfg.mean(), mitigated.mean())
