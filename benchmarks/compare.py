"""basinguard against diffusers (torch) and optimum (ONNX Runtime) on the same model and settings.

    python benchmarks/compare.py [--models shipped tiny64 tiny256] [--batches 1 4] [--steps 50] [--repeats 5]
                                 [--threads 2] [--plot] [--quick] [--out benchmarks/results/compare]

Contenders, all in one process and run in alternation (round-robin, the order rotated every round so
that drift of the machine hits everyone alike), after `--warmup` untimed rounds; at least `--repeats` timed
rounds, more (up to `--max-repeats`) until the timed rounds of a setting took `--target-s` seconds:

  (a) torch    diffusers `StableDiffusionPipeline` on torch (CPU, float32)
  (b) optimum  optimum-onnx's `ORTStableDiffusionPipeline` on the ONNX folder
  (c) ours     basinguard's `Pipeline` on the same ONNX folder, policies cfg, stp (s_pre = 0, τ = 500: the
               UNet runs at batch N instead of 2N while t > τ), dtp and og-dtp

Every contender gets the same prompt, the same initial latents (`latents=` for (a)/(b), `Pipeline.generate(...,
latents=...)` for (c)), the same guidance scale, the same number of steps and DPM++ 2M (`DPMSolverMultistep
Scheduler.from_config` for (a)/(b), `scheduler="dpm++2m"` for (c)), and the same thread count: torch
`set_num_threads(--threads)` (one inter-op thread), ONNX Runtime `intra_op_num_threads = --threads` (one inter-op
thread) for (b) and (c). Otherwise (b) runs with optimum's default session options (ORT's defaults: full graph
optimisation, sequential execution, memory arena and patterns) and (c) with basinguard's
(`basinguard.engine.ort.session_options`), which today are the same settings, so (b) against (c) compares
the pipelines around equivalent sessions. (b) and (c) always run on the same ONNX files: basinguard's export
when optimum's pipeline loads it, else a folder written by `optimum-cli export onnx --task text-to-image`,
which basinguard loads as well.

Stage times are measured the same way for everyone, by wrapping the model calls with timers: torch modules'
`forward` (text encoder, UNet) and `vae.decode` for (a); ONNX Runtime `InferenceSession.run` (and
`run_with_iobinding`) of the text encoder, UNet and VAE decoder sessions for (b) and (c). "other" is the rest
of the wall time of one pipeline call: scheduler, guidance policy, tokenizer, tensor conversions and copies,
image post-processing. Peak memory is the peak resident set size (VmHWM) of a fresh subprocess per contender
family that imports its runtime, loads the model and runs one generation of `--probe-steps` steps at
the setting's size and batch (the policy does not change what is allocated: after τ stp runs at 2N like cfg).

Models: `shipped` (the shipped model, ONNX at basinguard/models/shapes, its diffusers source in its diffusers/
subfolder, else at build/shapes-model), and `tiny64` / `tiny256`: one tiny random SD-shaped pipeline built here from configs (no
download), run at 64x64 and at 256x256: UNet block_out_channels (32, 64, 64), one layer per block,
cross-attention in the two upper levels (CrossAttnDown, CrossAttnDown, Down / Up, CrossAttnUp, CrossAttnUp),
8 attention heads (diffusers' `attention_head_dim`), cross-attention dim 64; a 4-level VAE (16, 32, 64, 64;
latents 1/8 of the image as in SD); a 2-layer CLIP text encoder (width 64, 77 tokens); SD 1.x's scheduler config.
Built and exported once under --work and reused.

optimum-onnx 0.1.0 shares this environment with basinguard's export extra (diffusers 0.36, transformers 4.57);
with versions that could not coexist, (b) would need its own virtual environment.

Goals (on a CPU): ours ≥ 1.5x faster than (a) and ≥ 1.1x faster than (b); dtp/cfg ≤ 1.01;
"other" ≤ 2 % of ours' wall time. Writes OUT.json (raw rounds and medians), OUT.md (the printed tables) and
with --plot OUT.png (stacked per-stage bars).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from basinguard.cli import SHIPPED_MODEL  # noqa: E402
from basinguard.demo import load_memorization  # noqa: E402
from basinguard.runtime.guidance import PolicyConfig  # noqa: E402
from basinguard.runtime.spec import ModelSpec as FolderSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SOURCES = (SHIPPED_MODEL / "diffusers", ROOT / "build" / "shapes-model")  # its torch weights: first found
TINY_PROMPT = "a photo of an astronaut riding a horse on mars"
OURS = ("cfg", "stp", "dtp", "og-dtp")
CONTENDERS = ("torch", "optimum", *(f"ours-{p}" for p in OURS))
MODEL_STAGES = ("text_encoder", "unet", "vae")


# ------------------------------------------------------------------------------------------------ models


@dataclass
class ModelSpec:
    key: str
    source: Path  # diffusers folder, for (a)
    onnx: Path  # ONNX folder for (b) and (c)
    size: int  # image side
    latent_factor: int  # image side / latent side (the VAE's downsampling)
    prompt: str
    guidance_scale: float
    opposite_scale: float | None  # None: λ (Algorithm 1)
    onnx_kind: str = "basinguard"  # or "optimum-cli"


def write_clip_vocab(folder: Path, words: list[str]) -> None:
    """A CLIP-format BPE (vocab.json + merges.txt): byte characters, each also with "</w>", one merge chain per
    word so each listed word is one token; any other text still tokenizes, as single characters."""
    from transformers import CLIPTokenizer

    from basinguard.runtime.tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    tokens, merges = base + [c + "</w>" for c in base], []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            if f"{symbols[0]} {symbols[1]}" not in merges:
                merges.append(f"{symbols[0]} {symbols[1]}")
                tokens.append(symbols[0] + symbols[1])
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    raw = folder.parent / f"{folder.name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=77).save_pretrained(folder)


def build_tiny_pipeline(dest: Path) -> None:
    """The tiny random SD-shaped pipeline described in the module docstring (seeded, safetensors)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tok_dir = dest.parent / "tokenizer-src"
    write_clip_vocab(tok_dir, TINY_PROMPT.split())
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=1,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.no_grad():  # random weights, perturbed so that no zero-initialised layer makes an output constant
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.add_(0.05 * torch.randn_like(p))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)  # SD 1.x's config
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(dest, safe_serialization=True)


def optimum_loads(folder: Path) -> str | None:
    """None when optimum's pipeline loads `folder`, else the first line of its error."""
    try:
        OptimumContender(folder, threads=1)
    except Exception as exc:  # optimum raises whatever its loaders raise
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def ensure_onnx(source: Path, ours: Path | None, work: Path, log: Callable[[str], None]) -> tuple[Path, str]:
    """An ONNX folder that both (b) and (c) load: basinguard's export when optimum loads it, else optimum-cli's."""
    if ours is None:
        ours = work / "onnx"
        if not (ours / "basinguard.json").exists():
            from basinguard.export.onnx_export import export_pipeline

            log(f"exporting {source} → {ours} (basinguard)")
            export_pipeline(source, ours, log=log)
    err = optimum_loads(ours)
    if err is None:
        return ours, "basinguard"
    alt = work / "optimum-onnx"
    log(f"optimum cannot load {ours} ({err}); using an optimum-cli export at {alt} for (b) and (c)")
    if not (alt / "unet" / "model.onnx").exists():
        subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model",
                        str(source), "--task", "text-to-image", str(alt)], check=True)
    return alt, "optimum-cli"


def model_specs(keys: list[str], work: Path, log: Callable[[str], None]) -> list[ModelSpec]:
    specs = []
    for key in keys:
        if key == "shipped":
            found = [s for s in SHIPPED_SOURCES if (s / "model_index.json").exists()]
            if not (SHIPPED_MODEL / "unet" / "model.onnx").exists() or not found:
                log(f"skipping the shipped model: needs {SHIPPED_MODEL} (ONNX) and its diffusers source in one of "
                    f"{', '.join(map(str, SHIPPED_SOURCES))}")
                continue
            source, prompt = found[0], load_memorization(SHIPPED_MODEL)[0][0]["caption"]  # a duplicated caption
            onnx, kind = ensure_onnx(source, SHIPPED_MODEL, work / "shapes", log)
        elif key in ("tiny64", "tiny256"):
            source = work / "tiny-sd" / "diffusers"
            if not (source / "model_index.json").exists():
                log(f"building the tiny random SD pipeline at {source}")
                build_tiny_pipeline(source)
            onnx, kind = ensure_onnx(source, None, work / "tiny-sd", log)
            prompt = TINY_PROMPT
        else:
            raise SystemExit(f"unknown model {key!r}; choose from shipped, tiny64, tiny256")
        model_policy = FolderSpec(onnx).sampling().policy  # the model's own λ and λ_og (settings' one owner)
        unet_cfg = json.loads((onnx / "unet" / "config.json").read_text())
        vae_cfg = json.loads((onnx / "vae_decoder" / "config.json").read_text())
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        size = {"tiny64": 64, "tiny256": 256}.get(key, int(unet_cfg.get("sample_size", 64)) * factor)
        specs.append(ModelSpec(key, source, onnx, size, factor, prompt, model_policy.guidance_scale,
                               model_policy.opposite_scale, kind))
    return specs


# ------------------------------------------------------------------------------------------------ timing


class CallTimer:
    """Seconds and calls per stage, collected by wrapping the methods that run a model."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.wrapped: set[int] = set()

    def wrap(self, obj: Any, attr: str, stage: str) -> None:
        original = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        setattr(obj, attr, timed)  # an instance attribute shadows the method for this object only

    def wrap_session(self, session: Any, stage: str) -> None:
        self.wrap(session, "run", stage)
        self.wrap(session, "run_with_iobinding", stage)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


class TorchContender:
    """(a) diffusers on torch, DPM++ 2M, float32."""

    family = "torch"

    def __init__(self, source: Path, threads: int):
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        torch.set_num_threads(threads)
        self.torch = torch
        self.pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False,
                                                            torch_dtype=torch.float32)
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)  # tqdm costs time per step
        self.timer = CallTimer()
        self.timer.wrap(self.pipe.text_encoder, "forward", "text_encoder")
        self.timer.wrap(self.pipe.unet, "forward", "unet")
        self.timer.wrap(self.pipe.vae, "decode", "vae")

    def generate(self, prompt: str, latents: np.ndarray, steps: int, guidance_scale: float, size: int) -> np.ndarray:
        with self.torch.inference_mode():
            return self.pipe([prompt] * len(latents), height=size, width=size, num_inference_steps=steps,
                             guidance_scale=guidance_scale, latents=self.torch.from_numpy(latents),
                             output_type="np").images


class OptimumContender(TorchContender):
    """(b) optimum-onnx's ORTStableDiffusionPipeline with its default session options, threads pinned."""

    family = "optimum"

    def __init__(self, folder: Path, threads: int):
        import onnxruntime as ort
        import torch
        from diffusers import DPMSolverMultistepScheduler
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        torch.set_num_threads(threads)  # optimum's scheduler and glue run in torch
        self.torch = torch
        opts = ort.SessionOptions()  # optimum's default (None) is ORT's defaults; only the thread counts are pinned
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        self.pipe = ORTStableDiffusionPipeline.from_pretrained(folder, export=False, provider="CPUExecutionProvider",
                                                               session_options=opts)
        self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.timer = CallTimer()
        for stage, part in (("text_encoder", self.pipe.text_encoder), ("unet", self.pipe.unet),
                            ("vae", self.pipe.vae_decoder)):
            self.timer.wrap_session(part.session, stage)


class OursContender:
    """(c) basinguard's Pipeline with one guidance policy; the four policies share one loaded Pipeline."""

    family = "ours"

    def __init__(self, pipe: Any, policy: PolicyConfig, timer: CallTimer):
        self.pipe, self.policy, self.timer = pipe, policy, timer

    @classmethod
    def load(cls, folder: Path, threads: int, policies: dict[str, PolicyConfig],
             static_shapes: bool = True) -> dict[str, OursContender]:
        from basinguard.runtime.pipeline import Pipeline

        pipe = Pipeline(folder, provider="cpu", threads=threads, static_shapes=static_shapes)
        timer = CallTimer()
        for stage, model in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet.model),
                             ("vae", pipe.vae_decoder)):
            timer.wrap_session(model.session, stage)
        timer.wrapped = {id(pipe.unet.model.session)}
        return {f"ours-{name}": cls(pipe, p, timer) for name, p in policies.items()}

    def generate(self, prompt: str, latents: np.ndarray, steps: int, guidance_scale: float, size: int) -> np.ndarray:
        from basinguard.runtime.pipeline import SamplingConfig

        # Shape-specialised UNet sessions appear during the warm-up round (at a shape's first call); time them too.
        for session in self.pipe.unet.model.sessions:
            if id(session) not in self.timer.wrapped:
                self.timer.wrap_session(session, "unet")
                self.timer.wrapped.add(id(session))
        sampling = SamplingConfig(steps=steps, scheduler="dpm++2m", height=size, width=size, policy=self.policy)
        gens = self.pipe.generate([prompt] * len(latents), sampling, latents=latents)
        return np.stack([g.pixels for g in gens])


def policy_configs(spec: ModelSpec) -> dict[str, PolicyConfig]:
    lam = spec.guidance_scale
    return {"cfg": PolicyConfig("cfg", guidance_scale=lam),
            "stp": PolicyConfig("stp", guidance_scale=lam, transition_t=500, pre_scale=0.0),
            "dtp": PolicyConfig("dtp", guidance_scale=lam, pre_scale=0.0),
            "og-dtp": PolicyConfig("og-dtp", guidance_scale=lam, opposite_scale=spec.opposite_scale)}


def initial_latents(batch: int, size: int, factor: int, seed: int = 0) -> np.ndarray:
    """As basinguard's Pipeline.initial_latents: one generator per image, 4 latent channels."""
    side = size // factor
    return np.stack([np.random.default_rng(seed + k).standard_normal((4, side, side), dtype=np.float32)
                     for k in range(batch)])


def run_once(contender: Any, prompt: str, latents: np.ndarray, steps: int, guidance: float, size: int
             ) -> tuple[dict, np.ndarray]:
    contender.timer.reset()
    gc.collect()
    gc.disable()  # a collection inside one contender's run would be charged to it alone
    try:
        start = time.perf_counter()
        images = contender.generate(prompt, latents, steps, guidance, size)
        total = time.perf_counter() - start
    finally:
        gc.enable()
    row: dict[str, Any] = {s: contender.timer.seconds.get(s, 0.0) for s in MODEL_STAGES}
    row["unet_calls"] = contender.timer.calls.get("unet", 0)
    row["total"] = total
    row["other"] = total - sum(row[s] for s in MODEL_STAGES)
    return row, np.asarray(images, dtype=np.float32)


def summarize(rounds: list[dict], batch: int) -> dict:
    keys = (*MODEL_STAGES, "other", "total")
    med = {k: statistics.median(r[k] for r in rounds) for k in keys}
    med["unet_calls"] = rounds[0]["unet_calls"]
    med["unet_per_call"] = med["unet"] / max(med["unet_calls"], 1)
    med["other_fraction"] = med["other"] / med["total"]
    med["images_per_s"] = batch / med["total"]
    med["total_min"] = min(r["total"] for r in rounds)
    return med


# ------------------------------------------------------------------------------------------------ memory


def proc_status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB. Not `ru_maxrss`: Linux carries the
    parent's peak over fork + exec into the child's, so a probe started from this (big) process would report it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe(spec_json: str) -> None:
    """Subprocess entry: import one runtime, load, generate once; print RSS figures as one JSON line."""
    s = json.loads(spec_json)
    after_import = proc_status_mib("VmRSS")  # numpy + basinguard's policy module, imported at the top of this script
    if s["family"] == "torch":
        contender: Any = TorchContender(Path(s["source"]), s["threads"])
    elif s["family"] == "optimum":
        contender = OptimumContender(Path(s["onnx"]), s["threads"])
    else:
        contender = next(iter(OursContender.load(Path(s["onnx"]), s["threads"],
                                                 {"cfg": PolicyConfig("cfg", guidance_scale=s["guidance"])},
                                                 s["static_shapes"]).values()))
    after_load = proc_status_mib("VmRSS")
    latents = initial_latents(s["batch"], s["size"], s["factor"])
    contender.generate(s["prompt"], latents, s["steps"], s["guidance"], s["size"])
    peak = proc_status_mib("VmHWM")
    print(json.dumps({"rss_start_mib": after_import, "rss_loaded_mib": after_load, "peak_rss_mib": peak}))


def measure_memory(spec: ModelSpec, batch: int, size: int, steps: int, threads: int,
                   static_shapes: bool) -> dict[str, dict]:
    out = {}
    for family in ("torch", "optimum", "ours"):
        arg = json.dumps({"family": family, "source": str(spec.source), "onnx": str(spec.onnx), "batch": batch,
                          "size": size, "factor": spec.latent_factor, "steps": steps, "threads": threads, "prompt": spec.prompt,
                          "guidance": spec.guidance_scale, "static_shapes": static_shapes})
        res = subprocess.run([sys.executable, __file__, "--probe", arg], capture_output=True, text=True)
        if res.returncode != 0:
            out[family] = {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            out[family] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------------------------ report


def setting_table(setting: dict) -> str:
    med, mem = setting["median"], setting.get("memory", {})
    a, b = med["torch"]["total"], med["optimum"]["total"]
    lines = [f"### {setting['model']} {setting['size']}x{setting['size']}, batch {setting['batch']} "
             f"({setting['onnx_kind']} ONNX export, {len(setting['rounds']['torch'])} rounds)", "",
             "| contender | text encoder ms | UNet ms (calls) | UNet ms/call | other ms (% wall) | VAE ms | total ms "
             "| images/s | peak RSS MiB | ×faster than (a) | ×faster than (b) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in med.items():
        family = "ours" if name.startswith("ours") else name
        peak = mem.get(family, {}).get("peak_rss_mib")
        lines.append(
            f"| {name} | {r['text_encoder'] * 1e3:.2f} | {r['unet'] * 1e3:.1f} ({r['unet_calls']}) "
            f"| {r['unet_per_call'] * 1e3:.3f} | {r['other'] * 1e3:.1f} ({100 * r['other_fraction']:.1f} %) "
            f"| {r['vae'] * 1e3:.1f} | {r['total'] * 1e3:.1f} | {r['images_per_s']:.2f} "
            f"| {'-' if peak is None else f'{peak:.0f}'} | {a / r['total']:.2f} | {b / r['total']:.2f} |")
    diff = setting.get("max_abs_diff_vs_ours_cfg", {})
    lines += ["", "max |image − ours-cfg image|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items())]
    return "\n".join(lines)


def goals(settings: list[dict]) -> list[str]:
    out = []
    for s in settings:
        med = s["median"]
        cfg = med["ours-cfg"]
        va, vb = med["torch"]["total"] / cfg["total"], med["optimum"]["total"] / cfg["total"]
        dtp = med["ours-dtp"]["total"] / cfg["total"]
        # cfg and dtp make identical model calls; only "other" (scheduler, policy, glue) differs in work.
        dtp_work = 1 + (med["ours-dtp"]["other"] - cfg["other"]) / cfg["total"]
        other = max(med[f"ours-{p}"]["other_fraction"] for p in OURS)

        def mark(ok: bool) -> str:
            return "met" if ok else "MISSED"

        pr = s["paired_speedup"]
        out.append(f"- {s['model']} {s['size']}px batch {s['batch']}: ours-cfg vs (a) {va:.2f}x ({mark(va >= 1.5)}), "
                   f"vs (b) {vb:.2f}x ({mark(vb >= 1.1)}); dtp/cfg {dtp:.3f} ({mark(dtp <= 1.01)}; attributed to the work "
                   f"that differs: {dtp_work:.4f}, {mark(dtp_work <= 1.01)}); "
                   f"stp/cfg {med['ours-stp']['total'] / cfg['total']:.3f}; "
                   f"max other {100 * other:.1f} % ({mark(other <= 0.02)}). Per-round medians: ours-cfg vs (a) "
                   f"{pr['ours-cfg']['vs_torch']:.2f}x, vs (b) {pr['ours-cfg']['vs_optimum']:.2f}x, dtp/cfg "
                   f"{pr['ours-dtp']['vs_ours_cfg']:.3f}, ours-stp vs (b) {pr['ours-stp']['vs_optimum']:.2f}x")
    return out


def plot(settings: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(settings), 1, figsize=(9, 2.2 * len(settings) + 0.6), squeeze=False)
    colours = {"text_encoder": "#4c72b0", "unet": "#dd8452", "other": "#8c8c8c", "vae": "#55a868"}
    for ax, s in zip(axes[:, 0], settings):
        names = list(s["median"])
        left = np.zeros(len(names))
        for stage in ("text_encoder", "unet", "other", "vae"):
            vals = np.array([s["median"][n][stage] * 1e3 for n in names])
            ax.barh(names, vals, left=left, color=colours[stage], label=stage.replace("_", " "))
            left += vals
        for y, n in enumerate(names):
            ax.text(left[y], y, f" {s['median'][n]['total'] * 1e3:.0f} ms", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, left.max() * 1.18)
        ax.set_title(f"{s['model']} {s['size']}x{s['size']}, batch {s['batch']}", fontsize=10)
        ax.set_xlabel("ms per pipeline call (median)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the legend above the first panel
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(args: argparse.Namespace, specs: list[ModelSpec], settings: list[dict], final: bool) -> None:
    """OUT.json, OUT.md (and with --plot OUT.png) for the settings done so far."""
    from importlib.metadata import version

    import onnxruntime as ort
    import torch

    header = (f"# basinguard vs diffusers (torch) vs optimum (ONNX Runtime)\n\n{args.steps} steps DPM++ 2M, "
              f"{args.threads} thread(s) for everyone (torch intra-op; ONNX Runtime intra-op). Medians of at least "
              f"{args.repeats} round-robin rounds after {args.warmup} warm-up round(s); cheap settings run more rounds "
              f"(up to {args.max_repeats}) until their timed rounds took {args.target_s:.0f} s (count in each title). "
              f"Stage times from wrapped model calls; other = wall − model calls. Peak RSS (VmHWM): one subprocess per "
              f"family, one generation of {args.probe_steps} steps. ours-stp: s_pre 0, τ 500 (UNet at batch N before "
              f"τ). Ours {'with dynamic-shape sessions only' if args.dynamic_shapes else 'with shape-specialised UNet sessions (Pipeline(static_shapes=True), built in the warm-up round)'}; (b) "
              f"with ORT's dynamic-shape session as optimum opens it. Run on {args.date}."
              f"{'' if final else ' PARTIAL: the run has not finished.'}\n")
    text = header + "\n" + "\n\n".join(setting_table(s) for s in settings) + "\n\n## Goals\n\n" \
        + "\n".join(goals(settings)) + "\n"
    if final:
        print(text)
    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "onnxruntime": ort.__version__}
    versions |= {dist: version(dist) for dist in ("diffusers", "transformers", "optimum-onnx")}
    record = {"complete": final, "steps": args.steps, "threads": args.threads, "warmup": args.warmup,
              "repeats": args.repeats, "target_s": args.target_s, "max_repeats": args.max_repeats,
              "probe_steps": args.probe_steps, "dynamic_shapes": args.dynamic_shapes, "date": args.date,
              "platform": platform.platform(), "versions": versions,
              "models": [asdict(s) | {"source": str(s.source), "onnx": str(s.onnx)} for s in specs],
              "settings": settings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    args.out.with_suffix(".md").write_text(text)
    if args.plot:
        plot(settings, args.out.with_suffix(".png"))
    if final:
        print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}"
              + (f", {args.out.with_suffix('.png')}" if args.plot else ""), file=sys.stderr)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["shipped", "tiny64", "tiny256"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per setting")
    p.add_argument("--repeats", type=int, default=5, help="minimum timed rounds per setting (medians reported)")
    p.add_argument("--target-s", type=float, default=60.0,
                   help="add timed rounds until they took this long in all (up to --max-repeats)")
    p.add_argument("--max-repeats", type=int, default=25)
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads, for everyone")
    p.add_argument("--probe-steps", type=int, default=10, help="steps of the memory-probe generation")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--dynamic-shapes", action="store_true",
                   help="ours without shape-specialised UNet sessions (Pipeline(static_shapes=False))")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "bench", help="tiny pipeline and exports")
    p.add_argument("--plot", action="store_true", help="also write OUT.png")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny64, batch 1, 3 steps, 2 warm-up rounds, 1 round")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare")
    p.add_argument("--render", type=Path, help="only rewrite OUT.md (and with --plot OUT.png) from this OUT.json")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        probe(args.probe)
        return 0
    if args.render:
        record = json.loads(args.render.read_text())
        for key in ("steps", "threads", "warmup", "repeats", "target_s", "max_repeats", "probe_steps"):
            setattr(args, key, record[key])
        args.dynamic_shapes = record.get("dynamic_shapes", True)
        args.date = record.get("date", "an unrecorded date")
        specs = [ModelSpec(**{**m, "source": Path(m["source"]), "onnx": Path(m["onnx"])}) for m in record["models"]]
        write_report(args, specs, record["settings"], final=record["complete"])
        return 0
    args.date = time.strftime("%Y-%m-%d")
    if args.quick:
        args.models, args.batches, args.steps, args.warmup, args.repeats, args.probe_steps = ["tiny64"], [1], 3, 2, 1, 2
        args.target_s = 0.0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    specs = model_specs(args.models, args.work, log)
    settings: list[dict] = []
    loaded: dict[tuple[Path, Path], dict[str, Any]] = {}  # tiny64 and tiny256 share one loaded model
    for spec in specs:
        key = (spec.source, spec.onnx)
        if key not in loaded:
            contenders: dict[str, Any] = {"torch": TorchContender(spec.source, args.threads),
                                          "optimum": OptimumContender(spec.onnx, args.threads)}
            contenders |= OursContender.load(spec.onnx, args.threads, policy_configs(spec), not args.dynamic_shapes)
            loaded = {key: contenders}  # drop the previous model's sessions
        contenders = loaded[key]
        for batch in args.batches:
            latents = initial_latents(batch, spec.size, spec.latent_factor)
            rounds: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
            images: dict[str, np.ndarray] = {}
            r, timed = 0, 0.0
            # At least --repeats timed rounds; cheap settings keep going until --target-s of timed rounds (capped),
            # so that their medians rest on many rounds while an expensive setting stops at --repeats.
            while r < args.warmup + args.repeats or (timed < args.target_s and r < args.warmup + args.max_repeats):
                k = r % len(CONTENDERS)
                start = time.perf_counter()
                for name in CONTENDERS[k:] + CONTENDERS[:k]:
                    row, images[name] = run_once(contenders[name], spec.prompt, latents, args.steps,
                                                 spec.guidance_scale, spec.size)
                    if r >= args.warmup:
                        rounds[name].append(row)
                if r >= args.warmup:
                    timed += time.perf_counter() - start
                r += 1
                log(f"{spec.key} batch {batch} round {r} ({'warm-up' if r <= args.warmup else 'timed'}): "
                    + "  ".join(f"{n} {rounds[n][-1]['total'] * 1e3:.0f}" for n in CONTENDERS if rounds[n]))
            # Per-round ratios (their median is robust to a burst of load that hits one round harder than others).
            paired = {n: {"vs_torch": statistics.median(a["total"] / b["total"] for a, b in zip(rounds["torch"], rounds[n])),
                          "vs_optimum": statistics.median(a["total"] / b["total"]
                                                          for a, b in zip(rounds["optimum"], rounds[n])),
                          "vs_ours_cfg": statistics.median(b["total"] / a["total"]
                                                           for a, b in zip(rounds["ours-cfg"], rounds[n]))}
                      for n in CONTENDERS}
            setting = {"model": spec.key, "paired_speedup": paired, "size": spec.size, "batch": batch, "onnx": str(spec.onnx),
                       "onnx_kind": spec.onnx_kind, "source": str(spec.source), "prompt": spec.prompt,
                       "guidance_scale": spec.guidance_scale,
                       "median": {n: summarize(rounds[n], batch) for n in CONTENDERS},
                       "max_abs_diff_vs_ours_cfg": {n: float(np.abs(images[n] - images["ours-cfg"]).max())
                                                    for n in ("torch", "optimum")},
                       "rounds": rounds}
            if not args.no_memory:
                setting["memory"] = measure_memory(spec, batch, spec.size, args.probe_steps, args.threads,
                                                   not args.dynamic_shapes)
            settings.append(setting)
            log(setting_table(setting))
            write_report(args, specs, settings, final=False)  # a killed run keeps the settings it finished

    write_report(args, specs, settings, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
