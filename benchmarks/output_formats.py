"""Batch throughput per output format: the same job written as loose files, WebDataset tar shards and parquet shards,
on one loaded pipeline, in rounds that alternate the formats (so machine noise falls on all of them alike).

    python benchmarks/output_formats.py [--model DIR] [--images 48] [--steps 10] [--batch-size 8] \
        [--shard-size 100] [--image-format png|jpeg|webp] [--rounds 3] [--threads 1] [--json out.json]

Reports per format the median images/s of the whole job (generation, encoding with provenance metadata, writes with
fsync, manifest appends), its ratio to `files`, and the files the job leaves in OUT_DIR (lock and manifest included)
and their bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from basinguard.batch.job import BatchJob, run_batch
from basinguard.batch.output import OutputSettings
from basinguard.cli import model_dir
from basinguard.outputs.images import ImageOptions
from basinguard.outputs.shards import OUTPUT_FORMATS
from basinguard.runtime.pipeline import Pipeline
from basinguard.runtime.settings import SamplingConfig

PROMPTS = ["a red circle on a blue background", "a small green square at the top", "a yellow triangle on the left",
           "a purple cross in the center", "a big orange circle", "a white square on black"]


def run(pipe: Pipeline, work: Path, name: str, sampling: SamplingConfig, images: int, args: argparse.Namespace,
        output_format: str) -> dict:
    prompts = work / "prompts.txt"
    prompts.write_text("".join(PROMPTS[k % len(PROMPTS)] + "\n" for k in range(images)))
    identity = pipe.spec.identity
    options = ImageOptions(model_name=Path(identity["path"]).name, model_hash=identity["id"])
    output = OutputSettings(args.image_format, output_format, args.shard_size, options)
    out = work / name
    summary = run_batch(BatchJob(prompts, out, sampling, batch_size=args.batch_size, progress=False, output=output),
                        pipe)
    files = [p for p in out.iterdir() if p.is_file()]
    return {"images_per_s": summary.images_per_second, "files": len(files),
            "bytes": sum(p.stat().st_size for p in files)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--image-format", choices=("png", "jpeg", "webp"), default="png")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    pipe = Pipeline(model_dir(args.model), threads=args.threads)
    sampling = SamplingConfig(steps=args.steps)
    results: dict[str, list[dict]] = {f: [] for f in OUTPUT_FORMATS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # ORT allocates per shape on first use, and pyarrow imports pandas on its first table: outside the timings
        for output_format in OUTPUT_FORMATS:
            run(pipe, work, f"warm-up-{output_format}", sampling, args.batch_size, args, output_format)
        for round_ in range(args.rounds):
            for output_format in OUTPUT_FORMATS:
                results[output_format].append(run(pipe, work, f"{output_format}-{round_}", sampling, args.images,
                                                  args, output_format))
    base = statistics.median(r["images_per_s"] for r in results["files"])
    rows = []
    print(f"{args.images} images, {args.steps} steps, batch {args.batch_size}, {args.image_format}, shards of "
          f"{args.shard_size}, median of {args.rounds} rounds")
    print(f"{'format':<12}{'images/s':>10}{'vs files':>10}{'files':>8}{'MB':>8}")
    for output_format, runs in results.items():
        speed = statistics.median(r["images_per_s"] for r in runs)
        row = {"format": output_format, "images_per_s": speed, "vs_files": speed / base, "files": runs[0]["files"],
               "bytes": runs[0]["bytes"], "rounds_images_per_s": [r["images_per_s"] for r in runs]}
        rows.append(row)
        each = " ".join(f"{r['images_per_s']:.2f}" for r in runs)
        print(f"{output_format:<12}{speed:>10.2f}{speed / base:>10.3f}{row['files']:>8}{row['bytes'] / 1e6:>8.2f}"
              f"   rounds: {each}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
