"""Loaded models behind one small interface: named numpy arrays in, named numpy arrays out."""

from __future__ import annotations

from pathlib import Path

from basinguard.engine.base import EngineError, LoadedModel, TensorSpec

__all__ = ["EngineError", "LoadedModel", "TensorSpec", "load_model", "PROVIDER_NAMES"]

PROVIDER_NAMES = ("cpu", "cuda", "tensorrt")


def load_model(path: Path, provider: str = "cpu", threads: int | None = None) -> LoadedModel:
    """Load `path` (an .onnx file) on `provider`; ONNX Runtime is imported only here, when needed."""
    from basinguard.engine.ort import OrtModel

    return OrtModel(Path(path), provider=provider, threads=threads)
