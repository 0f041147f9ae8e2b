"""Karras sigmas, Euler ancestral and UniPC at pipeline level: Euler ancestral's images do not depend on their batch,
and the paper's switching rules hold on traces made with each of these samplers (on the tiny model whose d has
minima)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

NEW_SAMPLERS = ["dpm++2m-karras", "euler-karras", "euler-a", "unipc", "unipc-karras"]
PROMPTS = ["a red cat", "a blue dog on the mars", "the big green tree"]
SIZE = 16


def paper_transition(gap: list[float | None]) -> int | None:
    """Algorithm 1's rule by hand: the first step i with d[i-2] > d[i-1] < d[i], or None."""
    return next((i for i in range(2, len(gap)) if gap[i - 2] > gap[i - 1] < gap[i]), None)


def test_euler_ancestral_image_is_the_same_alone_or_in_a_batch(tiny_onnx_dir):
    ours = Pipeline(tiny_onnx_dir, threads=1)
    sampling = SamplingConfig(steps=8, scheduler="euler-a", height=SIZE, width=SIZE, policy=PolicyConfig("cfg", 7.5))
    batch = ours.generate(PROMPTS, sampling, seeds=[3, 4, 5])
    alone = ours.generate(PROMPTS[1:2], sampling, seeds=[4])[0]
    np.testing.assert_allclose(batch[1].pixels, alone.pixels, atol=1e-5)
    # the step noise matters (else the above proves nothing): Euler without it gives another image
    euler = ours.generate(PROMPTS[1:2], replace(sampling, scheduler="euler"), seeds=[4])[0]
    assert np.abs(euler.pixels - alone.pixels).mean() > 1e-3
    # given latents (no seed): image k's noise comes from its own x_T, so again alone == in a batch
    lat = ours.spec.initial_latents([3, 4, 5], SIZE, SIZE)
    batch = ours.generate(PROMPTS, sampling, latents=lat)
    alone = ours.generate(PROMPTS[2:], sampling, latents=lat[2:])[0]
    np.testing.assert_allclose(batch[2].pixels, alone.pixels, atol=1e-5)


@pytest.mark.parametrize("name", NEW_SAMPLERS)
def test_policy_rules_hold_with_each_new_sampler(tiny_switching_onnx_dir, name):
    ours = Pipeline(tiny_switching_onnx_dir, threads=1)
    prompts = [PROMPTS[k % 3] for k in range(6)]
    steps, lam, tau = 20, 7.5, 500
    switched_any = False
    for policy in ("stp", "dtp", "og-stp", "og-dtp"):
        config = PolicyConfig(policy, guidance_scale=lam, transition_t=tau, opposite_scale=2.0)
        sampling = SamplingConfig(steps=steps, scheduler=name, height=SIZE, width=SIZE, policy=config)
        for g in ours.generate(prompts, sampling, seeds=list(range(6))):
            tr = g.trace
            if policy.endswith("stp"):  # λ from the first step whose t <= τ
                want = next((i for i, t in enumerate(tr["timesteps"]) if t <= tau), None)
            else:  # the first local minimum of d, by hand on the trace's own d
                want = paper_transition(tr["gap"])
                switched_any |= want is not None
            assert tr["transition_step"] == want, (policy, tr["gap"])
            pre = -2.0 if policy.startswith("og-") else 0.0
            ts = steps if want is None else want
            assert tr["scale"] == [pre] * ts + [lam] * (len(tr["scale"]) - ts), policy
    assert switched_any, "no DTP sample switched: the rule was not exercised"


def test_euler_ancestral_images_survive_a_resumed_batch_job(tiny_onnx_dir, tmp_path):
    """A job cut short and resumed packs its remaining images into other batches: with per-image step noise each
    image is still the one the uninterrupted job made."""
    import json
    import shutil

    from PIL import Image

    from basinguard.cli import main as cli_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe big green tree\n")

    def run(out):
        return cli_main(["batch", "--model", str(tiny_onnx_dir), str(prompts), str(out), "--threads", "1",
                         "--steps", "6", "--scheduler", "euler-a", "--images-per-prompt", "3", "--batch-size", "4",
                         "--seed", "11", "--no-progress"])

    def png(path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run(full) == 0
    shutil.copytree(full, cut)
    lines = (cut / "manifest.jsonl").read_text().splitlines()
    kept, dropped = lines[:1], [json.loads(x) for x in lines[1:]]  # as if killed after the first image
    (cut / "manifest.jsonl").write_text("\n".join(kept) + "\n")
    for entry in dropped:
        (cut / entry["file"]).unlink()
    assert run(cut) == 0
    entries = [json.loads(x) for x in (cut / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in entries) == sorted(json.loads(x)["id"] for x in lines)
    for entry in entries:
        assert np.abs(png(cut / entry["file"]) - png(full / entry["file"])).max() <= 1, entry["id"]
    # and the noise is per image, not per job position: one image of the job, made alone by generate
    entry = next(e for e in entries if e["id"].endswith("-001") and e["prompt"] == "a red cat")
    alone = Pipeline(tiny_onnx_dir, threads=1).generate(
        ["a red cat"], SamplingConfig(steps=6, scheduler="euler-a", height=entry["height"], width=entry["width"]),
        seeds=[entry["seed"]])[0]
    assert np.abs((alone.pixels * 255).round() - png(full / entry["file"])).max() <= 1
