"""`basinguard` command line: argument parsing and clear one-line errors; the work is in the packages.

One module a concern: `common` (flags, settings, output paths), `console` (warnings, signals), one module per
command group; this module builds the parser and runs `main`."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import NoReturn

from basinguard.cli.commands import cmd_batch, cmd_build_engines, cmd_demo, cmd_export
from basinguard.cli.common import (
    SHIPPED_MODEL,
    add_output_flags,
    add_sampling_flags,
    model_dir,
    oversize_warning,
    parse_hw,
    positive_int,
    size_warning,
    thread_problem,
)
from basinguard.cli.console import Terminated, one_line_warning, quiet_known_noise, raise_terminated
from basinguard.cli.detect import cmd_detect
from basinguard.cli.generate import cmd_generate
from basinguard.errors import BasinguardError

# What other code imports from the command line: the shipped model's folder and the entry point.
__all__ = ["SHIPPED_MODEL", "build_parser", "main", "model_dir", "oversize_warning", "parse_hw", "quiet_known_noise"]


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake (a flag's value of the wrong type, a missing argument) is one line naming it and where the
    help is, not the whole usage: the usage of `generate` alone is some 20 lines, and the error is its last.

    A value that starts with '-' and a digit is a (negative) number, as Python 3.12's argparse reads it: 3.11's
    takes '-5e-1', '-1e3' and '-1,0' for flags and answers "expected one argument". No flag here starts so."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")  # as 3.12's; argparse only calls its .match

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="basinguard", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images for one prompt")
    add_sampling_flags(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=None, help="image k uses seed + k (default 0)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--detect-calibration", metavar="FILE.json", help="auto: the threshold from `detect --calibrate`")
    g.add_argument("--batch-size", type=int, default=8, help="images per UNet call (2x that with guidance); "
                   "each batch is written before the next starts")
    g.add_argument("--latents", help="initial latents .npy of shape (N, C, h, w), instead of --seed")
    g.add_argument("--out", default="out.png", help="image path, .png, .jpg or .webp (.npy: float pixels); an index "
                   "is added when N > 1")
    g.add_argument("--trace", help="JSON trace path; an index is added when N > 1")
    add_output_flags(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="diffusers pipeline folder or single-file checkpoint → ONNX model folder")
    e.add_argument("src", help="a diffusers pipeline folder, or an SD 1.x/2.x/SDXL .safetensors checkpoint")
    e.add_argument("out")
    e.add_argument("--fp16", action="store_true", help="fp16 text encoder and UNet (for GPU); VAE stays fp32")
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--atol", type=float, default=None, help="validation tolerance (max abs vs torch)")
    e.add_argument("--tensorrt", action="store_true", help="then build TensorRT plans (build-engines' defaults)")
    e.add_argument("--no-memory-check", action="store_true",
                   help="export even where the estimated peak memory exceeds what is available")
    e.add_argument("--config", metavar="DIFFUSERS_FOLDER",
                   help="single file: the model's configs, tokenizers and scheduler (default: the published ones)")
    e.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="what the UNet predicts, where the checkpoint cannot tell (SD 2.x)")
    e.add_argument("--allow-pickle", action="store_true",
                   help="load a pickled .ckpt single file (tensors only, by torch's weights-only unpickler)")
    e.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="fuse a LoRA (.safetensors, kohya or diffusers/PEFT) at WEIGHT (default 1); repeatable")
    e.add_argument("--vae", metavar="FILE_OR_FOLDER", help="replace the VAE (.safetensors file or diffusers folder)")
    e.add_argument("--quantize", choices=("int8",),
                   help="int8 UNet weights for ONNX Runtime's CPU provider: a fifth less UNet memory, not the "
                        "fp32 numbers (d moves, so dtp switches sooner; docs/export.md); SRC may also be an "
                        "exported folder, whose UNet alone is then quantized")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("build-engines", help="TensorRT plans for an exported ONNX folder (for --provider tensorrt)")
    r.add_argument("onnx_dir", metavar="ONNX_DIR")
    r.add_argument("--cache-dir", help="where plans live (default: $BASINGUARD_ENGINE_DIR, else ONNX_DIR/tensorrt); "
                   "generate/batch look in $BASINGUARD_ENGINE_DIR, so set it to this directory when running")
    r.add_argument("--batch", type=int, default=1, help="images per call N: the UNet profile spans 1..2N (static: N and 2N)")
    r.add_argument("--min-batch", type=int, default=None, help="smallest UNet batch (default: 1 for a dynamic plan, "
                   "serving batch jobs' smaller tail batches; N for a static one)")
    r.add_argument("--image-size", type=parse_hw, default=None, metavar="HxW", help="size the kernels are tuned for "
                   "(default: the model's native size)")
    r.add_argument("--min-image-size", type=parse_hw, default=None, metavar="HxW", help="default: --image-size")
    r.add_argument("--max-image-size", type=parse_hw, default=None, metavar="HxW", help="default: --image-size")
    r.add_argument("--static", action="store_true", help="fixed shapes, one profile per batch size (N, 2N): faster, "
                   "and BASINGUARD_CUDA_GRAPH=1 then captures CUDA graphs")
    r.add_argument("--fp32", action="store_true", help="no fp16 conversion (default: fp16 text encoder and "
                   "UNet; an fp32 export is converted to fp16 first). An `export --fp16` folder builds fp16 either way: "
                   "TensorRT builds the graph's own types")
    r.add_argument("--vae-fp16", action="store_true", help="fp16 VAE decoder too (may overflow to NaN)")
    r.add_argument("--models", nargs="+", choices=("text_encoder", "text_encoder_2", "unet", "vae_decoder"),
                   default=None, help="default: every one the folder has (text_encoder_2: SDXL's)")
    r.add_argument("--workspace-mib", type=int, default=None, help="cap on the builder's scratch GPU memory")
    r.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0-5 (TensorRT's default 3)")
    r.add_argument("--force", action="store_true", help="rebuild even when a valid cached plan exists")
    r.set_defaults(func=cmd_build_engines)

    d = sub.add_parser("demo", help="the method at work on the shipped model: an HTML report")
    d.add_argument("--model", help="exported model folder with memorization/ (default: the shipped model)")
    d.add_argument("--out", default="basinguard-demo", help="report folder (default: basinguard-demo)")
    d.add_argument("--seeds", type=int, default=6, help="seeds per caption and policy (default: 6)")
    d.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    d.add_argument("--threads", type=positive_int, default=None)
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("batch", help="generate a prompt file's images into OUT_DIR with a manifest; resumable")
    add_sampling_flags(b)
    b.add_argument("prompts", metavar="PROMPTS", help=".txt (a prompt a line), .jsonl or .csv (fields: prompt, "
                   "negative_prompt, seed, num_images, policy, guidance_scale, transition_t, pre_scale, "
                   "opposite_scale, mitigation, detect_threshold, latest_transition_t, steps, scheduler)")
    b.add_argument("out_dir", metavar="OUT_DIR")
    b.add_argument("--images-per-prompt", type=int, default=1, help="for lines without num_images")
    b.add_argument("--batch-size", type=int, default=4, help="images per UNet call (2x that with guidance)")
    b.add_argument("--seed", type=int, default=0, help="base seed: a line without a seed field gets, for image k "
                   "of line L, the top 53 bits of sha256('basinguard-batch:SEED:L:k'); with one, seed + k")
    b.add_argument("--detect-calibration", metavar="FILE.json", help="auto: the threshold from `detect --calibrate`")
    b.add_argument("--on-error", choices=("skip", "stop"), default="stop", help="a bad prompt line: skip it or stop")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: no ADDRESS starts a local instance; 'auto' or ray://head:10001 joins a cluster")
    b.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per worker slot)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--image-format", choices=("png", "jpeg", "webp"), default="png",
                   help="the images' format (default png); each carries its trace and, unless --no-provenance, the "
                   "A1111 parameters and the IPTC XMP")
    b.add_argument("--output-format", choices=("files", "webdataset", "parquet"), default="files",
                   help="files: one image file per image (default); webdataset: tar shards of KEY.png, KEY.json (the "
                   "trace) and KEY.txt (the prompt); parquet: shards of image bytes and metadata columns "
                   "(pip install 'basinguard[shards]')")
    b.add_argument("--shard-size", type=positive_int, default=None, metavar="N",
                   help="images per shard (default 1000); a resumed job's shards may hold fewer")
    add_output_flags(b)
    b.set_defaults(func=cmd_batch)

    t = sub.add_parser("detect", help="memorization scores per prompt, or --calibrate a threshold for --policy auto")
    add_sampling_flags(t)
    t.add_argument("prompts", metavar="PROMPTS", nargs="?", help=".txt, .jsonl or .csv prompt file (as batch; a "
                   "line's seed and num_images fields do not apply: every prompt is scored on the same seeds)")
    t.add_argument("--detect-steps", type=int, default=1, help="score = mean d over this many first steps "
                   "(auto gates on 1)")
    t.add_argument("--seeds", type=int, default=1, help="score = mean over seeds SEED..SEED+N-1 (auto scores one)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=8, help="prompt x seed pairs per UNet call")
    t.add_argument("--detect-calibration", metavar="FILE.json", help="flag prompts with this file's threshold")
    t.add_argument("--on-error", choices=("skip", "stop"), default="stop")
    t.add_argument("--calibrate", action="store_true", help="choose a threshold from --memorized and --normal")
    t.add_argument("--memorized", metavar="FILE", help="prompts known to be memorized (positives)")
    t.add_argument("--normal", metavar="FILE", help="prompts known not to be (negatives)")
    t.add_argument("--fpr", type=float, default=None, help="false-positive rate allowed on --normal (default 0.01)")
    t.add_argument("--out", metavar="FILE.json", help="calibration file to write")
    t.set_defaults(func=cmd_detect)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = one_line_warning
    quiet_known_noise()
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, raise_terminated) if in_main_thread else None
    try:
        problem = thread_problem(args)
        if problem:
            raise BasinguardError(problem)
        warning = size_warning(args)
        if warning:
            print(f"basinguard {args.command}: warning: {warning}", file=sys.stderr)
        args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen below and not at exit
    except BrokenPipeError:
        # `basinguard detect … | head -1`: the reader has all it wants. Quiet, as a tool killed by SIGPIPE is; stdout
        # goes to /dev/null so that the interpreter's last flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BasinguardError as exc:
        print(f"basinguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the checks could not foresee (full disk, permissions): one line, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"basinguard {args.command}: error: cannot read or write{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (SIGINT) or SIGTERM: the shell's 128 + the signal's number
        terminated = isinstance(exc, Terminated)
        print(f"basinguard {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    finally:
        if in_main_thread and previous is not None:  # None: a handler set outside Python, which stays
            signal.signal(signal.SIGTERM, previous)
    return 0
