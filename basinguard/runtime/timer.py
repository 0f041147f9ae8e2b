"""Wall time per pipeline stage (text encoder, UNet, scheduler + policy, VAE), as NVIDIA's demo tabulates it."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Wall time and call count per stage; `loop` minus `unet` is the scheduler + policy cost."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds
        self.calls[stage] += 1

    def summary(self) -> dict[str, float]:
        s = dict(self.seconds)
        if "loop" in s:
            s["scheduler+policy"] = s.pop("loop") - s.get("unet", 0.0)
        return s

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
