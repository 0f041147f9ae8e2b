"""GPU check: build plans, check GPU backends against ONNX Runtime on CPU, time every backend per stage.

    bash benchmarks/gpu_check.sh                      # on a GPU machine, from the repo root (fits in 8 min)
    python benchmarks/gpu_check.py --device cpu --tiny --skip-shipped   # the same code paths on CPU, seconds

Sections (each skipped, with the reason printed, when its backend is not installed or time runs short):
1. environment: torch / CUDA / GPU, onnxruntime providers, tensorrt, cuda-python, diffusers, tokenizers.
2. shipped model (basinguard/models/shapes or --model): per stage (text encoder, UNet, VAE) ORT-CUDA and
   TensorRT (dynamic plan; static plan + CUDA graph) against ORT-CPU on random inputs, stage latencies; then
   whole generations with cfg and og-dtp on every backend, with the pipeline's per-stage timings.
3. SD1.5-sized UNet, random weights (diffusers' UNet2DConditionModel from SD1.5's config, or without
   diffusers the same network from benchmarks/sd_unet.py): torch eager on the device driven by basinguard's
   NumPy loop (denoise + DDIM + a policy) through benchmarks/torch_adapter.py: per step the UNet, the host
   round trip of its inputs and output, the policy, the scheduler; the batch-N saving of STP. When ORT-CUDA
   or TensorRT is installed: ONNX export, both checked against ORT-CPU and timed (ORT-CUDA with its IO
   binding and with plain session.run; TensorRT with and without CUDA graphs) with cfg, og-dtp and stp.

Tolerances (max |candidate - ORT-CPU| <= atol + rtol * max |ORT-CPU|): fp32/TF32 backends rtol 1e-2,
fp16 backends rtol 5e-2; atol 1e-3. Writes a JSON report to --json (default $OUT/gpu_check.json if $OUT is set)
after every check, skip and section ("finished": false until the end), so a run stopped by its time limit keeps
what it measured; a TensorRT build is started only when its estimated time (BUILD_S) is left in the budget.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from basinguard.engine.base import LoadedModel  # noqa: E402

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon"}
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "sample_size": 8, "cross_attention_dim": 32,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8, "norm_num_groups": 32}
TOL = {"fp32": (1e-3, 1e-2), "fp16": (1e-3, 5e-2)}  # (atol, rtol)
POLICIES = ("cfg", "og-dtp", "stp")
# Seconds a TensorRT build may take (a static fp16 plan, profiles N and 2N), generous: NVIDIA's diffusion demo builds
# an SD1.5 UNet in a few minutes on data-centre GPUs; a build is started only when this much of the budget is left.
BUILD_S = {"shipped": 90, "tiny": 30, "sd15": 420}


class Report:
    """Prints as it goes and keeps everything for the JSON file; a deadline keeps the run inside its budget."""

    def __init__(self, budget_s: float, json_path: Path | None = None):
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.json_path = json_path
        self.data: dict = {"sections": {}, "skipped": [], "checks": [], "finished": False}

    def save(self) -> None:
        """Write the report so far (atomically): after every check, skip and section, so a run stopped by its
        time limit still leaves everything it measured."""
        if self.json_path is not None:
            from basinguard.files import write_atomic

            self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.json_path, json.dumps(self.data, indent=1, default=str).encode())

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        self.say(f"  SKIP {what}: {why}")
        self.save()

    def afford(self, what: str, seconds: float) -> bool:
        if self.left() < seconds:
            self.skip(what, f"needs ~{seconds:.0f} s, {max(self.left(), 0):.0f} s of the budget left")
            return False
        return True

    def check(self, what: str, got: np.ndarray, ref: np.ndarray, precision: str) -> bool:
        atol, rtol = TOL[precision]
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        finite = bool(np.isfinite(got).all())
        err = float(np.abs(got - ref).max()) if got.shape == ref.shape and finite else float("inf")
        limit = atol + rtol * float(np.abs(ref).max())
        ok = err <= limit
        self.data["checks"].append({"what": what, "max_abs": err, "limit": limit, "precision": precision, "ok": ok,
                                    "finite": finite})
        self.say(f"  {'PASS' if ok else 'FAIL'} {what}: max abs {err:.3g} (limit {limit:.3g}, {precision})"
                 + ("" if finite else "  [non-finite output]"))
        self.save()
        return ok


def probe(name: str) -> str | None:
    """Version string of an importable module, or None."""
    try:
        module = importlib.import_module(name)
    except Exception:
        return None
    return str(getattr(module, "__version__", "present"))


def placeholder_tokenizers(r: Report) -> None:
    """basinguard.runtime.pipeline imports `tokenizers` at module level, and the GPU machines may lack it. The
    SD1.5 section never tokenizes (random embeddings), so a placeholder module lets the import succeed; any use
    of it raises. The shipped model's whole generations are skipped instead (they tokenize)."""
    import importlib.util
    import types

    if importlib.util.find_spec("tokenizers") is not None:
        return

    class Missing:
        def __init__(self, *args, **kwargs):
            raise ImportError("tokenizers is not installed (gpu_check placeholder)")

    module = types.ModuleType("tokenizers")
    module.__getattr__ = lambda name: Missing  # type: ignore[attr-defined]
    sys.modules["tokenizers"] = module
    r.say("  tokenizers missing: a placeholder lets basinguard.runtime import; nothing here tokenizes")


def environment(r: Report, device: str) -> dict:
    r.say("== environment")
    env: dict = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "onnxruntime", "tensorrt", "polygraphy", "cupy", "diffusers", "tokenizers", "onnx"):
        env[name] = probe(name)
    env["cuda-python"] = probe("cuda.bindings") or probe("cuda.cudart")
    if env["torch"]:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if env["onnxruntime"]:
        import onnxruntime as ort

        env["ort_providers"] = ort.get_available_providers()
    from basinguard.engine.tensorrt import native_problem

    env["tensorrt_native"] = native_problem() or "ok"
    for k, v in env.items():
        r.say(f"  {k}: {v}")
    placeholder_tokenizers(r)
    env["can_torch"] = bool(env["torch"]) and (device == "cpu" or bool(env.get("gpu")))
    env["can_ort_cuda"] = device == "cuda" and "CUDAExecutionProvider" in env.get("ort_providers", [])
    env["can_trt"] = device == "cuda" and env["tensorrt_native"] == "ok"
    if device == "cuda" and not env.get("gpu"):
        r.skip("GPU backends", "torch sees no CUDA device")
    if not env["can_ort_cuda"]:
        r.skip("ORT-CUDA", "onnxruntime has no CUDAExecutionProvider here (pip install 'basinguard[gpu-cu12]' or "
               "'basinguard[gpu-cu13]', the driver's CUDA major)" if device == "cuda" else "--device cpu")
    if not env["can_trt"]:
        r.skip("TensorRT", env["tensorrt_native"] if device == "cuda" else "--device cpu")
    return env


def timed(model: LoadedModel, feed: dict[str, np.ndarray], repeats: int) -> float:
    """Median seconds of `repeats` model.run(feed) calls after one warm-up call."""
    model.run(feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.run(feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------- shipped model


def stage_inputs(model: LoadedModel, batch: int, latent: tuple[int, int], rng: np.random.Generator) -> dict:
    """Random inputs of the right shapes for a text encoder, UNet or VAE decoder."""
    feed = {}
    for name, spec in model.inputs.items():
        if name == "input_ids":
            feed[name] = rng.integers(0, 256, (batch, spec.shape[1] or 77)).astype(np.int64)  # byte tokens: in any CLIP vocab
        elif name == "timestep":
            feed[name] = np.full(batch, 500.0, np.float32)
        elif name == "encoder_hidden_states":
            feed[name] = rng.standard_normal((batch, spec.shape[1] or 77, spec.shape[2])).astype(np.float32)
        elif spec.rank == 4:
            feed[name] = rng.standard_normal((batch, spec.shape[1], *latent)).astype(np.float32)
        else:
            raise RuntimeError(f"no random input rule for {name} {spec.shape}")
    return feed


def shipped_section(r: Report, env: dict, folder: Path, work: Path, n: int, steps: int) -> dict:
    from basinguard.engine.ort import OrtModel
    from basinguard.runtime.model_folder import ModelFolder
    from basinguard.runtime.spec import ModelSpec

    r.say(f"== shipped model {folder}")
    out: dict = {"stages": {}, "pipelines": {}}
    r.data["sections"]["shipped"] = out  # filled in as it goes
    mf = ModelFolder.open(folder)
    f = mf.vae_scale_factor
    latent = (mf.default_size // f, mf.default_size // f)
    batches = {"text_encoder": 2 * n, "unet": 2 * n, "vae_decoder": n}
    plans: dict[str, dict] = {}
    if env["can_trt"]:
        from basinguard.engine.plans import BuildSpec
        from basinguard.engine.tensorrt import build_engines

        for kind, spec in (("tensorrt", BuildSpec(batch=n)), ("tensorrt+graph", BuildSpec(batch=n, static=True))):
            if not r.afford(f"{kind} builds (shipped model)", BUILD_S["shipped"]):
                continue
            t0 = time.perf_counter()
            plans[kind] = {"dir": work / f"engines-shipped-{kind}",
                           "records": build_engines(folder, ModelSpec(folder).engine_geometry(), spec,
                                                    cache_dir=work / f"engines-shipped-{kind}",
                                                    log=lambda s: r.say(f"  {s}"))}
            r.say(f"  {kind} plans ready in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    for role, batch in batches.items():
        path = folder / role / "model.onnx"
        ref_model = OrtModel(path, "cpu")
        feed = stage_inputs(ref_model, batch, latent, rng)
        ref = next(iter(ref_model.run(feed).values()))
        row = {"ort-cpu_ms": 1e3 * timed(ref_model, feed, 5)}
        candidates: list[tuple[str, Callable[[], LoadedModel], str]] = []
        if env["can_ort_cuda"]:
            candidates.append(("ort-cuda", lambda p=path: OrtModel(p, "cuda"), "fp32"))
        for kind, info in plans.items():
            from basinguard.engine.tensorrt import TensorRTModel

            rec = info["records"][role]
            precision = "fp16" if rec.sidecar["precision"]["fp16"] else "fp32"
            graph = kind.endswith("graph")
            candidates.append((kind, lambda rec=rec, role=role, graph=graph: TensorRTModel(rec.plan, role, cuda_graph=graph),
                               precision))
        for kind, make, precision in candidates:
            try:
                model = make()
                got = next(iter(model.run(feed).values()))
                row[f"{kind}_ok"] = r.check(f"shipped {role} {kind} vs ort-cpu", got, ref, precision)
                row[f"{kind}_ms"] = 1e3 * timed(model, feed, 20)
            except Exception as exc:
                r.say(f"  FAIL shipped {role} {kind}: {exc}")
                row[f"{kind}_error"] = str(exc)
        r.say(f"  {role} (batch {batch}): " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_ms")))
        out["stages"][role] = row

    if env["tokenizers"] is None:
        r.skip("shipped-model generations", "tokenizers is not installed")
        return out
    from basinguard.runtime.guidance import PolicyConfig
    from basinguard.runtime.pipeline import Pipeline, SamplingConfig

    backends = [("ort-cpu", "cpu", {})]
    if env["can_ort_cuda"]:
        backends.append(("ort-cuda", "cuda", {}))
    for kind, info in plans.items():
        backends.append((kind, "tensorrt", {"BASINGUARD_ENGINE_DIR": str(info["dir"]),
                                            "BASINGUARD_CUDA_GRAPH": "1" if kind.endswith("graph") else "0"}))
    reference: dict[str, np.ndarray] = {}
    for kind, provider, extra_env in backends:
        if not r.afford(f"shipped generations on {kind}", 20):
            continue
        os.environ.update(extra_env)
        try:
            pipe = Pipeline(folder, provider=provider)
            for policy in ("cfg", "og-dtp"):
                sampling = SamplingConfig(steps=steps, policy=PolicyConfig(name=policy))
                pipe.generate(["a red circle"] * n, sampling, seeds=list(range(n)))  # warm-up
                pipe.timer.reset()
                gens = pipe.generate(["a red circle"] * n, sampling, seeds=list(range(n)))
                stages = {k: round(1e3 * v, 2) for k, v in pipe.timer.summary().items()}
                pixels = np.stack([g.pixels for g in gens])
                key = f"{kind}/{policy}"
                if kind == "ort-cpu":
                    reference[policy] = pixels
                diff = float(np.abs(pixels - reference[policy]).max()) if policy in reference else None
                out["pipelines"][key] = {"ms": stages, "provider": gens[0].trace["provider"], "max_pixel_diff": diff}
                r.say(f"  {key} [{gens[0].trace['provider']}] ms: {stages}  max pixel diff vs ort-cpu: {diff}")
        except Exception as exc:
            r.say(f"  FAIL shipped generations on {kind}: {exc}")
            out["pipelines"][kind] = {"error": str(exc)}
        finally:
            for k in extra_env:
                os.environ.pop(k, None)
    return out


# ------------------------------------------------------------------------------------------ SD1.5-size UNet


class TimedPolicy:
    """A guidance policy whose decisions are timed (what the policy itself costs per step)."""

    def __init__(self, policy):
        self.policy, self.seconds = policy, 0.0

    def rows(self, step: int, t: float):
        t0 = time.perf_counter()
        try:
            return self.policy.rows(step, t)
        finally:
            self.seconds += time.perf_counter() - t0

    def scale(self, step: int, t: float, d):
        t0 = time.perf_counter()
        try:
            return self.policy.scale(step, t, d)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str):
        return getattr(self.policy, name)


def drive(model: LoadedModel, policy_name: str, n: int, steps: int, latent: tuple[int, int], context: tuple[int, int],
          seed: int = 0) -> dict:
    """One generation's denoising loop through basinguard's runtime; per-step costs in ms."""
    from basinguard.runtime.conditioning import Conditioning
    from basinguard.runtime.guidance import PolicyConfig, make_policy
    from basinguard.runtime.loop import UNetStage, denoise
    from basinguard.runtime.schedulers import make_scheduler
    from basinguard.runtime.timer import StageTimer

    rng = np.random.default_rng(seed)
    timer = StageTimer()
    unet = UNetStage(model, timer, ("sample", "timestep", "encoder_hidden_states"))
    scheduler = make_scheduler(SD15_SCHEDULER, steps, "ddim")
    policy = TimedPolicy(make_policy(PolicyConfig(name=policy_name), n))
    c = model.inputs["sample"].shape[1] or 4
    x = rng.standard_normal((n, c, *latent), dtype=np.float32) * np.float32(scheduler.init_noise_sigma)
    e_pair = rng.standard_normal((2 * n, *context), dtype=np.float32)
    with timer("loop"):
        x0, gap, scale = denoise(unet, scheduler, policy, x, Conditioning.of({"encoder_hidden_states": e_pair}))  # type: ignore[arg-type]
    loop, unet_s = timer.seconds["loop"], timer.seconds["unet"]
    return {"loop_s": loop, "unet_ms_per_step": 1e3 * unet_s / steps,
            "scheduler_policy_ms_per_step": 1e3 * (loop - unet_s) / steps,
            "policy_us_per_step": 1e6 * policy.seconds / steps, "batch_n_steps": int(np.isnan(gap[:, 0]).sum()),
            "finite": bool(np.isfinite(x0).all())}


def export_unet(module, path: Path, n: int, latent: tuple[int, int], context: tuple[int, int], device: str) -> None:
    """torch → ONNX (fp32, dynamic batch and size); the TorchScript exporter, which needs no onnxscript."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    c = module.conv_in.in_channels
    args = (torch.randn(2 * n, c, *latent, device=device), torch.full((2 * n,), 500.0, device=device),
            torch.randn(2 * n, *context, device=device))
    kwargs: dict = {"input_names": ["sample", "timestep", "encoder_hidden_states"], "output_names": ["out_sample"],
                    "dynamic_axes": {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                                     "encoder_hidden_states": {0: "batch"}, "out_sample": {0: "batch", 2: "height", 3: "width"}},
                    "opset_version": 17, "do_constant_folding": True}

    class Plain(torch.nn.Module):  # diffusers returns an output object; the exporter wants tensors
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, sample, timestep, encoder_hidden_states):
            out = self.inner(sample, timestep, encoder_hidden_states)
            return getattr(out, "sample", out)

    with torch.inference_mode(False), torch.no_grad():
        try:
            torch.onnx.export(Plain(module).eval(), args, str(path), dynamo=False, **kwargs)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(Plain(module).eval(), args, str(path), **kwargs)


def sd_section(r: Report, env: dict, work: Path, device: str, tiny: bool, n: int, size: int, steps: int,
               unet_choice: str) -> dict:
    import torch
    from sd_unet import SD15_UNET_CONFIG, build_unet
    from torch_adapter import TorchUNetModel

    from basinguard.engine.ort import OrtModel

    config = {**SD15_UNET_CONFIG, **TINY_UNET} if tiny else dict(SD15_UNET_CONFIG)
    label = "tiny UNet" if tiny else "SD1.5-sized UNet"
    latent = (size // 8, size // 8)
    context = (77, config["cross_attention_dim"])
    r.say(f"== {label}, random weights, N={n}, {size}x{size} (latent {latent[0]}x{latent[1]}), {steps} DDIM steps")
    out: dict = {"config": "tiny" if tiny else "sd15", "n": n, "size": size, "steps": steps, "runs": {}}
    r.data["sections"]["sd"] = out  # filled in as it goes: each save shows what is measured so far
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):  # initialise on the device: 860M parameters initialise in seconds there
        module, which = build_unet(config, prefer_diffusers=unet_choice != "own")
    if unet_choice == "diffusers" and which != "diffusers":
        r.say("  diffusers is not importable: using benchmarks/sd_unet.py (same layout, parameter names and count)")
    params = sum(p.numel() for p in module.parameters())
    r.say(f"  built with {which}: {params / 1e6:.1f} M parameters in {time.perf_counter() - t0:.1f} s")
    out["unet_impl"], out["parameters"] = which, params
    module.eval()

    # ONNX export + ORT-CPU reference, when a backend needs it (or on CPU, where it is cheap and tests the path).
    onnx_path = work / ("unet-tiny" if tiny else "unet-sd15") / "unet" / "model.onnx"
    need_onnx = env["can_ort_cuda"] or env["can_trt"] or device == "cpu"
    ref = feed = None
    rng = np.random.default_rng(1)
    if not need_onnx:
        r.skip(f"{label} ONNX export", "no ORT-CUDA or TensorRT here to check against ORT-CPU")
    elif env["onnx"] is None:
        r.skip(f"{label} ONNX export (and ORT-CUDA / TensorRT on it)", "torch.onnx.export needs the onnx package")
    elif r.afford(f"{label} ONNX export and ORT-CPU reference", 30 if tiny else 200):
        t0 = time.perf_counter()
        export_unet(module, onnx_path, n, latent, context, device)  # always: weights are this run's random ones
        ref_model = OrtModel(onnx_path, "cpu")
        feed = {"sample": rng.standard_normal((2 * n, 4, *latent)).astype(np.float32),
                "timestep": np.full(2 * n, 321.0, np.float32),  # not the export's 500: a baked-in constant shows
                "encoder_hidden_states": rng.standard_normal((2 * n, *context)).astype(np.float32)}
        ref = ref_model.run(feed)["out_sample"]
        del ref_model
        r.say(f"  exported {onnx_path} and ran ORT-CPU in {time.perf_counter() - t0:.1f} s "
              f"(|out| max {np.abs(ref).max():.3g})")

    dtype = torch.float16 if device == "cuda" else torch.float32
    eager = TorchUNetModel(module, device=device, dtype=dtype, in_channels=4, context_dim=context[1])
    if ref is not None and feed is not None:
        r.check(f"{label} torch eager ({'fp16' if dtype == torch.float16 else 'fp32'}) vs ort-cpu",
                eager.run(feed)["out_sample"], ref, "fp16" if dtype == torch.float16 else "fp32")
    backends: list[tuple[str, Callable[[], LoadedModel]]] = [("torch eager", lambda: eager)]
    if ref is not None:
        if env["can_ort_cuda"]:
            # IO binding (read-only conditioning and timesteps kept on the GPU, only ε copied back) against plain
            # session.run (every input copied in, the output copied back, at every call): the binding's saving.
            backends.append(("ort-cuda", lambda: OrtModel(onnx_path, "cuda")))
            backends.append(("ort-cuda session.run", lambda: OrtModel(onnx_path, "cuda", io_binding=False)))
        if env["can_trt"]:
            backends += trt_backends(r, onnx_path, n, size, work, tiny)
    for kind, make in backends:
        if not r.afford(f"{label} on {kind}", 15 if tiny else 60):
            continue
        try:
            model = make()
            if kind != "torch eager" and ref is not None and feed is not None:
                precision = "fp32" if kind.startswith("ort-cuda") else "fp16"
                r.check(f"{label} {kind} vs ort-cpu", model.run(feed)["out_sample"], ref, precision)
            sample = {"sample": np.zeros((n, 4, *latent), np.float32), "timestep": np.full(n, 500.0, np.float32),
                      "encoder_hidden_states": np.zeros((n, *context), np.float32)}
            pair = {k: np.concatenate([v, v]) for k, v in sample.items()}
            out["runs"][kind] = {"unet_ms_batch_n": 1e3 * timed(model, sample, 3),
                                 "unet_ms_batch_2n": 1e3 * timed(model, pair, 3)}
            drive(model, "stp", n, 4, latent, context)  # warm-up: first-call setup at both batch sizes
            if isinstance(model, TorchUNetModel):
                model.reset()
            for policy in POLICIES:
                res = drive(model, policy, n, steps, latent, context)
                if isinstance(model, TorchUNetModel):
                    calls = sum(model.calls.values())
                    res["h2d_ms_per_call"] = 1e3 * model.seconds["h2d"] / calls
                    res["d2h_ms_per_call"] = 1e3 * model.seconds["d2h"] / calls
                    res["compute_ms_per_call"] = 1e3 * model.seconds["compute"] / calls
                    model.reset()
                out["runs"][kind][policy] = res
            report_runs(r, kind, out["runs"][kind], steps)
        except Exception as exc:
            r.say(f"  FAIL {label} on {kind}: {exc}")
            out["runs"][kind] = {"error": str(exc), "trace": traceback.format_exc(limit=3)}
    return out


def trt_backends(r: Report, onnx_path: Path, n: int, size: int, work: Path, tiny: bool) -> list:
    """A static TensorRT plan (profiles at N and 2N, one size) run without and with CUDA graphs."""
    from basinguard.engine.plans import BuildSpec, role_profiles
    from basinguard.engine.tensorrt import TensorRTModel, build_plan

    # A build cannot be stopped once started: refuse one that would not finish before the deadline.
    if not r.afford("TensorRT build (UNet)", BUILD_S["tiny" if tiny else "sd15"]):
        return []
    spec = BuildSpec(batch=n, image=(size, size), static=True)
    t0 = time.perf_counter()
    record = build_plan(onnx_path, "unet", role_profiles("unet", spec, 8, size, 8), spec, work / "engines-unet",
                        log=lambda s: r.say(f"  {s}"))
    r.say(f"  plan ready in {time.perf_counter() - t0:.1f} s")
    return [("tensorrt", lambda: TensorRTModel(record.plan, "unet")),
            ("tensorrt+graph", lambda: TensorRTModel(record.plan, "unet", cuda_graph=True))]


def report_runs(r: Report, kind: str, runs: dict, steps: int) -> None:
    bn, b2n = runs["unet_ms_batch_n"], runs["unet_ms_batch_2n"]
    r.say(f"  {kind}: UNet call {bn:.2f} ms at batch N, {b2n:.2f} ms at 2N (N/2N = {bn / b2n:.2f})")
    for policy in POLICIES:
        p = runs[policy]
        line = (f"    {policy:7s} loop {p['loop_s']:.3f} s: per step UNet {p['unet_ms_per_step']:.2f} ms, scheduler+policy "
                f"{p['scheduler_policy_ms_per_step']:.3f} ms (policy alone {p['policy_us_per_step']:.1f} us), "
                f"{p['batch_n_steps']}/{steps} steps at batch N")
        if "d2h_ms_per_call" in p:
            line += (f"; round trip per call: in {p['h2d_ms_per_call']:.3f} ms, out {p['d2h_ms_per_call']:.3f} ms "
                     f"(compute {p['compute_ms_per_call']:.2f} ms)")
        r.say(line + ("" if p["finite"] else "  [non-finite latents]"))
    saving = 1 - runs["stp"]["loop_s"] / runs["cfg"]["loop_s"]
    runs["stp_saving_vs_cfg"] = saving
    r.say(f"    STP (pre-scale 0) saves {100 * saving:.1f}% of the loop vs cfg at this size")
    r.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet instead of the SD1.5-sized one (CPU tests)")
    ap.add_argument("--unet", choices=("auto", "diffusers", "own"), default="auto",
                    help="auto/diffusers: diffusers' UNet2DConditionModel when importable; own: benchmarks/sd_unet.py")
    ap.add_argument("--batch", type=int, default=4, help="N images: STP's unconditional-only steps run the UNet at N, "
                    "guided steps at 2N; both are timed (at N = 1 launch overheads hide the difference)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 512, tiny 64)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 30, tiny 4)")
    ap.add_argument("--model", type=Path, default=None, help="an exported ONNX folder (default: the shipped model)")
    ap.add_argument("--skip-shipped", action="store_true")
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--skip-diffusers", action="store_true", help="skip the diffusers adapter section")
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting sections after this many seconds")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "basinguard-gpu-check")
    ap.add_argument("--json", type=Path, default=Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    args = ap.parse_args(argv)
    size = args.size or (64 if args.tiny else 512)
    steps = args.steps or (4 if args.tiny else 30)
    r = Report(args.budget_s, args.json)
    r.data["settings"] = {"batch": args.batch, "size": size, "steps": steps, "budget_s": args.budget_s}
    args.work.mkdir(parents=True, exist_ok=True)
    env = environment(r, args.device)
    r.data["environment"] = env
    r.save()
    rc = 0
    if not args.skip_shipped:
        from basinguard.cli import SHIPPED_MODEL

        folder = args.model or SHIPPED_MODEL
        if not (folder / "unet" / "model.onnx").is_file():
            r.skip("shipped model", f"no exported model at {folder}")
        else:
            try:
                r.data["sections"]["shipped"] = shipped_section(r, env, folder, args.work, args.batch, min(steps, 20))
            except Exception as exc:
                r.say(f"  FAIL shipped model section: {exc}\n{traceback.format_exc(limit=4)}")
                rc = 1
            r.save()
    if not args.skip_sd:
        if not env["can_torch"]:
            r.skip("SD UNet section", "torch is missing" if not env["torch"] else "torch sees no CUDA device")
        else:
            try:
                r.data["sections"]["sd"] = sd_section(r, env, args.work, args.device, args.tiny, args.batch, size, steps,
                                                      args.unet)
            except Exception as exc:
                r.say(f"  FAIL SD UNet section: {exc}\n{traceback.format_exc(limit=4)}")
                rc = 1
            r.save()
    if args.device == "cuda" and not args.skip_diffusers and env["can_torch"]:  # benchmarks/gpu_check_diffusers.py
        try:
            from gpu_check_diffusers import diffusers_section

            r.data["sections"]["diffusers"] = diffusers_section(r, args.device, args.tiny)
        except Exception as exc:
            r.say(f"  FAIL diffusers adapter section: {exc}\n{traceback.format_exc(limit=4)}")
            rc = 1
        r.save()
    failed = [c["what"] for c in r.data["checks"] if not c["ok"]]
    r.say(f"== done in {time.perf_counter() - r.start:.0f} s: {len(r.data['checks']) - len(failed)}/{len(r.data['checks'])} "
          f"checks passed, {len(r.data['skipped'])} skipped" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    r.data["finished"] = True
    r.save()
    if args.json:
        r.say(f"report: {args.json}")
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
