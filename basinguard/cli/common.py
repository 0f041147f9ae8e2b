"""What the commands share: the shipped model, flags and their types, sampling settings from flags, output paths
checked before any work."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from basinguard.errors import BasinguardError
from basinguard.files import temporary_files, temporary_name_fits
from basinguard.runtime.guidance import POLICY_NAMES
from basinguard.runtime.schedulers import SCHEDULERS

if TYPE_CHECKING:
    from basinguard.outputs.images import ImageOptions
    from basinguard.runtime.pipeline import SamplingConfig
    from basinguard.runtime.spec import ModelSpec


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # basinguard/


SHIPPED_MODEL = PACKAGE_DIR / "models" / "shapes"


OVERSIZE_FACTOR = 2  # a side above this many times the native one gets a warning: the work grows fast, quality drops


SCHEDULER_CHOICES = tuple(SCHEDULERS)


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if not (SHIPPED_MODEL / "unet" / "model.onnx").exists():
        raise BasinguardError(f"no --model given and the shipped model is not installed at {SHIPPED_MODEL}; "
                              "pass --model DIR (an exported ONNX folder)")
    return SHIPPED_MODEL


def positive_int(text: str) -> int:
    """argparse type for counts such as --threads: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (got {text!r})")
    return value


def output_file(arg: str, flag: str, suffixes: tuple[str, ...] | None = None, count: int = 1) -> Path:
    """A file path the command will write (`count` of them, see `indexed`), checked before any work: not a
    directory, a parent that is one (or can be made), one of `suffixes` if given, a name short enough."""
    path = Path(arg)
    targets = [indexed(path, k, count) for k in range(count)]
    if not all(temporary_name_fits(target.name) for target in targets):  # write_atomic's temporary name too
        raise BasinguardError(f"{flag} {arg}: file name too long")
    if path.is_dir():
        raise BasinguardError(f"{flag} {arg} is a directory; give a file path")
    if suffixes and path.suffix.lower() not in suffixes:
        raise BasinguardError(f"{flag} {arg} must end in {' or '.join(suffixes)}")
    for target in targets:
        if target.is_dir():
            raise BasinguardError(f"{flag} {target} is a directory; give a file path")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise BasinguardError(f"{flag} {arg}: {parent} is a file, not a directory")
    return path


def indexed(path: Path, k: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """Flags for the images' format and metadata (generate, batch)."""
    p.add_argument("--quality", type=int, default=None, metavar="Q",
                   help="JPEG/WebP quality 1-100 (default 90)")
    p.add_argument("--no-provenance", action="store_true",
                   help="write neither the A1111 parameters nor the XMP that marks images as AI-generated (IPTC "
                   "digital source type); the trace is written all the same")
    p.add_argument("--provenance-prompt", action="store_true",
                   help="also put the prompt in the XMP (IPTC AI prompt information); off by default, as prompts "
                   "can be private (the trace and the parameters hold it in any case)")
    p.add_argument("--c2pa-cert", metavar="CHAIN.pem", help="sign each image with a C2PA manifest: the signer's "
                   "certificate chain, signer first (needs c2pa-python: pip install 'basinguard[c2pa]')")
    p.add_argument("--c2pa-key", metavar="KEY.pem", help="the private key of --c2pa-cert's first certificate")
    p.add_argument("--c2pa-tsa", metavar="URL", help="RFC 3161 time-stamp authority for the C2PA signatures")


def image_options(args: argparse.Namespace, suffixes: set[str], identity: Callable[[], dict] | None) -> ImageOptions:
    """The output flags, checked (and C2PA credentials opened) before any model loads (`options_from_flags`)."""
    from basinguard.outputs.images import options_from_flags

    return options_from_flags(suffixes, identity, quality=args.quality, provenance=not args.no_provenance,
                              provenance_prompt=args.provenance_prompt, c2pa_cert=args.c2pa_cert,
                              c2pa_key=args.c2pa_key, c2pa_tsa=args.c2pa_tsa)


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate, batch, detect and demo. None means: the model's own default."""
    p.add_argument("--model", help="exported ONNX model folder (default: the shipped model)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads per model, at most the CPUs this process may use (default: ORT's)")
    p.add_argument("--static-shapes", action="store_true",
                   help="cpu: shape-specialised UNet sessions, built at a shape's first call (~0.5 s and one more "
                   "copy of the weights each); 10-20 %% faster UNet calls on small models, for long jobs")
    p.add_argument("--policy", choices=(*POLICY_NAMES, "auto"), default=None)
    p.add_argument("--guidance-scale", type=float, default=None, help="λ, the CFG scale after the transition")
    p.add_argument("--transition-t", type=int, default=None, help="τ for stp/og-stp: λ applies once t <= τ")
    p.add_argument("--pre-scale", type=float, default=None, help="s_pre before the transition for stp/dtp")
    p.add_argument("--opposite-scale", type=float, default=None, help="λ_og for og-*: s_pre = -λ_og (default: the model's, else λ as in Algorithm 1)")
    p.add_argument("--detect-threshold", type=float, default=None, help="auto: d at the first step (t = T) above this → mitigate")
    p.add_argument("--mitigation", choices=("stp", "dtp", "og-stp", "og-dtp"), default=None)
    p.add_argument("--latest-transition-t", type=int, default=None, metavar="T",
                   help="dtp/og-dtp: an image whose d has had no local minimum by t <= T switches there "
                   "(default: off, Algorithm 1: such an image never switches)")
    p.add_argument("--guidance-end-t", type=int, default=None, metavar="T",
                   help="any policy: once t <= T, the conditional prediction alone (scale 1, one UNet row per image, "
                   "d not measured), as guidance in a limited interval (default: guidance to the last step)")
    p.add_argument("--long-prompts", choices=("truncate", "error"), default="truncate",
                   help="a prompt longer than the text encoder takes: cut it and warn, naming the dropped words, "
                   "as diffusers does (default), or refuse it")
    p.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None,
                   help="default: the model's own; -karras: Karras sigmas; euler-a: Euler ancestral (per-image noise)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--original-size", type=parse_pair, default=None, metavar="HxW",
                   help="SDXL micro-conditioning: the size the image claims to come from (default: its own size)")
    p.add_argument("--crops-coords-top-left", type=parse_pair, default=None, metavar="TOP,LEFT",
                   help="SDXL micro-conditioning: the crop's top-left corner in pixels (default: 0,0)")
    p.add_argument("--target-size", type=parse_pair, default=None, metavar="HxW",
                   help="SDXL micro-conditioning: the size aimed at (default: the image's own size)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="SDXL: text encoder layers skipped back from the penultimate one, as diffusers' clip_skip "
                   "(default: none)")


def sampling_from_args(args: argparse.Namespace, spec: ModelSpec) -> SamplingConfig:
    """The flags given, as overrides of the model's sampling defaults (`runtime.settings`)."""
    from basinguard.runtime.settings import SETTINGS, sampling_from

    overrides = {name: getattr(args, name, None) for name in SETTINGS}
    return sampling_from(spec.folder.sampling_defaults, overrides, lambda name: "--" + name.replace("_", "-"))


def read_latents(path: str, num_images: int) -> np.ndarray:
    """--latents: one finite (N, C, h, w) .npy array; N decides the image count (--num-images 1 or N)."""
    try:
        latents = np.load(path)  # allow_pickle stays False: a file that is not .npy/.npz fails as "pickled"
    except OSError as exc:
        raise BasinguardError(f"cannot read --latents {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:  # numpy takes a file without the .npy magic for a pickle
        why = "" if "pickle" in str(exc) else f" ({exc})"
        raise BasinguardError(f"--latents {path} is not a readable .npy file{why}") from None
    if not isinstance(latents, np.ndarray):  # an .npz archive
        raise BasinguardError(f"--latents must be one .npy array (got {type(latents).__name__} from {path})")
    if latents.ndim != 4 or len(latents) == 0:
        raise BasinguardError(f"--latents must have shape (N, C, h, w) with N >= 1; got {latents.shape}")
    real = np.issubdtype(latents.dtype, np.floating)
    with np.errstate(over="ignore"):  # the denoising loop runs in float32: a float64 beyond its range is inf
        if not real or not np.isfinite(latents.astype(np.float32)).all():
            raise BasinguardError(f"--latents must hold finite real numbers within float32's range (got dtype "
                                  f"{latents.dtype}{' with NaN, inf or |x| > 3.4e38' if real else ''})")
    if num_images not in (1, len(latents)):
        raise BasinguardError(f"--num-images {num_images} but --latents holds {len(latents)} images; "
                              "the latents decide the count")
    return latents


def refuse_overwriting(flags: tuple[str, ...], outputs: list[Path], inputs: dict[str, str | None]) -> None:
    """An output path that is one of the command's input files would replace the input with what is made from it."""
    for in_flag, name in inputs.items():
        if not name or not Path(name).exists():
            continue
        for target in outputs:
            if target.exists() and os.path.samefile(target, name):
                raise BasinguardError(f"{' or '.join(flags)} {target} is the {in_flag} file; writing it would "
                                      "replace the input: choose another path")


def remove_leftovers(outputs: list[Path]) -> None:
    """`write_atomic`'s temporary files of these outputs left by a killed run (as batch removes its own)."""
    for folder in {target.parent for target in outputs}:
        names = {target.name for target in outputs if target.parent == folder}
        for tmp in temporary_files(folder, "?") if folder.is_dir() else []:
            if tmp.name[1:].rsplit(".", 2)[0] in names:  # `.NAME.XXXXXXXX.tmp`
                tmp.unlink(missing_ok=True)


def _integers(text: str) -> list[int]:
    """The integers of 'A', 'AxB' or 'A,B' (any count); [] where a part is not an integer."""
    try:
        return [int(part) for part in text.lower().replace(",", "x").split("x")]
    except ValueError:
        return []


def parse_pair(text: str) -> tuple[int, int]:
    """'AxB' or 'A,B' → (A, B), integers; the model checks the range (SDXL micro-conditioning)."""
    values = _integers(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers as AxB or A,B, e.g. 1024x1024 (got {text!r})")
    return (values[0], values[1])


def parse_hw(text: str) -> tuple[int, int]:
    """'512' or 'HxW' ('512x768') → (height, width) in pixels."""
    values = _integers(text)
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HxW in pixels, e.g. 512 or 512x768 (got {text!r})")
    return (values[0], values[-1])


def calibrated_threshold(args: argparse.Namespace, detect_steps: int | None = None, seeds: int = 1) -> dict | None:
    """--detect-calibration FILE → args.detect_threshold (the two flags exclude each other). `detect_steps` and
    `seeds`: how the scores it will be compared with are made (None, 1: d at step 0 of one image, as `auto`)."""
    from basinguard.runtime.detection import load_calibration

    if not getattr(args, "detect_calibration", None):
        return None
    if args.detect_threshold is not None:
        raise BasinguardError("give --detect-threshold or --detect-calibration, not both")
    calib = load_calibration(Path(args.detect_calibration), detect_steps, model=model_dir(args.model))
    args.detect_threshold = float(calib["threshold"])
    if calib.get("seeds", 1) != seeds:
        print(f"basinguard: warning: {args.detect_calibration} averaged {calib.get('seeds', 1)} seeds per prompt, these "
              f"scores {seeds}; averaging narrows the scores, so its threshold may flag too many or too few",
              file=sys.stderr)
    return calib


def thread_problem(args: argparse.Namespace) -> str | None:
    """--threads above the CPUs this process may use (see `engine.ort.thread_count_problem`), checked before any
    work; not for a Ray cluster (`--ray ADDRESS`), whose nodes have CPUs of their own."""
    threads = getattr(args, "threads", None)
    if threads is None or getattr(args, "ray", None) not in (None, "local"):
        return None
    from basinguard.engine.ort import thread_count_problem

    problem = thread_count_problem(threads)
    return None if problem is None else f"--{problem}"


def oversize_warning(native: tuple[int, int], height: int, width: int) -> str | None:
    """A warning for a size more than OVERSIZE_FACTOR times the native one per side, with what it costs."""
    nh, nw = native
    factor = max(height / nh, width / nw)
    if factor <= OVERSIZE_FACTOR:
        return None
    pixels = height * width / (nh * nw)
    return (f"{height}x{width} is {factor:.3g}x this model's native {nh}x{nw} per side ({pixels:,.0f}x the pixels): "
            f"each UNet call does {pixels:,.0f}x to {pixels * pixels:,.0f}x the work of one at the native size "
            "(convolutions grow with the pixels, attention with their square), and memory grows alike; models make "
            "their best images near their native size")


def size_warning(args: argparse.Namespace) -> str | None:
    """oversize_warning for --height/--width, where the model folder reads and the size is one it accepts (a bad
    folder or size is the command's to report)."""
    height, width = getattr(args, "height", None), getattr(args, "width", None)
    if height is None and width is None:
        return None
    from basinguard.runtime.model_folder import ModelFolder

    try:
        folder = ModelFolder.open(model_dir(getattr(args, "model", None)))
        native = folder.default_image
        height, width = height or native[0], width or native[1]
        folder.check_size(height, width)
    except BasinguardError:
        return None
    return oversize_warning(native, height, width)
