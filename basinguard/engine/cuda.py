"""The CUDA runtime as the TensorRT backend needs it: cuda-python's runtime module, libcudart from NVIDIA's wheels
for polygraphy, the current device, and what a CUDA error says about the driver. cuda-python and polygraphy are
imported inside functions only: this module imports on machines without them."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from basinguard.engine.base import EngineError

# One working set per CUDA major: TensorRT, cuda-python and onnxruntime-gpu built for the same CUDA.
INSTALL_HINT = ("pip install 'basinguard[tensorrt-cu12]' (CUDA 12 driver) or 'basinguard[tensorrt-cu13]' (CUDA 13 "
                "driver; nvidia-smi shows the driver's CUDA version), on a machine with an NVIDIA GPU")


def import_cudart() -> ModuleType:
    """cuda-python's runtime module: cuda.bindings.runtime, or cuda.cudart before cuda-python 12.6. Imported by name:
    it is a compiled module, whose names pyright cannot see, so it is typed as a plain module."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        try:
            return importlib.import_module("cuda.cudart")
        except ImportError as exc:
            raise EngineError(f"cuda-python is not installed ({exc}); {INSTALL_HINT}") from None


def _cudart_in_wheels() -> dict[int, Path]:
    """libcudart from NVIDIA's CUDA runtime wheels, by CUDA major, in every folder the `nvidia` namespace spans:
    nvidia-cuda-runtime-cu12 puts it in nvidia/cuda_runtime/lib, nvidia-cuda-runtime 13 in nvidia/cu13/lib."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return {}
    found: dict[int, Path] = {}
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        for lib in sorted(Path(root).glob("*/lib/libcudart.so.*")):
            if (major := re.fullmatch(r"libcudart\.so\.(\d+)", lib.name)) is not None:
                found.setdefault(int(major.group(1)), lib)
    return found


def _tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheels are built for (tensorrt-cu12 / tensorrt-cu13), or None."""
    for major in (13, 12):
        for dist in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}-bindings", f"tensorrt-cu{major}"):
            try:
                importlib.metadata.distribution(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            return major
    return None


def cudart_load_problem(exc: OSError) -> str:
    return (f"cannot load the CUDA runtime library libcudart ({exc}); install it with the CUDA set that matches the "
            f"driver ({INSTALL_HINT}), or put the folder holding libcudart.so.* on LD_LIBRARY_PATH")


def polygraphy_cuda() -> Any:
    """polygraphy's CUDA wrapper (its runners' streams and buffers), with libcudart from the CUDA runtime wheel of
    TensorRT's CUDA major when one is installed.

    polygraphy 0.53 looks for libcudart.so* on LD_LIBRARY_PATH, in /usr/local/cuda/lib64, /usr/lib, /lib and
    nvidia/cuda_runtime/lib (the CUDA 12 wheel), then falls back to loading "libcudart.so" by name: it misses
    nvidia-cuda-runtime 13's nvidia/cu13/lib, and without a CUDA toolkit the fallback raises OSError. It reads
    LD_LIBRARY_PATH first (from os.environ, when the wrapper is first made), so the wheel's folder goes there for
    that moment; the loader itself never re-reads it. A toolkit of another CUDA major is not used over the wheel."""
    from polygraphy import cuda as polygraphy_cuda_module

    major = _tensorrt_cuda_major()
    lib = _cudart_in_wheels().get(major) if major is not None else None
    before = os.environ.get("LD_LIBRARY_PATH")
    if lib is not None:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib.parent), *([before] if before else [])])
    try:
        return polygraphy_cuda_module.wrapper()
    except OSError as exc:
        raise EngineError(cudart_load_problem(exc)) from None
    finally:
        if lib is not None:
            if before is None:
                os.environ.pop("LD_LIBRARY_PATH", None)
            else:
                os.environ["LD_LIBRARY_PATH"] = before


class CudaError(EngineError):
    """A failed CUDA runtime call; `out_of_memory` tells an allocation failure apart."""

    def __init__(self, message: str, out_of_memory: bool = False):
        super().__init__(message)
        self.out_of_memory = out_of_memory


class Cuda:
    """cuda-python's runtime API with its (error, *values) tuples turned into values or a CudaError."""

    def __init__(self) -> None:
        self.rt = import_cudart()

    def __call__(self, what: str, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            text = self.rt.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise CudaError(f"CUDA {what} failed: {name} ({text})",
                            out_of_memory=err == self.rt.cudaError_t.cudaErrorMemoryAllocation)
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def device(self) -> tuple[str, str, int, int]:
        """(name, compute capability, free bytes, total bytes) of the current device."""
        dev = self("cudaGetDevice", self.rt.cudaGetDevice())
        prop = self("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(dev))
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        free, total = self("cudaMemGetInfo", self.rt.cudaMemGetInfo())
        return name, f"{prop.major}.{prop.minor}", int(free), int(total)


def _cuda_version(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"  # CUDA's 1000 * major + 10 * minor


def driver_hint(cuda: Cuda) -> str:
    """What cudaErrorInsufficientDriver means on this machine. CUDA reports it both when there is no NVIDIA driver
    at all and when the driver is older than the runtime; cudaDriverGetVersion tells them apart (0: no driver)."""
    rt = cuda.rt
    try:
        driver = int(cuda("cudaDriverGetVersion", rt.cudaDriverGetVersion()))
        runtime = int(cuda("cudaRuntimeGetVersion", rt.cudaRuntimeGetVersion()))
    except CudaError:
        driver, runtime = -1, 0
    if driver == 0:
        return ("no NVIDIA driver is installed here (CUDA finds none): install the NVIDIA driver, or give the "
                "container GPU access (docker run --gpus all); nvidia-smi must work")
    if driver > 0 and runtime > driver:
        return (f"this NVIDIA driver supports CUDA up to {_cuda_version(driver)}, the installed CUDA packages are "
                f"CUDA {_cuda_version(runtime)}: install the set for the driver's CUDA version, e.g. pip install "
                "'basinguard[tensorrt-cu12]' for a CUDA 12 driver, or update the driver")
    return "the NVIDIA driver is too old for the installed CUDA packages, or not loaded (nvidia-smi)"


def cuda_device() -> tuple[str, str]:
    """(name, compute capability) of the current GPU; an EngineError saying why there is none."""
    cuda = Cuda()
    try:
        name, cc, _, _ = cuda.device()
    except CudaError as exc:
        hint = "check the GPU is visible (nvidia-smi, CUDA_VISIBLE_DEVICES) and the NVIDIA driver is loaded"
        if "InsufficientDriver" in str(exc):
            hint = driver_hint(cuda)
        raise EngineError(f"no usable CUDA device: {exc}; {hint}") from None
    return name, cc


