"""The whole runtime against independent references: diffusers' own pipeline for plain CFG, and a
torch loop written here from Algorithm 1 of Jain et al. for STP, DTP and opposite guidance."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from basinguard.cli import main as cli_main
from basinguard.engine import EngineError
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

PROMPTS = ["a red circle on a blue background", "a small green square at the top"]
SIZE = 16


def latents_for(folder: Path, n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    pipe_cfg = json.loads((folder / "unet/config.json").read_text())
    factor = 2 ** (len(json.loads((folder / "vae_decoder/config.json").read_text())["block_out_channels"]) - 1)
    return np.random.default_rng(seed).standard_normal((n, pipe_cfg["in_channels"], size // factor, size // factor)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_pipe(tiny_sd_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_onnx_dir):
    return Pipeline(tiny_onnx_dir, threads=1)


@pytest.fixture(scope="module")
def switching_torch_pipe(tiny_switching_sd_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_switching_sd_pipeline_dir, safety_checker=None)


@pytest.fixture(scope="module")
def switching(tiny_switching_onnx_dir):
    """The tiny model whose d has local minima (conftest): DTP switches there, per sample."""
    return Pipeline(tiny_switching_onnx_dir, threads=1)


def paper_transition(gap: list[float | None]) -> int | None:
    """Algorithm 1's rule by hand: the first step i with d[i-2] > d[i-1] < d[i], or None."""
    return next((i for i in range(2, len(gap)) if gap[i - 2] > gap[i - 1] < gap[i]), None)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_cli_generate_matches_diffusers(tiny_onnx_dir, torch_pipe, tmp_path, scheduler):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    cls = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler}[scheduler]
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config)
    lat = latents_for(tiny_onnx_dir, 2)
    np.save(tmp_path / "lat.npy", lat)
    with torch.no_grad():
        ref = torch_pipe([PROMPTS[0]] * 2, latents=torch.from_numpy(lat), num_inference_steps=10, guidance_scale=7.5,
                         height=SIZE, width=SIZE, output_type="np").images
    rc = cli_main(["generate", "--model", str(tiny_onnx_dir), "--prompt", PROMPTS[0], "--latents", str(tmp_path / "lat.npy"),
                   "--scheduler", scheduler, "--steps", "10", "--guidance-scale", "7.5", "--policy", "cfg",
                   "--height", str(SIZE), "--width", str(SIZE), "--threads", "1", "--out", str(tmp_path / "img.npy"),
                   "--trace", str(tmp_path / "trace.json")])
    assert rc == 0
    got = np.stack([np.load(tmp_path / f"img-{k}.npy") for k in range(2)])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3
    assert ref.std() > 0.01  # the images are not trivially flat
    trace = json.loads((tmp_path / "trace-0.json").read_text())
    assert len(trace["gap"]) == 10 and all(v is not None for v in trace["gap"]) and trace["scale"] == [7.5] * 10


def reference_loop(pipe, prompts: list[str], lat: np.ndarray, config: PolicyConfig, steps: int):
    """Algorithm 1 in torch on diffusers' modules: both branches every step, the rule per sample; with an end of
    guidance, the conditional prediction alone once t <= it."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    n = len(prompts)
    ids = pipe.tokenizer([""] * n + prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    pre = -config.opposite_scale if config.name.startswith("og-") else config.pre_scale
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        x = torch.from_numpy(lat) * sched.init_noise_sigma
        d_hist: list[list[float]] = [[] for _ in range(n)]
        switched = [None] * n
        for i, t in enumerate(sched.timesteps):
            eps = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
            eps_u, eps_c = eps[:n], eps[n:]
            if config.guidance_end_t is not None and int(t) <= config.guidance_end_t:  # the conditional ε alone
                for k in range(n):
                    d_hist[k].append(np.nan)
                x = sched.step(eps_c, t, x).prev_sample
                continue
            scales = []
            for k in range(n):
                d = float((eps_c[k] - eps_u[k]).norm())
                d_hist[k].append(d)
                if switched[k] is None:
                    if config.name == "cfg":
                        switched[k] = i
                    if config.name.endswith("stp") and int(t) <= config.transition_t:
                        switched[k] = i
                    h = d_hist[k]
                    if config.name.endswith("dtp") and i >= 2 and h[i - 2] > h[i - 1] < h[i]:
                        switched[k] = i
                scales.append(config.guidance_scale if switched[k] is not None else pre)
            s = torch.tensor(scales).view(-1, 1, 1, 1)
            x = sched.step(eps_u + s * (eps_c - eps_u), t, x).prev_sample
        img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), switched, np.array(d_hist).T


# On the switching model, with these prompts and latents, DTP's samples switch at steps 2, 4, 2, never, 2, 4 (found
# by a search; asserted against the reference below). Each class is there: early, later, never.
SWITCH_STEPS, SWITCH_N = 20, 6


def switch_case(folder: Path) -> tuple[list[str], np.ndarray]:
    return [PROMPTS[k % 2] for k in range(SWITCH_N)], latents_for(folder, SWITCH_N, seed=3)


@pytest.mark.parametrize("name", ["stp", "dtp", "og-stp", "og-dtp"])
def test_policies_match_algorithm1_reference(switching, switching_torch_pipe, tiny_switching_onnx_dir, name):
    steps = SWITCH_STEPS
    prompts, lat = switch_case(tiny_switching_onnx_dir)
    config = PolicyConfig(name, guidance_scale=7.5, transition_t=500, opposite_scale=2.0)
    ref, switched, ref_d = reference_loop(switching_torch_pipe, prompts, lat, config, steps)
    gens = switching.generate(prompts, SamplingConfig(steps=steps, scheduler="ddim", height=SIZE, width=SIZE,
                                                      policy=config), latents=lat)
    got = np.stack([g.pixels for g in gens])
    assert [g.trace["transition_step"] for g in gens] == switched
    if name.endswith("dtp"):  # samples switch at their own steps, by the paper's rule applied to their own trace
        assert len(set(switched) - {None}) >= 2, f"expected samples switching at different steps, got {switched}"
        assert [paper_transition(g.trace["gap"]) for g in gens] == switched
    pre = -2.0 if name.startswith("og-") else 0.0
    for g, ts in zip(gens, switched):  # s_pre before the transition step, λ from it on
        ts = steps if ts is None else ts
        assert g.trace["scale"] == [pre] * ts + [7.5] * (steps - ts)
    assert np.abs(got - ref).max() <= 1e-3
    gaps = np.array([[np.nan if v is None else v for v in g.trace["gap"]] for g in gens]).T
    measured = ~np.isnan(gaps)
    np.testing.assert_allclose(gaps[measured], ref_d[measured], rtol=1e-3)
    if name == "stp":  # s_pre = 0: the UNet skips the conditional branch before τ, so d is not measured there
        assert not measured[: switched[0]].any() and measured[switched[0]:].all()


@pytest.mark.parametrize("name", ["dtp", "og-dtp"])
def test_a_mixed_batch_makes_each_image_as_alone(switching, tiny_switching_onnx_dir, name):
    """Samples of one batch that switch at different steps: each image is the one its sample makes alone, and the
    switch shows in the image (a later switch is not CFG's image; a sample that never switches under dtp is the
    unguided image)."""
    prompts, lat = switch_case(tiny_switching_onnx_dir)

    def run(config: PolicyConfig, k: slice) -> list:
        sampling = SamplingConfig(steps=SWITCH_STEPS, scheduler="ddim", height=SIZE, width=SIZE, policy=config)
        return switching.generate(prompts[k], sampling, latents=lat[k])

    config = PolicyConfig(name, guidance_scale=7.5, opposite_scale=2.0)
    batch = run(config, slice(None))
    switched = [g.trace["transition_step"] for g in batch]
    assert len(set(switched) - {None}) >= 2, switched  # found: [2, 4, 2, None, 2, 4] (see SWITCH_STEPS)
    for k, g in enumerate(batch):
        alone = run(config, slice(k, k + 1))[0]
        assert alone.trace["transition_step"] == switched[k]
        np.testing.assert_allclose(g.pixels, alone.pixels, atol=1e-5)
    cfg = run(PolicyConfig("cfg", guidance_scale=7.5), slice(None))
    unguided = run(PolicyConfig("cfg", guidance_scale=0.0), slice(None))
    for k, g in enumerate(batch):
        diff_cfg = np.abs(g.pixels - cfg[k].pixels).mean()
        diff_unguided = np.abs(g.pixels - unguided[k].pixels).mean()
        assert diff_cfg > 0.005, (k, diff_cfg)  # guidance withheld (or opposed) for 2, 4 or all steps: not CFG's image
        if switched[k] is None and name == "dtp":  # s = 0 at every step
            assert diff_unguided <= 1e-5, (k, diff_unguided)
        else:  # guided (or opposed) at some step: not the unguided image
            assert diff_unguided > 0.005, (k, diff_unguided)


@pytest.mark.parametrize("name", ["cfg", "stp", "dtp", "og-dtp"])
def test_an_end_of_guidance_matches_the_reference(switching, switching_torch_pipe, tiny_switching_onnx_dir, name):
    """Once t <= T every image takes ε(x, e_p) alone: scale 1, d not measured; before, its policy as ever."""
    end = 300
    prompts, lat = switch_case(tiny_switching_onnx_dir)
    config = PolicyConfig(name, guidance_scale=7.5, transition_t=500, opposite_scale=2.0, guidance_end_t=end)
    ref, switched, _ = reference_loop(switching_torch_pipe, prompts, lat, config, SWITCH_STEPS)
    calls = []
    run = switching.unet.model.run
    switching.unet.model.run = lambda inputs: (calls.append(len(inputs["sample"])), run(inputs))[1]
    try:
        gens = switching.generate(prompts, SamplingConfig(steps=SWITCH_STEPS, scheduler="ddim", height=SIZE,
                                                          width=SIZE, policy=config), latents=lat)
    finally:
        switching.unet.model.run = run
    assert np.abs(np.stack([g.pixels for g in gens]) - ref).max() <= 1e-3
    assert [g.trace["transition_step"] for g in gens] == switched
    timesteps = gens[0].trace["timesteps"]
    ended = [t <= end for t in timesteps]
    assert 3 <= sum(ended) < len(ended)
    for g in gens:
        assert all(s == 1.0 and d is None for s, d, e in zip(g.trace["scale"], g.trace["gap"], ended) if e)
        assert g.trace["policy"]["guidance_end_t"] == end
    # one UNet row per image once guidance has ended
    assert [c for c, e in zip(calls, ended) if e] == [SWITCH_N] * sum(ended)
    # and it is not the image without the end (the last steps changed it)
    (full,) = switching.generate(prompts[:1], SamplingConfig(steps=SWITCH_STEPS, scheduler="ddim", height=SIZE,
                                 width=SIZE, policy=replace(config, guidance_end_t=None)), latents=lat[:1])
    assert np.abs(full.pixels - gens[0].pixels).max() > 1e-3


def test_auto_runs_each_image_on_the_rows_its_policy_needs(switching, switching_torch_pipe, tiny_switching_onnx_dir):
    """`auto` with stp as mitigation: after step 0 a flagged image needs only ε(x, e_∅) until τ, a clean one both,
    so the batch pays 3 rows a step, not 4; each image is its policy's reference image (stp flagged, cfg clean)."""
    prompts, lat = switch_case(tiny_switching_onnx_dir)
    prompts, lat = prompts[:2], lat[:2]
    sampling = SamplingConfig(steps=SWITCH_STEPS, scheduler="ddim", height=SIZE, width=SIZE)
    d0 = [g.trace["gap"][0] for g in switching.generate(prompts, sampling, latents=lat)]
    assert d0[0] != d0[1]
    threshold = sum(d0) / 2  # flags exactly one of the two
    auto = PolicyConfig("auto", guidance_scale=7.5, transition_t=500, detect_threshold=threshold, mitigation="stp")
    calls = []
    run = switching.unet.model.run
    switching.unet.model.run = lambda inputs: (calls.append(len(inputs["sample"])), run(inputs))[1]
    try:
        gens = switching.generate(prompts, replace(sampling, policy=auto), latents=lat)
    finally:
        switching.unet.model.run = run
    flagged = [d > threshold for d in d0]
    timesteps = gens[0].trace["timesteps"]
    assert calls == [4] + [3 if t > 500 else 4 for t in timesteps[1:]]
    for k, g in enumerate(gens):
        policy = PolicyConfig("stp" if flagged[k] else "cfg", guidance_scale=7.5, transition_t=500)
        ref, switched, _ = reference_loop(switching_torch_pipe, prompts[k:k + 1], lat[k:k + 1], policy, SWITCH_STEPS)
        assert np.abs(g.pixels - ref[0]).max() <= 1e-3
        assert g.trace["transition_step"] == switched[0]
        assert g.trace["detection_score"] == pytest.approx(d0[k])


def test_stp_runs_batch_n_before_tau(ours, tiny_onnx_dir):
    batches = []
    run = ours.unet.model.run
    ours.unet.model.run = lambda inputs: (batches.append(len(inputs["sample"])), run(inputs))[1]
    try:
        gens = ours.generate(PROMPTS, SamplingConfig(steps=10, scheduler="ddim", height=SIZE, width=SIZE,
                                                     policy=PolicyConfig("stp", transition_t=500)), seeds=[0, 1])
    finally:
        ours.unet.model.run = run
    timesteps = gens[0].trace["timesteps"]
    assert batches == [2 if t > 500 else 4 for t in timesteps]


def test_optimum_export_generates_like_ours(tiny_sd_pipeline_dir, tiny_onnx_dir, ours, tmp_path):
    pytest.importorskip("optimum.exporters.onnx")
    out = tmp_path / "optimum"
    proc = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--task", "text-to-image",
                           "--model", str(tiny_sd_pipeline_dir), str(out)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = Pipeline(out, threads=1)
    # optimum's export writes attention as ours does: both run fused (basinguard.engine.fusion)
    assert theirs.unet.model.fused_attention == ours.unet.model.fused_attention > 0
    for name in ("cfg", "og-dtp"):
        sampling = SamplingConfig(steps=10, scheduler="dpm++2m", height=SIZE, width=SIZE, policy=PolicyConfig(name))
        a = ours.generate(PROMPTS, sampling, seeds=[5, 6])
        b = theirs.generate(PROMPTS, sampling, seeds=[5, 6])
        assert np.abs(np.stack([g.pixels for g in a]) - np.stack([g.pixels for g in b])).max() <= 1e-4
        assert [g.trace["transition_step"] for g in a] == [g.trace["transition_step"] for g in b]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "basinguard.cli", *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_bad_input_gives_one_clear_line(tiny_onnx_dir, tmp_path):
    base = ["generate", "--model", str(tiny_onnx_dir), "--prompt", "x", "--threads", "1", "--out", str(tmp_path / "o.png")]
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(tiny_onnx_dir), str(broken)], check=True)
    (broken / "unet/model.onnx").write_bytes(b"not an onnx file")
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(tiny_onnx_dir), str(partial)], check=True)
    subprocess.run(["rm", "-r", str(partial / "vae_decoder")], check=True)
    np.save(tmp_path / "bad_lat.npy", np.zeros((1, 4, 3, 3), np.float32))
    size = SIZE // 2 ** (len(json.loads((tiny_onnx_dir / "vae_decoder/config.json").read_text())["block_out_channels"]) - 1)
    np.save(tmp_path / "nan_lat.npy", np.full((1, 4, size, size), np.nan, np.float32))
    np.save(tmp_path / "two_lat.npy", np.zeros((2, 4, size, size), np.float32))
    np.save(tmp_path / "five_bad_lat.npy", np.zeros((5, 4, size + 1, size), np.float32))
    np.save(tmp_path / "many_lat.npy", np.zeros((10_001, 1, 1, 1), np.float32))
    (tmp_path / "calib.json").write_text('{"threshold": 1.0}')
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("")
    (tmp_path / "q-1.png").mkdir()  # where image 1 of 2 of --out q.png would go
    np.savez(tmp_path / "lat.npz", a=np.zeros((1, 4, size, size), np.float32))
    np.save(tmp_path / "huge_lat.npy", np.full((1, 4, size, size), 1e300))
    cases = [
        (["--height", "18"], "height 18 not allowed: must be a multiple of"),
        (["--width", "0"], "width 0 not allowed"),
        # DDIM with steps_offset 1 over 1000 training steps: 1000 steps would need t = 1000, one past the last
        (["--steps", "0"], "steps (--steps) must be in [1, 999]"),
        (["--steps", "1001"], "steps (--steps) must be in [1, 999]"),
        (["--guidance-scale", "-2"], r"guidance scale must be in [0, 100]"),
        (["--guidance-scale", "inf"], r"guidance scale must be in [0, 100] (got inf)"),
        (["--guidance-scale", "1e38"], r"guidance scale must be in [0, 100]"),
        (["--policy", "auto", "--detect-threshold", "nan"], "detection threshold must be a finite number (got nan)"),
        (["--policy", "auto"], "--detect-calibration FILE"),
        (["--latents", str(tmp_path / "a_file")], "is not a readable .npy file"),
        (["--num-images", "10001"], "--num-images must be in [1, 10000]"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--latents", str(tmp_path / "bad_lat.npy")], "latents have shape (1, 4, 3, 3)"),
        (["--latents", str(tmp_path / "missing.npy")], "cannot read --latents"),
        (["--policy", "og-dtp", "--pre-scale", "1"], "--pre-scale applies to stp and dtp only, not og-dtp"),
        (["--policy", "cfg", "--pre-scale", "1"], "--pre-scale applies to stp and dtp only, not cfg"),
        (["--policy", "auto", "--detect-threshold", "1", "--mitigation", "og-stp", "--pre-scale", "1"], "not og-stp"),
        (["--policy", "dtp", "--transition-t", "100"], "--transition-t applies to stp and og-stp only, not dtp"),
        (["--policy", "cfg", "--transition-t", "100"], "--transition-t applies to stp and og-stp only, not cfg"),
        (["--policy", "dtp", "--opposite-scale", "3"], "--opposite-scale applies to og-stp and og-dtp only, not dtp"),
        (["--policy", "stp", "--mitigation", "og-dtp"], "--mitigation applies to policy auto only, not stp"),
        (["--policy", "cfg", "--detect-threshold", "3"], "--detect-threshold applies to policy auto only here, not cfg"),
        (["--policy", "stp", "--detect-calibration", str(tmp_path / "calib.json")],
         "--detect-calibration applies to policy auto only here, not stp"),
        (["--policy", "auto", "--detect-threshold", "1", "--mitigation", "stp", "--opposite-scale", "2"],
         "not stp (policy auto mitigates with stp here; choose its mitigation with --mitigation)"),
        (["--latents", str(tmp_path / "five_bad_lat.npy"), "--batch-size", "2"], "latents have shape (5, 4,"),
        (["--latents", str(tmp_path / "many_lat.npy")], "--latents holds 10001 images; at most 10000"),
        (["--policy", "auto", "--detect-threshold", "1", "--mitigation", "og-dtp", "--transition-t", "9"], "not og-dtp"),
        (["--latents", str(tmp_path / "nan_lat.npy")], "--latents must hold finite real numbers"),
        (["--latents", str(tmp_path / "two_lat.npy"), "--num-images", "3"], "--num-images 3 but --latents holds 2"),
        (["--out", str(tmp_path / "a_dir")], "is a directory"),
        (["--out", str(tmp_path / "o.gif")], "must end in .png or .jpg or .jpeg or .webp or .npy"),
        (["--trace", str(tmp_path / "a_dir")], f"--trace {tmp_path / 'a_dir'} is a directory"),
        (["--trace", str(tmp_path / "o.png")], f"--trace {tmp_path / 'o.png'} must end in .json"),  # not the image
        (["--out", str(tmp_path / "a_file" / "o.png")], "is a file, not a directory"),
        (["--out", str(tmp_path / ("x" * 300 + ".png"))], "file name too long"),
        (["--num-images", "2", "--out", str(tmp_path / "q.png")], "q-1.png is a directory"),
        (["--latents", str(tmp_path / "lat.npz")], "--latents must be one .npy array"),
        (["--latents", str(tmp_path / "huge_lat.npy")], "within float32's range"),
        (["--num-images", "0"], "--num-images must be in [1, 10000]"),
        (["--seed", "-1"], "seed -1 not allowed: seeds must be integers >= 0"),
    ]
    for extra, message in cases:
        proc = run_cli(*base, *extra)
        assert proc.returncode != 0, extra
        assert "Traceback" not in proc.stderr and message in proc.stderr, (extra, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for folder, message in ((broken, "cannot load"), (partial, "missing vae_decoder/model.onnx"),
                            (tmp_path / "nowhere", "model folder not found")):
        proc = run_cli("generate", "--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "o.png"))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert not list(tmp_path.glob(".*.tmp")) and not list(Path.cwd().glob(".a_dir.tmp"))  # nothing half-written
    proc = run_cli("demo", "--threads", "1", "--out", str(tmp_path / "a_file"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is a file" in proc.stderr, proc.stderr
    proc = run_cli("demo", "--model", str(tiny_onnx_dir), "--threads", "1", "--out", str(tmp_path / "demo"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no usable memorization/" in proc.stderr
    for extra, message in ((["--scheduler", "lms"], "invalid choice"), (["--policy", "nope"], "invalid choice"),
                           (["--threads", "0"], "expected an integer >= 1")):  # argparse: usage + one line, exit 2
        proc = run_cli(*base, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_model_output_is_an_error_not_an_image(ours, monkeypatch, bad):
    vae, unet = ours.vae_decoder, ours.unet.model
    real_vae, real_unet = vae.run, unet.run
    monkeypatch.setattr(vae, "run", lambda feed: {k: v * bad for k, v in real_vae(feed).items()})
    with pytest.raises(EngineError, match="the VAE decoder produced NaN or infinite values"):
        ours.generate(["x"], SamplingConfig(steps=2), seeds=[0])
    monkeypatch.setattr(vae, "run", real_vae)
    monkeypatch.setattr(unet, "run", lambda feed: {k: v * bad for k, v in real_unet(feed).items()})
    with pytest.raises(EngineError, match="the denoising loop"):
        ours.generate(["x"], SamplingConfig(steps=2), seeds=[0])


@pytest.mark.parametrize("name", ["dtp", "og-dtp"])
def test_dtp_on_the_shipped_model_switches_per_sample_as_algorithm1(name):
    """On a trained model d has real minima: each sample of one batch switches at its own step, as the reference."""
    from diffusers import StableDiffusionPipeline

    from basinguard.cli import SHIPPED_MODEL

    torch_pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL / "diffusers", safety_checker=None)
    captions = [json.loads(line)["caption"] for line in (SHIPPED_MODEL / "memorization/duplicated.jsonl").read_text().splitlines()]
    prompts, steps = captions[:6], 30
    lat = latents_for(SHIPPED_MODEL, len(prompts), seed=11, size=32)
    config = PolicyConfig(name, guidance_scale=7.5, opposite_scale=2.0)
    ref, switched, _ = reference_loop(torch_pipe, prompts, lat, config, steps)
    gens = Pipeline(SHIPPED_MODEL, threads=1).generate(
        prompts, SamplingConfig(steps=steps, scheduler="ddim", policy=config), latents=lat)
    assert [g.trace["transition_step"] for g in gens] == switched
    assert len(set(switched)) > 1, f"expected different transition steps per sample, got {switched}"
    assert np.abs(np.stack([g.pixels for g in gens]) - ref).max() <= 2e-3


def test_generate_in_batches_writes_the_same_images_batch_by_batch(ours, tiny_onnx_dir, tmp_path, monkeypatch):
    """--batch-size splits --num-images into UNet batches; image k keeps seed + k, so the images are the same as
    one batch's, and each batch is on disk before the next runs (an interrupted run keeps what it made)."""
    common = ["generate", "--model", str(tiny_onnx_dir), "--prompt", PROMPTS[0], "--steps", "3", "--threads", "1",
              "--num-images", "3", "--seed", "5", "--policy", "dtp"]
    assert cli_main([*common, "--out", str(tmp_path / "one.npy"), "--trace", str(tmp_path / "one.json")]) == 0
    written_before: list[int] = []
    generate = Pipeline.generate

    def spy(self, prompts, *args, **kwargs):
        written_before.append(len(list(tmp_path.glob("two-*.npy"))))
        return generate(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "generate", spy)
    assert cli_main([*common, "--batch-size", "2", "--out", str(tmp_path / "two.npy")]) == 0
    assert written_before == [0, 2]  # two calls; the first batch's two images were written before the second
    for k in range(3):
        np.testing.assert_allclose(np.load(tmp_path / f"two-{k}.npy"), np.load(tmp_path / f"one-{k}.npy"), atol=1e-5)
        assert json.loads((tmp_path / f"one-{k}.json").read_text())["seed"] == 5 + k


def test_png_carries_its_trace(tiny_onnx_dir, tmp_path):
    """A PNG holds its trace (JSON in a compressed text chunk): the same as --trace writes, any prompt text."""
    from PIL import Image

    from basinguard.runtime.pipeline import PNG_TRACE_KEY

    prompt = "a café — 猫 on a mat"  # beyond latin-1: PIL stores it as an iTXt chunk
    assert cli_main(["generate", "--model", str(tiny_onnx_dir), "--prompt", prompt, "--steps", "3", "--threads", "1",
                     "--policy", "dtp", "--out", str(tmp_path / "a.png"), "--trace", str(tmp_path / "a.json")]) == 0
    with Image.open(tmp_path / "a.png") as im:
        embedded = json.loads(im.text[PNG_TRACE_KEY])
    assert embedded == json.loads((tmp_path / "a.json").read_text())
    assert embedded["prompt"] == prompt and embedded["policy"]["name"] == "dtp" and len(embedded["gap"]) == 3


def test_an_unsupported_scheduler_config_points_to_scheduler(tiny_onnx_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_onnx_dir, model)
    config_path = model / "scheduler/scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "DPMSolverMultistepScheduler",
                                       "algorithm_type": "sde-dpmsolver++"}))
    proc = run_cli("generate", "--model", str(model), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "o.png"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "algorithm_type='sde-dpmsolver++' is not supported" in proc.stderr
    # every name the hint offers runs this config, and DPM++'s Karras twin (the same class) is not offered
    hint = proc.stderr.split("--scheduler ")[-1].split()[0].split("|")
    assert hint == ["ddim", "euler", "euler-karras", "euler-a", "pndm", "unipc", "unipc-karras"], proc.stderr
    proc = run_cli("generate", "--model", str(model), "--prompt", "x", "--steps", "2", "--scheduler", "ddim",
                   "--out", str(tmp_path / "o.png"))
    assert proc.returncode == 0, proc.stderr  # as the hint says
    config_path.write_text(json.dumps({**config, "beta_schedule": "sigmoid"}))  # read by every scheduler: no hint
    proc = run_cli("generate", "--model", str(model), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "o.png"))
    assert proc.returncode == 2 and "beta_schedule 'sigmoid' is not supported" in proc.stderr
    assert "--scheduler" not in proc.stderr


def test_generate_checks_the_latents_count_against_the_prompts(ours):
    from basinguard.runtime.errors import InputError

    sampling = SamplingConfig(steps=2)
    resolved = ours.spec.resolve(sampling)
    latents = ours.spec.initial_latents([0, 1, 2], resolved.height, resolved.width)
    with pytest.raises(InputError, match=r"latents have shape \(3, .* with 2 images needs \(2, "):
        ours.generate([PROMPTS[0]] * 2, sampling, latents=latents)


def test_python_api_misuse_is_one_clear_error(ours):
    """The CLI checks its flags; a service calling `generate` directly gets the same kind of error, never a
    TypeError from deep inside or an image made from something it did not mean."""
    from basinguard.runtime.errors import InputError
    from basinguard.runtime.guidance import PolicyError

    sampling = SamplingConfig(steps=2)
    resolved = ours.spec.resolve(sampling)
    latents = ours.spec.initial_latents([0], resolved.height, resolved.width)
    cases = [
        (lambda: ours.generate("a red cat", sampling, seeds=[0] * 9), "prompts must be a list of strings"),  # not 9 images
        (lambda: ours.generate(["a", None], sampling, seeds=[0, 1]), "prompts must be a list of strings"),
        (lambda: ours.generate(["a"], sampling, seeds=[0], negative_prompts="x"), "negative_prompts must be a list"),
        (lambda: ours.generate(["a"], sampling, seeds=0), "need a list of one seed per image"),
        (lambda: ours.generate(["a"], sampling, seeds=[1], latents=latents), "seeds or latents, not both"),
        (lambda: ours.generate(["a"], sampling, latents=latents.tolist()), "latents must be a real numpy array"),
        (lambda: ours.generate(["a"], sampling, latents=latents.astype(np.complex64)), "complex64 array"),
        (lambda: ours.generate(["a"], sampling, latents=latents * 1e30), "finite and within"),
        (lambda: ours.generate(["a"], {"steps": 2}, seeds=[0]), "sampling must be a SamplingConfig"),
        (lambda: ours.generate(["a"], SamplingConfig(steps=2, height=32.0), seeds=[0]), "height must be an integer"),
        (lambda: ours.generate(["a"], SamplingConfig(steps=2, policy=PolicyConfig(guidance_scale="7")), seeds=[0]),
         "guidance_scale must be a number"),
    ]
    for call, message in cases:
        with pytest.raises((InputError, PolicyError), match=message):
            call()


def test_an_image_owns_its_pixels(ours):
    gens = ours.generate(["a red cat", "a blue dog"], SamplingConfig(steps=2), seeds=[0, 1])
    assert all(g.pixels.base is None and g.pixels.flags.c_contiguous for g in gens)  # not a view of the batch
