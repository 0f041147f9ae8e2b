"""What one numpy call costs right after a UNet call (the goal: "other" ≤ 2 % of wall time).

The denoising loop's glue (CFG subtract, d, combine, scheduler step) works on a few hundred floats at batch 1 on
the shipped model, yet measures 200-400 µs a step. This script shows why: after an ONNX Runtime UNet call has
streamed the weights through the caches, the first numpy call pays tens of µs, a repeat of the same call a few.
Each row runs the UNet (CFG pair at batch 1, on the session `Pipeline` would use), then times the listed calls
one by one; medians over alternating rounds.

    python benchmarks/cold_glue.py --threads 1 --rounds 60
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from basinguard.cli import SHIPPED_MODEL
from basinguard.engine import load_model


def sequences(buf: np.ndarray) -> dict[str, list[tuple[str, Callable[[np.ndarray], object]]]]:
    """Named call sequences on the UNet output `eps` (2, C, H, W); `buf` is scratch of one sample's shape."""
    norm = np.empty(1, np.float32)

    def sub(eps: np.ndarray) -> object:
        return np.subtract(eps[1:], eps[:1], out=buf)

    def flat(_: np.ndarray) -> np.ndarray:
        return buf.reshape(1, -1)

    return {
        "perf_counter only": [],
        "subtract, subtract again": [("subtract", sub), ("same subtract", sub)],
        "subtract, multiply, add": [("subtract", sub), ("multiply", lambda e: np.multiply(buf, 7.5, out=buf)),
                                    ("add", lambda e: np.add(e[:1], buf, out=buf))],
        "subtract, vecdot, sqrt": [("subtract", sub), ("vecdot", lambda e: np.vecdot(flat(e), flat(e), out=norm)),
                                   ("sqrt", lambda e: np.sqrt(norm, out=norm))],
        "subtract, square, sum": [("subtract", sub), ("square", lambda e: np.square(buf)),
                                  ("sum", lambda e: buf.sum(axis=(1, 2, 3)))],
        "python dict(zip), subtract": [("dict(zip)", lambda e: dict(zip(("out",), (e,), strict=True))),
                                       ("subtract", sub)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    unet = load_model(args.model / "unet" / "model.onnx", "cpu", args.threads)
    spec = unet.inputs
    channels = spec["sample"].shape[1]
    size = 8 if not isinstance(spec["sample"].shape[2], int) else spec["sample"].shape[2]
    seq_len, width = spec["encoder_hidden_states"].shape[1:]
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, channels, size, size), dtype=np.float32),
            "timestep": np.full(2, 500, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, seq_len, width), dtype=np.float32)}
    buf = np.empty((1, channels, size, size), np.float32)
    plans = sequences(buf)

    def one(calls: list[tuple[str, Callable[[np.ndarray], object]]]) -> list[float]:
        eps = next(iter(unet.run(feed).values()))
        times = [time.perf_counter()]
        for _, call in calls:
            call(eps)
            times.append(time.perf_counter())
        return list(np.diff(times)) if calls else [time.perf_counter() - times[0]]

    for _ in range(3):  # warm-up
        for calls in plans.values():
            one(calls)
    rows: dict[str, list[list[float]]] = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, calls in plans.items():
            rows[name].append(one(calls))
    print(f"µs per call right after a UNet call ({args.model.name}, batch 2, {args.threads} thread(s)); "
          f"medians of {args.rounds} rounds")
    for name, calls in plans.items():
        med = np.median(np.array(rows[name]), axis=0) * 1e6
        labels = [label for label, _ in calls] or ["perf_counter"]
        print(f"  {name:28s} " + "  ".join(f"{label} {m:5.1f}" for label, m in zip(labels, med, strict=True)))


if __name__ == "__main__":
    main()
