"""Opt-in int8 UNet for ONNX Runtime's CPU provider (`basinguard export --quantize int8`).

onnxruntime.quantization's dynamic quantization: each MatMul (and Gemm) whose weight is a constant (the attention
projections, the feed-forward, the time and text projections: most of an SD UNet's transformer work) gets its
weight stored as int8, one scale per tensor, and its activations quantized per call; ONNX Runtime runs the pair as
one DynamicQuantizeMatMul, u8×s8 integer GEMM. Attention scores (no constant weight) stay float32, so the runtime's
attention fusion still finds them; convolutions stay float32 too (ORT's dynamic ConvInteger measured 2× slower
than float32 Conv on the shipped model). The text encoders and the VAE are left as they are.

The int8 UNet does not compute the fp32 one's numbers: the deviation of its output from the fp32 graph's on the
export's own inputs is measured and recorded in basinguard.json (`models.unet.quantization`); what it does to
images and to the method is in docs/speed.md. Quantization is a CPU lever: TensorRT and the GPU providers take
the fp32 or `--fp16` export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from basinguard.export.errors import ExportError, first_line
from basinguard.export.memory import GIB, available_memory
from basinguard.export.onnx_files import EXTERNAL_DATA, save_checked
from basinguard.export.out_folder import output_folder
from basinguard.model_format import MANIFEST, read_json

QUANTIZE_MODES = ("int8",)
METHOD = ("onnxruntime.quantization.quantize_dynamic: MatMul and Gemm weights int8 (symmetric, one scale per tensor), "
          "activations uint8 per call; Conv, attention scores, text encoders and VAE float32")
# Peak memory of a quantization in multiples of the fp32 UNet's bytes (onnxruntime.quantization holds the model,
# its shape-inferred copy and the int8 weights; then both graphs run once for the deviation). Measured: SD 1.5's
# 3.20 GiB UNet peaked at 10.23 GiB RSS (docs/speed.md).
PEAK_FACTOR = 3.2
BASE = 0.5 * GIB


def unet_bytes(unet: Path) -> int:
    return sum(f.stat().st_size for f in (unet / "model.onnx", unet / EXTERNAL_DATA) if f.is_file())


def check_quantize_memory(fp32_bytes: int, available: tuple[int, str] | None = None) -> float:
    """Raise ExportError before loading when quantizing a UNet of `fp32_bytes` would exceed the memory available;
    returns the estimate in bytes."""
    need = PEAK_FACTOR * fp32_bytes + BASE
    available = available if available is not None else available_memory()
    if available is not None and need > available[0]:
        raise ExportError(f"quantizing the UNet ({fp32_bytes / GIB:.1f} GiB in fp32) needs about {need / GIB:.1f} "
                          f"GiB but {available[0] / GIB:.1f} GiB is available ({available[1]}); free memory first")
    return need


def _feed(session, multiple: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The UNet's inputs at batch 2 and a small latent (2 × the size multiple): random normal, timestep 500."""
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in arg.shape]
        if arg.name == "sample":
            shape = [shape[0], shape[1], 2 * multiple, 2 * multiple]
        dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
        if arg.name == "timestep":
            feed[arg.name] = np.full(shape, 500, dtype)
        else:
            feed[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def measure_deviation(fp32: Path, int8: Path, multiple: int, threads: int | None = None) -> dict:
    """The int8 UNet's output against the fp32 graph's on the same random inputs (two draws)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    rng = np.random.default_rng(0)
    reference = ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
    feeds = [_feed(reference, multiple, rng) for _ in range(2)]
    expected = [reference.run(None, feed)[0] for feed in feeds]
    del reference
    quantized = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    got = [quantized.run(None, feed)[0] for feed in feeds]
    if not all(np.isfinite(g).all() for g in got):
        raise ExportError("the int8 UNet gives non-finite outputs where the fp32 one does not")
    relative = max(float(np.linalg.norm(g - e) / np.linalg.norm(e)) for g, e in zip(got, expected))
    peak = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    shape = list(next(iter(feeds[0].values())).shape)
    return {"relative_l2": round(relative, 6), "max_abs": round(peak, 6), "inputs": f"random normal, sample {shape}, "
            "timestep 500, two draws", "against": "the fp32 ONNX graph"}


class _NoPreprocessAdvice(logging.Filter):
    """onnxruntime.quantization advises its pre-processing on the root logger; it is for calibrated (static)
    quantization of CNNs, not this dynamic MatMul-only one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def quantize_unet(unet: Path, log: Callable[[str], object] = print, threads: int | None = None,
                  multiple: int = 8) -> dict:
    """Replace `unet`/model.onnx (and its external weights) by the int8 UNet; returns the manifest record."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = unet / "model.onnx"
    before = unet_bytes(unet)
    log(f"quantizing the UNet to int8 ({before / GIB:.2f} GiB fp32)")
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=unet) as work:
        raw = Path(work) / "model.onnx"
        large = (unet / EXTERNAL_DATA).is_file()
        advice = _NoPreprocessAdvice()
        logging.getLogger().addFilter(advice)
        try:
            quantize_dynamic(source, raw, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             per_channel=False, use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
        except Exception as exc:  # onnxruntime.quantization raises assorted errors on graphs it cannot handle
            raise ExportError(f"int8 quantization of the UNet failed: {first_line(exc)}") from None
        finally:
            logging.getLogger().removeFilter(advice)
        quantized = sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                        for n in onnx.load(str(raw), load_external_data=False).graph.node)
        if not quantized:
            raise ExportError("int8 quantization of the UNet found no MatMul with a constant weight to quantize")
        final = Path(work) / "final" / "model.onnx"
        final.parent.mkdir()
        save_checked(raw, final)
        deviation = measure_deviation(source, final, multiple, threads)
        for old in (source, unet / EXTERNAL_DATA):
            old.unlink(missing_ok=True)
        for new in final.parent.iterdir():
            os.replace(new, unet / new.name)
    after = unet_bytes(unet)
    log(f"  unet: {quantized} MatMul/Gemm weights int8, {after / GIB:.2f} GiB; against fp32: relative L2 "
        f"{deviation['relative_l2']:.3g}, max |int8 - fp32| {deviation['max_abs']:.3g}")
    return {"mode": "int8", "method": METHOD, "matmuls": quantized, "bytes": {"fp32": before, "int8": after},
            "deviation": deviation}


def quantize_folder(src: Path, out: Path, mode: str = "int8", log: Callable[[str], object] = print,
                    threads: int | None = None, check_memory: bool = True) -> dict:
    """Write `out`: a copy of the exported folder `src` with its UNet quantized; returns the new manifest.

    `out` appears only when everything succeeded (a hidden sibling renamed at the end), as an export's does.
    """
    if mode not in QUANTIZE_MODES:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    src, out = Path(src), Path(out)
    manifest = read_json(src / MANIFEST)
    unet_entry = manifest.get("models", {}).get("unet", {})
    if "quantization" in unet_entry:
        raise ExportError(f"{src}'s UNet is quantized already ({unet_entry['quantization'].get('mode')}); "
                          "quantize its fp32 export")
    if unet_entry.get("dtype") != "float32":
        raise ExportError(f"{src}'s UNet is {unet_entry.get('dtype')}; int8 quantization starts from a float32 "
                          "export (without --fp16)")
    if check_memory:
        check_quantize_memory(unet_bytes(src / "unet"))
    with output_folder(out) as tmp:
        for item in src.iterdir():
            if item.name == "unet":
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, ignore=shutil.ignore_patterns("*.fused.onnx", "tensorrt"))
            elif item.name != MANIFEST:
                shutil.copy2(item, tmp / item.name)
        (tmp / "unet").mkdir()
        for item in (src / "unet").iterdir():
            if item.is_file() and not item.name.endswith(".fused.onnx"):
                shutil.copy2(item, tmp / "unet" / item.name)
        record = quantize_unet(tmp / "unet", log, threads, int(manifest.get("latent_size_multiple", 8)))
        manifest["models"]["unet"]["quantization"] = record
        manifest["quantized_from"] = str(src)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out}")
    return manifest
