"""`LoadedModel` over a torch UNet, so basinguard's NumPy runtime (denoise, schedulers, policies) drives torch.

Benchmark-only: the runtime itself never imports torch. Each call copies the NumPy inputs to the device,
runs the module under inference_mode, and copies the output back; the three parts are timed separately
(synchronising the device around the compute), so a report can show what the host round trip of the UNet
output costs next to the UNet itself.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from basinguard.engine.base import TensorSpec


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor over `a`; the runtime marks its loop constants read-only, which torch cannot wrap: copied."""
    return torch.from_numpy(np.require(a, np.float32, ["C", "W"]))


class TorchUNetModel:
    """A UNet module (diffusers' UNet2DConditionModel or benchmarks/sd_unet.SDUNet) as a LoadedModel."""

    name = "unet"

    def __init__(self, module: torch.nn.Module, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 in_channels: int = 4, context_dim: int = 768):
        self.module = module.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.provider = f"torch-{self.device.type}"
        f32 = np.dtype(np.float32)
        self.inputs = {"sample": TensorSpec("sample", f32, (None, in_channels, None, None)),
                       "timestep": TensorSpec("timestep", f32, (None,)),
                       "encoder_hidden_states": TensorSpec("encoder_hidden_states", f32, (None, None, context_dim))}
        self.outputs = {"out_sample": TensorSpec("out_sample", f32, (None, in_channels, None, None))}
        self.seconds: dict[str, float] = defaultdict(float)  # h2d, compute, d2h
        self.calls: dict[int, int] = defaultdict(int)  # batch size → calls
        self.batch_seconds: dict[int, float] = defaultdict(float)  # batch size → compute seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

        t0 = time.perf_counter()
        x = _tensor(inputs["sample"]).to(self.device, self.dtype)
        t = _tensor(inputs["timestep"]).to(self.device)
        e = _tensor(inputs["encoder_hidden_states"]).to(self.device, self.dtype)
        self._sync()
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.module(x, t, e)
        out = getattr(out, "sample", out)  # diffusers returns an output object, SDUNet a tensor
        self._sync()
        t2 = time.perf_counter()
        host = out.float().cpu().numpy()  # the round trip the NumPy runtime pays every step
        t3 = time.perf_counter()
        n = len(host)
        self.seconds["h2d"] += t1 - t0
        self.seconds["compute"] += t2 - t1
        self.seconds["d2h"] += t3 - t2
        self.calls[n] += 1
        self.batch_seconds[n] += t2 - t1
        return {"out_sample": host}

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.batch_seconds.clear()
