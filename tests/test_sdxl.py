"""SDXL end to end on a tiny random StableDiffusionXLPipeline (tests/conftest.py): basinguard's export and runtime
against diffusers' own StableDiffusionXLPipeline in torch, and against Algorithm 1 written here in torch on
diffusers' modules for the policies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from basinguard.cli import main as cli_main
from basinguard.runtime.errors import InputError, ModelFolderError
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

PROMPTS = ["a red cat on mars", "a blue dog in the sky"]
NEGATIVES = ["green tree", "night"]
HEIGHT, WIDTH = 16, 24  # non-square; the tiny model's native size is 16x16
LEVEL = 1 / 255  # one 8-bit level


def latents(n: int, seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, height // 2, width // 2)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_xl(tiny_sdxl_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_pipeline_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours_xl(tiny_sdxl_onnx_dir):
    return Pipeline(tiny_sdxl_onnx_dir, threads=1)


def scheduler_class(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    return {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
            "pndm": PNDMScheduler}[name]


def with_config(folder: Path, dest: Path, scheduler: dict | None = None, index: dict | None = None) -> Path:
    """A copy of an exported folder with another scheduler config and/or model_index.json entries."""
    shutil.copytree(folder, dest)
    if scheduler is not None:
        (dest / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler))
    if index is not None:
        path = dest / "model_index.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **index}))
    return dest


def reference(pipe, prompts, lat, steps=8, scale=6.0, height=HEIGHT, width=WIDTH, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return pipe(prompts, latents=torch.from_numpy(lat), num_inference_steps=steps, guidance_scale=scale,
                    height=height, width=width, output_type="np", **kwargs).images


def pixels(gens) -> np.ndarray:
    return np.stack([g.pixels for g in gens])


def test_export_writes_an_sdxl_folder(tiny_sdxl_onnx_dir, ours_xl):
    manifest = json.loads((tiny_sdxl_onnx_dir / "basinguard.json").read_text())
    assert manifest["model_family"] == "sdxl"
    models = manifest["models"]
    assert set(models) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder"}
    unet_inputs = {i["name"]: i for i in models["unet"]["inputs"]}
    assert list(unet_inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet_inputs["encoder_hidden_states"]["shape"] == ["batch_size", 77, 32 + 48]  # both encoders' widths
    assert unet_inputs["text_embeds"]["shape"] == ["batch_size", 32] and unet_inputs["time_ids"]["shape"][1] == 6
    outputs_2 = [o["name"] for o in models["text_encoder_2"]["outputs"]]
    assert outputs_2 == ["text_embeds", "last_hidden_state", *(f"hidden_states.{k}" for k in range(4))]
    assert [o["name"] for o in models["text_encoder"]["outputs"]][2:] == [f"hidden_states.{k}" for k in range(3)]
    assert models["vae_decoder"]["dtype"] == "float32"
    assert {"text_encoder_2", "tokenizer", "tokenizer_2"} <= set(manifest["validation"])
    # the runtime takes each encoder's penultimate layer, and tokenizer_2 pads with "!" as the source's does
    assert ours_xl.text.hidden_outputs() == ("hidden_states.1", "hidden_states.2")
    tokenizer_2 = ours_xl.text.tokenizers[1]
    assert tokenizer_2.pad_id == tokenizer_2.tokenizer.token_to_id("!") != ours_xl.tokenizer.pad_id
    assert ours_xl.folder.family == "sdxl" and ours_xl.folder.force_zeros_for_empty_prompt


@pytest.mark.parametrize("negative", [False, True], ids=["no-negative", "negative"])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpm++2m", "pndm"])
def test_matches_diffusers_sdxl_pipeline(tiny_sdxl_onnx_dir, torch_xl, tmp_path, scheduler, negative):
    """The folder's own scheduler (SDXL ships Euler, leading spacing, steps_offset 1; the others from it as diffusers'
    from_config makes them). DDIM without clip_sample: with it, this random model's trajectories are chaotic
    (diffusers against itself moves by whole levels for latents 1e-6 apart); PNDM as SD 1.x ships it (no PRK)."""
    cls = scheduler_class(scheduler)
    extra = {"ddim": {"clip_sample": False}, "pndm": {"skip_prk_steps": True}}.get(scheduler, {})
    torch_xl.scheduler = cls.from_config(json.loads((tiny_sdxl_onnx_dir / "scheduler/scheduler_config.json")
                                                    .read_text()), **extra)
    folder = with_config(tiny_sdxl_onnx_dir, tmp_path / "model", scheduler=dict(torch_xl.scheduler.config))
    lat = latents(2)
    ref = reference(torch_xl, PROMPTS, lat, negative_prompt=NEGATIVES if negative else None)
    ours = Pipeline(folder, threads=1)
    gens = ours.generate(PROMPTS, SamplingConfig(steps=8, height=HEIGHT, width=WIDTH, policy=PolicyConfig("cfg", 6.0)),
                         latents=lat, negative_prompts=NEGATIVES if negative else None)
    assert gens[0].trace["scheduler"] == scheduler
    assert np.abs(pixels(gens) - ref).max() <= LEVEL and ref.std() > 0.05
    trace = gens[0].trace
    assert trace["model_family"] == "sdxl" and trace["uncond"] == ("negative prompt" if negative else "zeros")
    assert trace["original_size"] == trace["target_size"] == [HEIGHT, WIDTH] and trace["crops_coords_top_left"] == [0, 0]


def test_force_zeros_for_empty_prompt_false_uses_the_empty_prompt(tiny_sdxl_onnx_dir, torch_xl, ours_xl, tmp_path):
    from diffusers import EulerDiscreteScheduler

    torch_xl.scheduler = EulerDiscreteScheduler.from_config(
        json.loads((tiny_sdxl_onnx_dir / "scheduler/scheduler_config.json").read_text()))
    sampling = SamplingConfig(steps=8, height=HEIGHT, width=WIDTH, policy=PolicyConfig("cfg", 6.0))
    lat = latents(2, seed=1)
    folder = with_config(tiny_sdxl_onnx_dir, tmp_path / "model", index={"force_zeros_for_empty_prompt": False})
    theirs = Pipeline(folder, threads=1)
    assert not theirs.folder.force_zeros_for_empty_prompt
    got = theirs.generate(PROMPTS, sampling, latents=lat)
    torch_xl.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        ref = reference(torch_xl, PROMPTS, lat)
    finally:
        torch_xl.register_to_config(force_zeros_for_empty_prompt=True)
    assert np.abs(pixels(got) - ref).max() <= LEVEL and got[0].trace["uncond"] == "empty prompt"
    zeros = ours_xl.generate(PROMPTS, sampling, latents=lat)  # the same model with force_zeros true
    assert np.abs(pixels(zeros) - ref).max() > 10 * LEVEL  # the setting changes e_∅, and so the images
    assert zeros[0].trace["gap"] != got[0].trace["gap"]  # d is measured against the e_∅ used


def test_cli_micro_conditioning_matches_diffusers(tiny_sdxl_onnx_dir, torch_xl, tmp_path):
    from diffusers import EulerDiscreteScheduler

    torch_xl.scheduler = EulerDiscreteScheduler.from_config(
        json.loads((tiny_sdxl_onnx_dir / "scheduler/scheduler_config.json").read_text()))
    lat = latents(1, seed=2)
    np.save(tmp_path / "lat.npy", lat)
    micro = {"original_size": (64, 48), "crops_coords_top_left": (4, 8), "target_size": (32, 40)}
    ref = reference(torch_xl, PROMPTS[:1], lat, **micro)
    plain = reference(torch_xl, PROMPTS[:1], lat)
    assert np.abs(ref - plain).max() > 10 * LEVEL  # the time ids matter to this model
    rc = cli_main(["generate", "--model", str(tiny_sdxl_onnx_dir), "--prompt", PROMPTS[0], "--latents",
                   str(tmp_path / "lat.npy"), "--steps", "8", "--guidance-scale", "6", "--policy", "cfg",
                   "--height", str(HEIGHT), "--width", str(WIDTH), "--original-size", "64x48",
                   "--crops-coords-top-left", "4,8", "--target-size", "32x40", "--threads", "1",
                   "--out", str(tmp_path / "img.npy"), "--trace", str(tmp_path / "trace.json")])
    assert rc == 0
    assert np.abs(np.load(tmp_path / "img.npy")[None] - ref).max() <= LEVEL
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert {k: tuple(trace[k]) for k in micro} == micro


def reference_loop_xl(pipe, prompts: list[str], lat: np.ndarray, config: PolicyConfig, steps: int):
    """Algorithm 1 in torch on diffusers' SDXL modules: e_∅, e_p, pooled and time ids from the pipeline's own
    encode_prompt and _get_add_time_ids, both branches every step, the rule per sample."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    sched.set_timesteps(steps)
    n = len(prompts)
    pre = -config.opposite_scale if config.name.startswith("og-") else config.pre_scale
    with torch.no_grad():
        e_p, e_u, pooled_p, pooled_u = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
        emb, pooled = torch.cat([e_u, e_p]), torch.cat([pooled_u, pooled_p])
        time_ids = pipe._get_add_time_ids((HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH), emb.dtype,
                                          pipe.text_encoder_2.config.projection_dim).repeat(2 * n, 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        x = torch.from_numpy(lat) * sched.init_noise_sigma
        d_hist: list[list[float]] = [[] for _ in range(n)]
        switched = [None] * n
        for i, t in enumerate(sched.timesteps):
            eps = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
            eps_u, eps_c = eps[:n], eps[n:]
            scales = []
            for k in range(n):
                d_hist[k].append(float((eps_c[k] - eps_u[k]).norm()))
                if switched[k] is None:
                    h = d_hist[k]
                    if config.name.endswith("stp") and int(t) <= config.transition_t:
                        switched[k] = i
                    if config.name.endswith("dtp") and i >= 2 and h[i - 2] > h[i - 1] < h[i]:
                        switched[k] = i
                scales.append(config.guidance_scale if switched[k] is not None else pre)
            x = sched.step(eps_u + torch.tensor(scales).view(-1, 1, 1, 1) * (eps_c - eps_u), t, x).prev_sample
        img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), switched, np.array(d_hist).T


@pytest.mark.parametrize("name", ["stp", "dtp", "og-stp", "og-dtp"])
def test_policies_on_sdxl_follow_algorithm1(tiny_sdxl_onnx_dir, torch_xl, tmp_path, name):
    """The rules as on SD (tests/test_pipeline.py): the same transition steps, scales, d and images as the reference,
    with d measured against SDXL's zero e_∅; STP runs the unconditional half alone (batch N) before τ."""
    from diffusers import DDIMScheduler

    steps, n = 12, 4
    prompts = [PROMPTS[k % 2] for k in range(n)]
    lat = latents(n, seed=3)
    config = PolicyConfig(name, guidance_scale=6.0, transition_t=500, opposite_scale=2.0)
    ref, switched, ref_d = reference_loop_xl(torch_xl, prompts, lat, config, steps)
    folder = with_config(tiny_sdxl_onnx_dir, tmp_path / "model", scheduler=dict(
        DDIMScheduler.from_config(torch_xl.scheduler.config, clip_sample=False).config))
    ours = Pipeline(folder, threads=1)
    batches: list[int] = []
    run = ours.unet.model.run
    ours.unet.model.run = lambda inputs: (batches.append(len(inputs["sample"])), run(inputs))[1]
    gens = ours.generate(prompts, SamplingConfig(steps=steps, height=HEIGHT, width=WIDTH, policy=config), latents=lat)
    assert [g.trace["transition_step"] for g in gens] == switched
    if name.endswith("dtp"):  # each sample at its own step: early, later, never (the tiny SDXL UNet's d has minima)
        assert switched == [2, 9, None, 9]
    pre = -2.0 if name.startswith("og-") else 0.0
    for g, ts in zip(gens, switched):
        ts = steps if ts is None else ts
        assert g.trace["scale"] == [pre] * ts + [6.0] * (steps - ts) and g.trace["uncond"] == "zeros"
    assert np.abs(pixels(gens) - ref).max() <= LEVEL
    gaps = np.array([[np.nan if v is None else v for v in g.trace["gap"]] for g in gens]).T
    measured = ~np.isnan(gaps)
    np.testing.assert_allclose(gaps[measured], ref_d[measured], rtol=1e-3)
    if name == "stp":  # s_pre = 0: the conditional half is skipped before τ, the SDXL inputs sliced with it
        assert batches == [n if t > 500 else 2 * n for t in gens[0].trace["timesteps"]]
        assert not measured[: switched[0]].any() and measured[switched[0]:].all()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "basinguard.cli", *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_bad_input_on_sdxl_is_one_clear_line(tiny_sdxl_onnx_dir, tiny_onnx_dir, ours_xl, tmp_path):
    base = ["generate", "--model", str(tiny_sdxl_onnx_dir), "--prompt", "x", "--steps", "2", "--threads", "1",
            "--out", str(tmp_path / "o.png")]
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sdxl_onnx_dir, partial)
    shutil.rmtree(partial / "text_encoder_2")
    cases = [
        (base + ["--height", "18"], "height 18 not allowed: must be a multiple of 4"),
        (base + ["--original-size", "0x16"], "original_size (0, 16) not allowed: must be (height, width), integers in [1, 16384]"),
        (base + ["--crops-coords-top-left=-1,0"], "crops_coords_top_left (-1, 0) not allowed: must be (top, left), integers in [0, 16384]"),
        (base + ["--target-size", "20000x16"], "target_size (20000, 16) not allowed"),
        (base + ["--original-size", "big"], "expected two integers as AxB or A,B"),
        (base + ["--clip-skip", "5"], "clip_skip 5 not allowed: must be an integer in [0, 1] for this model"),
        (["generate", "--model", str(tiny_onnx_dir), "--prompt", "x", "--clip-skip", "1", "--out",
          str(tmp_path / "o.png")], "clip_skip applies to SDXL models only here; this model is SD"),
        (["generate", "--model", str(tiny_onnx_dir), "--prompt", "x", "--target-size", "16x16", "--out",
          str(tmp_path / "o.png")], "target_size applies to SDXL models only; this model is SD"),
        (["generate", "--model", str(partial), "--prompt", "x", "--out", str(tmp_path / "o.png")],
         "is an SDXL model (its UNet takes text_embeds and time_ids) but is missing text_encoder_2/model.onnx"),
    ]
    for args, message in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(InputError, match=r"crops_coords_top_left \(0,\) not allowed"):  # the Python API alike
        ours_xl.generate(["x"], SamplingConfig(steps=2, crops_coords_top_left=(0,)), seeds=[0])
    with pytest.raises(ModelFolderError, match="missing text_encoder_2/model.onnx"):
        Pipeline(partial)


def test_optimum_sdxl_export_loads_as_it_is(tiny_sdxl_pipeline_dir, ours_xl, tmp_path):
    """optimum-cli's SDXL folder (hidden_states.K outputs, a scalar timestep, vae_encoder/ beside) runs as ours."""
    pytest.importorskip("optimum.exporters.onnx")
    out = tmp_path / "optimum"
    proc = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--task",
                           "text-to-image", "--model", str(tiny_sdxl_pipeline_dir), str(out)], capture_output=True,
                          text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = Pipeline(out, threads=1)
    assert theirs.folder.family == "sdxl" and theirs.unet.model.inputs["timestep"].rank == 0
    for name in ("cfg", "og-dtp"):
        sampling = SamplingConfig(steps=6, height=HEIGHT, width=WIDTH, policy=PolicyConfig(name))
        a = ours_xl.generate(PROMPTS, sampling, seeds=[5, 6], negative_prompts=["", NEGATIVES[1]])
        b = theirs.generate(PROMPTS, sampling, seeds=[5, 6], negative_prompts=["", NEGATIVES[1]])
        assert np.abs(pixels(a) - pixels(b)).max() <= 1e-4
        assert [g.trace["uncond"] for g in b] == ["zeros", "negative prompt"]
        assert [g.trace["transition_step"] for g in a] == [g.trace["transition_step"] for g in b]


def test_batch_on_sdxl_lines_carry_micro_conditioning(tiny_sdxl_onnx_dir, ours_xl, tmp_path, capsys):
    from PIL import Image

    lines = tmp_path / "p.jsonl"
    records = [{"prompt": PROMPTS[0], "seed": 1},
               {"prompt": PROMPTS[1], "seed": 2, "negative_prompt": "night", "original_size": [64, 48],
                "crops_coords_top_left": [4, 8]},
               {"prompt": PROMPTS[1], "crops_coords_top_left": [-1, 0]}]
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "batch"
    args = ["batch", str(lines), str(out), "--model", str(tiny_sdxl_onnx_dir), "--threads", "1", "--steps", "4",
            "--no-progress", "--on-error", "skip"]
    assert cli_main([*args, "--target-size", "32x32"]) == 0
    assert "line 3: crops_coords_top_left (-1, 0) not allowed" in capsys.readouterr().err
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["uncond"] for e in entries] == ["zeros", "negative prompt"]
    assert [e["original_size"] for e in entries] == [[16, 16], [64, 48]]
    assert [e["crops_coords_top_left"] for e in entries] == [[0, 0], [4, 8]]
    assert all(e["target_size"] == [32, 32] and e["model_family"] == "sdxl" for e in entries)
    for e, record in zip(entries, records):  # each PNG is the image the Python API makes with the line's settings
        sampling = SamplingConfig(steps=4, target_size=(32, 32), **{k: tuple(record[k]) for k in
                                  ("original_size", "crops_coords_top_left") if k in record})
        want = ours_xl.generate([record["prompt"]], sampling, seeds=[record["seed"]],
                                negative_prompts=[record.get("negative_prompt", "")])[0]
        with Image.open(out / e["file"]) as im:
            got = np.asarray(im.convert("RGB"), dtype=np.int16)
        assert np.abs(got - np.asarray(want.to_pil(), dtype=np.int16)).max() <= 1
    # resuming is the same job only with the same micro-conditioning
    assert cli_main([*args, "--target-size", "16x16"]) == 2
    assert "with a different target_size than this job" in capsys.readouterr().err


def test_detect_and_auto_on_sdxl(tiny_sdxl_onnx_dir, ours_xl, tmp_path, capsys):
    """Scores are d at step 0 against the e_∅ generate uses (zeros here); calibrations record the family, which e_∅
    and the time ids, and a run with other time ids is warned about."""
    common = ["--model", str(tiny_sdxl_onnx_dir), "--threads", "1", "--steps", "4"]
    mem, normal = tmp_path / "mem.txt", tmp_path / "normal.txt"
    mem.write_text(PROMPTS[0] + "\n")
    normal.write_text("a green tree\na big castle at night\n")
    assert cli_main(["detect", str(mem), *common]) == 0
    score = float(capsys.readouterr().out.splitlines()[1].split("\t")[1])
    gen = ours_xl.generate([PROMPTS[0]], SamplingConfig(steps=4, policy=PolicyConfig("cfg")), seeds=[0])[0]
    assert score == pytest.approx(gen.trace["gap"][0], rel=1e-4) and gen.trace["uncond"] == "zeros"
    calib = tmp_path / "calib.json"
    assert cli_main(["detect", "--calibrate", "--memorized", str(mem), "--normal", str(normal), "--out", str(calib),
                     *common]) == 0
    c = json.loads(calib.read_text())
    assert (c["model_family"], c["uncond"], c["original_size"], c["target_size"]) == ("sdxl", ["zeros"], [16, 16],
                                                                                   [16, 16])
    capsys.readouterr()
    for extra, warned in (([], False), (["--original-size", "32x32"], True)):
        assert cli_main(["generate", "--prompt", PROMPTS[0], *common, "--policy", "auto", "--detect-calibration",
                         str(calib), "--out", str(tmp_path / "g.png"), "--trace", str(tmp_path / "g.json"),
                         *extra]) == 0
        assert ("original_size [16, 16] (here [32, 32])" in capsys.readouterr().err) == warned
    trace = json.loads((tmp_path / "g.json").read_text())
    assert trace["policy"]["name"] == "auto" and trace["detection_score"] == pytest.approx(trace["gap"][0])


def test_vae_latent_statistics_decode_as_diffusers(tiny_sdxl_onnx_dir, torch_xl, tmp_path):
    """An SDXL VAE config with latents_mean and latents_std: diffusers' SDXL pipeline decodes x * std / scaling +
    mean; the same folder without them decodes x / scaling."""
    from diffusers import EulerDiscreteScheduler

    torch_xl.scheduler = EulerDiscreteScheduler.from_config(
        json.loads((tiny_sdxl_onnx_dir / "scheduler/scheduler_config.json").read_text()))
    stats = {"latents_mean": [0.5, -0.25, 0.1, 0.0], "latents_std": [2.0, 0.5, 1.5, 1.0]}
    folder = with_config(tiny_sdxl_onnx_dir, tmp_path / "model")
    config_path = folder / "vae_decoder/config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **stats}))
    lat = latents(1, seed=4)
    torch_xl.vae.register_to_config(**stats)
    try:
        ref = reference(torch_xl, PROMPTS[:1], lat, steps=4)
    finally:
        torch_xl.vae.register_to_config(latents_mean=None, latents_std=None)
    sampling = SamplingConfig(steps=4, height=HEIGHT, width=WIDTH, policy=PolicyConfig("cfg", 6.0))
    got = Pipeline(folder, threads=1).generate(PROMPTS[:1], sampling, latents=lat)
    assert np.abs(pixels(got) - ref).max() <= LEVEL
    assert np.abs(pixels(Pipeline(tiny_sdxl_onnx_dir, threads=1).generate(PROMPTS[:1], sampling, latents=lat))
                  - ref).max() > 10 * LEVEL


def test_fp16_export_keeps_sizes_and_the_vae_in_float32(tiny_sdxl_pipeline_dir, tmp_path):
    """time_ids are pixel counts (float16 rounds 2049 to 2048); the VAE stays float32 (force_upcast: SDXL's VAE
    overflows in float16)."""
    from basinguard.export.onnx_export import export_pipeline

    manifest = export_pipeline(tiny_sdxl_pipeline_dir, tmp_path / "fp16", fp16=True, validate=False, log=lambda _: None)
    models = manifest["models"]
    dtypes = {i["name"]: i["dtype"] for i in models["unet"]["inputs"]}
    assert dtypes == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
                      "text_embeds": "float16", "time_ids": "float32"}
    assert models["text_encoder_2"]["dtype"] == "float16" and models["vae_decoder"]["dtype"] == "float32"


def test_conditioning_is_one_read_only_mapping_with_uncond_views(ours_xl):
    """What the loop gets (`denoise`'s contract): every UNet input besides sample and timestep, [uncond; cond] at 2N,
    read-only, with the uncond halves as views; an empty negative prompt is zeros (force_zeros_for_empty_prompt)."""
    sampling = ours_xl.spec.resolve(SamplingConfig(steps=2))
    cond = ours_xl.text.encode(PROMPTS, ["", "night"], sampling, ours_xl.spec.uncond_kinds(["", "night"]))
    assert list(cond.pair) == ["encoder_hidden_states", "text_embeds", "time_ids"]
    for name, value in cond.pair.items():
        assert len(value) == 4 and not value.flags.writeable and value.dtype == np.float32
        assert len(cond.uncond[name]) == 2 and np.shares_memory(cond.uncond[name], value)
    for name in ("encoder_hidden_states", "text_embeds"):
        assert not cond.pair[name][0].any() and cond.pair[name][1].any() and cond.pair[name][2:].any()
    np.testing.assert_array_equal(cond.pair["time_ids"], [[16, 16, 0, 0, 16, 16]] * 4)


def test_a_mixed_batch_makes_each_image_as_alone(ours_xl):
    """Zeros for one image's e_∅ and a negative prompt for another's, in one batch: each image as made alone."""
    sampling = SamplingConfig(steps=4, height=HEIGHT, width=WIDTH, policy=PolicyConfig("dtp"))
    negatives = ["", NEGATIVES[1]]
    both = ours_xl.generate(PROMPTS, sampling, seeds=[3, 4], negative_prompts=negatives)
    for k, g in enumerate(both):
        alone = ours_xl.generate([PROMPTS[k]], sampling, seeds=[3 + k], negative_prompts=[negatives[k]])[0]
        assert np.abs(alone.pixels - g.pixels).max() <= 1e-4 and alone.trace["uncond"] == g.trace["uncond"]
        np.testing.assert_allclose(alone.trace["gap"], g.trace["gap"], rtol=1e-4)


def test_export_refuses_an_incomplete_sdxl_source_in_one_line(tiny_sdxl_pipeline_dir, tmp_path):
    from basinguard.export.onnx_export import ExportError, export_pipeline

    no_tokenizer_2 = tmp_path / "no_tokenizer_2"
    shutil.copytree(tiny_sdxl_pipeline_dir, no_tokenizer_2)
    shutil.rmtree(no_tokenizer_2 / "tokenizer_2")
    refiner = tmp_path / "refiner"  # an SDXL refiner's index: no first text encoder
    shutil.copytree(tiny_sdxl_pipeline_dir, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    for src, message in ((no_tokenizer_2, "is an SDXL pipeline but is missing tokenizer_2"),
                         (refiner, r"has no first text encoder \(an SDXL refiner\?\)")):
        with pytest.raises(ExportError, match=message) as caught:
            export_pipeline(src, tmp_path / "out", log=lambda _: None)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["dpm++2m-karras", "euler-karras", "unipc", "unipc-karras", "euler-a"])
def test_the_other_samplers_run_sdxl_as_diffusers(tiny_sdxl_onnx_dir, torch_xl, ours_xl, name):
    """Each sampler by name (--scheduler), built from SDXL's own Euler config as diffusers' from_config builds it.
    Euler ancestral draws step noise: its images are compared with the rule, not with diffusers' generator."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    sampling = SamplingConfig(steps=8, scheduler=name, height=HEIGHT, width=WIDTH, policy=PolicyConfig("cfg", 6.0))
    lat = latents(2, seed=5)
    gens = ours_xl.generate(PROMPTS, sampling, latents=lat)
    if name == "euler-a":
        alone = ours_xl.generate(PROMPTS[1:], sampling, latents=lat[1:])[0]  # its noise is its own, not its batch's
        assert np.abs(alone.pixels - gens[1].pixels).max() <= 1e-4
        return
    cls = {"dpm++2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
           "unipc": UniPCMultistepScheduler}[name.removesuffix("-karras")]
    config = json.loads((tiny_sdxl_onnx_dir / "scheduler/scheduler_config.json").read_text())
    torch_xl.scheduler = cls.from_config(config, use_karras_sigmas=name.endswith("-karras"))
    assert np.abs(pixels(gens) - reference(torch_xl, PROMPTS, lat)).max() <= LEVEL


def test_clip_skip_matches_diffusers(tiny_sdxl_onnx_dir, torch_xl, ours_xl, tmp_path):
    """clip_skip as diffusers' SDXL pipeline applies it: hidden_states[-(clip_skip + 2)] of both encoders for the
    prompts, the penultimate layer for negative prompts; a batch line may set it, and the range is the model's."""
    from diffusers import EulerDiscreteScheduler

    torch_xl.scheduler = EulerDiscreteScheduler.from_config(
        json.loads((tiny_sdxl_onnx_dir / "scheduler/scheduler_config.json").read_text()))
    lat = latents(2, seed=6)
    ref = reference(torch_xl, PROMPTS, lat, steps=6, clip_skip=1, negative_prompt=NEGATIVES)
    assert np.abs(ref - reference(torch_xl, PROMPTS, lat, steps=6, negative_prompt=NEGATIVES)).max() > 10 * LEVEL
    sampling = SamplingConfig(steps=6, height=HEIGHT, width=WIDTH, policy=PolicyConfig("cfg", 6.0), clip_skip=1)
    gens = ours_xl.generate(PROMPTS, sampling, latents=lat, negative_prompts=NEGATIVES)
    assert np.abs(pixels(gens) - ref).max() <= LEVEL and gens[0].trace["clip_skip"] == 1
    with pytest.raises(InputError, match=r"clip_skip 2 not allowed: must be an integer in \[0, 1\]"):
        ours_xl.spec.resolve(SamplingConfig(clip_skip=2))  # text_encoder has 2 layers
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"prompt": PROMPTS[0], "seed": 7, "clip_skip": 1}) + "\n")
    out = tmp_path / "batch"
    assert cli_main(["batch", str(lines), str(out), "--model", str(tiny_sdxl_onnx_dir), "--threads", "1", "--steps",
                     "4", "--no-progress"]) == 0
    entry = json.loads((out / "manifest.jsonl").read_text())
    assert entry["clip_skip"] == 1 and entry["uncond"] == "zeros"
    # clip_skip 0 selects the layer unset does (hidden_states[-2]): one record for both, so a job resumes either way
    assert ours_xl.spec.resolve(SamplingConfig(clip_skip=0)).clip_skip is None
    lines.write_text(json.dumps({"prompt": PROMPTS[0], "seed": 7}) + "\n")
    zero = ["batch", str(lines), str(tmp_path / "zero"), "--model", str(tiny_sdxl_onnx_dir), "--threads", "1", "--steps",
            "4", "--no-progress"]
    assert cli_main([*zero, "--clip-skip", "0"]) == 0 and cli_main(zero) == 0


def test_a_text_encoder_config_that_disagrees_with_its_onnx_is_refused(tiny_sdxl_onnx_dir, tmp_path, capsys):
    """clip_skip's range is read from text_encoder*/config.json (before any model loads); a config claiming 12
    layers for a 2-layer encoder let --clip-skip 5 through to an IndexError traceback."""
    model = shutil.copytree(tiny_sdxl_onnx_dir, tmp_path / "model")
    for part in ("text_encoder", "text_encoder_2"):
        path = model / part / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": 12}))
    args = ["generate", "--model", str(model), "--prompt", "a red cat", "--steps", "2", "--threads", "1",
            "--out", str(tmp_path / "o.png")]
    assert cli_main([*args, "--clip-skip", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model / "text_encoder/config.json") in err and "num_hidden_layers" in err, err
    with pytest.raises(ModelFolderError, match="has 2 layers"):
        Pipeline(model, threads=1)


def test_calibrate_refuses_a_line_with_its_own_micro_conditioning(tiny_sdxl_onnx_dir, tmp_path, capsys):
    """A memorized line with its own original_size was scored with it while the calibration recorded the flags'
    (the image's size), so `auto` at that original_size was warned about and at the default was not."""
    memorized, normal = tmp_path / "m.jsonl", tmp_path / "n.txt"
    memorized.write_text('{"prompt": "a red cat", "original_size": [64, 64]}\n{"prompt": "a blue dog"}\n')
    normal.write_text("a big tree\ngreen sky\n")
    calibration = tmp_path / "c.json"
    assert cli_main(["detect", "--model", str(tiny_sdxl_onnx_dir), "--threads", "1", "--steps", "3", "--calibrate",
                     "--memorized", str(memorized), "--normal", str(normal), "--out", str(calibration)]) == 2
    err = capsys.readouterr().err
    assert f"{memorized} line 1" in err and "original_size [16, 16]" in err and not calibration.exists(), err


def test_micro_conditioning_takes_a_numpy_pair_as_a_tuple(ours_xl):
    """SamplingConfig(original_size=np.array([32, 32])) was refused as "not allowed: must be (height, width),
    integers in [1, 16384]", though both are such integers."""
    lat = latents(1, height=16, width=16)
    tuple_pair, array_pair = (ours_xl.generate(["a red cat"], SamplingConfig(steps=2, original_size=size), latents=lat)[0]
                              for size in ((32, 24), np.array([32, 24])))
    assert array_pair.trace["original_size"] == [32, 24] and np.array_equal(array_pair.pixels, tuple_pair.pixels)
    with pytest.raises(InputError, match="original_size"):
        ours_xl.spec.resolve(SamplingConfig(original_size=np.array([32, 24, 1])))


def test_the_demo_report_runs_on_an_sdxl_model(tiny_sdxl_onnx_dir, ours_xl, tmp_path):
    """The demo's report (grids, d curves, metrics) is built from traces only, so an SDXL folder with a memorization
    set gets the same report: its images are the ones generate makes, its transition steps the traces'."""
    import shutil

    from PIL import Image

    from basinguard.demo import DEMO_POLICIES, run_demo

    model = tmp_path / "model"
    shutil.copytree(tiny_sdxl_onnx_dir, model)
    height, width = ours_xl.folder.default_image
    train = (np.random.default_rng(0).uniform(size=(height, width, 3)) * 255).astype(np.uint8)
    mem = model / "memorization"
    (mem / "images").mkdir(parents=True)
    Image.fromarray(train).save(mem / "images" / "0.png")
    (mem / "duplicated.jsonl").write_text(json.dumps({"caption": PROMPTS[0], "image": "images/0.png"}) + "\n")
    (mem / "other_captions.txt").write_text(PROMPTS[1] + "\n")
    manifest = json.loads((model / "basinguard.json").read_text())
    manifest["sampling_defaults"] = {"steps": 6, "transition_t": 500}
    (model / "basinguard.json").write_text(json.dumps(manifest))

    report = run_demo(model, tmp_path / "demo", seeds=2, threads=1, log=lambda *_: None)
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert [(m["caption"], m["policy"]) for m in metrics] == [
        (c, p) for c in ("duplicated training caption", "novel caption") for p in DEMO_POLICIES]
    html_text = report.read_text()
    assert html_text.count("<polyline") == 2 * len(DEMO_POLICIES)
    # the dtp grid holds the images generate makes for seeds 0 and 1 (2-pixel white borders, 3x nearest upscale)
    dtp = SamplingConfig(steps=6, policy=PolicyConfig("dtp", 7.5))
    gens = Pipeline(model, threads=1).generate([PROMPTS[0]] * 2, dtp, seeds=[0, 1])
    with Image.open(tmp_path / "demo" / "dup_dtp.png") as im:
        grid = np.asarray(im.convert("RGB"), np.int16)[::3, ::3]
    for k, g in enumerate(gens):
        cell = grid[2:2 + height, 2 + k * (width + 4):2 + k * (width + 4) + width]
        assert np.abs(cell - (g.pixels * 255).round()).max() <= 1
    steps = [g.trace["transition_step"] for g in gens if g.trace["transition_step"] is not None]
    want = float(np.mean(steps)) if steps else None
    assert next(m for m in metrics if m["policy"] == "dtp" and m["caption"].startswith("dup"))[
        "mean_transition_step"] == want
