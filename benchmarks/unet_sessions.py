"""One UNet file, several ways of running it in ONNX Runtime, calls alternated in one process.

    python benchmarks/unet_sessions.py [--batch 8] [--calls 60] [--threads 1] [--model DIR]

Is basinguard's session (attention fusion, shape-specialised sessions) faster or slower than a plain ONNX
Runtime session with default options (what optimum opens) on the same file? Each round calls every variant
once, in turn, with the same inputs, so the VM's drift hits them alike; prints median and 10th-percentile ms.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from basinguard.cli import SHIPPED_MODEL
from basinguard.engine.ort import OrtModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL, help="an exported ONNX folder")
    ap.add_argument("--batch", type=int, default=8, help="UNet batch (2N under CFG)")
    ap.add_argument("--calls", type=int, default=60, help="timed rounds")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    path = args.model / "unet" / "model.onnx"
    options = ort.SessionOptions()  # ORT's defaults with the thread counts pinned, as compare.py opens optimum's
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ours = {
        "basinguard, unfused": OrtModel(path, threads=args.threads, fuse_attention=False),
        "basinguard (fused attention)": OrtModel(path, threads=args.threads),
        "basinguard, fused + static shapes": OrtModel(path, threads=args.threads, static_shapes=True),
    }
    spec = ours["basinguard, unfused"].inputs
    rng = np.random.default_rng(0)
    sample = spec["sample"].shape
    latent = [d if isinstance(d, int) else 8 for d in sample[2:]]  # dynamic spatial axes: the shipped model's 8×8
    feed = {"sample": rng.standard_normal((args.batch, sample[1], *latent), np.float32),
            "timestep": np.full(args.batch, 500, np.float32),
            "encoder_hidden_states": rng.standard_normal((args.batch, *spec["encoder_hidden_states"].shape[1:]), np.float32)}
    plain_feed = {i.name: feed[i.name].astype(spec[i.name].dtype) for i in plain.get_inputs()}
    calls = {"plain ORT session (optimum's options)": lambda: plain.run(None, plain_feed)}
    calls |= {name: (lambda m=model: m.run(feed)) for name, model in ours.items()}
    for call in calls.values():
        for _ in range(5):  # warm-up; also builds the shape-specialised session
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.calls):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    print(f"{path}, batch {args.batch}, {args.threads} thread(s), {args.calls} alternating rounds")
    for name, values in times.items():
        print(f"  {name:38s} median {np.median(values) * 1e3:6.2f} ms   p10 {np.percentile(values, 10) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
