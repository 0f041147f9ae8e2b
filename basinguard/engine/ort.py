"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind `LoadedModel`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from basinguard.engine.base import EngineError, TensorSpec, conform

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _specs(args: list) -> dict[str, TensorSpec]:
    specs = {}
    for a in args:
        if a.type not in _ORT_DTYPES:
            raise EngineError(f"unsupported tensor type {a.type} for {a.name!r}")
        shape = tuple(d if isinstance(d, int) else None for d in a.shape)
        specs[a.name] = TensorSpec(a.name, np.dtype(_ORT_DTYPES[a.type]), shape)
    return specs


def session_options(threads: int | None) -> ort.SessionOptions:
    """Sequential execution, full graph optimisation; `threads` caps intra-op threads (None: ORT's default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return opts


def provider_list(provider: str, cache_dir: Path | None = None) -> list:
    """ORT provider names (with options) for `provider`; a clear error when this build lacks it."""
    if provider not in PROVIDERS:
        raise EngineError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        extra = "basinguard[gpu] (onnxruntime-gpu)" if provider != "cpu" else "onnxruntime"
        raise EngineError(f"provider {provider!r} needs {wanted[0]}, which this onnxruntime build lacks "
                          f"(it has: {', '.join(available)}); install {extra}")
    providers: list = []
    for name in wanted:
        if name == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": True}
            if cache_dir is not None:
                opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                         "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}
            providers.append((name, opts))
        elif name == "CUDAExecutionProvider":
            providers.append((name, {"cudnn_conv_algo_search": "HEURISTIC"}))
        else:
            providers.append(name)
    return providers


class OrtModel:
    """One ONNX model in an ONNX Runtime session."""

    def __init__(self, path: Path, provider: str = "cpu", threads: int | None = None, name: str | None = None):
        path = Path(path)
        self.name = name or path.parent.name
        if not path.is_file():
            raise EngineError(f"model file not found: {path}")
        cache = path.parent / "trt_cache" if provider == "tensorrt" else None
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=provider_list(provider, cache))
        except EngineError:
            raise
        except Exception as exc:  # ORT raises its own exception types for a corrupt or truncated file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"cannot load {path}: {first}") from None
        self.provider = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
                         "TensorrtExecutionProvider": "tensorrt"}[self.session.get_providers()[0]]
        self.inputs = _specs(self.session.get_inputs())
        self.outputs = _specs(self.session.get_outputs())
        self._output_names = list(self.outputs)
        self._io_binding = self.provider != "cpu"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, spec in self.inputs.items():
            if name not in inputs:
                raise EngineError(f"{self.name}: missing input {name!r} (model takes {', '.join(self.inputs)})")
            feed[name] = conform(spec, inputs[name])
        if self._io_binding:
            # On a GPU provider, bind once per call: inputs are copied in, outputs come back to the host once.
            binding = self.session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in self._output_names:
                binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, values))
