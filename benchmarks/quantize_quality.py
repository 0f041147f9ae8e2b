"""What the int8 UNet (`basinguard export --quantize int8`) changes in the images and in the method's signals.

    python benchmarks/quantize_quality.py FP32_DIR INT8_DIR [--seeds 2] [--policies cfg,dtp] [--steps S]
                                          [--size PX] [--threads 2] [--out benchmarks/results/quantize_quality.jsonl]

Same prompts, seeds and settings (the model's defaults unless --steps/--size say otherwise) through both folders;
per policy: the pixel difference in 8-bit levels (mean, 99th percentile, max) and PSNR, the first step's d (the
detection signal) relative difference, and how many images switch at another step (dtp's transition). Prompts: the
shipped model's duplicated and novel captions where the folder has them (memorization/), else a fixed list.
The copy rate and alignment under int8 come from benchmarks/memorization.py --model INT8_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a watercolor painting of a lighthouse at dawn",
           "a bowl of ramen on a wooden table, studio lighting", "portrait of an old fisherman, 35mm film"]


def prompts_for(folder: Path) -> list[str]:
    if (folder / "memorization").is_dir():
        from basinguard.demo import load_memorization

        duplicated, _, others = load_memorization(folder)
        captions = [row["caption"] for row in duplicated]
        return captions + others[: len(captions)]
    return PROMPTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fp32", type=Path)
    p.add_argument("int8", type=Path)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--policies", default="cfg,dtp")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="images per generate call")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quantize_quality.jsonl")
    args = p.parse_args()

    from basinguard.runtime.pipeline import Pipeline

    prompts = prompts_for(args.fp32)[: args.prompts]
    jobs = [(prompt, seed) for prompt in prompts for seed in range(args.seeds)]
    size = {} if args.size is None else {"height": args.size, "width": args.size}
    steps = {} if args.steps is None else {"steps": args.steps}
    results = {}
    for policy in args.policies.split(","):
        out: dict[str, list] = {}
        for name, folder in (("fp32", args.fp32), ("int8", args.int8)):
            pipe = Pipeline(folder, threads=args.threads)
            out[name] = []
            for start in range(0, len(jobs), args.batch):
                chunk = jobs[start:start + args.batch]
                out[name] += pipe.generate([c[0] for c in chunk], seeds=[c[1] for c in chunk], policy=policy,
                                           **size, **steps)
            del pipe
        a = np.stack([g.pixels for g in out["fp32"]]).astype(np.float64) * 255
        b = np.stack([g.pixels for g in out["int8"]]).astype(np.float64) * 255
        diff = np.abs(a - b)
        mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
        psnr = 10 * np.log10(255**2 / np.maximum(mse, 1e-12))
        d0 = np.array([[g.trace["gap"][0] for g in out[name]] for name in ("fp32", "int8")], dtype=np.float64)
        d0 = d0[:, ~np.isnan(d0).any(axis=0)]  # None (NaN): no d at the first step (stp before τ with s_pre 0)
        switched = [(f.trace["transition_step"], q.trace["transition_step"]) for f, q in zip(out["fp32"], out["int8"])]
        results[policy] = {
            "images": len(a), "levels_mean": round(float(diff.mean()), 3),
            "levels_p99": round(float(np.percentile(diff, 99)), 2), "levels_max": round(float(diff.max()), 2),
            "psnr_db_median": round(float(np.median(psnr)), 2), "psnr_db_min": round(float(psnr.min()), 2),
            "first_step_d_relative_diff_median": round(float(np.median(np.abs(d0[1] - d0[0]) / d0[0])), 5)
            if d0.size else None,
            "first_step_d_relative_diff_max": round(float(np.max(np.abs(d0[1] - d0[0]) / d0[0])), 5)
            if d0.size else None,
            "transition_step_differs": int(sum(f != q for f, q in switched)),
        }
        print(policy, json.dumps(results[policy]), flush=True)
    record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
              "fp32": str(args.fp32), "int8": str(args.int8), "prompts": len(prompts), "seeds": args.seeds,
              "steps": args.steps, "size": args.size, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
