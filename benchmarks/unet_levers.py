"""The UNet call's levers on ONNX Runtime's CPU provider, each against optimum's session on the same file.

    python benchmarks/unet_levers.py ONNX_DIR [--int8 INT8_DIR] [--ort-fusions DIR] [--size 512] [--batch 2]
                                     [--threads 2] [--calls 3] [--rounds 2] [--variants optimum,basinguard,...]

Variants (one UNet call at batch `--batch`, `--size` pixels, the same inputs for all):
  optimum          ort.InferenceSession with ORT's default options, threads pinned: how optimum's ORTModel opens
                   the file (unfused attention)
  basinguard       `OrtModel` as the runtime opens it: fused attention, full graph optimisation, sequential
  static-shapes    basinguard + shape-specialised sessions (`--static-shapes`)
  no-spinning      basinguard with intra-op thread spinning off (session.intra_op.allow_spinning 0)
  no-arena         basinguard without the CPU memory arena
  denormal-zero    basinguard with denormals flushed to zero (session.set_denormal_as_zero 1)
  affinity         basinguard with each intra-op thread pinned to a CPU of its own (session.intra_op_thread_affinities)
  ort-fusions      onnxruntime.transformers' UNet optimizer (its fusions with CPU kernels: LayerNorm,
                   SkipLayerNorm, Gelu) written to --ort-fusions DIR (made on first use), then basinguard's
  int8             basinguard on `--int8 INT8_DIR` (`basinguard export --quantize int8`); also the deviation of
                   its output from the fp32 graph's on the same inputs

Each variant runs in a fresh process per round (one full-size UNet's weights at a time fit beside the rest; a
session's options cannot change once it is open), one warm-up call then `--calls` timed calls; the order is
rotated each round and the calls of all rounds pooled. Ratios are optimum's median over each variant's (> 1: faster
than optimum). Results are appended to --out as JSON lines, with the command. Full-size folders take minutes:
run it alone on the machine; never in CI.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # basinguard from this checkout

VARIANTS = ("optimum", "basinguard", "static-shapes", "no-spinning", "no-arena", "denormal-zero", "affinity",
            "ort-fusions", "int8")
SESSION_CONFIG = {"no-spinning": {"session.intra_op.allow_spinning": "0"},
                  "denormal-zero": {"session.set_denormal_as_zero": "1"}}


def affinity_config(threads: int) -> dict[str, str]:
    """Each intra-op thread ORT starts (threads - 1 of them; the caller's thread is the first) pinned to its own
    logical processor, 2 .. threads (1-based, ';' between threads)."""
    return {"session.intra_op_thread_affinities": ";".join(str(cpu) for cpu in range(2, threads + 1))}


def unet_feed(session: Any, batch: int, latent: int) -> dict[str, np.ndarray]:
    """Random inputs for the UNet session's inputs: batch and latent size where the axes are dynamic."""
    rng = np.random.default_rng(0)
    feed = {}
    for arg in session.get_inputs():
        shape = [batch if i == 0 else (d if isinstance(d, int) else latent) for i, d in enumerate(arg.shape)]
        if arg.name == "timestep":
            feed[arg.name] = np.full(shape, 500, np.float32)
        elif arg.name == "time_ids":
            feed[arg.name] = np.tile(np.float32([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]), (batch, 1))
        else:
            feed[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def ort_fused_file(onnx_dir: Path, dest: Path) -> Path:
    """The UNet through onnxruntime.transformers' optimizer with only the fusions ORT's CPU provider can run
    (its attention fusion, NhwcConv, GroupNorm, BiasSplitGelu and BiasAdd need CUDA; attention is basinguard's)."""
    target = dest / "unet" / "model.onnx"
    if target.is_file():
        return target
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    for name in ("enable_attention", "enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm",
                 "enable_bias_splitgelu", "enable_bias_add"):
        setattr(options, name, False)
    start = time.perf_counter()
    model = optimizer.optimize_model(str(onnx_dir / "unet" / "model.onnx"), model_type="unet", opt_level=0,
                                     use_gpu=False, optimization_options=options)
    target.parent.mkdir(parents=True, exist_ok=True)
    large = (onnx_dir / "unet" / "model.onnx_data").is_file()
    model.save_model_to_file(str(target), use_external_data_format=large, all_tensors_to_one_file=True)
    print(f"ort-fusions: {target} written in {time.perf_counter() - start:.0f} s", flush=True)
    return target


def child(args: argparse.Namespace) -> None:
    """One variant: open, warm up, time `--calls` calls; write the result as JSON to --result."""
    import onnxruntime as ort

    from basinguard.engine import ort as engine_ort
    from basinguard.engine.ort import OrtModel

    variant, path = args.variant, args.onnx_dir / "unet" / "model.onnx"
    base_options = engine_ort.session_options

    def options(threads: int | None) -> ort.SessionOptions:
        opts = base_options(threads)
        config = affinity_config(args.threads) if variant == "affinity" else SESSION_CONFIG.get(variant, {})
        for key, value in config.items():
            opts.add_session_config_entry(key, value)
        if variant == "no-arena":
            opts.enable_cpu_mem_arena = False
        return opts

    engine_ort.session_options = options  # the variant's options for every session OrtModel opens
    start = time.perf_counter()
    if variant == "optimum":
        opts = ort.SessionOptions()  # ORT's defaults, as optimum's ORTModel opens a file; thread counts pinned
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = unet_feed(session, args.batch, args.size // 8)
        names = [o.name for o in session.get_outputs()]

        def call() -> np.ndarray:
            return session.run(names, feed)[0]
    else:
        if variant == "int8":
            path = args.int8 / "unet" / "model.onnx"
        elif variant == "ort-fusions":
            path = args.ort_fusions / "unet" / "model.onnx"
        model = OrtModel(path, threads=args.threads, static_shapes=variant == "static-shapes")
        feed = unet_feed(model.session, args.batch, args.size // 8)
        name = next(iter(model.outputs))

        def call() -> np.ndarray:
            return model.run(feed)[name]
    load_s = time.perf_counter() - start
    first = call()  # warm-up: arenas, the shape-specialised session
    seconds = []
    for _ in range(args.calls):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    np.save(args.result.with_suffix(".npy"), first)
    # VmHWM: this process's own peak (getrusage's ru_maxrss carries the parent's peak across fork and exec)
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]
    peak = int(status) / 2**20
    args.result.write_text(json.dumps({"load_s": load_s, "seconds": seconds, "peak_rss_gib": round(peak, 2),
                                       "fused_attention": getattr(locals().get("model"), "fused_attention", 0)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx_dir", type=Path)
    p.add_argument("--int8", type=Path, help="the same model exported with --quantize int8 (int8 variant)")
    p.add_argument("--ort-fusions", type=Path, help="where the ort-fusions variant's UNet is (made if missing)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2N under CFG)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=3, help="timed calls per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="optimum,basinguard,int8", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/unet_levers.jsonl")
    p.add_argument("--work", type=Path, default=ROOT / "build/unet_levers")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        child(args)
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "optimum" not in variants:
        raise SystemExit(f"variants: {', '.join(unknown) or 'optimum missing'}; choose from {', '.join(VARIANTS)} "
                         "(optimum is the reference)")
    if "int8" in variants and not args.int8:
        raise SystemExit("the int8 variant needs --int8 INT8_DIR (basinguard export --quantize int8)")
    if "ort-fusions" in variants:
        if not args.ort_fusions:
            raise SystemExit("the ort-fusions variant needs --ort-fusions DIR (made on first use)")
        if not (args.ort_fusions / "unet" / "model.onnx").is_file():  # in a process of its own: it takes GBs
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            "from benchmarks.unet_levers import ort_fused_file; from pathlib import Path; "
                            f"ort_fused_file(Path({str(args.onnx_dir)!r}), Path({str(args.ort_fusions)!r}))"],
                           check=True)
    args.work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            result = args.work / f"{variant}.json"
            command = [sys.executable, __file__, str(args.onnx_dir), "--variant", variant, "--result", str(result),
                       "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
                       "--calls", str(args.calls)]
            for flag, value in (("--int8", args.int8), ("--ort-fusions", args.ort_fusions)):
                if value:
                    command += [flag, str(value)]
            subprocess.run(command, check=True, env=env)
            run = json.loads(result.read_text())
            runs[variant].append(run)
            seconds[variant] += run["seconds"]
            print(f"round {r} {variant}: median {statistics.median(run['seconds']):.3f} s/call "
                  f"(load {run['load_s']:.1f} s, peak RSS {run['peak_rss_gib']} GiB)", flush=True)
    median = {v: statistics.median(s) for v, s in seconds.items()}
    ratio = {v: round(median["optimum"] / median[v], 3) for v in variants}
    reference = np.load(args.work / "optimum.npy")
    deviation = {}
    for v in variants:
        out = np.load(args.work / f"{v}.npy")
        deviation[v] = {"relative_l2": float(np.linalg.norm(out - reference) / np.linalg.norm(reference)),
                        "max_abs": float(np.abs(out - reference).max())}
    import onnxruntime

    record = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "onnx_dir": str(args.onnx_dir), "size": args.size, "batch": args.batch, "threads": args.threads,
              "calls": args.calls, "rounds": args.rounds, "seconds": seconds, "median_s": median,
              "optimum_over_variant": ratio, "deviation_from_optimum_output": deviation,
              "runs": runs, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                       "load_average_end": os.getloadavg()},
              "versions": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"\n{args.onnx_dir}, UNet batch {args.batch}, {args.size}², {args.threads} threads, "
          f"{args.rounds} rounds × {args.calls} calls")
    print(f"{'variant':15s} {'median s':>9s} {'optimum / it':>13s} {'rel. L2 vs optimum':>19s}")
    for v in variants:
        print(f"{v:15s} {median[v]:9.3f} {ratio[v]:12.3f}× {deviation[v]['relative_l2']:19.2e}")


if __name__ == "__main__":
    main()
