"""Where the denoising loop's non-model time goes (the goal: "other" ≤ 2 % of wall time), in one process.

    python benchmarks/loop_glue.py --threads 1 --rounds 25

Three loops of 50 steps around the same UNet session of the shipped model (batch 1, CFG pair), alternated round by
round so the VM's drift hits them alike; each reports wall time, time inside the UNet call and the rest:
- `denoise`: basinguard's loop (`runtime.pipeline.denoise`: UNet stage, cfg policy, DDIM scheduler, trace arrays);
- `minimal glue`: the least numpy a CFG step can do — [x; x] copy, ε_p − ε_∅, d, combine, a two-term update —
  around a bare `InferenceSession.run`;
- `minimal glue, IO binding`: the same with inputs and output bound once to preallocated buffers
  (`run_with_iobinding`), so no array is allocated per call.
The gap between the first two is what the loop's structure costs; the second is the floor of numpy glue on this
machine at this UNet size (see cold_glue.py for why single calls cost tens of µs right after a UNet call).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from basinguard.cli import SHIPPED_MODEL
from basinguard.runtime.guidance import PolicyConfig, make_policy
from basinguard.runtime.loop import denoise
from basinguard.runtime.pipeline import Pipeline, SamplingConfig

STEPS = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args()
    pipe = Pipeline(args.model, threads=args.threads)
    sampling = pipe.spec.resolve(SamplingConfig(steps=STEPS, scheduler="ddim", policy=PolicyConfig("cfg", 7.5)))
    cond = pipe.text.encode(["a red cross"], [""], sampling, pipe.spec.uncond_kinds([""]))
    e = cond.pair["encoder_hidden_states"]
    x_t = pipe.spec.initial_latents([0], sampling.height, sampling.width)
    session, out_name = pipe.unet.model.session, pipe.unet.output

    def ours() -> tuple[float, float]:
        scheduler = pipe.spec.make_scheduler(sampling)
        policy = make_policy(sampling.policy, 1, pipe.folder.num_train_timesteps)
        pipe.timer.reset()
        start = time.perf_counter()
        denoise(pipe.unet, scheduler, policy, x_t * np.float32(scheduler.init_noise_sigma), cond)
        return time.perf_counter() - start, pipe.timer.seconds["unet"]

    pair = np.empty((2, *x_t.shape[1:]), np.float32)
    timestep = np.full(2, 500.0, np.float32)
    eps_out = np.empty_like(pair)
    binding = session.io_binding()
    for name, array in (("sample", pair), ("timestep", timestep), ("encoder_hidden_states", e)):
        binding.bind_input(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
    binding.bind_output(out_name, "cpu", 0, eps_out.dtype, eps_out.shape, eps_out.ctypes.data)

    def minimal(bound: bool) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            x, model = x_t.copy(), 0.0
            start = time.perf_counter()
            for _ in range(STEPS):
                pair[:] = x
                t0 = time.perf_counter()
                if bound:
                    session.run_with_iobinding(binding)
                    eps = eps_out
                else:
                    eps = session.run([out_name], {"sample": pair, "timestep": timestep, "encoder_hidden_states": e})[0]
                model += time.perf_counter() - t0
                guidance = np.subtract(eps[1:], eps[:1], out=eps[1:])
                flat = guidance.reshape(1, -1)
                np.sqrt(np.vecdot(flat, flat))
                np.multiply(guidance, 7.5, out=guidance)
                guided = np.add(eps[:1], guidance, out=eps[:1])
                x = 0.99 * x
                x += 0.01 * guided
            return time.perf_counter() - start, model
        return run

    loops = {"denoise": ours, "minimal glue": minimal(False), "minimal glue, IO binding": minimal(True)}
    for loop in loops.values():  # warm-up
        loop()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            results[name].append(loop())
    print(f"{STEPS} steps, batch 1 (CFG pair), {args.threads} thread(s), medians of {args.rounds} alternating rounds")
    print(f"{'loop':28s} {'wall ms':>8s} {'UNet ms':>8s} {'other ms':>9s} {'other %':>8s}")
    for name, rows in results.items():
        wall, model = np.array(rows).T
        other = wall - model
        print(f"{name:28s} {1e3 * np.median(wall):8.1f} {1e3 * np.median(model):8.1f} {1e3 * np.median(other):9.2f} "
              f"{100 * np.median(other / wall):7.1f}%")


if __name__ == "__main__":
    main()
