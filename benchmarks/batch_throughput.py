"""Batch-job throughput per batch size: the full job (packing, PNG + manifest writes with fsync) against bare
`Pipeline.generate` calls on the same images, so the job's own overhead is visible.

    python benchmarks/batch_throughput.py --model DIR --batch-sizes 1,2,4,8 --images 32 --steps 20 \
        [--policy cfg|og-dtp|auto --detect-threshold T] [--provider cpu|cuda|tensorrt] [--threads N] [--json out.json]

Each batch size gets a fresh OUT_DIR and one warm-up batch first (ORT allocates per shape on first use).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from basinguard.batch.job import BatchJob, run_batch
from basinguard.batch.output import generate_batch
from basinguard.batch.prompts import pack, read_prompts
from basinguard.cli import model_dir
from basinguard.runtime.guidance import PolicyConfig
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

PROMPTS = ["a red circle on a blue background", "a small green square at the top", "a yellow triangle on the left",
           "a purple cross in the center", "a big orange circle", "a white square on black"]


def measure(pipe: Pipeline, sampling: SamplingConfig, images: int, batch_size: int, work: Path) -> dict:
    prompts = work / f"prompts-{batch_size}.txt"
    prompts.write_text("".join(PROMPTS[k % len(PROMPTS)] + "\n" for k in range(images)))
    batches = pack(read_prompts(prompts, pipe.spec, sampling).tasks, batch_size)
    generate_batch(pipe, batches[0])  # warm-up at this batch shape

    start = time.perf_counter()
    for batch in batches:
        generate_batch(pipe, batch)
    bare = time.perf_counter() - start

    summary = run_batch(BatchJob(prompts, work / f"out-{batch_size}", sampling, batch_size=batch_size,
                                 progress=False), pipe)
    return {"batch_size": batch_size, "images": images, "bare_images_per_s": images / bare,
            "job_images_per_s": summary.images_per_second, "job_overhead_s_per_image": (summary.seconds - bare) / images}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--policy", default="cfg")
    ap.add_argument("--detect-threshold", type=float, default=None)
    ap.add_argument("--json", help="write the results here as well")
    ap.add_argument("--static-shapes", action="store_true", help="shape-specialised UNet sessions (CPU)")
    args = ap.parse_args()

    pipe = Pipeline(model_dir(args.model), provider=args.provider, threads=args.threads, static_shapes=args.static_shapes)
    sampling = SamplingConfig(steps=args.steps, policy=PolicyConfig(args.policy, detect_threshold=args.detect_threshold))
    rows = []
    print(f"{'batch':>5} {'bare img/s':>11} {'job img/s':>10} {'job overhead ms/img':>20}")
    with tempfile.TemporaryDirectory(prefix="basinguard-bench-") as tmp:
        for size in (int(s) for s in args.batch_sizes.split(",")):
            row = measure(pipe, sampling, args.images, size, Path(tmp))
            rows.append(row)
            print(f"{size:>5} {row['bare_images_per_s']:>11.2f} {row['job_images_per_s']:>10.2f} "
                  f"{1000 * row['job_overhead_s_per_image']:>20.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(pipe.folder.path), "provider": args.provider,
                                               "threads": args.threads, "static_shapes": args.static_shapes,
                                               "steps": args.steps, "policy": args.policy, "images": args.images,
                                               "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
