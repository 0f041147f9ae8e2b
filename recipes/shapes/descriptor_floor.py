"""How far can any generation's sim95 fall under a descriptor, on the shipped model's data?

    python recipes/shapes/descriptor_floor.py [--threads 1]

A generator that copies nothing still makes images like its training data, and their top-1 similarity to the
20,020 training images is the floor a mitigation cannot go below. This scores held-out images of the data
generator (never trained on: they copy nothing) and the duplicated images (copies), both degraded as the VAE
degrades generations (memorization.py's descriptor check), under the edge descriptor at several blurs and
poolings, and prints the largest sim95 cut any non-copying generator could show: 1 − non-copy p95 / copy
median. Data only: no model runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # memorization.py's descriptor check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--held-out", type=int, default=2000)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # before numpy loads

    import memorizing_data as data
    import numpy as np
    from memorization import descriptor_check, training_images

    from basinguard.evaluation import EdgeDescriptor

    train = training_images()
    held_out = np.stack([data.render(s) for s in data.varied_samples(args.held_out, seed=99)]).astype(np.float32) / 255
    print("| descriptor | non-copy p50 | non-copy p95 | copy median | largest possible sim95 cut |\n|---|---:|---:|---:|---:|")
    for sigma in (0.5, 1.0, 2.0):
        for pool in (1, 2, 4):
            descriptor = EdgeDescriptor(sigma=sigma, pool=pool)
            check = descriptor_check(descriptor, descriptor(train), train, held_out)
            p95, copy = check["non_copies"]["p95"], check["copies"]["p50"]
            shipped = " (shipped)" if (sigma, pool) == (1.0, 2) else ""
            print(f"| edges σ {sigma} pool {pool}{shipped} | {check['non_copies']['p50']:.3f} | {p95:.3f} | {copy:.3f} "
                  f"| {100 * (1 - p95 / copy):.0f} % |", flush=True)


if __name__ == "__main__":
    main()
