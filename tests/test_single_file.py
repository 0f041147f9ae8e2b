"""Bring your own model: single-file checkpoints in the original layout, LoRAs fused in, another VAE.

The tiny pipelines of tests/conftest.py are written as original-layout checkpoints by tests/ldm_layout.py (the
inverse of diffusers' key mapping; checked here to read back exactly). Each export is generated from by basinguard
and compared with diffusers' own `from_single_file` (+ `load_lora_weights` and `fuse_lora` at the same weights) on
the same latents: within one 8-bit level.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from ldm_layout import peft_to_kohya, save_ldm_checkpoint  # noqa: E402

from basinguard.cli import main as cli_main  # noqa: E402
from basinguard.export import memory  # noqa: E402
from basinguard.export.errors import ExportError  # noqa: E402
from basinguard.export.onnx_export import export_pipeline  # noqa: E402
from basinguard.export.single_file import inspect_checkpoint  # noqa: E402
from basinguard.runtime.guidance import PolicyConfig  # noqa: E402
from basinguard.runtime.model_folder import model_identity  # noqa: E402
from basinguard.runtime.pipeline import Pipeline, SamplingConfig  # noqa: E402

torch.set_num_threads(1)
LEVEL = 1 / 255  # one 8-bit level
PROMPTS = ["a red cat on mars", "a blue dog in the sky"]
STEPS, SCALE = 6, 6.0


def _quiet(_: str) -> None:
    pass


def _sd_class(xl: bool):  # noqa: ANN202
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if xl else StableDiffusionPipeline


def _load_folder(folder: Path, xl: bool):  # noqa: ANN202
    extra = {"add_watermarker": False} if xl else {"safety_checker": None, "requires_safety_checker": False}
    return _sd_class(xl).from_pretrained(folder, **extra)


def make_lora(folder: Path, xl: bool, seed: int, dest: Path, kohya_alpha: float | None = None) -> Path:
    """A random rank-4 LoRA on every attention projection of the UNet and the text encoder(s) of the pipeline at
    `folder`, saved by diffusers' save_lora_weights (diffusers/PEFT naming) or, with `kohya_alpha`, in kohya's
    naming with that alpha."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe = _load_folder(folder, xl)
    torch.manual_seed(seed)
    unet_cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    pipe.unet.add_adapter(unet_cfg)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    encoders = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    for name in encoders:
        getattr(pipe, name).add_adapter(text_cfg)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, name))
    if kohya_alpha is None:
        _sd_class(xl).save_lora_weights(dest.parent / dest.stem, **layers)
        shutil.move(dest.parent / dest.stem / "pytorch_lora_weights.safetensors", dest)
        shutil.rmtree(dest.parent / dest.stem)
    else:
        state = {f"{key.removesuffix('_lora_layers')}.{k}": v for key, part in layers.items() for k, v in part.items()}
        save_file(peft_to_kohya(state, kohya_alpha), str(dest))
    return dest


@pytest.fixture(scope="module")
def sd_files(tiny_sd_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("single_sd")
    pipe = _load_folder(tiny_sd_pipeline_dir, False)
    return {"config": tiny_sd_pipeline_dir, "ckpt": save_ldm_checkpoint(pipe, base / "tiny-sd.safetensors"),
            "peft": make_lora(tiny_sd_pipeline_dir, False, 1, base / "style.safetensors"),
            "kohya": make_lora(tiny_sd_pipeline_dir, False, 2, base / "kohya_style.safetensors", kohya_alpha=2.0)}


@pytest.fixture(scope="module")
def xl_files(tiny_sdxl_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("single_xl")
    pipe = _load_folder(tiny_sdxl_pipeline_dir, True)
    return {"config": tiny_sdxl_pipeline_dir, "ckpt": save_ldm_checkpoint(pipe, base / "tiny-xl.safetensors"),
            "peft": make_lora(tiny_sdxl_pipeline_dir, True, 3, base / "xl_style.safetensors"),
            "kohya": make_lora(tiny_sdxl_pipeline_dir, True, 4, base / "xl_kohya.safetensors", kohya_alpha=8.0)}


def diffusers_single_file(ckpt: Path, config: Path, xl: bool, loras: list[tuple[Path, float]], **components):  # noqa: ANN003, ANN201
    """diffusers' own pipeline from the single file, LoRAs loaded and fused as diffusers documents it: one LoRA by
    fuse_lora(lora_scale=weight), several as adapters at their weights (set_adapters) fused together."""
    extra = {"add_watermarker": False} if xl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = _sd_class(xl).from_single_file(str(ckpt), config=str(config), local_files_only=True, **extra, **components)
    if len(loras) == 1:
        pipe.load_lora_weights(str(loras[0][0]))
        pipe.fuse_lora(lora_scale=loras[0][1])
    elif loras:
        names = [f"l{k}" for k in range(len(loras))]
        for name, (path, _) in zip(names, loras):
            pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
        pipe.fuse_lora(adapter_names=names)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_images(pipe, lat: np.ndarray, size: tuple[int, int]) -> np.ndarray:  # noqa: ANN001
    with torch.no_grad():
        return pipe(PROMPTS, latents=torch.from_numpy(lat), num_inference_steps=STEPS, guidance_scale=SCALE,
                    height=size[0], width=size[1], output_type="np").images


def ours(folder: Path, lat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    gens = Pipeline(folder, threads=1).generate(
        PROMPTS, SamplingConfig(steps=STEPS, height=size[0], width=size[1], policy=PolicyConfig("cfg", SCALE)),
        latents=lat)
    return np.stack([g.pixels for g in gens])


def latents(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 4, size[0] // 2, size[1] // 2)).astype(np.float32)


def no_leftovers(out: Path) -> None:
    """Nothing written: neither OUT nor a working folder or lock beside it."""
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_ldm_files_read_back_as_the_pipeline(xl: bool, sd_files: dict, xl_files: dict) -> None:
    """The test helper's files are what diffusers reads: every tensor of every part back, bit for bit."""
    files = xl_files if xl else sd_files
    original = _load_folder(files["config"], xl)
    back = _sd_class(xl).from_single_file(str(files["ckpt"]), config=str(files["config"]), local_files_only=True)
    for part in ("unet", "vae", "text_encoder", *(["text_encoder_2"] if xl else [])):
        want, got = getattr(original, part).state_dict(), getattr(back, part).state_dict()
        assert set(want) == set(got)
        assert all(torch.equal(want[k], got[k]) for k in want), part


CASES = {  # id: (sdxl?, LoRAs as (file key, weight), through the CLI?)
    "sd": (False, [], False),
    "sd-peft-and-kohya-loras": (False, [("peft", 0.7), ("kohya", -0.5)], True),
    "sd-kohya-lora": (False, [("kohya", 0.8)], False),
    "sdxl": (True, [], False),
    "sdxl-peft-and-kohya-loras": (True, [("peft", 0.6), ("kohya", 0.9)], True),
}


@pytest.fixture(scope="module")
def exported(sd_files: dict, xl_files: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each case of CASES exported once (lazily): the CLI's `export FILE OUT --config .. --lora F:W ..` or
    export_pipeline."""
    done: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, case: str) -> Path:
            xl, loras, cli = CASES[case]
            files = xl_files if xl else sd_files
            out = tmp_path_factory.mktemp("single_out") / case
            if cli:
                args = ["export", str(files["ckpt"]), str(out), "--config", str(files["config"])]
                for key, weight in loras:
                    args += ["--lora", f"{files[key]}:{weight}"]
                assert cli_main(args) == 0
            else:
                export_pipeline(files["ckpt"], out, config=files["config"], log=_quiet,
                                loras=[f"{files[key]}:{weight}" for key, weight in loras])
            self[case] = out
            return out

    return Lazy(done)


@pytest.mark.parametrize("case", list(CASES))
def test_export_then_generate_equals_diffusers_single_file(case: str, exported: dict, sd_files: dict,
                                                           xl_files: dict) -> None:
    xl, loras, _ = CASES[case]
    files = xl_files if xl else sd_files
    size = (16, 24) if xl else (16, 16)
    lat = latents(size)
    weighted = [(files[key], weight) for key, weight in loras]
    ref = reference_images(diffusers_single_file(files["ckpt"], files["config"], xl, weighted), lat, size)
    got = ours(exported[case], lat, size)
    assert ref.std() > 0.05 and np.abs(got - ref).max() <= LEVEL
    if loras:  # the LoRAs change the image well beyond the tolerance: they were fused, not skipped
        plain = reference_images(diffusers_single_file(files["ckpt"], files["config"], xl, []), lat, size)
        assert np.abs(plain - ref).max() > 10 * LEVEL
    manifest = json.loads((exported[case] / "basinguard.json").read_text())
    sources = manifest["sources"]
    assert manifest["model_family"] == ("sdxl" if xl else "sd")
    assert sources["checkpoint"]["file"] == files["ckpt"].name
    assert sources["checkpoint"]["sha256"] == _sha256(files["ckpt"])
    assert sources["checkpoint"]["family"] == ("sdxl" if xl else "sd1")
    assert sources["loras"] == [{"file": files[key].name, "sha256": _sha256(files[key]), "weight": weight}
                                for key, weight in loras]
    assert sources["vae"] is None


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_resumed_batch_on_a_folder_with_other_loras_is_refused(exported: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """The model identity hashes the ONNX files, so another LoRA set (other fused weights) is another model."""
    plain, with_loras = exported["sd"], exported["sd-peft-and-kohya-loras"]
    assert model_identity(plain)["id"] != model_identity(with_loras)["id"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "job"

    def args(model: Path) -> list[str]:
        return ["batch", "--model", str(model), str(prompts), str(out), "--threads", "1", "--steps", "2",
                "--no-progress"]

    assert cli_main(args(with_loras)) == 0
    assert cli_main(args(with_loras)) == 0  # the same folder resumes
    capsys.readouterr()
    assert cli_main(args(plain)) == 2
    assert "different model" in capsys.readouterr().err


def test_vae_replaced_from_a_folder_and_from_a_file(sd_files: dict, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    original = AutoencoderKL.from_pretrained(sd_files["config"] / "vae")
    torch.manual_seed(9)
    other = AutoencoderKL.from_config(original.config)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "other_vae")
    save_file(other.state_dict(), str(tmp_path / "other_vae.safetensors"))  # diffusers' names, one file
    size, lat = (16, 16), latents((16, 16), seed=3)
    ref = reference_images(diffusers_single_file(sd_files["ckpt"], sd_files["config"], False, [], vae=other),
                           lat, size)
    for source in (tmp_path / "other_vae", tmp_path / "other_vae.safetensors"):
        out = tmp_path / f"out-{source.name}"
        export_pipeline(sd_files["ckpt"], out, config=sd_files["config"], vae=source, log=_quiet)
        assert np.abs(ours(out, lat, size) - ref).max() <= LEVEL
        recorded = json.loads((out / "basinguard.json").read_text())["sources"]["vae"]
        if source.is_file():
            assert recorded == {"file": source.name, "sha256": _sha256(source)}
        else:
            assert recorded["files"] == {"diffusion_pytorch_model.safetensors":
                                         _sha256(source / "diffusion_pytorch_model.safetensors")}


def test_lora_on_a_diffusers_folder_export(sd_files: dict, tmp_path: Path) -> None:
    """--lora (and --prediction-type) work on the folder way in too: equal to diffusers' folder pipeline with the
    LoRA fused (and its scheduler predicting v)."""
    out = tmp_path / "out"
    export_pipeline(sd_files["config"], out, loras=[f"{sd_files['peft']}:0.9"], prediction_type="v_prediction",
                    log=_quiet)
    assert json.loads((out / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert "prediction_type" not in json.loads((sd_files["config"] / "scheduler/scheduler_config.json").read_text()) \
        or json.loads((sd_files["config"] / "scheduler/scheduler_config.json").read_text())["prediction_type"] \
        == "epsilon"  # the source folder is not changed
    pipe = _load_folder(sd_files["config"], False)
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    pipe.load_lora_weights(str(sd_files["peft"]))
    pipe.fuse_lora(lora_scale=0.9)
    pipe.set_progress_bar_config(disable=True)
    size, lat = (16, 16), latents((16, 16), seed=5)
    assert np.abs(ours(out, lat, size) - reference_images(pipe, lat, size)).max() <= LEVEL
    assert json.loads((out / "basinguard.json").read_text())["sources"]["loras"][0]["weight"] == 0.9


def build_tiny_sd2(tiny: Path, dest: Path) -> Path:
    """The tiny SD pipeline with SD 2.x's shape of text encoder (OpenCLIP, 1024 wide: what an SD 2.x checkpoint's
    tensors show) and a v-prediction DDIM scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = _load_folder(tiny, False)
    torch.manual_seed(11)
    text = pipe.text_encoder.config.to_dict()
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**{**text, "hidden_size": 1024, "hidden_act": "gelu",
                                                       "num_attention_heads": 8}))
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 1024,
                                                  "use_linear_projection": True})
    for module in (pipe.text_encoder, pipe.unet):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def test_sd2_needs_a_prediction_type_and_exports_v_prediction(tiny_sd_pipeline_dir: Path, tmp_path: Path) -> None:
    config = build_tiny_sd2(tiny_sd_pipeline_dir, tmp_path / "sd2")
    ckpt = save_ldm_checkpoint(_load_folder(config, False), tmp_path / "tiny-sd2.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="SD 2.x checkpoint.*--prediction-type epsilon"):
        export_pipeline(ckpt, out, log=_quiet)
    no_leftovers(out)
    # the configs' scheduler says epsilon; the flag overrides it, as the keys cannot tell
    scheduler = config / "scheduler/scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "epsilon"}))
    export_pipeline(ckpt, out, config=config, prediction_type="v_prediction", log=_quiet)
    manifest = json.loads((out / "basinguard.json").read_text())
    assert manifest["sources"]["checkpoint"]["family"] == "sd2"
    assert manifest["sources"]["checkpoint"]["prediction_type"] == "v_prediction"
    assert json.loads((out / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    pipe = diffusers_single_file(ckpt, config, False, [])
    pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    size, lat = (16, 16), latents((16, 16), seed=7)
    ref = reference_images(pipe, lat, size)
    assert ref.std() > 0.05 and np.abs(ours(out, lat, size) - ref).max() <= LEVEL


def test_pickled_checkpoint_needs_allow_pickle_and_loads_weights_only(sd_files: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny-sd.ckpt"
    torch.save({"state_dict": load_file(str(sd_files["ckpt"]))}, ckpt)
    out = tmp_path / "out"
    assert cli_main(["export", str(ckpt), str(out), "--config", str(sd_files["config"])]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    no_leftovers(out)
    assert cli_main(["export", str(ckpt), str(out), "--config", str(sd_files["config"]), "--allow-pickle"]) == 0
    size, lat = (16, 16), latents((16, 16), seed=4)
    ref = reference_images(diffusers_single_file(sd_files["ckpt"], sd_files["config"], False, []), lat, size)
    assert np.abs(ours(out, lat, size) - ref).max() <= LEVEL
    # a pickle that would run code is not unpickled at all
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "run": os.system}, evil)
    assert cli_main(["export", str(evil), str(tmp_path / "evil-out"), "--allow-pickle"]) == 2
    assert "weights-only" in capsys.readouterr().err
    no_leftovers(tmp_path / "evil-out")


def _one_line_error(args: list[str], capsys) -> str:  # noqa: ANN001
    assert cli_main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_bad_checkpoints_are_one_line_and_leave_nothing(sd_files: dict, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    truncated = tmp_path / "truncated.safetensors"
    data = sd_files["ckpt"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert "is truncated" in _one_line_error(["export", str(truncated), str(out)], capsys)
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights\n")
    assert "not a readable safetensors file" in _one_line_error(["export", str(text), str(out)], capsys)
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(3, 4)}, str(other))
    assert "not a Stable Diffusion checkpoint" in _one_line_error(["export", str(other), str(out)], capsys)
    inpaint = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 4)},
              str(inpaint))
    assert "9 input channels" in _one_line_error(["export", str(inpaint), str(out)], capsys)
    refiner = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
               "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(10, 4)}, str(refiner))
    assert "SDXL refiner" in _one_line_error(["export", str(refiner), str(out)], capsys)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, str(unet_only))
    assert "no text encoder basinguard knows" in _one_line_error(["export", str(unet_only), str(out)], capsys)
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in load_file(str(sd_files["ckpt"])).items() if not k.startswith("first_stage_model.")},
              str(no_vae))
    line = _one_line_error(["export", str(no_vae), str(out), "--config", str(sd_files["config"])], capsys)
    assert "has no VAE" in line and "--vae" in line
    # the tiny model against the shipped SD 1.5 configs: nothing shipped fits, --config is asked for
    line = _one_line_error(["export", str(sd_files["ckpt"]), str(out)], capsys)
    assert "does not fit the sd15" in line and "pass --config" in line and "32 channels, the config 320" in line
    # --config of the other family
    line = _one_line_error(["export", str(sd_files["ckpt"]), str(out), "--config", str(tmp_path)], capsys)
    assert "missing model_index.json" in line
    no_leftovers(out)


def test_loras_that_do_not_fit_are_one_line_naming_the_file(sd_files: dict, xl_files: dict, tmp_path: Path,
                                                            capsys) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    base = ["export", str(sd_files["ckpt"]), str(out), "--config", str(sd_files["config"])]
    line = _one_line_error([*base, "--lora", str(xl_files["peft"])], capsys)  # an SDXL LoRA on an SD model
    assert str(xl_files["peft"]) in line and "SDXL LoRA" in line
    line = _one_line_error([*base, "--lora", str(xl_files["kohya"])], capsys)
    assert str(xl_files["kohya"]) in line
    wider = tmp_path / "wider.safetensors"  # right names, wrong shapes
    state = load_file(str(sd_files["peft"]))
    save_file({k: torch.cat([v, v], 1) if k.endswith("lora_A.weight") else v for k, v in state.items()}, str(wider))
    line = _one_line_error([*base, "--lora", f"{wider}:0.5"], capsys)
    assert str(wider) in line and "does not fit" in line and "size mismatch" in line
    assert str(tmp_path / "nope.safetensors") in _one_line_error(
        [*base, "--lora", str(tmp_path / "nope.safetensors")], capsys)
    not_lora = tmp_path / "not_lora.safetensors"
    save_file({"fc.weight": torch.zeros(3, 4)}, str(not_lora))
    assert str(not_lora) in _one_line_error([*base, "--lora", str(not_lora)], capsys)
    no_leftovers(out)


def test_memory_preflight_reads_the_single_files_header(sd_files: dict, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The single file's parts count as the diffusers folder's do, and a shortfall refuses before any load."""
    counts = inspect_checkpoint(sd_files["ckpt"], allow_pickle=False).part_parameters()
    folder = {name: memory.parameter_count(sd_files["config"] / name) for name in ("text_encoder", "unet", "vae")}
    assert counts == folder
    assert memory.estimate_export(counts, False).peak == memory.estimate_export(sd_files["config"], False).peak
    monkeypatch.setattr(memory, "available_memory", lambda: (2**20, "MemAvailable in /proc/meminfo"))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="would need about .* GiB .* but 0.0 GiB is available"):
        export_pipeline(sd_files["ckpt"], out, config=sd_files["config"], log=_quiet)
    no_leftovers(out)


def test_lora_argument_parsing(tmp_path: Path) -> None:
    from basinguard.export.lora import parse_lora

    assert parse_lora("a.safetensors").weight == 1.0
    spec = parse_lora("dir/a.safetensors:0.75")
    assert spec.path == Path("dir/a.safetensors") and spec.weight == 0.75
    assert parse_lora("c:/x/a.safetensors").path == Path("c:/x/a.safetensors")  # no number after ':': all path
    with pytest.raises(ExportError, match="finite"):
        parse_lora("a.safetensors:nan")


@pytest.mark.parametrize(("family", "prediction", "name"), [("sd1", None, "sd15"), ("sd2", "epsilon", "sd21-base"),
                                                            ("sd2", "v_prediction", "sd21-768v"), ("sdxl", None, "sdxl")])
def test_shipped_configs_are_a_diffusers_folder_read_offline(family: str, prediction: str | None, name: str,
                                                             tmp_path: Path) -> None:
    """What a checkpoint is configured from without --config: the published config, as diffusers reads it."""
    import importlib.util

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from basinguard.export.configs import CLIP_BPE, published_config, write_config_folder
    from basinguard.export.single_file import shipped_config_name

    assert shipped_config_name(family, prediction, tmp_path / "x.safetensors") == name
    folder = write_config_folder(name, tmp_path / name, prediction)
    published = published_config(name)
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert all(unet[k] == (list(v) if isinstance(v, tuple) else v) for k, v in published["unet"].items())
    assert AutoencoderKL.load_config(folder / "vae")["scaling_factor"] == published["vae"]["scaling_factor"]
    text = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    assert text.hidden_size == published["text_encoder"]["hidden_size"]
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler.get("prediction_type", "epsilon") == (prediction or published["scheduler"].get("prediction_type",
                                                                                                     "epsilon"))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # CLIP's own ids: <|startoftext|> a photo of an astronaut <|endoftext|>
    assert tokenizer("a photo of an astronaut").input_ids == [49406, 320, 1125, 539, 550, 18376, 49407]
    assert len(tokenizer) == 49408
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:  # the shipped BPE file is open_clip's, byte for byte
        theirs = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
        assert CLIP_BPE.read_bytes() == theirs.read_bytes()
