"""basinguard.diffusers (`guard`) on diffusers' own tiny SD and SDXL pipelines, against `basinguard generate`
(Pipeline.generate) on the same models exported to ONNX: with the same latents each image switches at the same
step, gets the same scale per step, d agrees, and the images agree within one 8-bit level."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from basinguard.errors import BasinguardError
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

from basinguard.diffusers import AdapterError, guard  # noqa: E402

LEVEL = 1 / 255  # one 8-bit level
SD_PROMPTS = ["a red circle on a blue background", "a small green square at the top"]
SD_STEPS, SD_N, SD_SIZE = 20, 6, 16
XL_PROMPTS = ["a red cat on mars", "a blue dog in the sky"]
XL_STEPS, XL_N, XL_HEIGHT, XL_WIDTH = 12, 4, 16, 24
POLICIES = ["cfg", "stp", "dtp", "og-dtp", "auto"]


def sd_case() -> tuple[list[str], np.ndarray]:
    """tests/test_pipeline.py's switch case: on the switching tiny SD model with DDIM, dtp switches at 2, 4, 2,
    never, 2, 4."""
    return [SD_PROMPTS[k % 2] for k in range(SD_N)], np.random.default_rng(3).standard_normal(
        (SD_N, 4, SD_SIZE // 2, SD_SIZE // 2)).astype(np.float32)


def xl_case() -> tuple[list[str], np.ndarray]:
    return [XL_PROMPTS[k % 2] for k in range(XL_N)], np.random.default_rng(3).standard_normal(
        (XL_N, 4, XL_HEIGHT // 2, XL_WIDTH // 2)).astype(np.float32)


@pytest.fixture(scope="module")
def sd_pipe(tiny_switching_sd_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_switching_sd_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_ours(tiny_switching_onnx_dir):
    return Pipeline(tiny_switching_onnx_dir, threads=1)


@pytest.fixture(scope="module")
def xl_pipe(tiny_sdxl_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def xl_ours(tiny_sdxl_onnx_dir):
    return Pipeline(tiny_sdxl_onnx_dir, threads=1)


def settings(name: str) -> dict:
    """The policy settings each policy takes here (og: λ_og = 2; stp: τ = 500)."""
    return {"stp": {"transition_t": 500}, "og-dtp": {"opposite_scale": 2.0}}.get(name, {})


def auto_threshold(ours: Pipeline, prompts: list[str], lat: np.ndarray, sampling: SamplingConfig) -> float:
    """A threshold between the images' step-0 d (the runtime's), so that some are flagged and some are not."""
    gens = ours.generate(prompts, sampling, latents=lat)
    scores = sorted(g.trace["gap"][0] for g in gens)
    middle = len(scores) // 2
    return (scores[middle - 1] + scores[middle]) / 2


def assert_same_as_runtime(out, gens, steps: int) -> None:
    """Per image: switch step, scale per step, d (measured where the runtime measured it), image within a level."""
    assert len(out.traces) == len(gens)
    for trace, gen in zip(out.traces, gens):
        assert trace["transition_step"] == gen.trace["transition_step"]
        # PNDM's PLMS runs one more UNet step than it was asked for (its first timestep twice), here as there
        assert trace["scale"] == gen.trace["scale"] and len(trace["scale"]) in (steps, steps + 1)
        assert trace["timesteps"] == pytest.approx(gen.trace["timesteps"], rel=1e-5)  # Karras: float32 t
        assert [v is None for v in trace["gap"]] == [v is None for v in gen.trace["gap"]]
        measured = [(a, b) for a, b in zip(trace["gap"], gen.trace["gap"]) if a is not None]
        np.testing.assert_allclose(*np.array(measured).T, rtol=1e-3)
        assert trace["detection_score"] == (None if gen.trace["detection_score"] is None
                                            else pytest.approx(gen.trace["detection_score"], rel=1e-3))
        assert (trace["uncond"], trace["model_family"], trace["policy"]) == (
            gen.trace["uncond"], gen.trace["model_family"], gen.trace["policy"])
    got = np.stack([g.pixels for g in gens])
    assert out.images.shape == got.shape
    assert np.abs(out.images - got).max() <= LEVEL


@pytest.mark.parametrize("name", POLICIES)
def test_sd_policies_match_basinguard_generate(sd_pipe, sd_ours, name):
    prompts, lat = sd_case()
    fields = settings(name)
    if name == "auto":
        threshold = auto_threshold(sd_ours, prompts, lat, SamplingConfig(
            steps=SD_STEPS, scheduler="ddim", height=SD_SIZE, width=SD_SIZE, policy=PolicyConfig("cfg")))
        fields = {"detect_threshold": threshold, "mitigation": "dtp"}
    config = PolicyConfig(name, guidance_scale=7.5, **fields)
    gens = sd_ours.generate(prompts, SamplingConfig(steps=SD_STEPS, scheduler="ddim", height=SD_SIZE, width=SD_SIZE,
                                                    policy=config), latents=lat)
    guarded = guard(sd_pipe, name, guidance_scale=7.5, **fields)
    out = guarded(prompts, latents=torch.from_numpy(lat), num_inference_steps=SD_STEPS, height=SD_SIZE, width=SD_SIZE,
                  output_type="np")
    assert_same_as_runtime(out, gens, SD_STEPS)
    switched = [t["transition_step"] for t in out.traces]
    if name in ("dtp", "og-dtp"):  # each image at its own step, found from its own d
        assert switched == [2, 4, 2, None, 2, 4]
    if name == "auto":  # flagged images follow dtp, the others plain CFG from step 0
        flagged = [t["detection_score"] > threshold for t in out.traces]
        assert any(flagged) and not all(flagged)
        assert [s for s, f in zip(switched, flagged) if not f] == [0] * flagged.count(False)
        assert {2, 4, None} & {s for s, f in zip(switched, flagged) if f}


@pytest.mark.parametrize("name", POLICIES)
def test_sdxl_policies_match_basinguard_generate(xl_pipe, xl_ours, name):
    """SDXL with its own Euler scheduler: d against SDXL's zero e_∅, the text_embeds and time_ids halved with the
    batch where the conditional branch is skipped."""
    prompts, lat = xl_case()
    sampling = SamplingConfig(steps=XL_STEPS, height=XL_HEIGHT, width=XL_WIDTH, policy=PolicyConfig("cfg", 6.0))
    fields = settings(name)
    if name == "auto":
        fields = {"detect_threshold": auto_threshold(xl_ours, prompts, lat, sampling)}
    config = PolicyConfig(name, guidance_scale=6.0, **fields)
    gens = xl_ours.generate(prompts, SamplingConfig(steps=XL_STEPS, height=XL_HEIGHT, width=XL_WIDTH, policy=config),
                            latents=lat)
    out = guard(xl_pipe, name, guidance_scale=6.0, **fields)(
        prompts, latents=torch.from_numpy(lat), num_inference_steps=XL_STEPS, height=XL_HEIGHT, width=XL_WIDTH,
        output_type="np")
    assert_same_as_runtime(out, gens, XL_STEPS)
    if name in ("dtp", "og-dtp"):
        assert [t["transition_step"] for t in out.traces] == [2, 9, None, 9]
    assert {k: out.traces[0][k] for k in ("original_size", "target_size", "crops_coords_top_left")} == {
        k: gens[0].trace[k] for k in ("original_size", "target_size", "crops_coords_top_left")}


def test_a_mixed_batch_switches_per_image_as_each_image_alone(sd_pipe):
    """Images of one batch switch at their own steps, each as it does alone, and the switch shows in the image: no
    image of the batch is CFG's, and the one that never switches is the unguided image."""
    prompts, lat = sd_case()
    guarded = guard(sd_pipe, "dtp", guidance_scale=7.5)

    def run(g, k: slice):
        return g(prompts[k], latents=torch.from_numpy(lat[k]), num_inference_steps=SD_STEPS, height=SD_SIZE,
                 width=SD_SIZE, output_type="np")

    batch = run(guarded, slice(None))
    switched = [t["transition_step"] for t in batch.traces]
    assert len(set(switched) - {None}) >= 2 and None in switched
    for k in range(SD_N):
        alone = run(guarded, slice(k, k + 1))
        assert alone.traces[0]["transition_step"] == switched[k]
        assert np.abs(alone.images[0] - batch.images[k]).max() <= LEVEL
    cfg = run(guard(sd_pipe, "cfg", guidance_scale=7.5), slice(None)).images
    unguided = run(guard(sd_pipe, "cfg", guidance_scale=0.0), slice(None)).images
    for k in range(SD_N):
        assert np.abs(batch.images[k] - cfg[k]).mean() > 0.005, k
        if switched[k] is None:
            assert np.abs(batch.images[k] - unguided[k]).max() <= 1e-5
        else:
            assert np.abs(batch.images[k] - unguided[k]).mean() > 0.005, k


def count_unet_rows(pipe) -> tuple[list[int], object]:
    """Rows each UNet evaluation runs, seen inside the UNet (its first convolution), and the hook's handle."""
    rows: list[int] = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda _m, args: rows.append(len(args[0])))
    return rows, handle


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_stp_runs_the_unet_at_batch_n_before_tau(sd_pipe, xl_pipe, family):
    pipe, (prompts, lat) = (sd_pipe, sd_case()) if family == "sd" else (xl_pipe, xl_case())
    rows, handle = count_unet_rows(pipe)
    try:
        out = guard(pipe, "stp", transition_t=500)(prompts, latents=torch.from_numpy(lat), num_inference_steps=8,
                                                   height=lat.shape[2] * 2, width=lat.shape[3] * 2, output_type="np")
    finally:
        handle.remove()
    n, trace = len(prompts), out.traces[0]
    assert rows == [n if t > 500 else 2 * n for t in trace["timesteps"]]
    assert 0 < trace["scale"].count(0.0) < 8
    assert [v is None for v in trace["gap"]] == [t > 500 for t in trace["timesteps"]]


@pytest.mark.parametrize("name", ["cfg", "dtp", "auto"])
def test_an_end_of_guidance_matches_basinguard_generate_with_one_row_per_image(sd_pipe, sd_ours, name):
    """guidance_end_t: past it each image takes ε_p alone, one UNet row; before, its policy (auto: stp for the
    flagged images, whose rows before τ are ε_∅ alone, CFG's two for the others); as the runtime does."""
    prompts, lat = sd_case()
    fields = {"guidance_end_t": 300}
    if name == "auto":
        threshold = auto_threshold(sd_ours, prompts, lat, SamplingConfig(
            steps=SD_STEPS, scheduler="ddim", height=SD_SIZE, width=SD_SIZE, policy=PolicyConfig("cfg")))
        fields |= {"detect_threshold": threshold, "mitigation": "stp", "transition_t": 500}
    config = PolicyConfig(name, guidance_scale=7.5, **fields)
    gens = sd_ours.generate(prompts, SamplingConfig(steps=SD_STEPS, scheduler="ddim", height=SD_SIZE, width=SD_SIZE,
                                                    policy=config), latents=lat)
    rows, handle = count_unet_rows(sd_pipe)
    try:
        out = guard(sd_pipe, name, guidance_scale=7.5, **fields)(
            prompts, latents=torch.from_numpy(lat), num_inference_steps=SD_STEPS, height=SD_SIZE, width=SD_SIZE,
            output_type="np")
    finally:
        handle.remove()
    assert_same_as_runtime(out, gens, SD_STEPS)
    n, timesteps = len(prompts), out.traces[0]["timesteps"]
    ended = [t <= 300 for t in timesteps]
    assert any(ended) and [r for r, e in zip(rows, ended) if e] == [n] * sum(ended)
    if name == "auto":  # before τ a flagged image runs one row, a clean one two
        flagged = sum(t["detection_score"] > threshold for t in out.traces)
        assert 0 < flagged < n
        assert [r for r, t in zip(rows[1:], timesteps[1:]) if t > 500] == [2 * n - flagged] * sum(
            t > 500 for t in timesteps[1:])


def test_a_users_callback_on_step_end_still_runs_and_can_change_latents(sd_pipe):
    prompts, lat = sd_case()
    seen: list[tuple[int, float, tuple]] = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, float(t), tuple(kwargs["latents"].shape)))
        return {"latents": kwargs["latents"] * 0 if i == SD_STEPS - 1 else kwargs["latents"]}

    out = guard(sd_pipe, "dtp")(prompts, latents=torch.from_numpy(lat), num_inference_steps=SD_STEPS, height=SD_SIZE,
                                width=SD_SIZE, output_type="latent", callback_on_step_end=callback)
    assert [s[0] for s in seen] == list(range(SD_STEPS))
    assert [s[1] for s in seen] == out.traces[0]["timesteps"]
    assert {s[2] for s in seen} == {(SD_N, 4, SD_SIZE // 2, SD_SIZE // 2)}  # the images' latents, not the CFG batch
    assert not out.images.any()  # the callback's latents were taken
    assert [t["transition_step"] for t in out.traces] == [2, 4, 2, None, 2, 4]

    def interrupt(pipe, i, t, kwargs):  # diffusers' way to stop early: the steps that ran are traced
        pipe._interrupt = i == 4
        return kwargs

    out = guard(sd_pipe, "dtp")(prompts, latents=torch.from_numpy(lat), num_inference_steps=SD_STEPS, height=SD_SIZE,
                                width=SD_SIZE, output_type="latent", callback_on_step_end=interrupt)
    assert len(out.traces[0]["scale"]) == 5 and len(out.traces[0]["gap"]) == 5


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-karras", "dpm++2m", "unipc", "pndm"])
def test_v_prediction_d_is_in_eps_space_on_every_scheduler(sd_pipe, tiny_switching_onnx_dir, tmp_path, scheduler):
    """v-prediction: d = α_t ‖v_p − v_∅‖ as the runtime converts it, with α_t from each scheduler's own sigma or
    ᾱ at t; the same switch steps and images as the runtime on the folder with the same scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
           "unipc": UniPCMultistepScheduler, "pndm": PNDMScheduler}[scheduler.removesuffix("-karras")]
    original = sd_pipe.scheduler
    extra = {"skip_prk_steps": True} if scheduler == "pndm" else {}
    sd_pipe.scheduler = cls.from_config(original.config, prediction_type="v_prediction",
                                        use_karras_sigmas=scheduler.endswith("-karras"), **extra)
    try:
        folder = tmp_path / "model"
        shutil.copytree(tiny_switching_onnx_dir, folder)
        (folder / "scheduler/scheduler_config.json").write_text(json.dumps(dict(sd_pipe.scheduler.config)))
        prompts, lat = sd_case()
        config = PolicyConfig("og-dtp", guidance_scale=7.5, opposite_scale=2.0)
        gens = Pipeline(folder, threads=1).generate(prompts, SamplingConfig(
            steps=10, height=SD_SIZE, width=SD_SIZE, policy=config), latents=lat)
        assert gens[0].trace["scheduler"] == scheduler
        out = guard(sd_pipe, "og-dtp", opposite_scale=2.0)(prompts, latents=torch.from_numpy(lat), num_inference_steps=10,
                                                           height=SD_SIZE, width=SD_SIZE, output_type="np")
    finally:
        sd_pipe.scheduler = original
    assert_same_as_runtime(out, gens, 10)


def test_traces_name_each_images_prompt_and_return_dict_false_appends_them(sd_pipe, sd_ours):
    lat = np.random.default_rng(0).standard_normal((4, 4, SD_SIZE // 2, SD_SIZE // 2)).astype(np.float32)
    guarded = guard(sd_pipe, "dtp", latest_transition_t=400)
    images, nsfw, traces = guarded(SD_PROMPTS, negative_prompt=["blue", ""], num_images_per_prompt=2,
                                   latents=torch.from_numpy(lat), num_inference_steps=6, height=SD_SIZE,
                                   width=SD_SIZE, output_type="np", return_dict=False)
    assert [t["prompt"] for t in traces] == [SD_PROMPTS[0]] * 2 + [SD_PROMPTS[1]] * 2
    assert [t["uncond"] for t in traces] == ["negative prompt"] * 2 + ["empty prompt"] * 2
    gens = sd_ours.generate([t["prompt"] for t in traces], SamplingConfig(
        steps=6, scheduler="ddim", height=SD_SIZE, width=SD_SIZE, policy=PolicyConfig("dtp", latest_transition_t=400)),
        negative_prompts=["blue", "blue", "", ""], latents=lat)
    assert set(gens[0].trace) - set(traces[0]) <= {"truncation"}  # the runtime's fields (no tokenizer here)
    assert [t["transition_step"] for t in traces] == [g.trace["transition_step"] for g in gens]
    assert traces[0]["policy"] == {"name": "dtp", "guidance_scale": 7.5, "pre_scale": 0.0, "latest_transition_t": 400}
    assert np.abs(images - np.stack([g.pixels for g in gens])).max() <= LEVEL


def test_bad_settings_and_arguments_are_one_clear_line(sd_pipe):
    prompts, lat = sd_case()
    forward = sd_pipe.unet.forward
    cases = [
        (lambda: guard(object(), "dtp"), "guard takes a StableDiffusionPipeline or StableDiffusionXLPipeline"),
        (lambda: guard(sd_pipe, "dtp", tau=3), "unknown policy setting 'tau'; the settings are"),
        (lambda: guard(sd_pipe, "og-dtp", pre_scale=1.0), "pre_scale applies to stp and dtp only, not og-dtp"),
        (lambda: guard(sd_pipe, "dtp", mitigation="stp"), "mitigation applies to policy auto only"),
        (lambda: guard(sd_pipe, "fast"), "unknown policy 'fast'"),
        (lambda: guard(sd_pipe, "dtp", guidance_scale=500.0), "guidance scale must be in [0, 100]"),
        (lambda: guard(sd_pipe, "auto"), "policy 'auto' needs a detection threshold"),
        (lambda: guard(sd_pipe)(prompts, guidance_scale=3.0), "guidance_scale is set by guard(pipe, guidance_scale="),
        (lambda: guard(sd_pipe)(prompts, guidance_rescale=0.7), "guidance_rescale is not supported"),
        (lambda: guard(sd_pipe)(prompts, steps=3), "StableDiffusionPipeline does not take the argument 'steps'"),
    ]
    for call, message in cases:
        with pytest.raises(BasinguardError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)

    def stop_cfg(pipe, i, t, kwargs):  # as diffusers' SDCFGCutoffCallback: CFG off mid-run
        pipe._guidance_scale = 1.0
        return kwargs

    with pytest.raises(AdapterError, match="without classifier-free guidance"):
        guard(sd_pipe, "dtp")(prompts, latents=torch.from_numpy(lat), num_inference_steps=4, height=SD_SIZE,
                              width=SD_SIZE, output_type="latent", callback_on_step_end=stop_cfg)
    assert sd_pipe.unet.forward == forward and "forward" not in vars(sd_pipe.unet)  # restored after a failure
    original = sd_pipe.scheduler
    sd_pipe.scheduler = type(original).from_config(original.config, prediction_type="sample")
    try:
        with pytest.raises(AdapterError, match="prediction_type 'sample' is not supported"):
            guard(sd_pipe, "dtp")(prompts[:1], num_inference_steps=2, height=SD_SIZE, width=SD_SIZE)
    finally:
        sd_pipe.scheduler = original


def test_the_package_imports_without_torch_and_guard_names_the_extra():
    code = ("import sys\n"
            "for name in ('torch', 'diffusers', 'transformers'):\n"
            "    sys.modules[name] = None\n"
            "from basinguard.diffusers import AdapterError, guard\n"
            "try:\n"
            "    guard(object(), 'dtp')\n"
            "except AdapterError as exc:\n"
            "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert "needs torch and diffusers: pip install 'basinguard[diffusers]'" in proc.stdout


def test_the_gpu_checks_adapter_section_runs_on_cpu(tmp_path):
    """benchmarks/gpu_check_diffusers.py's section, here with the CPU as the device (gpu_check.py runs it on CUDA)."""
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        import gpu_check
        from gpu_check_diffusers import diffusers_section
    finally:
        sys.path.remove(str(benchmarks))
    report = gpu_check.Report(budget_s=300, json_path=tmp_path / "report.json")
    result = diffusers_section(report, "cpu", tiny=True)
    checks = json.loads((tmp_path / "report.json").read_text())["checks"]
    assert len(checks) == 4 and all(c["ok"] for c in checks), checks
    timing = result["tiny timing"]
    assert timing["batch_n_steps"] > 0 and set(timing["seconds"]) == {"plain", "guarded cfg", "guarded stp",
                                                                      "guarded dtp"}
    assert result["tiny stp transition steps"]["cpu"] == [timing["steps"] - timing["batch_n_steps"]] * 3
