"""The one contract every backend implements: named numpy arrays in, named numpy arrays out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from basinguard.engine.fusion import is_fusion_cache
from basinguard.errors import BasinguardError


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the model file declares it."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # str/None: a dynamic axis

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def takes_one(self) -> bool:
        """A scalar or (1,) input (some exporters' timestep), fed one value for the whole batch."""
        return self.rank == 0 or (self.rank == 1 and self.shape[0] == 1)


class LoadedModel(Protocol):
    """A loaded model of any backend (ONNX Runtime, TensorRT)."""

    name: str
    provider: str  # the backend that actually runs it, recorded in traces and manifests
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class EngineError(BasinguardError, RuntimeError):
    """A model file that cannot be loaded or run; the message names the file and the cause."""


def conform(spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """Cast `value` to what the model declares, and fit a batch vector to a scalar or (1,) input.

    Exporters disagree on the UNet's `timestep`: optimum declares a float scalar or (1,) vector,
    others an int64 or float per-sample vector. The runtime always passes a per-sample vector;
    a model that takes one value gets it when all samples share it (they always do here).
    """
    value = np.asarray(value)
    if spec.takes_one:
        if value.size > 1 and not np.all(value == value.flat[0]):
            raise EngineError(f"input {spec.name!r} takes a single value but got differing values {value.tolist()}")
        value = value.reshape(-1)[:1].reshape(() if spec.rank == 0 else (1,))
    return value.astype(spec.dtype, copy=False)


def onnx_files(onnx_path: Path) -> list[Path]:
    """The ONNX file and its external data: every regular file beside it except JSON configs, hidden and
    temporary files, and the CPU backend's fused-attention cache (`model.fused.onnx`, derived from model.onnx and
    written by a CPU load: counting it would change a model's identity and its TensorRT plan keys after one CPU run).

    Exporters name external data differently (model.onnx_data, model.onnx.data, weights.pb); taking the whole
    folder (not sub-folders, where ORT's TensorRT cache may live) needs no ONNX parser and misses none. The one
    rule for model identities (runtime.model_folder) and plan keys (engine.tensorrt).
    """
    onnx_path = Path(onnx_path)
    siblings = [p for p in sorted(onnx_path.parent.iterdir()) if p != onnx_path and p.is_file()
                and not p.name.startswith(".") and p.suffix not in (".json", ".tmp", ".partial")
                and not is_fusion_cache(p)]
    return [onnx_path, *siblings]
