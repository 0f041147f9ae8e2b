"""Full-size checkpoints on one machine: SD 1.5, SD 2.1-768-v and SDXL base, exported, checked and timed.

    python benchmarks/full_size.py build  --model sd21-768v [--work build/fullsize]
    python benchmarks/full_size.py export --model sd21-768v [--work ...]       # `basinguard export`, peak RSS
    python benchmarks/full_size.py check  --model sd21-768v [--steps 3]        # generate vs diffusers, peak RSS
    python benchmarks/full_size.py memory --model sd21-768v                    # loaded RSS vs weights on disk
    python benchmarks/full_size.py stages --model sd21-768v [--repeats 3] [--rounds 2]  # per stage, 3 contenders
    python benchmarks/full_size.py policies --model sd21-768v [--steps 4]      # whole generations: cfg, stp, dtp
    python benchmarks/full_size.py all    --model sd21-768v                    # export .. policies in order

Pipelines are built from the published configs basinguard ships (basinguard/export/configs/published.json) with
random weights (the classes' own initialisation, seed 0), CLIP's real BPE vocabulary (bpe_simple_vocab_16e6.txt.gz
beside it, the file CLIP's vocab.json/merges.txt were made from), and no download.

Every section runs its models in a fresh subprocess, one model at a time, at `--threads` (default 2: torch
set_num_threads, ONNX Runtime intra_op_num_threads, one inter-op thread), and appends its result to
`--results` (default benchmarks/results/full_size.json) as soon as it is done, so a crash or a kill loses nothing
already written. Each record carries the date, versions, machine and the exact command. Peak RSS is each measured
child process's own (`os.wait4`'s ru_maxrss: its VmHWM), one fresh process per measurement.

check: `basinguard generate` (cfg 7.5, the model's own scheduler) against diffusers' pipeline on the same latents
and prompt, float32 pixels compared in 8-bit levels. stages: the text encoder at batch 2, the UNet at batch 2 at
the native size and the VAE decoder at batch 1, timed per call (one warm-up, then --repeats) for ours
(`basinguard.engine.load_model`: the fused-attention graph), optimum (the file opened as optimum's ORTModel opens
it: ort.InferenceSession with ORT's default options, threads pinned; unfused) and diffusers-torch (the
diffusers/transformers module, float32). Contenders run one after another, each in its own process (three
full-size UNets at once would not fit beside the other jobs on this machine); with --rounds N each contender runs N
times, the order rotated per round, and all its calls are pooled, which spreads drift of the machine over the
contenders (benchmarks/compare.py alternates within one process instead); min and median are recorded. policies: whole generations
at the native size, cfg, stp (τ = 500, s_pre = 0) and dtp (s_pre = 0), in one process, the order rotated per round.

Goals, as ratios within one run: UNet call at batch 2 ≥ 1.5x faster than diffusers-torch and ≥ 1.1x
faster than optimum's ORT session on the same ONNX file; whole generation dtp/cfg ≤ 1.01 and stp/cfg ≤ 0.8
(τ = 500: before it the UNet runs at batch N instead of 2N). Where one is missed, the printed table says by how
much and what the stage times show.

Too slow and too big for CI (minutes and gigabytes per model); CI keeps the tiny models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # basinguard from this checkout
from basinguard.export.configs import PUBLISHED as CONFIGS  # noqa: E402
from basinguard.export.configs import clip_vocab  # noqa: E402

DEFAULT_RESULTS = ROOT / "benchmarks/results/full_size.json"
DEFAULT_WORK = ROOT / "build" / "fullsize"  # inside the checkout (build/ is git-ignored), not a path of one machine
MODELS = ("sd15", "sd21-768v", "sdxl")
PROMPT = "a photo of an astronaut riding a horse on mars"
GOALS = {"unet_vs_torch": 1.5, "unet_vs_optimum": 1.1, "dtp_over_cfg": 1.01, "stp_over_cfg": 0.8}


# ------------------------------------------------------------------------------------------------ build


def _save(module: Any, dest: Path) -> None:
    # 2 GB shards: safetensors serialises a shard in memory, so a whole SDXL UNet in one shard would double it.
    module.save_pretrained(dest, safe_serialization=True, max_shard_size="2GB")


def build(name: str, dest: Path) -> Path:
    """Write the pipeline `name` with random weights to `dest`, one component at a time (freed before the next)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    cfg = json.loads(CONFIGS.read_text())[name]
    torch.manual_seed(0)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": cfg["pipeline_class"], "_diffusers_version": diffusers.__version__}
    vocab, merges = clip_vocab(tmp / "_vocab")
    for tok in ("tokenizer", "tokenizer_2"):
        if tok in cfg:
            CLIPTokenizer(str(vocab), str(merges), **cfg[tok]).save_pretrained(tmp / tok)
            index[tok] = ["transformers", "CLIPTokenizer"]
    for enc in ("text_encoder", "text_encoder_2"):
        if enc in cfg:
            options = dict(cfg[enc])
            cls = getattr(transformers, options.pop("class"))
            if not (tmp / enc / "config.json").is_file():  # a build that was stopped resumes here
                _save(cls(transformers.CLIPTextConfig(**options)).eval(), tmp / enc)
            index[enc] = ["transformers", cls.__name__]
    for part, cls in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        if not (tmp / part / "config.json").is_file():
            _save(cls(**cfg[part]).eval(), tmp / part)
        index[part] = ["diffusers", cls.__name__]
    scheduler_options = dict(cfg["scheduler"])
    scheduler_cls = getattr(diffusers, scheduler_options.pop("_class_name"))
    scheduler_cls.from_config(scheduler_options).save_pretrained(tmp / "scheduler")  # keeps the published keys
    index["scheduler"] = ["diffusers", scheduler_cls.__name__]
    if cfg["pipeline_class"] == "StableDiffusionPipeline":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    else:
        index |= {"force_zeros_for_empty_prompt": True}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for leftover in (tmp / "_vocab").iterdir():
        leftover.unlink()
    (tmp / "_vocab").rmdir()
    tmp.rename(dest)
    return dest


# ------------------------------------------------------------------------------------------------ records


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for dist in ("basinguard", "numpy", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "optimum-onnx"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _machine() -> dict[str, Any]:
    meminfo = {line.split(":")[0]: line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "mem_total_gib": round(int(meminfo["MemTotal"]) / 2**20, 1),
            "mem_available_gib_at_start": round(int(meminfo["MemAvailable"]) / 2**20, 1)}


def append_record(results: Path, record: dict) -> None:
    """Add one section's record to the results file at once (atomically), so a later crash loses nothing."""
    results.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(results.read_text()) if results.is_file() else []
    records.append({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": shlex.join([sys.executable, *sys.argv]), "machine": _machine(),
                    "versions": _versions(), **record})
    tmp = results.with_name(results.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(results)


def run_measured(command: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> dict[str, Any]:
    """Run `command` to completion; its wall time, exit status and peak RSS (its own, by wait4)."""
    start = time.perf_counter()
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if log:
            out.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": shlex.join(command), "returncode": proc.returncode,
            "wall_s": round(time.perf_counter() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def _size_args(model: str) -> list[str]:
    return ["--size", str(SIZE_OVERRIDE[model])] if model in SIZE_OVERRIDE else []


def _threads_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _basinguard() -> list[str]:
    return [sys.executable, "-m", "basinguard.cli"]


# ------------------------------------------------------------------------------------------------ sections


def section_export(model: str, source: Path, out: Path, args: argparse.Namespace) -> dict:
    if out.exists():
        raise SystemExit(f"{out} exists; remove it to export again")
    result = run_measured([*_basinguard(), "export", str(source), str(out), *args.export_args],
                          _threads_env(args.threads), args.work / f"export-{model}.log")
    manifest = json.loads((out / "basinguard.json").read_text()) if result["returncode"] == 0 else {}
    result["validation_max_abs_diff"] = {k: v.get("max_abs_diff") for k, v in (manifest.get("validation") or {}).items()
                                         if isinstance(v, dict) and "max_abs_diff" in v}
    print(f"{model} export: {result['wall_s'] / 60:.1f} min, peak RSS {result['peak_rss_gib']} GiB "
          f"(exit {result['returncode']})")
    return result


SIZE_OVERRIDE: dict[str, int] = {}  # --size: a smoke test on a small pipeline in a model's place


def _size(model: str) -> int:
    return SIZE_OVERRIDE.get(model) or int(json.loads(CONFIGS.read_text())[model]["size"])


def _latents(model: str, seed: int = 0) -> Any:
    import numpy as np

    side = _size(model) // 8  # every pipeline here has a VAE factor of 8
    return np.random.default_rng(seed).standard_normal((1, 4, side, side), dtype=np.float32)


def diffusers_reference(source: Path, latents_path: Path, steps: int, out: Path, threads: int) -> None:
    """(run in its own process) diffusers' pipeline with its own scheduler, cfg 7.5, float32 pixels to `out`."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(threads)
    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(latents_path))
    with torch.inference_mode():
        images = pipe(PROMPT, latents=latents, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                      height=latents.shape[-2] * 8, width=latents.shape[-1] * 8).images
    np.save(out, np.asarray(images, dtype=np.float32))


def _status_gib(key: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return round(int(line.split()[1]) / 2**20, 2)


def memory_worker(onnx_dir: Path, threads: int, out: Path) -> None:
    """(own process) RSS once the pipeline is loaded, against the weights on disk, and after one denoising step;
    whether the UNet's fused-attention graph was reused (not rewritten) by this load."""
    from basinguard.runtime.guidance import PolicyConfig
    from basinguard.runtime.pipeline import Pipeline, SamplingConfig

    fused = onnx_dir / "unet/model.fused.onnx"
    before = fused.stat().st_mtime_ns if fused.is_file() else None
    weights = sum(p.stat().st_size for part in ("text_encoder", "unet", "vae_decoder")
                  for p in (onnx_dir / part).iterdir() if p.name in ("model.onnx", "model.onnx_data"))
    pipe = Pipeline(onnx_dir, provider="cpu", threads=threads)
    loaded = {"rss_after_load_gib": _status_gib("VmRSS"), "peak_during_load_gib": _status_gib("VmHWM")}
    pipe.generate([PROMPT], SamplingConfig(steps=1, policy=PolicyConfig("cfg", guidance_scale=7.5)), seeds=[0])
    out.write_text(json.dumps({"weights_on_disk_gib": round(weights / 2**30, 2), **loaded,
                               "peak_after_one_step_gib": _status_gib("VmHWM"),
                               "fused_unet_reused": before is not None and fused.stat().st_mtime_ns == before,
                               "fused_attention": {"unet": pipe.unet.model.fused_attention}}))


def section_check(model: str, source: Path, onnx_dir: Path, args: argparse.Namespace) -> dict:
    """`basinguard generate` against diffusers at the native size: the same latents, prompt, scheduler and scale."""
    import numpy as np

    work = args.work / f"check-{model}"
    work.mkdir(parents=True, exist_ok=True)
    latents = work / "latents.npy"
    np.save(latents, _latents(model))
    ours = run_measured([*_basinguard(), "generate", "--model", str(onnx_dir), "--prompt", PROMPT, "--policy", "cfg",
                         "--guidance-scale", "7.5", "--steps", str(args.steps), "--latents", str(latents),
                         "--threads", str(args.threads), "--out", str(work / "ours.npy")],
                        _threads_env(args.threads), work / "generate.log")
    ref = run_measured([sys.executable, __file__, "_diffusers", "--model", model, "--work", str(args.work),
                        *_size_args(model),
                        "--steps", str(args.steps), "--threads", str(args.threads)],
                       _threads_env(args.threads), work / "diffusers.log")
    result: dict[str, Any] = {"steps": args.steps, "size": _size(model), "ours": ours, "diffusers": ref}
    if ours["returncode"] == 0 and ref["returncode"] == 0:
        got, want = np.load(work / "ours.npy").reshape(-1), np.load(work / "diffusers.npy").reshape(-1)
        result["max_abs_diff"] = float(np.abs(got - want).max())
        result["max_8bit_levels"] = int(np.abs(np.round(got * 255) - np.round(want * 255)).max())
        result["pass"] = result["max_8bit_levels"] <= 1
    print(f"{model} generate vs diffusers ({args.steps} steps, {_size(model)}^2): "
          f"max |diff| {result.get('max_abs_diff', float('nan')):.4f} ({result.get('max_8bit_levels')} 8-bit levels); "
          f"peak RSS ours {ours['peak_rss_gib']} GiB ({ours['wall_s']} s), diffusers {ref['peak_rss_gib']} GiB "
          f"({ref['wall_s']} s)")
    return result


def section_memory(model: str, source: Path, onnx_dir: Path, args: argparse.Namespace) -> dict:
    """Ours loaded: RSS against the weights on disk (held once?), the fused UNet graph reused, one step's peak."""
    work = args.work / f"check-{model}"
    work.mkdir(parents=True, exist_ok=True)
    run = run_measured([sys.executable, __file__, "_memory", "--model", model, "--work", str(args.work),
                        "--threads", str(args.threads)], _threads_env(args.threads), work / "memory.log")
    result = {**(json.loads((work / "memory.json").read_text()) if run["returncode"] == 0 else {}), "run": run}
    print(f"{model} loaded: {result.get('rss_after_load_gib')} GiB RSS for {result.get('weights_on_disk_gib')} GiB "
          f"of weights on disk (peak while loading {result.get('peak_during_load_gib')} GiB); after one step at "
          f"{_size(model)}^2: {result.get('peak_after_one_step_gib')} GiB; fused UNet graph reused: "
          f"{result.get('fused_unet_reused')}")
    return result


def _stage_inputs(model: str, onnx_dir: Path) -> dict[str, dict[str, Any]]:
    """The inputs each stage is timed on: text encoder at batch 2 (the cfg pair), UNet at batch 2 at the native
    size, VAE decoder at batch 1."""
    import numpy as np

    rng = np.random.default_rng(0)
    unet_cfg = json.loads((onnx_dir / "unet/config.json").read_text())
    side = _size(model) // 8
    vocab = json.loads((onnx_dir / "text_encoder/config.json").read_text())["vocab_size"]
    ids = rng.integers(0, vocab - 2, (2, 77), dtype=np.int64)
    ids[:, 0], ids[:, 10:] = vocab - 2, vocab - 1  # CLIP's <|startoftext|>, then <|endoftext|> as padding
    unet = {"sample": rng.standard_normal((2, 4, side, side), dtype=np.float32),
            "timestep": np.full((2,), 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, unet_cfg["cross_attention_dim"]), dtype=np.float32)}
    if unet_cfg.get("addition_embed_type") == "text_time":
        unet["text_embeds"] = rng.standard_normal((2, 1280), dtype=np.float32)
        unet["time_ids"] = np.tile(np.array([[_size(model), _size(model), 0, 0, _size(model), _size(model)]],
                                            dtype=np.float32), (2, 1))
    return {"text_encoder": {"input_ids": ids}, "unet": unet,
            "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, side, side), dtype=np.float32)}}


def _time_calls(call: Any, repeats: int) -> dict[str, Any]:
    call()  # warm-up: first-call allocations, ORT's arena
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3), "seconds": seconds}


def _stage_call(contender: str, stage: str, source: Path, onnx_dir: Path, feed: dict[str, Any],
                threads: int) -> tuple[Any, dict[str, Any]]:
    """One stage's model loaded by `contender`, as a call on `feed`, and what to record about it."""
    if contender == "ours":
        from basinguard.engine import load_model

        loaded = load_model(onnx_dir / stage / "model.onnx", "cpu", threads)
        return (lambda: loaded.run(feed)), {"fused_attention": getattr(loaded, "fused_attention", 0)}
    if contender == "optimum":
        import onnxruntime as ort

        # optimum's ORTModel opens each part as ort.InferenceSession(path, session_options); with session_options
        # given (as benchmarks/compare.py gives them): ORT's defaults, threads pinned, the file as it is (unfused).
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        session = ort.InferenceSession(str(onnx_dir / stage / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        return (lambda: session.run(None, feed)), {}
    return _torch_call(stage, source, feed, threads), {}


def stage_worker(contender: str, model: str, source: Path, onnx_dir: Path, threads: int, repeats: int,
                 out: Path) -> None:
    """(run in its own process, one contender and one model at a time) time each stage's model call."""
    import gc

    inputs = _stage_inputs(model, onnx_dir)
    timings: dict[str, Any] = {}
    for stage in ("text_encoder", "unet", "vae_decoder"):
        call, extra = _stage_call(contender, stage, source, onnx_dir, inputs[stage], threads)
        timings[stage] = {**_time_calls(call, repeats), **extra}
        print(f"  {contender} {stage}: median {timings[stage]['median_s']} s", flush=True)
        call = None  # one model in memory at a time
        gc.collect()
    out.write_text(json.dumps(timings))


def _torch_call(stage: str, source: Path, feed: dict[str, Any], threads: int) -> Any:
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_num_threads(threads)
    t = {k: torch.from_numpy(v) for k, v in feed.items()}
    if stage == "text_encoder":
        index = json.loads((source / "model_index.json").read_text())
        module = getattr(transformers, index["text_encoder"][1]).from_pretrained(source / "text_encoder").eval()

        def run() -> Any:
            return module(input_ids=t["input_ids"])
    elif stage == "unet":
        module = UNet2DConditionModel.from_pretrained(source / "unet").eval()
        added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if "time_ids" in t else None

        def run() -> Any:
            return module(t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=added)
    else:
        module = AutoencoderKL.from_pretrained(source / "vae").eval()

        def run() -> Any:
            return module.decode(t["latent_sample"])

    def call() -> Any:
        with torch.inference_mode():
            return run()

    return call


def section_stages(model: str, source: Path, onnx_dir: Path, args: argparse.Namespace) -> dict:
    work = args.work / f"stages-{model}"
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
                              "size": _size(model), "batch": {"text_encoder": 2, "unet": 2, "vae_decoder": 1}}
    contenders = ["ours", "optimum", "torch"]
    for r in range(args.rounds):  # each round runs every contender once, the order rotated: drift spreads out
        for contender in contenders[r % 3:] + contenders[:r % 3]:
            out = work / f"{contender}.json"
            run = run_measured([sys.executable, __file__, "_stage", "--model", model, "--work", str(args.work),
                                *_size_args(model), "--contender", contender, "--threads", str(args.threads),
                                "--repeats", str(args.repeats)],
                               _threads_env(args.threads), work / f"{contender}.log")
            got = json.loads(out.read_text()) if run["returncode"] == 0 else {}
            entry = result.setdefault(contender, {"runs": []})
            entry["runs"].append(run)
            for stage, timing in got.items():  # the calls of every round together
                merged = entry.setdefault(stage, {"seconds": []})
                merged["seconds"] += timing["seconds"]
                merged |= {k: v for k, v in timing.items() if k not in ("seconds", "median_s", "min_s")}
                merged["median_s"] = round(statistics.median(merged["seconds"]), 3)
                merged["min_s"] = round(min(merged["seconds"]), 3)
    unet = {c: result[c].get("unet", {}).get("median_s") for c in ("ours", "optimum", "torch")}
    if all(unet.values()):
        result["unet_vs_torch"] = round(unet["torch"] / unet["ours"], 2)
        result["unet_vs_optimum"] = round(unet["optimum"] / unet["ours"], 2)
    print(f"{model} per stage (median s, {args.threads} threads):")
    for stage in ("text_encoder", "unet", "vae_decoder"):
        row = {c: result[c].get(stage, {}).get("median_s") for c in ("ours", "optimum", "torch")}
        print(f"  {stage:13s} ours {row['ours']}  optimum {row['optimum']}  diffusers-torch {row['torch']}")
    fused = result["ours"].get("unet", {}).get("fused_attention", 0)
    for goal, key in (("unet_vs_torch", "torch"), ("unet_vs_optimum", "optimum")):
        if goal in result:
            met = result[goal] >= GOALS[goal]
            why = "" if met else (f"; the same ONNX weights and ORT kernels but {fused} attentions fused in ours"
                                  if key == "optimum" else "")
            print(f"  UNet speed-up vs {key}: {result[goal]}x (goal >= {GOALS[goal]}x: {'met' if met else 'MISSED'}"
                  f"{why}; per-call spread min..median: ours {result['ours']['unet']['min_s']}.."
                  f"{result['ours']['unet']['median_s']} s, {key} {result[key]['unet']['min_s']}.."
                  f"{result[key]['unet']['median_s']} s)")
    return result


def policy_worker(model: str, onnx_dir: Path, threads: int, steps: int, rounds: int, out: Path) -> None:
    """(own process) whole generations at the native size under cfg, stp (τ 500, s_pre 0) and dtp, one pipeline."""
    from basinguard.runtime.guidance import PolicyConfig
    from basinguard.runtime.pipeline import Pipeline, SamplingConfig

    pipe = Pipeline(onnx_dir, provider="cpu", threads=threads)
    policies = {"cfg": PolicyConfig("cfg", guidance_scale=7.5),
                "stp": PolicyConfig("stp", guidance_scale=7.5, transition_t=500, pre_scale=0.0),
                "dtp": PolicyConfig("dtp", guidance_scale=7.5, pre_scale=0.0)}
    latents = _latents(model)
    times: dict[str, list[float]] = {name: [] for name in policies}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in policies}
    transition: dict[str, Any] = {}
    names = list(policies)
    for r in range(rounds + 1):  # round 0 warms up
        for name in names[r % 3:] + names[:r % 3]:  # the order rotated each round
            pipe.timer.reset()
            start = time.perf_counter()
            (gen,) = pipe.generate([PROMPT], SamplingConfig(steps=steps, policy=policies[name]), latents=latents)
            seconds = time.perf_counter() - start
            if r:
                times[name].append(seconds)
                stages[name].append({k: round(v, 3) for k, v in pipe.timer.summary().items()})
            transition[name] = gen.trace["transition_step"]
            print(f"  {name} round {r}: {seconds:.1f} s {stages[name][-1] if r else ''}", flush=True)
    out.write_text(json.dumps({"seconds": times, "stage_seconds": stages, "steps": steps, "rounds": rounds,
                               "transition_step": transition,
                               "timesteps": [float(t) for t in gen.trace["timesteps"]]}))


def section_policies(model: str, source: Path, onnx_dir: Path, args: argparse.Namespace) -> dict:
    work = args.work / f"policies-{model}"
    work.mkdir(parents=True, exist_ok=True)
    run = run_measured([sys.executable, __file__, "_policies", "--model", model, "--work", str(args.work),
                        *_size_args(model),
                        "--threads", str(args.threads), "--steps", str(args.steps), "--rounds", str(args.rounds)],
                       _threads_env(args.threads), work / "policies.log")
    result: dict[str, Any] = {"run": run, "threads": args.threads, "size": _size(model)}
    if run["returncode"] == 0:
        data = json.loads((work / "policies.json").read_text())
        med = {k: statistics.median(v) for k, v in data["seconds"].items()}
        result |= {"steps": data["steps"], "rounds": data["rounds"], "median_s": med, "timesteps": data["timesteps"],
                   "transition_step": data["transition_step"],
                   "dtp_over_cfg": round(med["dtp"] / med["cfg"], 3), "stp_over_cfg": round(med["stp"] / med["cfg"], 3)}
        result["stage_seconds"] = data["stage_seconds"]
        # What stp can save: the steps with t > τ run the UNet at batch N instead of 2N; text encoder and VAE
        # times are the same for every policy. The bound assumes a UNet call's time is proportional to its batch.
        above = sum(t > 500 for t in data["timesteps"])
        unet_share = data["stage_seconds"]["cfg"][0].get("unet", 0.0) / med["cfg"]
        result["stp_bound"] = round(1 - unet_share * above / (2 * len(data["timesteps"])), 3)
        result["steps_above_tau"] = above
        for goal in ("dtp_over_cfg", "stp_over_cfg"):
            met = result[goal] <= GOALS[goal]
            why = ""
            if goal == "stp_over_cfg" and not met:
                why = (f"; {above} of {len(data['timesteps'])} steps have t > 500 and the UNet is {unet_share:.0%} "
                       f"of cfg's time, so halving those calls gives at best {result['stp_bound']}")
            print(f"{model} {goal.replace('_over_', '/')}: {result[goal]} (goal <= {GOALS[goal]}: "
                  f"{'met' if met else 'MISSED'}{why}); medians {med}")
    return result


SECTIONS = {"export": section_export, "check": section_check, "memory": section_memory, "stages": section_stages,
            "policies": section_policies}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=("build", *SECTIONS, "all", "_diffusers", "_stage", "_policies", "_memory"))
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="pipelines and exports go here (default: build/fullsize in the checkout, git-ignored; "
                        "tens of GB)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="check and policies: denoising steps")
    parser.add_argument("--repeats", type=int, default=3, help="stages: timed calls per stage and contender")
    parser.add_argument("--rounds", type=int, default=1,
                        help="policies: timed rounds (after one warm-up round); stages: runs of every contender")
    parser.add_argument("--contender", choices=("ours", "optimum", "torch"))
    parser.add_argument("--export-args", nargs=argparse.REMAINDER, default=[],
                        help="export: more `basinguard export` flags (e.g. --fp16), last on the line")
    parser.add_argument("--size", type=int, help="image side (default: the model's native size)")
    args = parser.parse_args()
    if args.size:
        SIZE_OVERRIDE[args.model] = args.size
    source, onnx_dir = args.work / args.model, args.work / f"{args.model}-onnx"
    if args.section == "build":
        if source.exists():
            raise SystemExit(f"{source} exists")
        build(args.model, source)
        print(f"wrote {source}")
    elif args.section == "_diffusers":
        work = args.work / f"check-{args.model}"
        diffusers_reference(source, work / "latents.npy", args.steps, work / "diffusers.npy", args.threads)
    elif args.section == "_memory":
        memory_worker(onnx_dir, args.threads, args.work / f"check-{args.model}" / "memory.json")
    elif args.section == "_stage":
        stage_worker(args.contender, args.model, source, onnx_dir, args.threads, args.repeats,
                     args.work / f"stages-{args.model}" / f"{args.contender}.json")
    elif args.section == "_policies":
        policy_worker(args.model, onnx_dir, args.threads, args.steps, args.rounds,
                      args.work / f"policies-{args.model}" / "policies.json")
    else:
        for name in (SECTIONS if args.section == "all" else (args.section,)):
            if name == "export" and args.section == "all" and onnx_dir.exists():
                continue  # exported by an earlier run
            result = SECTIONS[name](args.model, source, onnx_dir, args)
            append_record(args.results, {"section": name, "model": args.model, **result})


if __name__ == "__main__":
    main()
