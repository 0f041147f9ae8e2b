"""Loaded models behind one small interface: named numpy arrays in, named numpy arrays out."""

from __future__ import annotations

from pathlib import Path

from basinguard.engine.base import EngineError, LoadedModel, TensorSpec

__all__ = ["EngineError", "LoadedModel", "TensorSpec", "load_model", "PROVIDER_NAMES"]

PROVIDER_NAMES = ("cpu", "cuda", "tensorrt")


def load_model(path: Path, provider: str = "cpu", threads: int | None = None, static_shapes: bool = False) -> LoadedModel:
    """Load `path` (an .onnx file) on `provider`; backends are imported only here, when needed.

    "tensorrt": the native TensorRT backend when tensorrt is installed and `basinguard build-engines` built
    plans for this file, GPU and TensorRT version (each call runs on a plan whose profiles cover its shapes); else
    ONNX Runtime's TensorRT EP; else an error naming what to install. The model's `provider` says which ran
    ("tensorrt" or "ort-tensorrt"). `static_shapes`: see `OrtModel` (CPU only; TensorRT plans carry their own shape
    profiles). On "cuda" (and ORT's TensorRT EP) read-only inputs stay on the GPU between calls (`DeviceBinding`).
    """
    if provider == "tensorrt":
        from basinguard.engine.tensorrt import load_tensorrt

        return load_tensorrt(Path(path), threads=threads)
    from basinguard.engine.ort import OrtModel

    return OrtModel(Path(path), provider=provider, threads=threads, static_shapes=static_shapes)
