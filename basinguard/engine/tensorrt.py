"""Native TensorRT backend: one plan per model, built from the exported ONNX files and cached on disk.

Pieces, in order:
- profiles: the shape ranges a plan serves, from (N images, image-size range, VAE factor). The UNet spans
  batch N..2N in one profile, so STP's uncond-only steps (batch N) and guided steps (2N) share an engine;
  `static` builds one fixed-shape profile per batch size instead (faster kernels, and CUDA graphs).
- the plan cache: key = sha256(ONNX hash, TensorRT version, GPU, compute capability, profiles, precision,
  builder options); the key is in the file name, and a JSON sidecar next to each plan repeats the fields and
  the plan's own hash, checked before loading. A plan built elsewhere or from another ONNX file is never
  loaded: its key differs, and a sidecar that disagrees with its plan marks the plan as invalid.
- `build_engines` / `build_plan`: TensorRT's own builder API (ONNX parser, builder config, optimization
  profiles, timing cache shared across builds); an out-of-memory build is reported as such.
- `TensorRTModel`: `LoadedModel` over a plan. Device memory through cuda-python's runtime API
  (`cuda.bindings.runtime`, or `cuda.cudart` before cuda-python 12.6): buffers once per shape, pinned host
  staging, `execute_async_v3` on one stream, optional CUDA graphs for static plans.
- `load_tensorrt`: what `--provider tensorrt` loads: the native backend when tensorrt is installed and a valid
  plan exists, else ONNX Runtime's TensorRT EP, else an error naming what to install or build.

tensorrt and cuda-python are imported inside functions only: this module imports, and its pure parts are
tested, on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from basinguard.engine.base import EngineError, TensorSpec, conform
from basinguard.engine.fusion import is_fusion_cache
from basinguard.files import digest_memo, file_digests, sha256_file, write_atomic

ENGINE_DIR_ENV = "BASINGUARD_ENGINE_DIR"  # where plans live; default: ONNX_DIR/tensorrt
CUDA_GRAPH_ENV = "BASINGUARD_CUDA_GRAPH"  # "1": capture CUDA graphs when a plan is static
PLAN_FORMAT = 1  # bump when the profile rules or the sidecar change: old plans then no longer match
ROLES = ("text_encoder", "unet", "vae_decoder")
DEFAULT_SEQ_LEN = 77  # CLIP's context, when the tokenizer config does not give a usable one
MIN_TENSORRT = (8, 6)  # execute_async_v3, set_input_shape, named-tensor profile queries
INSTALL_HINT = "pip install 'basinguard[tensorrt]' (tensorrt and cuda-python, on a machine with an NVIDIA GPU)"
# Fields that must equal this machine's and this ONNX file's for a plan to load (the rest only name the build).
ENV_FIELDS = ("format", "onnx_sha256", "tensorrt", "gpu", "compute_capability")
KEY_FIELDS = (*ENV_FIELDS, "model", "profiles", "precision", "static", "builder")
_OOM = re.compile(r"out of memory|outofmemory|could not be allocated|bad_alloc|cudaErrorMemoryAllocation|"
                  r"CUDA_ERROR_OUT_OF_MEMORY|insufficient (device |gpu )?memory|failed to allocate", re.IGNORECASE)
_MAX_SLOTS = 4  # buffer sets kept per model: N and 2N (and a partial batch) without reallocating

Shape = tuple[int, ...]
HW = tuple[int, int]


# --------------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class BuildSpec:
    """What a plan must serve. Image sizes are (height, width) in pixels; None: the model's native size."""

    batch: int = 1  # N images per call: the UNet runs at N (uncond-only steps) and 2N (guided steps)
    min_batch: int | None = None  # the UNet profile's smallest batch (default N); 1 serves a batch job's tail
    image: HW | None = None  # the size the kernels are tuned for
    min_image: HW | None = None  # None: = image
    max_image: HW | None = None  # None: = image
    static: bool = False  # one fixed shape per batch size (N, 2N): fastest kernels, allows CUDA graphs
    fp16: bool = True  # text encoder and UNet in fp16
    vae_fp16: bool = False  # the SD VAE decoder overflows fp16 at large activations: fp32 unless asked
    workspace_mib: int | None = None  # cap on the builder's scratch memory (None: TensorRT's default)
    opt_level: int | None = None  # builder optimization level 0-5 (None: TensorRT's default, 3)

    def validate(self) -> None:
        if self.batch < 1:
            raise EngineError(f"batch must be >= 1 (got {self.batch})")
        if self.min_batch is not None and not 1 <= self.min_batch <= 2 * self.batch:
            raise EngineError(f"min batch must be in [1, {2 * self.batch}] for batch {self.batch} (got {self.min_batch})")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise EngineError(f"workspace must be >= 1 MiB (got {self.workspace_mib})")
        if self.opt_level is not None and not 0 <= self.opt_level <= 5:
            raise EngineError(f"builder optimization level must be in [0, 5] (got {self.opt_level})")
        if self.static and (self.min_image not in (None, self.image) or self.max_image not in (None, self.image)):
            raise EngineError("a static build takes one image size (--image-size), not a range")


@dataclass(frozen=True)
class RoleProfile:
    """One optimization profile of one model: batch (min, opt, max), latent (h, w) min/opt/max, text length."""

    batch: tuple[int, int, int]
    latent: tuple[HW, HW, HW] | None  # None: the model has no spatial input (text encoder)
    seq_len: int

    def as_dict(self) -> dict:
        return {"batch": list(self.batch), "latent": None if self.latent is None else [list(v) for v in self.latent],
                "seq_len": self.seq_len}

    def describe(self) -> str:
        lo, opt, hi = self.batch
        text = f"batch {lo}" if lo == hi else f"batch {lo}..{hi} (opt {opt})"
        if self.latent is not None:
            sizes = ["x".join(map(str, hw)) for hw in self.latent]
            text += f", latent {sizes[0]}" if sizes[0] == sizes[2] else f", latent {sizes[0]}..{sizes[2]} (opt {sizes[1]})"
        return text


def resolve_sizes(spec: BuildSpec, native: int | HW, multiple: int) -> tuple[HW, HW, HW]:
    """(min, opt, max) image sizes in pixels, checked: multiples of `multiple`, min <= opt <= max per side.
    `native`: the model's own (height, width), or one side of a square."""
    opt = spec.image or (native if isinstance(native, tuple) else (native, native))
    lo, hi = spec.min_image or opt, spec.max_image or opt
    for what, hw in (("min", lo), ("opt", opt), ("max", hi)):
        for side, value in zip(("height", "width"), hw):
            if value < multiple or value % multiple:
                raise EngineError(f"{what} image {side} {value} must be a positive multiple of {multiple} for this model")
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
        raise EngineError(f"image sizes must satisfy min <= opt <= max per side (got {lo}, {opt}, {hi})")
    return lo, opt, hi


def role_profiles(role: str, spec: BuildSpec, vae_factor: int, native: int | HW, multiple: int,
                  seq_len: int = DEFAULT_SEQ_LEN) -> list[RoleProfile]:
    """The optimization profiles of one model.

    The text encoder sees [e_∅; e_p] (2N prompts), the UNet N (uncond-only steps) or 2N, the VAE N latents.
    Dynamic: one profile per model spanning those batches and the image-size range (min = 1 for the text
    encoder and VAE, which are cheap to over-provision). Static: one fixed shape per batch size used.
    """
    if role not in ROLES:
        raise EngineError(f"unknown model {role!r}; choose from {', '.join(ROLES)}")
    spec.validate()
    n = spec.batch
    lo, opt, hi = resolve_sizes(spec, native, multiple)
    latent = None if role == "text_encoder" else tuple((h // vae_factor, w // vae_factor) for h, w in (lo, opt, hi))
    if spec.static:
        latent = None if latent is None else (latent[1],) * 3
        batches = {"text_encoder": [2 * n], "unet": sorted({spec.min_batch or n, n, 2 * n}), "vae_decoder": [n]}[role]
        return [RoleProfile((b, b, b), latent, seq_len) for b in batches]  # type: ignore[arg-type]
    batch = {"text_encoder": (1, 2 * n, 2 * n), "unet": (spec.min_batch or n, 2 * n, 2 * n),
             "vae_decoder": (1, n, n)}[role]
    return [RoleProfile(batch, latent, seq_len)]  # type: ignore[arg-type]


def precision_for(role: str, spec: BuildSpec) -> dict:
    """fp16 for the text encoder and UNet; the VAE decoder stays fp32 unless `vae_fp16` (its activations overflow)."""
    return {"fp16": bool(spec.fp16 and (role != "vae_decoder" or spec.vae_fp16))}


def _dynamic(d: Any) -> bool:
    return d is None or isinstance(d, str) or (isinstance(d, int) and d < 0)


def input_profile(name: str, shape: Sequence[Any], profile: RoleProfile) -> tuple[Shape, Shape, Shape] | None:
    """(min, opt, max) shape of one network input under `profile`; None when the input has no dynamic axis.

    Axis 0 is the batch; axes 2 and 3 of a 4-D input are the latent height and width; axis 1 of a 2-D or 3-D
    input is the token sequence. A dynamic axis elsewhere has no rule: the message says so.
    """
    if not any(_dynamic(d) for d in shape):
        return None
    shapes: tuple[list[int], list[int], list[int]] = ([], [], [])
    for axis, d in enumerate(shape):
        if not _dynamic(d):
            values = (int(d),) * 3
        elif axis == 0:
            values = profile.batch
        elif len(shape) == 4 and axis in (2, 3) and profile.latent is not None:
            values = tuple(hw[axis - 2] for hw in profile.latent)
        elif len(shape) in (2, 3) and axis == 1:
            values = (profile.seq_len,) * 3
        else:
            raise EngineError(f"input {name!r} {tuple(shape)}: axis {axis} is dynamic and basinguard has no rule for it; "
                              "export the model with that axis fixed")
        for out, v in zip(shapes, values):
            out.append(int(v))
    return tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2])


def pick_profile(shapes: dict[str, Shape], profiles: Sequence[dict[str, tuple[Shape, Shape, Shape]]]) -> int | None:
    """Index of the first profile whose ranges hold every input shape; None when none does."""
    for index, profile in enumerate(profiles):
        ok = True
        for name, (lo, _, hi) in profile.items():
            shape = shapes.get(name)
            if shape is None or len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
                ok = False
                break
        if ok:
            return index
    return None


def merged_input_profile(profiles: Sequence[dict[str, Sequence[Sequence[int]]]]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """One (min, opt, max) per input spanning several profiles (ORT's TensorRT EP takes a single profile)."""
    merged: dict[str, tuple[Shape, Shape, Shape]] = {}
    for profile in profiles:
        for name, (lo, opt, hi) in profile.items():
            lo, opt, hi = tuple(lo), tuple(opt), tuple(hi)
            if name in merged:
                a, o, b = merged[name]
                lo, hi = tuple(map(min, a, lo)), tuple(map(max, b, hi))
                opt = max(o, opt, key=lambda s: int(np.prod(s)))
            merged[name] = (lo, opt, hi)
    return merged


# ------------------------------------------------------------------------------------------------ plan cache


@dataclass(frozen=True)
class EngineEnv:
    """What a plan is tied to besides its ONNX file."""

    tensorrt: str
    gpu: str
    compute_capability: str


@dataclass
class PlanRecord:
    plan: Path
    sidecar: dict = field(default_factory=dict)

    @property
    def input_profiles(self) -> list[dict]:
        return self.sidecar.get("input_profiles", [])


def engine_dir(onnx_dir: Path) -> Path:
    """Where plans of the model folder `onnx_dir` live: $BASINGUARD_ENGINE_DIR, else ONNX_DIR/tensorrt."""
    env = os.environ.get(ENGINE_DIR_ENV)
    return Path(env) if env else Path(onnx_dir) / "tensorrt"


def onnx_files(onnx_path: Path) -> list[Path]:
    """The ONNX file and its external data: every regular file beside it except JSON configs, hidden and
    temporary files, and the CPU backend's fused-attention cache (`model.fused.onnx`, derived from model.onnx and
    written by a CPU load: hashing it would invalidate every plan after one CPU run).

    Exporters name external data differently (model.onnx_data, model.onnx.data, weights.pb); taking the whole
    folder (not sub-folders, where ORT's TensorRT cache may live) needs no ONNX parser and misses none.
    """
    onnx_path = Path(onnx_path)
    siblings = [p for p in sorted(onnx_path.parent.iterdir()) if p != onnx_path and p.is_file()
                and not p.name.startswith(".") and p.suffix not in (".json", ".tmp", ".partial")
                and not is_fusion_cache(p)]
    return [onnx_path, *siblings]


def onnx_digest(onnx_path: Path, memo: Path | None = None) -> str:
    """sha256 over the ONNX file and its external data (`onnx_files`); `memo`: see `files.file_digests` (callers
    pass `files.digest_memo()`, shared with model identities, else a memo beside the plans)."""
    files = onnx_files(onnx_path)
    h = hashlib.sha256()
    for path, digest in zip(files, file_digests(files, memo)):
        h.update(f"{path.name}:{digest}\n".encode())
    return h.hexdigest()


def _normal(value: Any) -> Any:
    """JSON's view of a value (tuples → lists), so fields compare equal before and after a sidecar round trip."""
    return json.loads(json.dumps(value))


def key_fields(role: str, onnx_sha: str, env: EngineEnv, profiles: Sequence[RoleProfile], precision: dict,
               spec: BuildSpec) -> dict:
    return _normal({"format": PLAN_FORMAT, "model": role, "onnx_sha256": onnx_sha, "tensorrt": env.tensorrt,
                    "gpu": env.gpu, "compute_capability": env.compute_capability,
                    "profiles": [p.as_dict() for p in profiles], "precision": precision, "static": spec.static,
                    "builder": {"workspace_mib": spec.workspace_mib, "opt_level": spec.opt_level}})


def plan_key(fields: dict) -> str:
    """sha256 of the canonical JSON of the key fields."""
    canonical = json.dumps({k: fields.get(k) for k in KEY_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def plan_paths(cache_dir: Path, role: str, key: str) -> tuple[Path, Path]:
    stem = f"{role}-{key[:24]}"
    return Path(cache_dir) / f"{stem}.plan", Path(cache_dir) / f"{stem}.json"


def _differences(found: dict, expected: dict, fields: Iterable[str]) -> list[str]:
    why = []
    for name in fields:
        a, b = found.get(name), expected.get(name)
        if _normal(a) == _normal(b):
            continue
        if name == "onnx_sha256":
            why.append("the ONNX file changed since the build")
        elif name == "tensorrt":
            why.append(f"built with TensorRT {a}, this is TensorRT {b}")
        elif name in ("gpu", "compute_capability"):
            text = (f"built for {found.get('gpu')} (compute {found.get('compute_capability')}), this is "
                    f"{expected.get('gpu')} (compute {expected.get('compute_capability')})")
            if text not in why:
                why.append(text)
        elif name == "format":
            why.append(f"plan format {a}, this basinguard writes {b}")
        else:
            why.append(f"another {name}")
    return why


def verify_plan(sidecar_path: Path, expected: dict | None = None) -> tuple[PlanRecord | None, str | None]:
    """Read a sidecar and check it: its key matches its fields, its plan exists with the recorded size and hash,
    and (given `expected`) its ENV_FIELDS, or with a full key its KEY_FIELDS, equal the expected ones.
    Returns (record, None) when the plan may be loaded, else (None, why not)."""
    sidecar_path = Path(sidecar_path)
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except FileNotFoundError:
        return None, f"{sidecar_path.name}: no sidecar"
    except (OSError, ValueError) as exc:
        return None, f"{sidecar_path.name}: unreadable sidecar ({exc})"
    if not isinstance(sidecar, dict) or sidecar.get("key") != plan_key(sidecar):
        return None, f"{sidecar_path.name}: sidecar fields do not match its key (edited or foreign)"
    plan = sidecar_path.with_name(str(sidecar.get("plan", "")))
    if expected is not None:  # fields first: a foreign plan is rejected without hashing it
        fields = KEY_FIELDS if "profiles" in expected else ENV_FIELDS
        why = _differences(sidecar, expected, fields)
        if why:
            return None, f"{plan.name}: " + "; ".join(why)
    if plan.name != sidecar_path.with_suffix(".plan").name or not plan.is_file():
        return None, f"{sidecar_path.name}: plan file missing"
    if plan.stat().st_size != sidecar.get("plan_bytes") or sha256_file(plan) != sidecar.get("plan_sha256"):
        return None, f"{plan.name}: plan file truncated or altered since the build"
    return PlanRecord(plan, sidecar), None


def find_plan(cache_dir: Path, role: str, onnx_sha: str, env: EngineEnv) -> tuple[PlanRecord | None, list[str]]:
    """The newest valid plan for `role` built from this ONNX file on this TensorRT and GPU, whatever its profile;
    else (None, why each plan found was rejected)."""
    expected = {"format": PLAN_FORMAT, "onnx_sha256": onnx_sha, "tensorrt": env.tensorrt, "gpu": env.gpu,
                "compute_capability": env.compute_capability}
    valid, why = [], []
    for sidecar in sorted(Path(cache_dir).glob(f"{role}-*.json")):
        record, problem = verify_plan(sidecar, expected)
        if record is not None:
            valid.append(record)
        elif problem:
            why.append(problem)
    if not valid:
        return None, why
    return max(valid, key=lambda r: str(r.sidecar.get("built_at", ""))), why


def newest_input_profiles(cache_dir: Path, role: str, onnx_sha: str) -> list[dict]:
    """The per-input shapes of the newest sidecar for `role` built from this ONNX file (`onnx_sha`), valid on
    this GPU or not (ORT's TensorRT EP reuses the profile a user chose with build-engines; the shapes depend on
    the model and that choice, not on the GPU). Another model's sidecars, in a shared $BASINGUARD_ENGINE_DIR,
    are skipped: their shapes (another context width, another latent size) would not fit this model."""
    best: dict = {}
    for path in Path(cache_dir).glob(f"{role}-*.json"):
        try:
            sidecar = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(sidecar, dict) and sidecar.get("onnx_sha256") == onnx_sha
                and str(sidecar.get("built_at", "")) > str(best.get("built_at", ""))):
            best = sidecar
    profiles = best.get("input_profiles", [])
    return profiles if isinstance(profiles, list) else []


# ------------------------------------------------------------------------------------------------- messages


def build_failure(role: str, messages: Sequence[str], profiles: Sequence[RoleProfile]) -> EngineError:
    """The error for a failed build: out of GPU memory (with what to shrink), or TensorRT's last errors."""
    ranges = "; ".join(p.describe() for p in profiles)
    if any(_OOM.search(m) for m in messages):
        return EngineError(f"building the {role} plan ran out of GPU memory ({ranges}). Build a smaller profile: "
                           "a lower --batch, a smaller --max-image-size, --static, or cap the builder's scratch "
                           "memory with --workspace-mib; and check no other process holds the GPU (nvidia-smi)")
    last = [m.strip() for m in messages if m.strip()][-3:]
    detail = " | ".join(last) if last else "no error message from TensorRT"
    return EngineError(f"TensorRT could not build the {role} plan ({ranges}): {detail}")


def out_of_profile(name: str, shapes: dict[str, Shape], profiles: Sequence[dict[str, tuple[Shape, Shape, Shape]]],
                   plan: Path | None) -> EngineError:
    ranges = "; ".join(", ".join(f"{k} {lo}..{hi}" for k, (lo, _, hi) in p.items()) for p in profiles) or "none"
    got = ", ".join(f"{k} {v}" for k, v in shapes.items())
    return EngineError(f"{name}: input shapes ({got}) are outside the TensorRT plan's profiles ({ranges}) "
                       f"{'of ' + str(plan) if plan else ''}. Rebuild with `basinguard build-engines` for this "
                       "batch and size (--batch N, --min-batch for smaller tail batches, --min/--max-image-size)")


def choose_backend(native_problem: str | None, plan_problem: str | None, ort_tensorrt: bool) -> str:
    """'native' (TensorRTModel), or 'ort' (ONNX Runtime's TensorRT EP); an EngineError naming what is missing."""
    if native_problem is None and plan_problem is None:
        return "native"
    if ort_tensorrt:
        return "ort"
    native = native_problem or plan_problem
    raise EngineError(f"--provider tensorrt has no backend here. Native TensorRT: {native}. ONNX Runtime's "
                      "TensorRT EP: this onnxruntime build lacks TensorrtExecutionProvider (pip install "
                      "onnxruntime-gpu, with TensorRT's libraries on the library path). Or run --provider cuda")


# ---------------------------------------------------------------------------------------- GPU libraries (lazy)


def _import_tensorrt():  # -> module tensorrt
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"tensorrt is not installed ({exc}); {INSTALL_HINT}") from None
    version = tuple(int(p) for p in re.findall(r"\d+", trt.__version__)[:2])
    if version < MIN_TENSORRT:
        raise EngineError(f"TensorRT {trt.__version__} is too old; basinguard needs >= "
                          f"{'.'.join(map(str, MIN_TENSORRT))}: {INSTALL_HINT}")
    return trt


def _import_cudart():  # -> module cuda.bindings.runtime
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as exc:
            raise EngineError(f"cuda-python is not installed ({exc}); {INSTALL_HINT}") from None
    return runtime


def native_problem() -> str | None:
    """Why the native backend cannot run here (a package missing or too old), or None."""
    try:
        _import_tensorrt()
        _import_cudart()
    except EngineError as exc:
        return str(exc)
    return None


class CudaError(EngineError):
    """A failed CUDA runtime call; `out_of_memory` tells an allocation failure apart."""

    def __init__(self, message: str, out_of_memory: bool = False):
        super().__init__(message)
        self.out_of_memory = out_of_memory


class Cuda:
    """cuda-python's runtime API with its (error, *values) tuples turned into values or a CudaError."""

    def __init__(self) -> None:
        self.rt = _import_cudart()

    def __call__(self, what: str, result: Any) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            text = self.rt.cudaGetErrorString(err)[1]
            text = text.decode() if isinstance(text, bytes) else str(text)
            raise CudaError(f"CUDA {what} failed: {name} ({text})",
                            out_of_memory=err == self.rt.cudaError_t.cudaErrorMemoryAllocation)
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def device(self) -> tuple[str, str, int, int]:
        """(name, compute capability, free bytes, total bytes) of the current device."""
        dev = self("cudaGetDevice", self.rt.cudaGetDevice())
        prop = self("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(dev))
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        free, total = self("cudaMemGetInfo", self.rt.cudaMemGetInfo())
        return name, f"{prop.major}.{prop.minor}", int(free), int(total)


def engine_env() -> EngineEnv:
    """TensorRT version and the current GPU; an EngineError when either is missing."""
    trt = _import_tensorrt()
    try:
        name, cc, _, _ = Cuda().device()
    except CudaError as exc:
        hint = ""
        if "InsufficientDriver" in str(exc):  # cuda-python 13 on a CUDA 12 driver, typically
            hint = ("; this cuda-python needs a newer NVIDIA driver: install the cuda-python major matching the "
                    "driver's CUDA version (nvidia-smi), e.g. pip install 'cuda-python<13' for a CUDA 12 driver")
        raise EngineError(f"no usable CUDA device: {exc}{hint}") from None
    return EngineEnv(trt.__version__, name, cc)


def _recording_logger(trt):  # -> trt.ILogger that keeps errors (for OOM detection) and prints them
    class Recorder(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                print(f"TensorRT: {msg}", file=sys.stderr)

    return Recorder()


# --------------------------------------------------------------------------------------------------- builds


def _model_geometry(onnx_dir: Path) -> tuple[int, HW, int, int]:
    """(VAE factor, native (height, width), size multiple, token length) from the exported folder's configs."""
    from basinguard.runtime.model_folder import ModelFolder  # lazy: the engine package does not need runtime

    folder = ModelFolder.open(onnx_dir)
    seq_len = DEFAULT_SEQ_LEN
    cfg = folder.path / "tokenizer" / "tokenizer_config.json"
    try:
        value = json.loads(cfg.read_text()).get("model_max_length") if cfg.is_file() else None
    except (OSError, ValueError):
        value = None
    if isinstance(value, int) and 2 < value <= 4096:  # huge sentinels (1e30) mean "unset"
        seq_len = value
    return folder.vae_scale_factor, folder.default_image, folder.size_multiple, seq_len


def _timing_cache_path(cache_dir: Path, env: EngineEnv) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", env.gpu).strip("-")
    return Path(cache_dir) / f"timing-trt{env.tensorrt}-{slug}-sm{env.compute_capability}.cache"


def _serialize(onnx_path: Path, role: str, profiles: Sequence[RoleProfile], precision: dict, spec: BuildSpec,
               timing_cache: Path) -> tuple[Any, list[dict]]:
    """Parse, configure and build with TensorRT's builder API; returns (serialized plan, per-input profiles)."""
    trt = _import_tensorrt()
    logger = _recording_logger(trt)
    builder = trt.Builder(logger)
    explicit = 0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if hasattr(trt.OnnxParserFlag, "NATIVE_INSTANCENORM"):  # GroupNorm exports as InstanceNorm: keep it one layer
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise build_failure(role, logger.errors + errors, profiles)
    config = builder.create_builder_config()
    if precision["fp16"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    if spec.opt_level is not None:
        config.builder_optimization_level = spec.opt_level
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    resolved = []
    for rp in profiles:
        trt_profile = builder.create_optimization_profile()
        shapes = {}
        for name, shape in inputs.items():
            ranges = input_profile(name, shape, rp)
            if ranges is not None:
                trt_profile.set_shape(name, *ranges)
                shapes[name] = [list(s) for s in ranges]
        if not shapes:  # an all-static ONNX file: TensorRT needs (and takes) no profile
            break
        if config.add_optimization_profile(trt_profile) < 0:
            raise build_failure(role, [*logger.errors, f"TensorRT rejected the profile {shapes}"], profiles)
        resolved.append(shapes)
    # Timing cache: tactic timings from earlier builds (any model) on this TensorRT + GPU skip re-measuring.
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob) if blob else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if blob:
            warnings.warn(f"ignoring unusable timing cache {timing_cache}", stacklevel=2)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    try:
        serialized = builder.build_serialized_network(network, config)
    except (RuntimeError, MemoryError) as exc:  # some allocation failures surface as Python exceptions
        raise build_failure(role, [*logger.errors, str(exc)], profiles) from None
    if serialized is None:
        raise build_failure(role, logger.errors, profiles)
    try:
        write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    except OSError as exc:
        warnings.warn(f"could not save the timing cache {timing_cache}: {exc}", stacklevel=2)
    return serialized, resolved


def build_plan(onnx_path: Path, role: str, profiles: Sequence[RoleProfile], spec: BuildSpec, cache_dir: Path,
               *, force: bool = False, log: Callable[[str], None] = print, env: EngineEnv | None = None) -> PlanRecord:
    """The plan for one ONNX file under `profiles`: from the cache when its sidecar checks out, else built."""
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    if not onnx_path.is_file():
        raise EngineError(f"model file not found: {onnx_path}")
    env = env or engine_env()
    precision = precision_for(role, spec)
    fields = key_fields(role, onnx_digest(onnx_path, digest_memo() or cache_dir / "digests.json"), env, profiles, precision, spec)
    key = plan_key(fields)
    plan, sidecar = plan_paths(cache_dir, role, key)
    ranges = "; ".join(p.describe() for p in profiles)
    if not force:
        record, problem = verify_plan(sidecar, fields)
        if record is not None:
            log(f"{role}: cached plan {plan} ({ranges})")
            return record
        if sidecar.exists() or plan.exists():
            log(f"{role}: rebuilding: {problem}")
    log(f"{role}: building a TensorRT {'fp16' if precision['fp16'] else 'fp32'} plan ({ranges}); "
        "a full-size UNet takes minutes")
    start = time.perf_counter()
    serialized, resolved = _serialize(onnx_path, role, profiles, precision, spec, _timing_cache_path(cache_dir, env))
    record = store_plan(cache_dir, fields, serialized, resolved, onnx_path, time.perf_counter() - start)
    log(f"{role}: built {record.plan} in {record.sidecar['build_seconds']} s "
        f"({record.sidecar['plan_bytes'] / 2**20:.0f} MiB)")
    return record


def store_plan(cache_dir: Path, fields: dict, serialized: Any, input_profiles: list[dict], onnx_path: Path,
               seconds: float = 0.0) -> PlanRecord:
    """Write a serialized plan under its key, then its sidecar (last: a plan without sidecar is never loaded)."""
    key = plan_key(fields)
    plan, sidecar = plan_paths(cache_dir, fields["model"], key)
    data = memoryview(serialized)
    write_atomic(plan, data)
    record = {**fields, "key": key, "plan": plan.name, "plan_bytes": data.nbytes,
              "plan_sha256": hashlib.sha256(data).hexdigest(), "input_profiles": input_profiles,
              "onnx": str(onnx_path), "built_at": datetime.now(timezone.utc).isoformat(), "build_seconds": round(seconds, 1)}
    write_atomic(sidecar, json.dumps(record, indent=1).encode())
    return PlanRecord(plan, record)


def build_engines(onnx_dir: Path, spec: BuildSpec | None = None, cache_dir: Path | None = None,
                  roles: Sequence[str] = ROLES, *, force: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, PlanRecord]:
    """Plans for the models of an exported folder (`basinguard build-engines`, `export --tensorrt`)."""
    spec = spec or BuildSpec()
    onnx_dir = Path(onnx_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else engine_dir(onnx_dir)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise EngineError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}")
    vae_factor, native, multiple, seq_len = _model_geometry(onnx_dir)
    plans = {role: role_profiles(role, spec, vae_factor, native, multiple, seq_len) for role in roles}  # validate all first
    env = engine_env()
    return {role: build_plan(onnx_dir / role / "model.onnx", role, profiles, spec, cache_dir, force=force, log=log,
                             env=env) for role, profiles in plans.items()}


# -------------------------------------------------------------------------------------------------- runtime


@dataclass
class _Slot:
    """Device and pinned host buffers for one set of input shapes, and its CUDA graph when captured."""

    profile: int
    shapes: dict[str, Shape]
    device: dict[str, int]
    host: dict[str, np.ndarray]
    host_ptrs: list[int]
    graph: Any = None
    graph_exec: Any = None
    graph_tried: bool = False


class TensorRTModel:
    """A TensorRT plan behind `LoadedModel`: host arrays in, copied to device buffers, one `execute_async_v3`
    on a private stream, outputs copied back. With `cuda_graph` (static plans only) each batch size's
    execution is captured once and replayed."""

    provider = "tensorrt"

    def __init__(self, plan: Path, name: str | None = None, cuda_graph: bool = False):
        plan = Path(plan)
        self.name = name or plan.stem.split("-")[0]
        self.plan_path = plan
        self._closed = True
        trt = _import_tensorrt()
        self._cuda = Cuda()
        self._logger = _recording_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        try:
            engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        except OSError as exc:
            raise EngineError(f"cannot read TensorRT plan {plan}: {exc}") from None
        if engine is None:
            raise EngineError(f"cannot load TensorRT plan {plan}: {' | '.join(self._logger.errors[-2:]) or 'unknown'}")
        self._engine = engine
        self.inputs: dict[str, TensorSpec] = {}
        self.outputs: dict[str, TensorSpec] = {}
        for i in range(engine.num_io_tensors):
            tname = engine.get_tensor_name(i)
            shape = tuple(None if d < 0 else int(d) for d in engine.get_tensor_shape(tname))
            spec = TensorSpec(tname, np.dtype(trt.nptype(engine.get_tensor_dtype(tname))), shape)
            is_input = engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[tname] = spec
        self._profiles = [{n: self._profile_shape(n, p) for n in self.inputs}
                          for p in range(engine.num_optimization_profiles)]
        self.static = all(lo == hi for prof in self._profiles for lo, _, hi in prof.values())
        if cuda_graph and not self.static:
            raise EngineError(f"{self.name}: CUDA graphs need a static plan (basinguard build-engines --static); "
                              f"{plan.name} has dynamic shapes")
        self.cuda_graph = cuda_graph
        self._stream = self._cuda("cudaStreamCreate", self._cuda.rt.cudaStreamCreate())
        self._stream_handle = int(self._stream)
        self._contexts: dict[int, Any] = {}
        self._bound: dict[int, tuple[Shape, ...]] = {}  # profile → the slot whose shapes/addresses its context holds
        self._slots: OrderedDict[tuple[Shape, ...], _Slot] = OrderedDict()
        self._closed = False

    def _profile_shape(self, name: str, profile: int) -> tuple[Shape, Shape, Shape]:
        """(min, opt, max) of an input in a profile; a static input's own shape when TensorRT reports none."""
        try:
            shapes = tuple(tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, profile))
        except (RuntimeError, TypeError, ValueError):
            shapes = ()
        if len(shapes) != 3 or any(d < 0 for s in shapes for d in s):
            declared = self.inputs[name].shape
            if any(d is None for d in declared):
                raise EngineError(f"{self.name}: no profile shape for dynamic input {name!r} in {self.plan_path}")
            shapes = (tuple(declared),) * 3  # type: ignore[assignment]
        return shapes  # type: ignore[return-value]

    # -- LoadedModel

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise EngineError(f"{self.name}: model was closed")
        feed = {}
        for name, spec in self.inputs.items():
            if name not in inputs:
                raise EngineError(f"{self.name}: missing input {name!r} (model takes {', '.join(self.inputs)})")
            feed[name] = np.ascontiguousarray(conform(spec, inputs[name]))
        key = tuple(v.shape for v in feed.values())
        slot = self._slot(key, {n: v.shape for n, v in feed.items()})
        rt, cuda, stream = self._cuda.rt, self._cuda, self._stream
        for name, value in feed.items():
            np.copyto(slot.host[name], value)  # into pinned memory: a true async copy, and graph-safe addresses
            cuda("cudaMemcpyAsync", rt.cudaMemcpyAsync(slot.device[name], slot.host[name].ctypes.data, value.nbytes,
                                                       rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        self._execute(key, slot)
        for name in self.outputs:
            out = slot.host[name]
            cuda("cudaMemcpyAsync", rt.cudaMemcpyAsync(out.ctypes.data, slot.device[name], out.nbytes,
                                                       rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        cuda("cudaStreamSynchronize", rt.cudaStreamSynchronize(stream))
        return {name: slot.host[name].copy() for name in self.outputs}  # the pinned buffers are reused next call

    # -- internals

    def _context(self, profile: int):  # -> trt.IExecutionContext, one per profile (each holds its own shapes)
        if profile not in self._contexts:
            context = self._engine.create_execution_context()
            if context is None:
                raise EngineError(f"{self.name}: TensorRT could not create an execution context (out of GPU memory?): "
                                  f"{' | '.join(self._logger.errors[-2:])}")
            if profile or len(self._profiles) > 1:
                if not context.set_optimization_profile_async(profile, self._stream_handle):  # False: not selected
                    raise EngineError(f"{self.name}: TensorRT could not select optimization profile {profile} of "
                                      f"{len(self._profiles)}: {' | '.join(self._logger.errors[-2:])}")
                self._cuda("cudaStreamSynchronize", self._cuda.rt.cudaStreamSynchronize(self._stream))
            self._contexts[profile] = context
        return self._contexts[profile]

    def _slot(self, key: tuple[Shape, ...], shapes: dict[str, Shape]) -> _Slot:
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        profile = pick_profile(shapes, self._profiles)
        if profile is None:
            raise out_of_profile(self.name, shapes, self._profiles, self.plan_path)
        context = self._context(profile)
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise EngineError(f"{self.name}: TensorRT rejected shape {shape} for {name!r}")
        self._bound.pop(profile, None)
        all_shapes = dict(shapes)
        for name in self.outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{self.name}: output {name!r} has a data-dependent shape {shape}; not supported")
            all_shapes[name] = shape
        while len(self._slots) >= _MAX_SLOTS:
            self._free_slot(*self._slots.popitem(last=False))
        slot = self._allocate(profile, all_shapes)
        self._slots[key] = slot
        return slot

    def _allocate(self, profile: int, shapes: dict[str, Shape]) -> _Slot:
        rt, cuda = self._cuda.rt, self._cuda
        slot = _Slot(profile, shapes, {}, {}, [])
        specs = {**self.inputs, **self.outputs}
        try:
            for name, shape in shapes.items():
                nbytes = max(1, int(np.prod(shape)) * specs[name].dtype.itemsize)
                slot.device[name] = cuda("cudaMalloc", rt.cudaMalloc(nbytes))
                ptr = cuda("cudaMallocHost", rt.cudaMallocHost(nbytes))
                slot.host_ptrs.append(ptr)
                raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
                slot.host[name] = raw[: int(np.prod(shape)) * specs[name].dtype.itemsize].view(specs[name].dtype).reshape(shape)
        except CudaError as exc:
            self._free_slot(None, slot)
            if exc.out_of_memory:
                mib = sum(int(np.prod(s)) * specs[n].dtype.itemsize for n, s in shapes.items()) / 2**20
                raise EngineError(f"{self.name}: out of GPU memory allocating {mib:.0f} MiB of buffers for shapes "
                                  f"{shapes}; run fewer images per call (--batch-size) or a smaller size") from None
            raise
        return slot

    def _bind(self, context: Any, slot: _Slot) -> None:
        for name in self.inputs:
            context.set_input_shape(name, slot.shapes[name])
        for name, ptr in slot.device.items():
            context.set_tensor_address(name, ptr)

    def _execute(self, key: tuple[Shape, ...], slot: _Slot) -> None:
        rt, cuda = self._cuda.rt, self._cuda
        if slot.graph_exec is not None:
            cuda("cudaGraphLaunch", rt.cudaGraphLaunch(slot.graph_exec, self._stream))
            return
        context = self._context(slot.profile)
        if self._bound.get(slot.profile) != key:
            self._bind(context, slot)
            self._bound[slot.profile] = key
        if not context.execute_async_v3(self._stream_handle):
            raise EngineError(f"{self.name}: TensorRT execution failed: {' | '.join(self._logger.errors[-2:])}")
        if self.cuda_graph and not slot.graph_tried:
            slot.graph_tried = True  # captured after one plain run, so TensorRT's lazy first-run setup is not in it
            self._capture(context, slot)

    def _capture(self, context: Any, slot: _Slot) -> None:
        """Record this slot's execution (addresses and shapes are fixed: a static plan) as a CUDA graph."""
        rt, cuda = self._cuda.rt, self._cuda
        cuda("cudaStreamSynchronize", rt.cudaStreamSynchronize(self._stream))
        graph = None
        try:
            cuda("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(
                self._stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
            try:
                ok = context.execute_async_v3(self._stream_handle)
            finally:  # always leave capture mode, or the stream stays unusable
                graph = cuda("cudaStreamEndCapture", rt.cudaStreamEndCapture(self._stream))
            if not ok:
                raise EngineError("execute_async_v3 failed during capture")
            slot.graph_exec = cuda("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
            slot.graph = graph
        except EngineError as exc:  # some plans cannot be captured: run them without a graph
            if graph is not None:
                rt.cudaGraphDestroy(graph)
            warnings.warn(f"{self.name}: CUDA graph capture failed ({exc}); running without it", stacklevel=3)

    def _free_slot(self, key: tuple[Shape, ...] | None, slot: _Slot) -> None:
        rt = self._cuda.rt
        if key is not None and self._bound.get(slot.profile) == key:
            del self._bound[slot.profile]
        if slot.graph_exec is not None:
            rt.cudaGraphExecDestroy(slot.graph_exec)
        if slot.graph is not None:
            rt.cudaGraphDestroy(slot.graph)
        for ptr in slot.device.values():
            rt.cudaFree(ptr)
        for ptr in slot.host_ptrs:
            rt.cudaFreeHost(ptr)
        slot.device, slot.host, slot.host_ptrs = {}, {}, []

    def close(self) -> None:
        """Free device memory and the stream now (also done, best effort, when the object is collected)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._cuda("cudaStreamSynchronize", self._cuda.rt.cudaStreamSynchronize(self._stream))
        finally:
            while self._slots:
                self._free_slot(*self._slots.popitem(last=False))
            self._contexts.clear()
            self._cuda.rt.cudaStreamDestroy(self._stream)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass


# ---------------------------------------------------------------------------------------------- selection


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_tensorrt(path: Path, threads: int | None = None):  # -> LoadedModel
    """`--provider tensorrt`: native TensorRT when tensorrt is installed and a valid plan for this ONNX file,
    TensorRT version and GPU exists (built by `basinguard build-engines`, never here: a build takes minutes
    and needs the profile chosen); else ONNX Runtime's TensorRT EP; else an EngineError naming what is missing."""
    import onnxruntime as ort

    from basinguard.engine.ort import OrtModel

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"model file not found: {path}")
    role, cache = path.parent.name, engine_dir(path.parent.parent)
    problem, plan_problem, record = native_problem(), None, None
    # No sidecar for this role, no plans and no profiles: skip hashing the ONNX file (seconds for a full-size UNet).
    sidecars = cache.is_dir() and any(cache.glob(f"{role}-*.json"))
    sha = onnx_digest(path, digest_memo() or cache / "digests.json") if sidecars else None
    if problem is None:
        try:
            env = engine_env()
        except EngineError as exc:
            problem = str(exc)
        else:
            record, why = find_plan(cache, role, sha, env) if sha is not None else (None, [])
            if record is None:
                found = f" ({'; '.join(why)})" if why else ""
                plan_problem = (f"no valid TensorRT plan for {role} in {cache}{found}; build them with "
                                f"`basinguard build-engines {path.parent.parent}`")
    choice = choose_backend(problem, plan_problem, "TensorrtExecutionProvider" in ort.get_available_providers())
    if choice == "native":
        assert record is not None
        graphs = _env_flag(CUDA_GRAPH_ENV)
        if graphs and not record.sidecar.get("static"):
            warnings.warn(f"{CUDA_GRAPH_ENV} ignored for {role}: its plan is dynamic (build-engines --static)", stacklevel=2)
        return TensorRTModel(record.plan, name=role, cuda_graph=graphs and bool(record.sidecar.get("static")))
    if plan_problem is not None:
        warnings.warn(f"{plan_problem}; running {role} on ONNX Runtime's TensorRT EP instead", stacklevel=2)
    profiles = newest_input_profiles(cache, role, sha) if sha is not None else []
    return OrtModel(path, provider="tensorrt", threads=threads, trt_profile=merged_input_profile(profiles) or None)
