"""`basinguard export --quantize int8`: the int8 UNet for ONNX Runtime's CPU provider.

Checked against the quantization's own definition (each constant MatMul weight W stored as int8 q with one scale s,
W ≈ s·q within s/2, symmetric), against the fp32 graph's outputs, and through the CLI and the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import numpy_helper  # noqa: E402

from basinguard.cli import main as cli_main  # noqa: E402
from basinguard.export.errors import ExportError  # noqa: E402
from basinguard.export.quantize import check_quantize_memory, quantize_folder  # noqa: E402
from basinguard.runtime.model_folder import ModelFolderError, model_identity  # noqa: E402
from basinguard.runtime.pipeline import Pipeline  # noqa: E402


def _matmuls(path: Path) -> tuple[dict[str, np.ndarray], int, int]:
    """The fp32 graph's constant MatMul and Gemm (linear layers with a bias) weights by name, the count of those
    nodes, and the count of MatMuls without a constant weight (attention scores)."""
    model = onnx.load(str(path))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    constant = {n.input[1]: weights[n.input[1]] for n in matmuls if n.input[1] in weights}
    with_constant = sum(n.input[1] in weights for n in matmuls)
    return constant, with_constant, len(matmuls) - with_constant


@pytest.fixture(scope="module")
def int8_dir(tiny_onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "model"
    assert cli_main(["export", str(tiny_onnx_dir), str(out), "--quantize", "int8"]) == 0
    return out


def test_every_constant_matmul_weight_is_int8_within_half_a_step(tiny_onnx_dir: Path, int8_dir: Path) -> None:
    fp32, with_constant, others = _matmuls(tiny_onnx_dir / "unet/model.onnx")
    model = onnx.load(str(int8_dir / "unet/model.onnx"))
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    integer = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert len(integer) == with_constant > 0
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == others > 0  # attention scores stay float
    checked = set()
    for node in integer:  # B: <weight>[_Transposed]_quantized with its scale and zero point beside it
        base = node.input[1].removesuffix("_quantized")
        name = base.removesuffix("_Transposed")
        w = fp32[name].T if base != name else fp32[name]  # a Gemm's weight, transposed into a MatMul's
        q, s, zero = values[node.input[1]], float(values[f"{base}_scale"]), values[f"{base}_zero_point"]
        assert q.dtype == np.int8 and q.shape == w.shape and zero == 0
        assert s == pytest.approx(np.abs(w).max() / 127, rel=1e-6)  # symmetric, one scale per tensor
        assert np.abs(s * q.astype(np.float32) - w).max() <= s / 2 * (1 + 1e-5)
        checked.add(name)
    assert checked == set(fp32)
    record = json.loads((int8_dir / "basinguard.json").read_text())["models"]["unet"]["quantization"]
    assert record["mode"] == "int8" and record["matmuls"] == with_constant
    assert record["bytes"]["int8"] < record["bytes"]["fp32"]


def test_int8_unet_is_close_to_fp32_and_still_fused(tiny_onnx_dir: Path, int8_dir: Path, ort_session) -> None:
    from basinguard.engine.ort import OrtModel

    rng = np.random.default_rng(1)
    feed = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.float32([900, 100])}
    feed["encoder_hidden_states"] = rng.standard_normal((2, *ort_session(tiny_onnx_dir / "unet/model.onnx")
                                                         .get_inputs()[2].shape[1:])).astype(np.float32)
    (want,) = ort_session(tiny_onnx_dir / "unet/model.onnx").run(None, feed)
    (got,) = ort_session(int8_dir / "unet/model.onnx").run(None, feed)
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < relative < 0.1, relative  # quantized, and not broken
    recorded = json.loads((int8_dir / "basinguard.json").read_text())["models"]["unet"]["quantization"]
    assert 0 < recorded["deviation"]["relative_l2"] < 0.1
    fp32_model = OrtModel(tiny_onnx_dir / "unet/model.onnx", threads=1)
    int8_model = OrtModel(int8_dir / "unet/model.onnx", threads=1)
    assert int8_model.fused_attention == fp32_model.fused_attention > 0


def test_generate_on_the_int8_folder(tiny_onnx_dir: Path, int8_dir: Path, tmp_path: Path) -> None:
    """The runtime takes the int8 folder as any other; a different model by identity; images near fp32's."""
    images = {}
    for name, folder in (("fp32", tiny_onnx_dir), ("int8", int8_dir)):
        pipe = Pipeline(folder, threads=1)
        images[name] = pipe.generate(["a red circle"], seeds=[0], steps=4)[0].pixels
    assert model_identity(int8_dir)["id"] != model_identity(tiny_onnx_dir)["id"]
    levels = np.abs(images["int8"].astype(np.float64) - images["fp32"]) * 255
    assert 0 < levels.max() and levels.mean() < 8, (levels.max(), levels.mean())
    for file in ("text_encoder/model.onnx", "vae_decoder/model.onnx", "tokenizer/tokenizer.json"):
        assert (int8_dir / file).read_bytes() == (tiny_onnx_dir / file).read_bytes()  # only the UNet changes


def test_export_with_quantize_from_the_diffusers_folder(tiny_sd_pipeline_dir: Path, tiny_onnx_dir: Path,
                                                         tmp_path: Path) -> None:
    """`export SRC OUT --quantize int8` quantizes the UNet after validating its fp32 graph against torch."""
    from basinguard.export.onnx_export import export_pipeline

    manifest = export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", quantize="int8", log=lambda _: None)
    assert manifest["models"]["unet"]["quantization"]["mode"] == "int8"
    assert manifest["validation"]["unet"]["max_abs_diff"] < 1e-3  # the fp32 graph's, before quantization
    same = tmp_path / "same"
    quantize_folder(tiny_onnx_dir, same, log=lambda _: None)
    assert (same / "unet/model.onnx").read_bytes() == (tmp_path / "out/unet/model.onnx").read_bytes()


def test_refusals(tiny_onnx_dir: Path, tiny_sd_pipeline_dir: Path, int8_dir: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (["export", str(tiny_onnx_dir), str(tmp_path / "a")], "exported basinguard folder already"),
        (["export", str(int8_dir), str(tmp_path / "b"), "--quantize", "int8"], "quantized already"),
        (["export", str(tiny_sd_pipeline_dir), str(tmp_path / "c"), "--quantize", "int8", "--fp16"],
         "--fp16 and --quantize int8 do not go together"),
        (["export", str(tiny_sd_pipeline_dir), str(tmp_path / "d"), "--quantize", "int8", "--tensorrt"],
         "--tensorrt and --quantize int8 do not go together"),
        (["build-engines", str(int8_dir)], "build TensorRT engines from its float export"),
    ]
    for args, message in cases:
        assert cli_main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not any(p.name.startswith(("a", "b", "c", "d")) for p in tmp_path.iterdir())
    with pytest.raises(ModelFolderError, match="quantized to int8 for ONNX Runtime's CPU provider"):
        Pipeline(int8_dir, provider="cuda")


def test_memory_is_checked_before_loading(tiny_sd_pipeline_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """3.2x the fp32 UNet's bytes (measured on SD 1.5); an export with --quantize checks it before loading."""
    from basinguard.export import memory, onnx_export, quantize

    with pytest.raises(ExportError, match=r"needs about 3\.7 GiB but 0\.0 GiB is available \(test\)"):
        check_quantize_memory(2**30, available=(1, "test"))
    room = (memory.check_export_memory(tiny_sd_pipeline_dir, False).peak + 2**20, "test")
    monkeypatch.setattr(memory, "available_memory", lambda: room)  # the export itself fits
    monkeypatch.setattr(quantize, "available_memory", lambda: (1, "test"))  # its quantization does not
    monkeypatch.setattr(onnx_export, "_build", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(ExportError, match="quantizing the UNet"):
        onnx_export.export_pipeline(tiny_sd_pipeline_dir, tmp_path / "out", quantize="int8", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_quantization_leaves_nothing(tiny_onnx_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization as quantization

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported node\nwith a second line")

    monkeypatch.setattr(quantization, "quantize_dynamic", broken)
    with pytest.raises(ExportError, match="^int8 quantization of the UNet failed: unsupported node$"):
        quantize_folder(tiny_onnx_dir, tmp_path / "out", log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_policies_that_read_d_warn_once_on_an_int8_unet(int8_dir: Path, tiny_onnx_dir: Path) -> None:
    """d is the method's signal; int8 moves it (8 % at the first step on the shipped model), so dtp's transition
    and auto's detection move: said once per pipeline, and not for policies that never read d."""
    import warnings

    pipe = Pipeline(int8_dir, threads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate(["a red circle"], seeds=[0], steps=2, policy="cfg")
        pipe.generate(["a red circle"], seeds=[0], steps=2, policy="stp")
        assert not caught
        pipe.generate(["a red circle"], seeds=[0], steps=2, policy="dtp")
        pipe.generate(["a red circle"], seeds=[0], steps=2, policy="og-dtp")
    assert len(caught) == 1 and "UNet is int8: its d differs" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pipeline(tiny_onnx_dir, threads=1).generate(["a red circle"], seeds=[0], steps=2, policy="dtp")
    assert not caught


def test_quantizing_an_exported_folder_needs_no_torch(tiny_onnx_dir: Path, tmp_path: Path, capsys) -> None:
    """The runtime's install (numpy, onnx, onnxruntime) is enough: the command imports no torch, diffusers or
    transformers; export-only flags are refused in one line."""
    import subprocess
    import sys

    code = ("import sys; from basinguard.cli import main; "
            f"code = main(['export', {str(tiny_onnx_dir)!r}, {str(tmp_path / 'q')!r}, '--quantize', 'int8']); "
            "heavy = sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)); "
            "print(code, heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.stdout.strip().splitlines()[-1] == "0 []", (done.stdout, done.stderr)
    assert (tmp_path / "q" / "unet" / "model.onnx").is_file()
    assert cli_main(["export", str(tiny_onnx_dir), str(tmp_path / "r"), "--quantize", "int8", "--lora", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "--lora does not go with --quantize int8 of an exported folder" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
