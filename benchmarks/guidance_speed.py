"""Whole generations, prompt to decoded image, on one exported folder: optimum's ORTStableDiffusionPipeline with
plain CFG against basinguard's Pipeline with cfg, stp (τ 500, s_pre 0) and dtp, each also with an end of guidance.

    python benchmarks/guidance_speed.py ONNX_DIR [--steps 25] [--size 512] [--end-t 200] [--threads 2] [--rounds 1]

Both run the same ONNX files with DPM-Solver++ 2M and Karras sigmas (diffusers' DPMSolverMultistepScheduler with
use_karras_sigmas for optimum; `dpm++2m-karras` for ours), λ 7.5, the same latents and prompt, in one process at
`--threads` (ONNX Runtime intra-op threads, one inter-op thread; torch's too, which runs optimum's scheduler).
Contenders run one after another, the order rotated each round, after one 2-step warm-up generation each. Ratios
are optimum's cfg time over each contender's (> 1: faster than optimum). Goals: stp with an end of guidance
>= 1.4x, dtp with an end of guidance >= 1.15x, plain cfg >= 1.05x. Results are appended to --out as JSON lines.
Full-size folders take minutes per generation: run it alone on the machine; never in CI.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on mars"
GOALS = {"stp-end": 1.4, "dtp-end": 1.15, "cfg": 1.05}


def optimum_pipeline(folder: Path, threads: int) -> Any:
    import onnxruntime as ort
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    torch.set_num_threads(threads)
    options = ort.SessionOptions()  # optimum's default is ORT's defaults; only the thread counts are pinned
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, export=False, provider="CPUExecutionProvider",
                                                      session_options=options)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_dir", type=Path)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--end-t", type=int, default=200, help="the end of guidance of the -end rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance_speed.jsonl"))
    args = p.parse_args()

    from basinguard.runtime.pipeline import Pipeline

    ours = Pipeline(args.onnx_dir, threads=args.threads)
    theirs = optimum_pipeline(args.onnx_dir, args.threads)
    factor = ours.folder.vae_scale_factor
    latents = ours.spec.initial_latents([0], args.size, args.size)
    common = {"scheduler": "dpm++2m-karras", "height": args.size, "width": args.size, "guidance_scale": 7.5}
    settings = {"cfg": {"policy": "cfg"}, "stp-end": {"policy": "stp", "transition_t": 500, "pre_scale": 0.0},
                "dtp-end": {"policy": "dtp", "pre_scale": 0.0}}
    for name in ("stp-end", "dtp-end"):
        settings[name]["guidance_end_t"] = args.end_t

    def run(name: str, steps: int) -> float:
        start = time.perf_counter()
        if name == "optimum-cfg":
            import torch

            theirs(PROMPT, latents=torch.from_numpy(latents), num_inference_steps=steps, guidance_scale=7.5,
                   height=args.size, width=args.size, output_type="np")
        else:
            ours.generate([PROMPT], latents=latents, steps=steps, **common, **settings[name])
        return time.perf_counter() - start

    names = ["optimum-cfg", *settings]
    for name in names:  # warm-up: sessions' first calls, arenas
        run(name, 2)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds[name].append(run(name, args.steps))
            print(f"round {r} {name}: {seconds[name][-1]:.1f} s", flush=True)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    speedup = {name: round(median["optimum-cfg"] / median[name], 3) for name in settings}
    record = {"date": time.strftime("%Y-%m-%d"), "onnx_dir": str(args.onnx_dir), "steps": args.steps,
              "size": args.size, "latent": [int(v) for v in latents.shape[1:]], "factor": factor,
              "end_t": args.end_t, "threads": args.threads, "rounds": args.rounds, "seconds": seconds,
              "median_s": median, "speedup_vs_optimum_cfg": speedup,
              "goals": {name: {"goal": goal, "met": speedup[name] >= goal} for name, goal in GOALS.items()},
              "machine": {"platform": platform.platform(), "processor": platform.processor()},
              "versions": {"numpy": np.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    for name, value in speedup.items():
        print(f"{name}: {value}x optimum's cfg (goal >= {GOALS[name]}: {'met' if value >= GOALS[name] else 'MISSED'})")


if __name__ == "__main__":
    main()
