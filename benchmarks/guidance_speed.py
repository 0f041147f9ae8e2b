"""Whole generations, prompt to decoded image, on one exported folder: optimum's ORTStableDiffusionPipeline (or
ORTStableDiffusionXLPipeline) with plain CFG against basinguard's Pipeline with cfg, stp (τ 500, s_pre 0) and dtp,
each also with an end of guidance.

    python benchmarks/guidance_speed.py ONNX_DIR [--steps 25] [--size 512] [--end-t 200] [--threads 2] [--rounds 1]
                                        [--process-per-contender] [--warmup-steps 2]

Both run the same ONNX files with DPM-Solver++ 2M and Karras sigmas (diffusers' DPMSolverMultistepScheduler with
use_karras_sigmas for optimum; `dpm++2m-karras` for ours), λ 7.5, the same latents and prompt, at `--threads`
(ONNX Runtime intra-op threads, one inter-op thread; torch's too, which runs optimum's scheduler). Contenders run
one after another, the order rotated each round, after one `--warmup-steps`-step warm-up generation each (0: none).
By default all contenders share one process; `--process-per-contender` runs each contender of each round in a
fresh process instead, which SDXL needs on a 24 GiB machine (optimum's and our SDXL sessions do not fit in memory
together). Ratios are optimum's cfg time over each contender's (> 1: faster than optimum). Goals: stp with an end
of guidance >= 1.4x, dtp with an end of guidance >= 1.15x, plain cfg >= 1.05x. Results are appended to --out as
JSON lines. Full-size folders take minutes per generation: run it alone on the machine; never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on mars"
GOALS = {"stp-end": 1.4, "dtp-end": 1.15, "cfg": 1.05}


def optimum_pipeline(folder: Path, threads: int, xl: bool) -> Any:
    import onnxruntime as ort
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    torch.set_num_threads(threads)
    options = ort.SessionOptions()  # optimum's default is ORT's defaults; only the thread counts are pinned
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    cls = ORTStableDiffusionXLPipeline if xl else ORTStableDiffusionPipeline
    pipe = cls.from_pretrained(folder, export=False, provider="CPUExecutionProvider", session_options=options)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def settings(end_t: int) -> dict[str, dict[str, Any]]:
    return {"cfg": {"policy": "cfg"},
            "stp-end": {"policy": "stp", "transition_t": 500, "pre_scale": 0.0, "guidance_end_t": end_t},
            "dtp-end": {"policy": "dtp", "pre_scale": 0.0, "guidance_end_t": end_t}}


class Contenders:
    """Each contender's generation as a function of the step count; a pipeline is loaded at its first use."""

    def __init__(self, args: argparse.Namespace):
        from basinguard.runtime.spec import ModelSpec

        self.args, self.spec = args, ModelSpec(args.onnx_dir)
        self.latents = self.spec.initial_latents([0], args.size, args.size)
        self.ours: Any = None
        self.theirs: Any = None
        self.load_s: dict[str, float] = {}

    def run(self, name: str, steps: int) -> float:
        args = self.args
        start = time.perf_counter()
        if name == "optimum-cfg":
            import torch

            if self.theirs is None:
                self.theirs = optimum_pipeline(args.onnx_dir, args.threads, self.spec.folder.family == "sdxl")
                self.load_s[name] = time.perf_counter() - start
                start = time.perf_counter()
            self.theirs(PROMPT, latents=torch.from_numpy(self.latents), num_inference_steps=steps, guidance_scale=7.5,
                        height=args.size, width=args.size, output_type="np")
        else:
            if self.ours is None:
                from basinguard.runtime.pipeline import Pipeline

                self.ours = Pipeline(self.spec, threads=args.threads)
                self.load_s[name] = time.perf_counter() - start
                start = time.perf_counter()
            self.ours.generate([PROMPT], latents=self.latents, steps=steps, scheduler="dpm++2m-karras",
                               height=args.size, width=args.size, guidance_scale=7.5, **settings(args.end_t)[name])
        return time.perf_counter() - start


def child(args: argparse.Namespace) -> None:
    """--process-per-contender: one contender, a warm-up, one timed generation; JSON to --result."""
    contenders = Contenders(args)
    if args.warmup_steps:
        contenders.run(args.contender, args.warmup_steps)
    seconds = contenders.run(args.contender, args.steps)
    args.result.write_text(json.dumps({"seconds": seconds, "load_s": contenders.load_s.get(args.contender)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_dir", type=Path)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--end-t", type=int, default=200, help="the end of guidance of the -end rows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of each contender's warm-up generation (0: none)")
    p.add_argument("--process-per-contender", action="store_true",
                   help="each contender of each round in a fresh process (SDXL on 24 GiB)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance_speed.jsonl"))
    p.add_argument("--contender", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.contender:
        child(args)
        return

    names = ["optimum-cfg", *settings(args.end_t)]
    contenders = None if args.process_per_contender else Contenders(args)
    if contenders is not None:
        for name in names:  # warm-up: sessions' first calls, arenas
            if args.warmup_steps:
                contenders.run(name, args.warmup_steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if contenders is not None:
                seconds[name].append(contenders.run(name, args.steps))
            else:
                result = Path(f"build/guidance_speed-{name}.json")
                result.parent.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, __file__, str(args.onnx_dir), "--contender", name, "--result", str(result),
                           "--steps", str(args.steps), "--size", str(args.size), "--end-t", str(args.end_t),
                           "--threads", str(args.threads), "--warmup-steps", str(args.warmup_steps)]
                subprocess.run(command, check=True)
                seconds[name].append(json.loads(result.read_text())["seconds"])
            print(f"round {r} {name}: {seconds[name][-1]:.1f} s", flush=True)
    from basinguard.runtime.spec import ModelSpec

    spec = ModelSpec(args.onnx_dir)
    latent = spec.initial_latents([0], args.size, args.size).shape[1:]
    median = {name: statistics.median(v) for name, v in seconds.items()}
    speedup = {name: round(median["optimum-cfg"] / median[name], 3) for name in settings(args.end_t)}
    record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
              "onnx_dir": str(args.onnx_dir), "model_family": spec.folder.family, "steps": args.steps,
              "size": args.size, "latent": [int(v) for v in latent], "factor": spec.folder.vae_scale_factor,
              "end_t": args.end_t, "threads": args.threads, "rounds": args.rounds,
              "warmup_steps": args.warmup_steps, "process_per_contender": args.process_per_contender,
              "seconds": seconds, "median_s": median, "speedup_vs_optimum_cfg": speedup,
              "goals": {name: {"goal": goal, "met": speedup[name] >= goal} for name, goal in GOALS.items()},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "load_average_end": os.getloadavg()},
              "versions": {"numpy": np.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    for name, value in speedup.items():
        print(f"{name}: {value}x optimum's cfg (goal >= {GOALS[name]}: {'met' if value >= GOALS[name] else 'MISSED'})")


if __name__ == "__main__":
    main()
