"""The export's memory: the preflight estimate and its refusal, validation at a reduced latent size, and torch
modules freed before ONNX Runtime validates their exported copies."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("diffusers")

from basinguard import cli  # noqa: E402
from basinguard.export import memory, onnx_export, validate  # noqa: E402
from basinguard.export.errors import ExportError  # noqa: E402
from basinguard.export.graphs import GraphSpec  # noqa: E402

GIB = 2**30


def _quiet(_: str) -> None:
    pass


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}, str(path))


def test_parameter_count_matches_torch(tiny_sd_pipeline_dir: Path) -> None:
    """Counted from the safetensors headers alone, as the loaded modules count their parameters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        module = cls.from_pretrained(tiny_sd_pipeline_dir / name)
        # state_dict: buffers saved beside parameters (CLIP's position ids) are in the file too
        want = sum(t.numel() for t in module.state_dict().values())
        assert memory.parameter_count(tiny_sd_pipeline_dir / name) == want > 10_000


def test_sharded_and_fp16_variant_weights_are_counted_once(tmp_path: Path) -> None:
    unet = tmp_path / "unet"
    _write_safetensors(unet / "diffusion_pytorch_model-00001-of-00002.safetensors", {"a": (10, 20)})
    _write_safetensors(unet / "diffusion_pytorch_model-00002-of-00002.safetensors", {"b": (7,), "c": (3, 3, 2)})
    _write_safetensors(unet / "diffusion_pytorch_model.fp16.safetensors", {"a": (10, 20), "b": (7,)}, torch.float16)
    assert memory.parameter_count(unet) == 200 + 7 + 18  # the plain shards; the fp16 variant is not loaded too
    only_half = tmp_path / "vae"
    _write_safetensors(only_half / "diffusion_pytorch_model.fp16.safetensors", {"a": (5, 5)}, torch.float16)
    assert memory.parameter_count(only_half) == 25


def _fake_pipeline(folder: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        _write_safetensors(folder / name / "model.safetensors", {"w": (count,)})
    return folder


def test_estimate_against_a_hand_computation(tmp_path: Path) -> None:
    """text encoder 1 M, UNet 10 M, VAE 0.5 M parameters, float32. Tracing the UNet holds its float32 module
    (40 MB), 3 bytes a parameter for the exporter (30 MB) and the waiting VAE (2 MB): 72 MB; re-saving and
    validating it, 5 bytes a parameter (50 MB) + the VAE: 52 MB. The text encoder's trace, with the UNet and VAE
    waiting: 4 + 3 + 42 = 49 MB; the VAE's: 3.5 MB. Peak 72 MB + 1.5 GiB of base."""
    folder = _fake_pipeline(tmp_path / "p", {"text_encoder": 1_000_000, "unet": 10_000_000, "vae": 500_000})
    fp32 = memory.estimate_export(folder, fp16=False)
    assert fp32.parameters == {"text_encoder": 1_000_000, "unet": 10_000_000, "vae": 500_000}
    assert fp32.peak == 72_000_000 + int(1.5 * GIB) and fp32.phase == "unet"
    # float16: tracing the UNet 40 (float32 module) + 35 (its half copy and the exporter's half-size copies) + 2
    # = 77 MB; re-saving and validating 2.5 bytes a parameter: 25 + 2 = 27 MB
    fp16 = memory.estimate_export(folder, fp16=True)
    assert fp16.peak == 77_000_000 + int(1.5 * GIB) and fp16.dtype == "float16"
    assert "unet 10 M" in fp16.describe() and "float16 export" in fp16.describe()


def test_sdxl_second_text_encoder_waits_in_memory(tmp_path: Path) -> None:
    """The second text encoder is exported after the first: while the first is traced, it waits (float32)."""
    folder = _fake_pipeline(tmp_path / "p", {"text_encoder": 1_000_000, "text_encoder_2": 6_000_000,
                                             "unet": 2_000_000, "vae": 500_000})
    estimate = memory.estimate_export(folder, fp16=False)
    # text_encoder_2: 24 + 18 + 4 * (2 + 0.5) M = 52 MB (its finish: 30 + 10 = 40); the first's: 4 + 3 + 34 = 41 MB;
    # the UNet's: 8 + 6 + 2 = 16 MB
    assert estimate.peak == 52_000_000 + int(1.5 * GIB) and estimate.phase == "text_encoder_2"


def test_refusal_names_estimate_available_and_what_to_do(tiny_sd_pipeline_dir: Path) -> None:
    with pytest.raises(ExportError) as caught:
        memory.check_export_memory(tiny_sd_pipeline_dir, False, available=(GIB // 2, "MemAvailable in /proc/meminfo"))
    message = str(caught.value)
    estimate = memory.estimate_export(tiny_sd_pipeline_dir, False)
    assert f"about {estimate.peak / GIB:.1f} GiB" in message and "unet" in message
    assert "0.5 GiB is available (MemAvailable in /proc/meminfo)" in message
    assert "--no-memory-check" in message and "a machine with at least" in message
    assert "\n" not in message
    # enough memory: no refusal, the estimate comes back
    assert memory.check_export_memory(tiny_sd_pipeline_dir, False, available=(64 * GIB, "test")).peak == estimate.peak



def test_no_refusal_where_memory_cannot_be_read(tiny_sd_pipeline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # not Linux: nothing to compare with
    assert memory.check_export_memory(tiny_sd_pipeline_dir, False).peak > 0


def test_fp16_is_suggested_only_where_it_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_pipeline(tmp_path / "p", {"text_encoder": 1_000_000, "unet": 100_000_000, "vae": 500_000})
    monkeypatch.setattr(memory, "BASE", 0)
    monkeypatch.setattr(memory, "FINISH", {"float32": 8.0, "float16": 4.0})
    monkeypatch.setattr(memory, "TRACE_EXTRA", {"float32": 4.0, "float16": 2.0})
    fp32, fp16 = memory.estimate_export(folder, False).peak, memory.estimate_export(folder, True).peak
    assert fp16 < fp32
    with pytest.raises(ExportError, match=r"or export with --fp16 .*about 0\.6 GiB"):
        memory.check_export_memory(folder, False, available=(fp16 + 1, "test"))
    with pytest.raises(ExportError) as caught:
        memory.check_export_memory(folder, False, available=(fp16 - 1, "test"))
    assert "--fp16" not in str(caught.value)


def test_available_memory_reads_meminfo() -> None:
    found = memory.available_memory()
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    assert found is not None and 0 < found[0] <= meminfo["MemTotal"]


def test_cgroup_limits_v2_and_v1(tmp_path: Path) -> None:
    """The room under the tightest limit of the process's cgroup and its parents, less page cache the kernel
    reclaims first (inactive_file): a container's 8 GiB limit with 5 GiB charged, 1 GiB of it cache, leaves 4."""
    root = tmp_path / "cgroup"
    job = root / "box" / "job"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("max\n")  # no limit at the job's level
    (job / "memory.current").write_text(str(3 * GIB))
    (root / "box" / "memory.max").write_text(str(8 * GIB))
    (root / "box" / "memory.current").write_text(str(5 * GIB))
    (root / "box" / "memory.stat").write_text(f"anon {4 * GIB}\ninactive_file {GIB}\nactive_file 0\n")
    membership = tmp_path / "self-cgroup"
    membership.write_text("0::/box/job\n")
    room, source = memory._cgroup_room(root, membership)
    assert room == 4 * GIB and "cgroup limit 8.0 GiB, 4.0 GiB used" in source
    v1 = root / "memory" / "process_api" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(6 * GIB))
    (v1 / "memory.usage_in_bytes").write_text(str(5 * GIB))
    (v1 / "memory.stat").write_text(f"cache {GIB}\ntotal_inactive_file {GIB // 2}\n")
    membership.write_text("9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n")
    room, source = memory._cgroup_room(root, membership)
    assert room == int(1.5 * GIB) and "memory.limit_in_bytes" in source
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert memory._cgroup_room(root, membership) is None


def test_export_refuses_before_loading_and_the_flag_overrides(tiny_sd_pipeline_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: (1024, "cgroup limit 0.0 GiB, 0.0 GiB used (test)"))
    loaded = []
    real_load = onnx_export._load_models
    monkeypatch.setattr(onnx_export, "_load_models", lambda folder: loaded.append(folder) or real_load(folder))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"would need about .* GiB of memory .* but 0\.0 GiB is available"):
        onnx_export.export_pipeline(tiny_sd_pipeline_dir, out, log=_quiet)
    assert loaded == [] and list(tmp_path.iterdir()) == []  # refused before any model loaded or folder was made
    assert cli.main(["export", str(tiny_sd_pipeline_dir), str(out)]) == 2  # the CLI: one clear line
    err = capsys.readouterr().err
    assert err.startswith("basinguard export: error: the export would need about") and err.count("\n") == 1
    assert "--no-memory-check" in err and loaded == []
    assert cli.main(["export", str(tiny_sd_pipeline_dir), str(out), "--no-memory-check"]) == 0
    assert loaded and json.loads((out / "basinguard.json").read_text())["validation"]["unet"]["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------------------------------------ validation


class _BakedWidth(torch.nn.Module):
    """A graph the tracer gets wrong off its traced size: the width becomes a constant in the trace."""

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return sample * float(sample.shape[-1]) + torch.nn.functional.avg_pool2d(sample, 2).repeat_interleave(2, -1)\
            .repeat_interleave(2, -2)


def _spec(module: torch.nn.Module, native: int, cases: list[tuple[int, int, int]]) -> GraphSpec:
    gen = torch.Generator().manual_seed(0)
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "out": {0: "batch_size", 2: "height", 3: "width"}}
    return GraphSpec("unet", module, {"sample": torch.randn(2, 4, native, native, generator=gen)}, ("out",), axes,
                     Path("config.json"), cases=[{"sample": torch.randn(b, 4, h, w, generator=gen)} for b, h, w in cases])


def _export(spec: GraphSpec, path: Path) -> Path:
    torch.onnx.export(spec.module, tuple(spec.example.values()), str(path), input_names=["sample"],
                      output_names=["out"], dynamic_axes=spec.dynamic_axes, opset_version=17, dynamo=False)
    return path


def test_cases_are_reduced_keeping_offsets_and_batch() -> None:
    spec = _spec(torch.nn.Identity(), 96, [(2, 96, 104), (3, 104, 96)])
    shapes = [tuple(validate.reduced_case(spec, case)["sample"].shape) for case in spec.cases]
    assert shapes == [(2, 4, 32, 40), (3, 4, 40, 32)]  # off the traced size, non-square, multiples of 8
    small = _spec(torch.nn.Identity(), 8, [(2, 8, 16)])  # at or under VALIDATION_SIDE: as built
    assert tuple(validate.reduced_case(small, small.cases[0])["sample"].shape) == (2, 4, 8, 16)
    text = GraphSpec("text_encoder", torch.nn.Identity(), {"input_ids": torch.zeros(2, 77, dtype=torch.long)},
                     ("x",), {"input_ids": {0: "batch_size"}}, Path("c.json"),
                     cases=[{"input_ids": torch.zeros(3, 77, dtype=torch.long)}])
    assert tuple(validate.reduced_case(text, text.cases[0])["input_ids"].shape) == (3, 77)  # no spatial axes


def test_validation_at_the_reduced_size_still_catches_a_wrong_graph(tmp_path: Path) -> None:
    spec = _spec(_BakedWidth(), 64, [(2, 64, 72), (3, 72, 64)])
    path = _export(spec, tmp_path / "model.onnx")
    expected = validate.expected_outputs(spec, half=False)
    assert [c[2] for c in expected.cases] == ["sample (2, 4, 32, 40)", "sample (3, 4, 40, 32)"]
    with pytest.raises(ExportError, match=r"unet validation failed: output 'out' for sample \(2, 4, 32, 40\) "
                                          r"differs from torch by"):
        validate.validate_graph(expected, path, False, 1e-3, _quiet)


def test_validation_at_the_reduced_size_passes_a_right_graph(tmp_path: Path) -> None:
    class Right(torch.nn.Module):
        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(sample, 2).repeat_interleave(2, -1).repeat_interleave(2, -2) * 3

    spec = _spec(Right(), 64, [(2, 64, 72), (3, 72, 64)])
    result = validate.validate_graph(spec, _export(spec, tmp_path / "model.onnx"), False, 1e-5, _quiet)
    assert [c["inputs"] for c in result["cases"]] == ["sample (2, 4, 32, 40)", "sample (3, 4, 40, 32)"]
    assert result["max_abs_diff"] < 1e-5


def test_each_torch_module_is_freed_before_ort_validates_its_export(tiny_sd_pipeline_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """When ONNX Runtime opens a graph for validation, the torch module it was traced from is gone (and the later
    ones are still there, to be exported next)."""
    modules: dict[str, weakref.ref] = {}
    real_build_specs = onnx_export.build_specs

    def recording_build_specs(models: object, fp16: bool) -> list[GraphSpec]:
        specs = real_build_specs(models, fp16)
        for spec in specs:
            modules[spec.name] = weakref.ref(spec.module.model)
        return specs

    alive_at_open: dict[str, dict[str, bool]] = {}
    real_session = validate._session

    def recording_session(path: Path) -> object:
        gc.collect()
        alive_at_open[Path(path).parent.name] = {name: ref() is not None for name, ref in modules.items()}
        return real_session(path)

    monkeypatch.setattr(onnx_export, "build_specs", recording_build_specs)
    monkeypatch.setattr(validate, "_session", recording_session)
    manifest = onnx_export.export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", log=_quiet)
    assert alive_at_open == {
        "text_encoder": {"text_encoder": False, "unet": True, "vae_decoder": True},
        "unet": {"text_encoder": False, "unet": False, "vae_decoder": True},
        "vae_decoder": {"text_encoder": False, "unet": False, "vae_decoder": False},
    }
    assert all(manifest["validation"][name]["max_abs_diff"] < 1e-4 for name in ("text_encoder", "unet", "vae_decoder"))


def test_validated_shapes_are_recorded(tiny_onnx_dir: Path) -> None:
    """The tiny model's latents (8) are under VALIDATION_SIDE: validated at the sizes the specs were built with."""
    manifest = json.loads((tiny_onnx_dir / "basinguard.json").read_text())
    shapes = [c["inputs"].split("), ")[0] + ")" for c in manifest["validation"]["unet"]["cases"]]
    assert shapes == ["sample (2, 4, 8, 10)", "sample (3, 4, 10, 8)"]  # native 8x8, size multiple 2
    got = np.array([c["max_abs_diff"]["out_sample"] for c in manifest["validation"]["unet"]["cases"]])
    assert (got < 1e-4).all()
