"""Per-stage latency of the guidance policies on one model.

    python benchmarks/latency.py [--model DIR] [--steps 50] [--batch 1] [--repeats 10] [--threads 2]
                                 [--out benchmarks/results/latency]

Runs cfg, stp (pre_scale 0, τ=500: the UNet runs at batch N instead of 2N while t > τ), dtp and og-dtp
on one exported model (default: the shipped model) with the same prompt and initial latents, and times
each stage with the pipeline's own `StageTimer`: text encoder, UNet (× calls), scheduler + policy
(loop − UNet) and VAE decoder, plus the whole `generate` call. After `--warmup` untimed rounds, each
of `--repeats` rounds runs every policy once, in an order rotated by one per round (round-robin), so
that slow drift of the machine (thermal, a background job) hits all policies alike. The table reports
medians over rounds; the ratios to cfg come as ratios of medians, as medians of per-round ratios, and (dtp,
og-dtp) attributed: cfg's time plus only the stages whose work differs (scheduler + policy and glue; their
model calls are identical), which a noisy machine cannot blur. Writes OUT.json (every round's raw times) and
OUT.md (the printed table). On a 2-core machine that other processes share, `--threads 1` gives steadier
numbers: a 2-thread pool stalls whenever another process takes one of the cores.

Goals: dtp/cfg ≤ 1.01 (measuring d is free: both halves of the CFG batch are there
anyway); stp clearly faster than cfg.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from basinguard.cli import SHIPPED_MODEL
from basinguard.demo import load_memorization
from basinguard.runtime.pipeline import Pipeline, SamplingConfig
from basinguard.runtime.schedulers import scheduler_name_for_config
from basinguard.runtime.spec import ModelSpec

POLICIES = ("cfg", "stp", "dtp", "og-dtp")
STAGES = ("text_encoder", "unet", "scheduler+policy", "vae")


def policy_samplings(spec: ModelSpec, transition_t: int, **common: object) -> dict[str, SamplingConfig]:
    """The four rows, at the model's own sampling defaults (λ, λ_og, ...) with `common` overrides; τ as given and
    s_pre = 0, the default, with which STP's steps before τ run the unconditional branch alone (batch N)."""
    return {
        "cfg": spec.sampling(policy="cfg", **common),
        "stp": spec.sampling(policy="stp", transition_t=transition_t, pre_scale=0.0, **common),
        "dtp": spec.sampling(policy="dtp", pre_scale=0.0, **common),
        "og-dtp": spec.sampling(policy="og-dtp", **common),
    }


def timed_generate(pipe: Pipeline, prompts: list[str], sampling: SamplingConfig, latents: np.ndarray) -> dict:
    """One generation; stage seconds from the pipeline's timer, `total` the wall time of the whole call."""
    pipe.timer.reset()
    gc.collect()
    gc.disable()  # a collection inside one policy's run would be charged to that policy alone
    try:
        start = time.perf_counter()
        gens = pipe.generate(prompts, sampling, latents=latents)
        total = time.perf_counter() - start
    finally:
        gc.enable()
    times = {stage: pipe.timer.summary().get(stage, 0.0) for stage in STAGES}
    times["total"] = total
    times["other"] = total - sum(times[s] for s in STAGES)  # tokenizer, latents, traces, pixel conversion
    times["unet_calls"] = pipe.timer.calls.get("unet", 0)
    times["transition_step"] = [g.trace["transition_step"] for g in gens]
    return times


def median_row(rounds: list[dict]) -> dict:
    keys = (*STAGES, "total", "other")
    row = {k: statistics.median(r[k] for r in rounds) for k in keys}
    row["unet_calls"] = rounds[0]["unet_calls"]
    row["unet_per_call"] = row["unet"] / max(row["unet_calls"], 1)
    row["total_min"] = min(r["total"] for r in rounds)
    row["total_spread"] = (max(r["total"] for r in rounds) - row["total_min"]) / row["total"]
    row["transition_step"] = rounds[0]["transition_step"]
    return row


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(rows: dict[str, dict], header: str) -> str:
    ms = 1e3
    lines = [header, "",
             "| policy | text encoder ms | UNet ms (calls) | UNet ms/call | scheduler+policy ms | VAE ms | other ms "
             "| total ms (median) | total ms (min) | ×cfg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = rows["cfg"]["total"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['text_encoder'] * ms:.2f} | {r['unet'] * ms:.1f} ({r['unet_calls']}) "
                     f"| {r['unet_per_call'] * ms:.3f} | {r['scheduler+policy'] * ms:.2f} | {r['vae'] * ms:.2f} "
                     f"| {r['other'] * ms:.2f} | {r['total'] * ms:.1f} | {r['total_min'] * ms:.1f} "
                     f"| {r['total'] / base:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="exported ONNX folder (default: the shipped model)")
    p.add_argument("--prompt", default=None, help="default: the shipped model's first duplicated caption")
    p.add_argument("--batch", type=int, default=1, help="images per generate call (N)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    p.add_argument("--scheduler", default=None, help="default: the model's own (its sampling defaults)")
    p.add_argument("--transition-t", type=int, default=500, help="τ for stp")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads per session")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (each runs every policy once)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-shapes", action="store_true", help="shape-specialised UNet sessions (CPU)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "latency",
                   help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)

    model = args.model or SHIPPED_MODEL
    if not (model / "unet" / "model.onnx").exists():
        p.error(f"no exported model at {model}; pass --model DIR (an exported ONNX folder)")
    pipe = Pipeline(model, provider="cpu", threads=args.threads, static_shapes=args.static_shapes)
    samplings = policy_samplings(pipe.spec, args.transition_t, steps=args.steps, scheduler=args.scheduler,
                                 height=args.size, width=args.size)
    scheduler = samplings["cfg"].scheduler
    scheduler_label = scheduler or scheduler_name_for_config(pipe.folder.scheduler_config)
    size = args.size or pipe.folder.default_size
    latents = pipe.spec.initial_latents([args.seed + k for k in range(args.batch)], size, size)
    if args.prompt is None:  # a memorized prompt where the model has one (the shipped model), else a plain one
        has_memorization = (model / "memorization" / "duplicated.jsonl").exists()
        args.prompt = load_memorization(model)[0][0]["caption"] if has_memorization else "a red circle"
    prompts = [args.prompt] * args.batch

    rounds: dict[str, list[dict]] = {name: [] for name in POLICIES}
    for r in range(args.warmup + args.repeats):
        order = POLICIES[r % len(POLICIES):] + POLICIES[:r % len(POLICIES)]  # rotate: no policy always runs first
        for name in order:
            times = timed_generate(pipe, prompts, samplings[name], latents)
            if r >= args.warmup:
                rounds[name].append(times)
        print(f"round {r + 1}/{args.warmup + args.repeats}{' (warm-up)' if r < args.warmup else ''}: "
              + "  ".join(f"{n} {rounds[n][-1]['total'] * 1e3:.1f} ms" for n in order if r >= args.warmup),
              file=sys.stderr)

    rows = {name: median_row(rounds[name]) for name in POLICIES}
    ratios = {f"{name}/cfg": rows[name]["total"] / rows["cfg"]["total"] for name in POLICIES if name != "cfg"}
    # Paired: the ratio within each round, then the median. A burst of load from another process hits one round's
    # policies (run back to back) far more alike than it hits different rounds.
    paired = {f"{name}/cfg": statistics.median(a["total"] / b["total"] for a, b in zip(rounds[name], rounds["cfg"]))
              for name in POLICIES if name != "cfg"}
    # Attributed: cfg, dtp and og-dtp make the same model calls at the same shapes, so their wall times differ by
    # real work only in the scheduler + policy and the glue; this ratio adds just those differences to cfg's time,
    # which leaves out the machine's run-to-run noise in the identical model calls.
    work = ("scheduler+policy", "other")
    attributed = {f"{name}/cfg": 1 + sum(rows[name][k] - rows["cfg"][k] for k in work) / rows["cfg"]["total"]
                  for name in ("dtp", "og-dtp")}
    header = (f"Latency per generate call: {model.name}, {size}x{size}, batch {args.batch}, {args.steps} steps "
              f"{scheduler_label}, {args.threads} ORT threads, median of {args.repeats} "
              f"round-robin rounds after {args.warmup} warm-up rounds.")
    text = table(rows, header)
    text += ("\n\nratio of medians: " + "  ".join(f"{k} = {v:.3f}" for k, v in ratios.items())
             + "\nmedian of per-round ratios: " + "  ".join(f"{k} = {v:.3f}" for k, v in paired.items())
             + "\nattributed (cfg's time + the scheduler+policy and glue differences; the model calls are identical): "
             + "  ".join(f"{k} = {v:.4f}" for k, v in attributed.items())
             + f"\n\ngoals: dtp/cfg <= 1.01: {verdict(ratios['dtp/cfg'] <= 1.01)} on the ratio of medians, "
             f"{verdict(paired['dtp/cfg'] <= 1.01)} per round, {verdict(attributed['dtp/cfg'] <= 1.01)} attributed; "
             f"stp faster than cfg: {verdict(ratios['stp/cfg'] < 0.95)} (stp/cfg {ratios['stp/cfg']:.3f}, "
             f"per round {paired['stp/cfg']:.3f})\n")
    print(text)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(model), "size": size, "batch": args.batch, "steps": args.steps, "scheduler": scheduler_label,
        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats, "prompt": args.prompt,
        "policies": {name: asdict(sampling.policy) for name, sampling in samplings.items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "numpy": np.__version__},
        "median": rows, "ratios": ratios, "paired_ratios": paired, "attributed_ratios": attributed, "rounds": rounds,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".md").write_text(text)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
