"""export_pipeline on a tiny random Stable Diffusion pipeline: layout, manifest, ONNX vs torch, refusals, fp16."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("diffusers")

from basinguard.export import onnx_export, validate  # noqa: E402
from basinguard.export.onnx_export import ExportError, export_pipeline  # noqa: E402
from basinguard.runtime.tokenizer import PromptTokenizer  # noqa: E402

MODELS = ("text_encoder", "unet", "vae_decoder")
EXPECTED_IO = {  # name: (inputs, outputs) as (name, dtype, shape)
    "text_encoder": ([("input_ids", "int64", ["batch_size", 77])],
                     [("last_hidden_state", "float32", ["batch_size", 77, 32]),
                      ("pooler_output", "float32", ["batch_size", 32])]),
    "unet": ([("sample", "float32", ["batch_size", 4, "height", "width"]), ("timestep", "float32", ["batch_size"]),
              ("encoder_hidden_states", "float32", ["batch_size", 77, 32])],
             [("out_sample", "float32", ["batch_size", 4, "height", "width"])]),
    "vae_decoder": ([("latent_sample", "float32", ["batch_size", 4, "latent_height", "latent_width"])],
                    [("sample", "float32", ["batch_size", 3, "image_height", "image_width"])]),
}


def _io(entry: dict) -> tuple[list, list]:
    return ([(i["name"], i["dtype"], i["shape"]) for i in entry["inputs"]],
            [(o["name"], o["dtype"], o["shape"]) for o in entry["outputs"]])


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def torch_models(tiny_sd_pipeline_dir: Path) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = tiny_sd_pipeline_dir
    return {"text_encoder": CLIPTextModel.from_pretrained(src / "text_encoder").eval(),
            "unet": UNet2DConditionModel.from_pretrained(src / "unet").eval(),
            "vae": AutoencoderKL.from_pretrained(src / "vae").eval()}


def test_layout_and_manifest(tiny_onnx_dir: Path, tiny_sd_pipeline_dir: Path) -> None:
    out, src = tiny_onnx_dir, tiny_sd_pipeline_dir
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "basinguard.json", "tokenizer/tokenizer.json",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                *(f"{m}/{f}" for m in MODELS for f in ("model.onnx", "config.json"))):
        assert (out / rel).is_file(), rel
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the working folder was renamed, nothing left
    assert (out / "model_index.json").read_bytes() == (src / "model_index.json").read_bytes()
    for model, component in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae")):
        assert (out / model / "config.json").read_bytes() == (src / component / "config.json").read_bytes()
    assert not (out / "_raw").exists()

    manifest = json.loads((out / "basinguard.json").read_text())
    assert manifest["source"] == str(src) and manifest["opset"] == 17 and manifest["fp16"] is False
    assert set(manifest["versions"]) == {"torch", "diffusers", "transformers", "onnx", "onnxruntime", "basinguard"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["latent_size_multiple"] == 2
    for model in MODELS:
        entry = manifest["models"][model]
        assert entry["path"] == f"{model}/model.onnx" and entry["dtype"] == "float32"
        assert _io(entry) == EXPECTED_IO[model]
        assert entry["dynamic_axes"][entry["inputs"][0]["name"]]["0"] == "batch_size"
        check = manifest["validation"][model]
        assert 0 <= check["max_abs_diff"] < 1e-4 and check["atol"] == 1e-3 and len(check["cases"]) >= 1
    assert manifest["models"]["unet"]["dynamic_axes"]["timestep"] == {"0": "batch_size"}
    assert manifest["validation"]["tokenizer"]["reference"] == "CLIPTokenizer"


def test_manifest_matches_the_onnx_files(tiny_onnx_dir: Path, ort_session: Callable) -> None:
    manifest = json.loads((tiny_onnx_dir / "basinguard.json").read_text())
    types = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}
    for model in MODELS:
        path = tiny_onnx_dir / model / "model.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        session = ort_session(path)
        declared = [(i.name, types[i.type]) for i in [*session.get_inputs(), *session.get_outputs()]]
        entry = manifest["models"][model]
        assert declared == [(i["name"], i["dtype"]) for i in [*entry["inputs"], *entry["outputs"]]]


def test_names_match_optimum(tiny_sd_pipeline_dir: Path, torch_models: dict) -> None:
    """Same input/output names as optimum-onnx's exporter configs, so one runtime serves both exports."""
    configs = pytest.importorskip("optimum.exporters.onnx.model_configs")
    image = "semantic-segmentation"  # the task optimum registers its diffusers parts under
    optimum = {"text_encoder": configs.CLIPTextOnnxConfig(torch_models["text_encoder"].config, "feature-extraction"),
               "unet": configs.UNetOnnxConfig(torch_models["unet"].config, image),
               "vae_decoder": configs.VaeDecoderOnnxConfig(torch_models["vae"].config, image)}
    for model, config in optimum.items():
        ours_in, ours_out = EXPECTED_IO[model]
        assert [n for n, _, _ in ours_in] == list(config.inputs)
        assert [n for n, _, _ in ours_out] == list(config.outputs)
    assert optimum["unet"].inputs["timestep"] == {}  # optimum: a scalar; ours: (batch,) — see graphs.py


def _ids(out: Path, prompts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PromptTokenizer.from_folder(out / "tokenizer").encode(prompts)


def test_text_encoder_dynamic_batch(tiny_onnx_dir: Path, torch_models: dict, ort_session: Callable) -> None:
    session = ort_session(tiny_onnx_dir / "text_encoder/model.onnx")
    prompts = ["a photo of a cat", "", "a red castle at night, detailed painting", " ".join(["sky"] * 100)]
    for batch in (1, 4):
        ids = _ids(tiny_onnx_dir, prompts[:batch])
        hidden, pooled = session.run(None, {"input_ids": ids})
        with torch.no_grad():
            ref = torch_models["text_encoder"](torch.from_numpy(ids))
        np.testing.assert_allclose(hidden, ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("latent", [(8, 8), (12, 6)])
def test_unet_dynamic_batch_and_size(latent: tuple[int, int], tiny_onnx_dir: Path, torch_models: dict,
                                     ort_session: Callable) -> None:
    session = ort_session(tiny_onnx_dir / "unet/model.onnx")
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 2, 4):
        sample = torch.randn(batch, 4, *latent, generator=gen)
        timestep = torch.tensor([981.0, 1.0, 500.0, 20.0][:batch])  # differing per sample
        context = torch.randn(batch, 77, 32, generator=gen)
        (got,) = session.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                    "encoder_hidden_states": context.numpy()})
        with torch.no_grad():
            ref = torch_models["unet"](sample, timestep, context).sample.numpy()
        assert got.shape == (batch, 4, *latent)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_vae_decoder_dynamic_batch_and_size(tiny_onnx_dir: Path, torch_models: dict, ort_session: Callable) -> None:
    session = ort_session(tiny_onnx_dir / "vae_decoder/model.onnx")
    gen = torch.Generator().manual_seed(2)
    for batch, latent in ((1, (8, 8)), (2, (6, 10))):
        z = torch.randn(batch, 4, *latent, generator=gen)
        (got,) = session.run(None, {"latent_sample": z.numpy()})
        with torch.no_grad():
            ref = torch_models["vae"].decode(z).sample.numpy()
        assert got.shape == (batch, 3, 2 * latent[0], 2 * latent[1])
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_exported_tokenizer(tiny_onnx_dir: Path, tiny_sd_pipeline_dir: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    prompts = ["a photo of an astronaut riding a horse on mars", "The Big Red Castle!!", "unknownword 42"]
    slow = CLIPTokenizer.from_pretrained(tiny_sd_pipeline_dir / "tokenizer")
    ref = slow(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert _ids(tiny_onnx_dir, prompts).tolist() == ref
    # the exported tokenizer.json, read by the tokenizers library alone, tokenizes as the slow CLIP tokenizer does
    fast = Tokenizer.from_file(str(tiny_onnx_dir / "tokenizer/tokenizer.json"))
    assert [fast.encode(p).ids for p in prompts] == slow(prompts).input_ids


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_pickle_only_component_is_refused(tiny_sd_pipeline_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    src = _copy(tiny_sd_pipeline_dir, tmp_path / "pickled")
    weights = src / "unet/diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), src / "unet/diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ExportError, match=r"unet has only pickle weights \(diffusion_pytorch_model\.bin\); pickle "
                                          r"checkpoints are not loaded.*safe_serialization=True"):
        export_pipeline(src, tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


def test_pickled_single_file_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ExportError, match=r"model\.ckpt is a pickle checkpoint, which can run code when loaded; "
                                          r"pass --allow-pickle"):
        export_pipeline(ckpt, tmp_path / "out", log=_quiet)


def test_missing_components_are_named(tiny_sd_pipeline_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_sd_pipeline_dir, tmp_path / "partial")
    shutil.rmtree(src / "vae")
    shutil.rmtree(src / "tokenizer")
    with pytest.raises(ExportError, match=r"not a diffusers Stable Diffusion folder: missing vae, tokenizer$"):
        export_pipeline(src, tmp_path / "out", log=_quiet)
    (src / "model_index.json").unlink()
    with pytest.raises(ExportError, match=r"missing model_index\.json, vae, tokenizer$"):
        export_pipeline(src, tmp_path / "out", log=_quiet)
    with pytest.raises(ExportError, match=r"source folder not found: .*nowhere"):
        export_pipeline(tmp_path / "nowhere", tmp_path / "out", log=_quiet)
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"is not a local folder and could not be fetched from the Hugging Face Hub"):
        export_pipeline("basinguard-tests/no-such-pipeline", tmp_path / "out", log=_quiet)


def test_bad_arguments_and_existing_output(tiny_sd_pipeline_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="atol must be a number >= 0"):
        export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", atol=-1.0, log=_quiet)
    from torch.onnx import _constants

    highest = _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET  # the TorchScript exporter's, below torch.onnx's own
    assert highest < _constants.ONNX_MAX_OPSET
    for opset in (13, highest + 1):  # before any model loads, naming the range
        with pytest.raises(ExportError, match=rf"opset must be in \[14, {highest}\] \(got {opset}\)"):
            export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", opset=opset, log=_quiet)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", log=_quiet)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_validation_failure_is_raised_and_leaves_nothing(tiny_sd_pipeline_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph whose outputs drift by 1e-2 from torch must fail the default 1e-3 tolerance."""
    open_session = validate._session

    class Drifting:
        def __init__(self, path: Path):
            self.session = open_session(path)

        def run(self, names: list[str], feed: dict) -> list[np.ndarray]:
            return [out + np.asarray(1e-2, out.dtype) for out in self.session.run(names, feed)]

    monkeypatch.setattr(validate, "_session", Drifting)
    log: list[str] = []
    with pytest.raises(ExportError, match=r"text_encoder validation failed: output 'last_hidden_state' for "
                                          r"input_ids \(2, 77\) differs from torch by 0\.01 > tolerance"):
        export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", log=log.append)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the working folder remains
    assert "exporting unet (float32)" not in log  # it stopped at the first failing model


def test_tokenizer_longer_than_text_encoder_is_refused(tiny_sd_pipeline_dir: Path, tmp_path: Path) -> None:
    src = _copy(tiny_sd_pipeline_dir, tmp_path / "short_tokenizer")
    config = json.loads((src / "tokenizer/tokenizer_config.json").read_text())
    config["model_max_length"] = 16
    (src / "tokenizer/tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"tokenizer pads to 16 tokens but the text encoder takes 77"):
        export_pipeline(src, tmp_path / "out", log=_quiet)
    assert [p.name for p in tmp_path.iterdir()] == ["short_tokenizer"]


def _failing_session(path: Path) -> None:
    raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Conv(11)")


def test_unrunnable_fp16_graph_is_skipped_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from basinguard.export.graphs import GraphSpec

    spec = GraphSpec("unet", torch.nn.Identity(), {"sample": torch.zeros(1)}, ("out_sample",), {}, Path("config.json"),
                     half=True, cases=[{"sample": torch.zeros(1)}])
    monkeypatch.setattr(validate, "_session", _failing_session)
    log: list[str] = []
    result = validate.validate_graph(spec, Path("model.onnx"), True, 2e-2, log.append)
    assert result["skipped"].startswith("ONNX Runtime CPU cannot run the float16 graph: [ONNXRuntimeError] : 9")
    assert log == [f"  unet: validation skipped ({result['skipped']})"]
    with pytest.raises(ExportError, match=r"unet: ONNX Runtime cannot run the exported model: .*NOT_IMPLEMENTED"):
        validate.validate_graph(spec, Path("model.onnx"), False, 1e-3, log.append)  # float32 graphs must run


def test_large_models_get_one_external_data_file(tiny_onnx_dir: Path, tmp_path: Path, ort_session: Callable,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 2 GiB (SD's float32 UNet) the weights go to model.onnx_data beside model.onnx, as optimum does."""
    from basinguard.export import onnx_files

    monkeypatch.setattr(onnx_files, "_TWO_GIB", 0)
    final = tmp_path / "vae_decoder" / "model.onnx"
    final.parent.mkdir()
    onnx_files.save_checked(tiny_onnx_dir / "vae_decoder/model.onnx", final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert final.stat().st_size < 100_000 < (final.parent / "model.onnx_data").stat().st_size
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    (got,) = ort_session(final).run(None, {"latent_sample": z})
    (want,) = ort_session(tiny_onnx_dir / "vae_decoder/model.onnx").run(None, {"latent_sample": z})
    np.testing.assert_array_equal(got, want)
    assert validate.graph_io(final)["inputs"][0]["name"] == "latent_sample"


def _initializer_types(path: Path) -> set[str]:
    model = onnx.load(str(path))
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer if len(t.dims) >= 2}


@pytest.fixture(scope="module")
def fp16_export(tiny_sd_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list]:
    log: list[str] = []
    out = tmp_path_factory.mktemp("fp16") / "model"
    manifest = export_pipeline(tiny_sd_pipeline_dir, out, fp16=True, log=log.append)
    return out, manifest, log


def test_fp16_export_dtypes(fp16_export: tuple[Path, dict, list]) -> None:
    out, manifest, _ = fp16_export
    assert manifest["fp16"] is True
    assert json.loads((out / "basinguard.json").read_text()) == manifest
    dtypes = {m: manifest["models"][m]["dtype"] for m in MODELS}
    assert dtypes == {"text_encoder": "float16", "unet": "float16", "vae_decoder": "float32"}
    unet_inputs = {i["name"]: i["dtype"] for i in manifest["models"]["unet"]["inputs"]}
    assert unet_inputs == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16"}
    assert manifest["models"]["text_encoder"]["inputs"][0]["dtype"] == "int64"
    assert _initializer_types(out / "unet/model.onnx") == {"FLOAT16"}
    assert _initializer_types(out / "text_encoder/model.onnx") == {"FLOAT16"}
    assert _initializer_types(out / "vae_decoder/model.onnx") == {"FLOAT"}
    assert manifest["models"]["unet"]["fp16_method"] == "torch_half"


def test_fp16_export_validated_or_skipped_loudly(fp16_export: tuple[Path, dict, list]) -> None:
    _, manifest, log = fp16_export
    for model in ("text_encoder", "unet"):
        check = manifest["validation"][model]
        if "skipped" in check:
            assert any(f"{model}: validation skipped" in line for line in log)
        else:
            assert check["atol"] == 2e-2 and 0 < check["max_abs_diff"] < 2e-2
    assert manifest["validation"]["vae_decoder"]["max_abs_diff"] < 1e-4


def test_fp16_unet_runs_against_fp32_torch(fp16_export: tuple[Path, dict, list], torch_models: dict,
                                           ort_session: Callable) -> None:
    session = ort_session(fp16_export[0] / "unet/model.onnx")
    gen = torch.Generator().manual_seed(3)
    sample, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    timestep = torch.tensor([250.0])
    (got,) = session.run(None, {"sample": sample.half().numpy(), "timestep": timestep.numpy(),
                                "encoder_hidden_states": context.half().numpy()})
    with torch.no_grad():
        ref = torch_models["unet"](sample, timestep, context).sample.numpy()
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-2, rtol=0)


def test_fp16_falls_back_to_onnx_conversion(tiny_sd_pipeline_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch cannot trace in float16 on the CPU, the float32 graph is converted; same interface results."""
    trace = onnx_export.trace_to_onnx

    def no_half(spec: object, path: Path, opset: int, half: bool) -> None:
        if half:
            raise ExportError("torch.onnx.export failed: \"addmm_impl_cpu_\" not implemented for 'Half'")
        trace(spec, path, opset, half)

    monkeypatch.setattr(onnx_export, "trace_to_onnx", no_half)
    (tmp_path / "out").mkdir()  # an empty OUT is fine
    log: list[str] = []
    manifest = export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", fp16=True, log=log.append)
    assert any("float16 tracing failed" in line and "converting the float32 ONNX graph" in line for line in log)
    for model in ("text_encoder", "unet"):
        assert manifest["models"][model]["fp16_method"] == "onnxruntime_float16_conversion"
        assert _initializer_types(tmp_path / "out" / model / "model.onnx") == {"FLOAT16"}
        onnx.checker.check_model(str(tmp_path / "out" / model / "model.onnx"))
    unet_inputs = {i["name"]: i["dtype"] for i in manifest["models"]["unet"]["inputs"]}
    assert unet_inputs == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16"}
    assert manifest["validation"]["unet"]["max_abs_diff"] < 2e-2


def test_a_scheduler_the_runtime_cannot_run_is_said_before_exporting(tiny_sd_pipeline_dir: Path, tmp_path: Path) -> None:
    from basinguard.export.onnx_export import scheduler_problem
    from basinguard.runtime.schedulers import make_scheduler

    assert scheduler_problem(tiny_sd_pipeline_dir) is None
    src = tmp_path / "src"
    shutil.copytree(tiny_sd_pipeline_dir, src)
    config_path = src / "scheduler/scheduler_config.json"
    config = json.loads(config_path.read_text())
    # A class-specific option (SDE DPM++): another scheduler runs the model.
    config_path.write_text(json.dumps({**config, "_class_name": "DPMSolverMultistepScheduler",
                                       "algorithm_type": "sde-dpmsolver++"}))
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        make_scheduler(json.loads(config_path.read_text()), 10)  # the runtime's own verdict, which the export repeats
    problem = scheduler_problem(src)
    assert problem is not None and "algorithm_type='sde-dpmsolver++' is not supported" in problem
    assert "--scheduler ddim|dpm++2m|dpm++2m-karras|euler|euler-karras|euler-a|pndm|unipc|unipc-karras" in problem
    # An option every scheduler reads: no --scheduler to suggest.
    config_path.write_text(json.dumps({**config, "beta_schedule": "sigmoid"}))
    problem = scheduler_problem(src)
    assert problem is not None and "beta_schedule 'sigmoid' is not supported" in problem and "with any --scheduler" in problem


def test_working_folders_of_killed_exports_are_removed_live_ones_kept(tmp_path: Path) -> None:
    """A killed export leaves its hidden working folder (gigabytes for SD); the next export to the same OUT removes
    it. An export still running into the same OUT (its lock held) makes the next one stop at its start, touching
    nothing (it would find OUT taken only after a whole export of its own)."""
    import subprocess
    import sys

    from basinguard.export.out_folder import prepare_out

    killed = tmp_path / ".out.partial-killed"
    (killed / "unet").mkdir(parents=True)
    (killed / "unet" / "model.onnx").write_bytes(b"half")
    (tmp_path / ".out.partial-killed.lock").write_text("")  # its lock file, no longer held
    (tmp_path / ".out.partial-lonely.lock").write_text("")  # killed between its lock and its folder
    live = tmp_path / ".out.partial-live"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(tmp_path / '.out.partial-live.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ExportError, match=f"another export into {tmp_path / 'out'} is running"):
            prepare_out(tmp_path / "out")
        assert killed.is_dir() and live.is_dir() and (tmp_path / ".out.partial-live.lock").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    work, lock = prepare_out(tmp_path / "out")  # the live one is gone now (killed): its folder goes too
    os.close(lock)
    assert not killed.exists() and not (tmp_path / ".out.partial-killed.lock").exists()
    assert not (tmp_path / ".out.partial-lonely.lock").exists() and not (tmp_path / ".out.partial-live.lock").exists()
    assert not live.exists() and work.is_dir() and work.name.startswith(".out.partial-")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ExportError, match="cannot make the folder .*afile/sub for the output"):
        prepare_out(tmp_path / "afile" / "sub" / "out")
