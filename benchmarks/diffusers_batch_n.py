"""What the diffusers adapter (basinguard.diffusers.guard) saves and costs inside diffusers' own SD pipeline.

    python benchmarks/diffusers_batch_n.py --config small --threads 2

A StableDiffusionPipeline with a random-weight UNet (`--config`: tiny, small or sd15, SD 1.5's own UNet config) and
random prompt embeddings (no text encoder runs), DDIM, output_type="latent" (the VAE is left out: it costs the same
under every policy). Times, in one process and interleaved over --repeats rounds (median per variant):
- plain: the pipeline called as it is (CFG at batch 2N every step);
- guarded cfg: guard(pipe, "cfg"): the same work plus d per image and the policy each step (the adapter's cost);
- guarded stp: guard(pipe, "stp", transition_t=τ): the steps before τ run the UNet on the N unconditional rows only;
- guarded dtp: guard(pipe, "dtp"): d every step, so batch 2N throughout (its saving is memorization, not time).
Seconds are CPU time of the process on the CPU (so that other work on the machine does not count), wall time on a
GPU. Prints each variant's seconds, stp/cfg, the number of batch-N steps, and the batch-N/batch-2N UNet time ratio.
Also a library: gpu_check_diffusers.py builds its pipelines with `build_pipeline`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# UNet configs over SD 1.5's (sd_unet.SD15_UNET_CONFIG): tiny as the tests' tiny model; small a 3-level UNet.
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": [32, 64], "layers_per_block": 1, "sample_size": 8, "cross_attention_dim": 32,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8},
    "small": {"block_out_channels": [64, 128, 256], "layers_per_block": 1, "sample_size": 32,
              "cross_attention_dim": 256, "attention_head_dim": 8,
              "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "sd15": {},
}
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000}


def build_pipeline(config: str, device: str = "cpu", dtype: Any = None) -> Any:
    """A StableDiffusionPipeline with a random UNet of `config` (see UNET_CONFIGS), a small random VAE of SD's 8x
    scale (only its config is read with output_type="latent"), no text encoder (callers pass prompt_embeds)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from sd_unet import SD15_UNET_CONFIG

    dtype = dtype or torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: SD 1.5's 860M parameters take seconds there
        unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, **UNET_CONFIGS[config]})
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def embeddings(pipe: Any, n: int, seed: int = 0) -> dict[str, Any]:
    """Random prompt and negative-prompt embeddings (N, 77, cross_attention_dim) on the pipeline's device."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (n, 77, pipe.unet.config.cross_attention_dim)
    return {name: torch.randn(shape, generator=g).to(pipe.device, pipe.unet.dtype)
            for name in ("prompt_embeds", "negative_prompt_embeds")}


def initial_latents(pipe: Any, n: int, size: int, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    side = size // pipe.vae_scale_factor
    return torch.randn((n, pipe.unet.config.in_channels, side, side), generator=g).to(pipe.device, pipe.unet.dtype)


def clock(pipe: Any) -> Any:
    """The timer: on the CPU the process's CPU time (the work done, whatever else shares the machine; with one torch
    thread it equals wall time on an idle machine), on a GPU wall time around synchronised calls."""
    return time.process_time if pipe.device.type == "cpu" else time.perf_counter


def synchronize(pipe: Any) -> None:
    import torch

    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


def variants(pipe: Any, tau: int) -> dict[str, Any]:
    """name -> a callable taking the pipeline's call arguments (without guidance_scale)."""
    from basinguard.diffusers import guard

    return {"plain": lambda **kw: pipe(guidance_scale=7.5, **kw),
            "guarded cfg": guard(pipe, "cfg", guidance_scale=7.5),
            "guarded stp": guard(pipe, "stp", guidance_scale=7.5, transition_t=tau),
            "guarded dtp": guard(pipe, "dtp", guidance_scale=7.5)}


def unet_seconds(pipe: Any, n: int, size: int, repeats: int) -> dict[int, float]:
    """Median seconds of one UNet call at batch N and at 2N."""
    import torch

    out, now = {}, clock(pipe)
    for rows in (n, 2 * n):
        x = initial_latents(pipe, rows, size)
        e = embeddings(pipe, rows)["prompt_embeds"]
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                synchronize(pipe)
                start = now()
                pipe.unet(x, 500, encoder_hidden_states=e)
                synchronize(pipe)
                times.append(now() - start)
        out[rows] = statistics.median(times[1:])
    return out


def measure(pipe: Any, n: int, size: int, steps: int, tau: int, repeats: int) -> dict[str, Any]:
    """Median seconds per variant (interleaved rounds after one warm-up each), the batch-N steps of stp and the
    UNet's batch-N/batch-2N time ratio."""
    runs = variants(pipe, tau)
    call = dict(latents=initial_latents(pipe, n, size), num_inference_steps=steps, height=size, width=size,
                output_type="latent", **embeddings(pipe, n))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    traces, now = {}, clock(pipe)
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            synchronize(pipe)
            start = now()
            out = run(**call)
            synchronize(pipe)
            if round_:
                seconds[name].append(now() - start)
            traces[name] = getattr(out, "traces", None)
        print(f"round {round_} of {repeats} done" + " (warm-up)" * (not round_), file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    unet = unet_seconds(pipe, n, size, repeats)
    stp = traces["guarded stp"][0]
    return {"seconds": median,
            "stp_over_cfg": median["guarded stp"] / median["guarded cfg"],
            "guarded_cfg_over_plain": median["guarded cfg"] / median["plain"],
            "batch_n_steps": sum(g is None for g in stp["gap"]), "steps": len(stp["gap"]),
            "unet_batch_n_over_2n": unet[n] / unet[2 * n],
            "dtp_transition_steps": [t["transition_step"] for t in traces["guarded dtp"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(UNET_CONFIGS), default="small")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--fp16", action="store_true", help="float16 weights (GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--batch", type=int, default=4, help="N images")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (latents: size / 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--transition-t", type=int, default=500, help="stp's τ")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import diffusers
    import torch

    torch.set_num_threads(args.threads)
    pipe = build_pipeline(args.config, args.device, torch.float16 if args.fp16 else torch.float32)
    result = measure(pipe, args.batch, args.size, args.steps, args.transition_t, args.repeats)
    result.update(config=args.config, device=args.device, fp16=args.fp16, threads=args.threads, batch=args.batch,
                  size=args.size, transition_t=args.transition_t, repeats=args.repeats, torch=torch.__version__,
                  diffusers=diffusers.__version__, machine=platform.processor() or platform.machine())
    for name, value in result["seconds"].items():
        print(f"{name:12s} {value:8.3f} s")
    print(f"stp / cfg (guarded) {result['stp_over_cfg']:.3f}  ({result['batch_n_steps']} of {result['steps']} steps "
          f"at batch N)   UNet batch N / 2N {result['unet_batch_n_over_2n']:.3f}   "
          f"guarded cfg / plain {result['guarded_cfg_over_plain']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
