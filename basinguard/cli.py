"""`basinguard` command line: argument parsing and clear one-line errors; the work is in the packages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from basinguard.errors import BasinguardError
from basinguard.runtime.guidance import POLICY_NAMES

SHIPPED_MODEL = Path(__file__).resolve().parent / "models" / "shapes"
SCHEDULER_CHOICES = ("ddim", "dpm++2m", "euler", "pndm")
FALLBACK_DEFAULTS = {"policy": "cfg", "guidance_scale": 7.5, "transition_t": 500, "pre_scale": 0.0,
                     "opposite_scale": 1.0, "steps": 50, "scheduler": None}


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if not (SHIPPED_MODEL / "unet" / "model.onnx").exists():
        raise BasinguardError(f"no --model given and the shipped model is not installed at {SHIPPED_MODEL}; "
                              "pass --model DIR (an exported ONNX folder)")
    return SHIPPED_MODEL


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name and rename, so a kill never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def indexed(path: Path, k: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate, batch, detect and demo. None means: the model's own default."""
    p.add_argument("--model", help="exported ONNX model folder (default: the shipped model)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per model (default: ORT's)")
    p.add_argument("--policy", choices=(*POLICY_NAMES, "auto"), default=None)
    p.add_argument("--guidance-scale", type=float, default=None, help="λ, the CFG scale after the transition")
    p.add_argument("--transition-t", type=int, default=None, help="τ for stp/og-stp: λ applies once t <= τ")
    p.add_argument("--pre-scale", type=float, default=None, help="s_pre before the transition for stp/dtp")
    p.add_argument("--opposite-scale", type=float, default=None, help="λ_og for og-*: s_pre = -λ_og")
    p.add_argument("--detect-threshold", type=float, default=None, help="auto: d at step 0 above this → mitigate")
    p.add_argument("--mitigation", choices=("stp", "dtp", "og-stp", "og-dtp"), default=None)
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None, help="default: the model's own")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)


def sampling_from_args(args: argparse.Namespace, defaults: dict):  # -> SamplingConfig
    from basinguard.runtime.guidance import PolicyConfig
    from basinguard.runtime.pipeline import SamplingConfig

    d = {**FALLBACK_DEFAULTS, **defaults}

    def pick(name: str):
        value = getattr(args, name, None)
        return d.get(name) if value is None else value

    if pick("policy") and pick("policy").startswith("og-") and args.pre_scale is not None:
        raise BasinguardError("--pre-scale does not apply to og-* policies; their pre-switch scale is -(--opposite-scale)")
    policy = PolicyConfig(name=pick("policy"), guidance_scale=pick("guidance_scale"), transition_t=pick("transition_t"),
                          pre_scale=pick("pre_scale"), opposite_scale=pick("opposite_scale"),
                          detect_threshold=pick("detect_threshold"), mitigation=pick("mitigation") or "og-dtp")
    return SamplingConfig(steps=pick("steps"), scheduler=pick("scheduler"), height=args.height, width=args.width,
                          policy=policy)


def cmd_generate(args: argparse.Namespace) -> None:
    from basinguard.runtime.pipeline import Pipeline

    if args.num_images < 1:
        raise BasinguardError(f"--num-images must be >= 1 (got {args.num_images})")
    pipe = Pipeline(model_dir(args.model), provider=args.provider, threads=args.threads)
    sampling = sampling_from_args(args, pipe.folder.sampling_defaults)
    n = args.num_images
    latents = None
    if args.latents:
        try:
            latents = np.load(args.latents)
        except (OSError, ValueError) as exc:
            raise BasinguardError(f"cannot read --latents {args.latents}: {exc}") from None
        if latents.ndim != 4:
            raise BasinguardError(f"--latents must have shape (N, C, h, w); got {latents.shape}")
        n = len(latents)
    seeds = [args.seed + k for k in range(n)]
    gens = pipe.generate([args.prompt] * n, sampling, seeds=None if latents is not None else seeds,
                         negative_prompts=[args.negative_prompt] * n, latents=latents)
    out = Path(args.out)
    for k, g in enumerate(gens):
        write_atomic(indexed(out, k, n), lambda p, g=g: g.to_pil().save(p, format="PNG"))
        if args.trace:
            write_atomic(indexed(Path(args.trace), k, n), lambda p, g=g: p.write_text(json.dumps(g.trace, indent=1)))
        ts = g.trace["transition_step"]
        print(f"{indexed(out, k, n)}  seed={g.trace['seed']}  transition_step={ts}")
    times = pipe.timer.summary()
    print("  ".join(f"{k} {v:.3f}s" for k, v in times.items()))


def cmd_export(args: argparse.Namespace) -> None:
    try:
        from basinguard.export.onnx_export import ExportError, export_pipeline
    except ImportError as exc:
        raise BasinguardError(f"export needs the export extra: pip install 'basinguard[export]' ({exc})") from None
    try:
        export_pipeline(args.src, Path(args.out), fp16=args.fp16, opset=args.opset, atol=args.atol)
    except ExportError as exc:
        raise BasinguardError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="basinguard", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images for one prompt")
    add_sampling_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--latents", help="initial latents .npy of shape (N, C, h, w); overrides --seed")
    g.add_argument("--out", default="out.png", help="PNG path; an index is added when N > 1")
    g.add_argument("--trace", help="JSON trace path; an index is added when N > 1")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="diffusers pipeline folder → ONNX model folder")
    e.add_argument("src")
    e.add_argument("out")
    e.add_argument("--fp16", action="store_true", help="fp16 text encoder and UNet (for GPU); VAE stays fp32")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--atol", type=float, default=None, help="validation tolerance (max abs vs torch)")
    e.set_defaults(func=cmd_export)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BasinguardError as exc:
        print(f"basinguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"basinguard {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
