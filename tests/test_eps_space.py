"""d is measured in the paper's ε space whatever the model predicts: against diffusers' own UNet
output on a tiny v-prediction model, converted to ε by hand; traces and calibrations say so, and a calibration made
before (d on a v-model's raw output) is refused on a v-model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from basinguard.errors import BasinguardError
from basinguard.runtime.detection import calibrate, load_calibration
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
torch.set_num_threads(1)

PROMPT, SIZE, STEPS, LAMBDA = "a red cat on the castle", 16, 5, 7.5


@pytest.fixture(scope="module")
def v_folder(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model read as a v-prediction model: its UNet's output is taken as v (what the config says is what
    every v-model's folder says)."""
    folder = tmp_path_factory.mktemp("v_model") / "model"
    shutil.copytree(tiny_onnx_dir, folder)
    path = folder / "scheduler/scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    return folder


def reference_eps_gaps(pipeline_dir: Path, scheduler_cls: str, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CFG in torch on diffusers' modules and scheduler (v-prediction); per step the ε gap, converted by hand as
    ε = α_t v + σ_t x_t (x_t the UNet's input; for Euler α_t = 1/√(1+σ²), σ_t = σ α_t), and the raw v gap."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    unet = diffusers.UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    config = {**diffusers.DDIMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler").config,
              "prediction_type": "v_prediction"}
    sched = getattr(diffusers, scheduler_cls).from_config(config)
    sched.set_timesteps(STEPS)
    ids = tok(["", PROMPT], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    eps_gaps, v_gaps = [], []
    with torch.no_grad():
        emb = text(ids)[0]
        x = torch.from_numpy(lat) * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(x, t)
            v_u, v_c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=emb).sample.double()
            if scheduler_cls == "DDIMScheduler":
                a_bar = sched.alphas_cumprod[int(t)].double()
                alpha, sigma = a_bar.sqrt(), (1 - a_bar).sqrt()
            else:
                s = sched.sigmas[i].double()
                alpha = 1 / (1 + s**2).sqrt()
                sigma = s * alpha
            eps_u, eps_c = alpha * v_u + sigma * x_in[0].double(), alpha * v_c + sigma * x_in[0].double()
            eps_gaps.append(float((eps_c - eps_u).norm()))
            v_gaps.append(float((v_c - v_u).norm()))
            x = sched.step((v_u + LAMBDA * (v_c - v_u)).float()[None], t, x).prev_sample
    return np.array(eps_gaps), np.array(v_gaps)


@pytest.mark.parametrize(("name", "cls"), [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")])
def test_d_is_the_eps_gap_on_a_v_prediction_model(v_folder, tiny_sd_pipeline_dir, name, cls):
    lat = np.random.default_rng(4).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    sampling = SamplingConfig(steps=STEPS, scheduler=name, height=SIZE, width=SIZE, policy=PolicyConfig("cfg", LAMBDA))
    trace = Pipeline(v_folder, threads=1).generate([PROMPT], sampling, latents=lat)[0].trace
    eps_gaps, v_gaps = reference_eps_gaps(tiny_sd_pipeline_dir, cls, lat)
    assert trace["gap_space"] == "epsilon"
    np.testing.assert_allclose(trace["gap"], eps_gaps, rtol=1e-3)
    # the raw v gap is another quantity: at the first step the ε gap is √ᾱ_t of it (0.19 at DDIM's t = 801, 0.07 at
    # Euler's t = 999), and the factor grows over the steps, so d's shape (DTP's minima) changes too
    assert eps_gaps[0] < 0.25 * v_gaps[0]
    assert not np.allclose(eps_gaps / v_gaps, eps_gaps[0] / v_gaps[0], rtol=0.1)


def test_epsilon_models_keep_their_d(tiny_onnx_dir):
    # epsilon prediction: d is the raw gap, as before (the factor is 1); the trace says which space
    lat = np.random.default_rng(4).standard_normal((1, 4, SIZE // 2, SIZE // 2)).astype(np.float32)
    sampling = SamplingConfig(steps=STEPS, scheduler="ddim", height=SIZE, width=SIZE, policy=PolicyConfig("cfg", LAMBDA))
    ours = Pipeline(tiny_onnx_dir, threads=1)
    gen = ours.generate([PROMPT], sampling, latents=lat)[0]
    assert gen.trace["gap_space"] == "epsilon" and all(g > 0 for g in gen.trace["gap"])


def test_calibrations_record_the_space_and_old_ones_are_refused_on_v_models(v_folder, tiny_onnx_dir, tmp_path):
    made = calibrate([3.0, 4.0], [1.0, 2.0])
    assert made["gap_space"] == "epsilon"
    new = tmp_path / "new.json"
    new.write_text(json.dumps({**made, "detect_steps": 1}))
    old = tmp_path / "old.json"  # as written before d was in ε space: no gap_space
    old.write_text(json.dumps({k: v for k, v in made.items() if k != "gap_space"} | {"detect_steps": 1}))
    assert load_calibration(new, model=v_folder)["threshold"] == made["threshold"]
    assert load_calibration(old, model=tiny_onnx_dir)["threshold"] == made["threshold"]  # epsilon: same numbers
    with pytest.raises(BasinguardError, match=r"old.json.*v_prediction model.*calibrate again"):
        load_calibration(old, model=v_folder)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**made, "gap_space": "v"}))
    with pytest.raises(BasinguardError, match="calibrate again"):
        load_calibration(other, model=tiny_onnx_dir)


def _strip_gap_space(out: Path) -> None:
    """Rewrite a finished job's manifest as a release before d was in ε space wrote it: no gap_space."""
    path = out / "manifest.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "gap_space"}) + "\n" for e in entries))


@pytest.mark.parametrize("v_model", [False, True])
def test_a_batch_job_from_before_eps_space_resumes_only_on_epsilon_models(v_model, v_folder, tiny_onnx_dir, tmp_path,
                                                                          capsys):
    from basinguard.cli import main as cli_main

    model = v_folder if v_model else tiny_onnx_dir
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "out"
    argv = ["batch", "--model", str(model), str(prompts), str(out), "--threads", "1", "--steps", "3",
            "--images-per-prompt", "2", "--no-progress", "--policy", "dtp"]
    assert cli_main(argv) == 0
    assert all(json.loads(x)["gap_space"] == "epsilon" for x in (out / "manifest.jsonl").read_text().splitlines())
    _strip_gap_space(out)
    (out / "manifest.jsonl").write_text((out / "manifest.jsonl").read_text().splitlines()[0] + "\n")  # one image left
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    if v_model:  # its switch steps were found on another d: refused, naming the image and why
        assert code == 2 and "measured on the UNet's raw output" in err and "000001-000" in err, err
    else:  # an epsilon model's d was the ε gap all along
        assert code == 0, err
