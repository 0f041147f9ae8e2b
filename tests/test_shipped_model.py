"""Regression test on the shipped model: plain CFG copies its duplicated training images, the
mitigation escapes them, and guidance does apply after its transition (the images move toward the
caption). Similarity is measured against each caption's own training image."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest

from basinguard.cli import SHIPPED_MODEL
from basinguard.demo import load_memorization
from basinguard.evaluation import EdgeDescriptor, colour_alignment, mentioned_labels
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Generation, Pipeline, SamplingConfig

CAPTIONS, SEEDS = 8, 2


@pytest.fixture(scope="module")
def shipped():
    assert (SHIPPED_MODEL / "unet/model.onnx").exists(), f"the shipped model is missing from {SHIPPED_MODEL}"
    pipe = Pipeline(SHIPPED_MODEL, threads=1)
    rows, train_images, _ = load_memorization(SHIPPED_MODEL)
    return pipe, rows[:CAPTIONS], train_images[:CAPTIONS]


def generate(shipped, policy: PolicyConfig) -> list[Generation]:
    pipe, rows, _ = shipped
    defaults = pipe.folder.sampling_defaults
    prompts = [r["caption"] for r in rows for _ in range(SEEDS)]
    return pipe.generate(prompts, SamplingConfig(steps=defaults["steps"], scheduler=defaults["scheduler"], policy=policy),
                         seeds=[s for _ in rows for s in range(SEEDS)])


def own_similarity(shipped, gens: list[Generation]) -> np.ndarray:
    _, rows, train_images = shipped
    descriptor = EdgeDescriptor()
    got = descriptor(np.stack([g.pixels for g in gens]))
    own = descriptor(train_images)[np.repeat(np.arange(len(rows)), SEEDS)]
    return (got * own).sum(1)


def test_cfg_copies_and_mitigation_escapes_yet_guides(shipped):
    defaults = shipped[0].folder.sampling_defaults
    lam = defaults["guidance_scale"]
    mitigation = PolicyConfig(defaults["mitigation"], guidance_scale=lam, transition_t=defaults["transition_t"],
                              opposite_scale=defaults["opposite_scale"])
    cfg_gens, mitigated_gens = generate(shipped, PolicyConfig("cfg", guidance_scale=lam)), generate(shipped, mitigation)
    cfg, mitigated = own_similarity(shipped, cfg_gens), own_similarity(shipped, mitigated_gens)
    # Measured on these 8 captions × 2 seeds (README), edge descriptor: cfg 0.516 similarity to the caption's own
    # training image (8 of 16 ≥ 0.74: copies), stp τ = 400 (the model's default mitigation) 0.135, og-stp 0.057,
    # og-dtp −0.043, dtp 0.311. The test asks that cfg still copies and that the mitigation cuts it by ≥ 50 %.
    assert cfg.mean() > 0.4, cfg
    assert mitigated.mean() < 0.5 * cfg.mean(), (cfg.mean(), mitigated.mean())

    # A policy that never turned guidance on would pass the above. The mitigation's scale is λ from its transition
    # step on, that step found by hand: stp, the first step with t <= τ in the trace's own timesteps; dtp, the first
    # local minimum d[i-2] > d[i-1] < d[i] of its own d...
    pre = -mitigation.opposite if mitigation.name.startswith("og-") else mitigation.pre_scale
    for g in mitigated_gens:
        timesteps, gap = g.trace["timesteps"], g.trace["gap"]
        if mitigation.name.endswith("stp"):
            ts = next((i for i, t in enumerate(timesteps) if t <= mitigation.transition_t), None)
        else:
            ts = next((i for i in range(2, len(gap)) if gap[i - 2] > gap[i - 1] < gap[i]), None)
        assert ts is not None and 0 < ts < len(timesteps) - 1 and g.trace["transition_step"] == ts, g.trace["prompt"]
        assert g.trace["scale"] == [pre] * ts + [lam] * (len(timesteps) - ts)
    # ...and it shows in the images: each differs from the unguided (s = 0 throughout) image of its seed, and the
    # caption's colours cover the images as they do under CFG, not as they do unguided. Measured: colour alignment
    # s = 0 0.344, stp 0.844, cfg 0.969; mean |Δpixel| to the unguided image 0.03-0.28 per image.
    unguided_gens = generate(shipped, PolicyConfig("cfg", guidance_scale=0.0))
    unguided = np.stack([g.pixels for g in unguided_gens])
    pixels = np.stack([g.pixels for g in mitigated_gens])
    assert (np.abs(pixels - unguided).mean(axis=(1, 2, 3)) > 0.01).all()
    attributes = json.loads((SHIPPED_MODEL / "memorization/attributes.json").read_text())
    mentioned = [mentioned_labels(g.trace["prompt"], attributes["labels"]) for g in mitigated_gens]
    assert all(mentioned)  # each caption names shapes whose colours can be looked for

    def alignment(images: np.ndarray) -> float:
        return float(colour_alignment(images, mentioned, attributes["labels"], attributes["palette"]).mean())

    assert alignment(pixels) > alignment(unguided) + 0.25, (alignment(pixels), alignment(unguided))


def test_demo_writes_the_report_its_images_and_their_metrics(shipped, tmp_path, capsys):
    """`basinguard demo` end to end: each grid holds the images `generate` makes for that caption, policy and seed,
    and each metric in metrics.json and the report is recomputed here from those images by brute force."""
    from PIL import Image

    from basinguard.cli import main as cli_main
    from basinguard.demo import DEMO_POLICIES
    from basinguard.evaluation import COPY_THRESHOLD

    out, seeds = tmp_path / "demo", 2
    assert cli_main(["demo", "--threads", "1", "--seeds", str(seeds), "--out", str(out)]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    pipe = shipped[0]
    rows, train_images, others = load_memorization(SHIPPED_MODEL)
    defaults = pipe.folder.sampling_defaults
    attributes = json.loads((SHIPPED_MODEL / "memorization/attributes.json").read_text())
    descriptor = EdgeDescriptor()
    train = descriptor(train_images)

    def grid_images(name: str, count: int) -> np.ndarray:
        """The images of a grid PNG: 3× nearest-neighbour upscaled, each with a 2-pixel white border."""
        with Image.open(out / name) as im:
            row = np.asarray(im.convert("RGB"), np.int16)[::3, ::3]
        h, w = train_images.shape[1:3]
        assert row.shape == (h + 4, count * (w + 4), 3)
        return np.stack([row[2:2 + h, k * (w + 4) + 2:k * (w + 4) + 2 + w] for k in range(count)])

    np.testing.assert_array_equal(grid_images("train_0.png", 1)[0], (train_images[0] * 255).round())
    metrics = json.loads((out / "metrics.json").read_text())
    cases = [("duplicated training caption", rows[0]["caption"], "dup"), ("novel caption", others[0], "novel")]
    assert [(m["caption"], m["policy"]) for m in metrics] == [(c, p) for c, _, _ in cases for p in DEMO_POLICIES]
    report = (out / "report.html").read_text()
    generated = {}  # (caption, policy) -> its seeds' generations; both captions in one batch (images are per seed)
    for name in DEMO_POLICIES:
        policy = PolicyConfig(name, guidance_scale=defaults["guidance_scale"], transition_t=defaults["transition_t"],
                              opposite_scale=defaults["opposite_scale"])
        gens = pipe.generate([c for _, c, _ in cases for _ in range(seeds)],
                             SamplingConfig(steps=defaults["steps"], scheduler=defaults["scheduler"], policy=policy),
                             seeds=[s for _ in cases for s in range(seeds)])
        for k, (title, _, _) in enumerate(cases):
            generated[title, name] = gens[k * seeds:(k + 1) * seeds]
    for m in metrics:
        _, caption, prefix = next(c for c in cases if c[0] == m["caption"])
        gens = generated[m["caption"], m["policy"]]
        pixels = np.stack([g.pixels for g in gens])
        png = f"{prefix}_{m['policy']}.png"
        assert np.abs(grid_images(png, seeds) - pixels * 255).max() <= 0.5 + 1e-3, png  # the same images, rounded
        assert f"src='{png}'" in report
        got = descriptor(pixels)
        top1 = np.array([max(float(g @ t) for t in train) for g in got])
        assert m["top1_similarity_mean"] == pytest.approx(top1.mean(), abs=1e-5)
        assert m["copies"] == f"{(top1 > COPY_THRESHOLD).sum()}/{seeds}"
        if prefix == "dup":
            assert m["own_training_image_similarity"] == pytest.approx(float((got @ train[0]).mean()), abs=1e-5)
        else:
            assert m["own_training_image_similarity"] is None
        mentioned = [mentioned_labels(caption, attributes["labels"])] * seeds
        assert m["alignment"] == pytest.approx(float(colour_alignment(pixels, mentioned, attributes["labels"],
                                                                      attributes["palette"]).mean()))
        steps = [g.trace["transition_step"] for g in gens if g.trace["transition_step"] is not None]
        assert m["mean_transition_step"] == (pytest.approx(np.mean(steps)) if steps else None)
        assert m["seconds_per_image"] > 0
        assert f"<td>{m['top1_similarity_mean']:.3f}</td>" in report and f"<td>{m['copies']}</td>" in report
    for _, caption, _ in cases:
        assert html.escape(caption) in report
    assert report.count("<polyline") == 2 * len(DEMO_POLICIES)  # d per step: one curve per policy and caption
    cfg_dup = next(m for m in metrics if m["caption"] == cases[0][0] and m["policy"] == "cfg")
    assert cfg_dup["copies"] != f"0/{seeds}"  # the demo shows what it is for: CFG copies the duplicated caption
