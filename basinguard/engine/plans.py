"""What TensorRT plans are, decided on the CPU: the shape profiles a plan serves, the plan cache (keys, sidecars,
which plan covers a call) and the messages for what goes wrong. No TensorRT here: tested on any machine.

- profiles: from (N images, image-size range, VAE factor). The UNet spans batch 1..2N in one profile, so STP's
  uncond-only steps (N), guided steps (2N) and a batch job's short last batch share an engine; `static` builds
  one fixed-shape profile per batch size instead (faster kernels, and CUDA graphs).
- the plan cache: key = sha256(ONNX hash, TensorRT version, GPU, compute capability, profiles, precision,
  builder options); the key is in the file name, and a JSON sidecar next to each plan repeats the fields, the
  plan's own hash and its per-input profiles. The plan's hash is checked through the size/mtime/inode memo of
  `files.file_digests`, so gigabyte plans are read once per change. A plan built elsewhere or from another ONNX
  file is never loaded: its key differs, and a sidecar that disagrees with its plan marks the plan invalid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from basinguard.engine.base import EngineError, onnx_files
from basinguard.files import digest_memo, file_digests, write_atomic

ENGINE_DIR_ENV = "BASINGUARD_ENGINE_DIR"  # where plans live; default: ONNX_DIR/tensorrt
# Bump when the profile rules, the build or the sidecar change: old plans then no longer match (3: TF32 on).
PLAN_FORMAT = 3
ROLES = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # text_encoder_2: SDXL's second encoder
DEFAULT_SEQ_LEN = 77  # CLIP's context; a folder's own length comes in its ModelGeometry
# Fields that must equal this machine's and this ONNX file's for a plan to load (the rest only name the build).
ENV_FIELDS = ("format", "onnx_sha256", "tensorrt", "gpu", "compute_capability")
KEY_FIELDS = (*ENV_FIELDS, "model", "profiles", "precision", "static", "builder")
_OOM = re.compile(r"out of memory|outofmemory|could not be allocated|bad_alloc|cudaErrorMemoryAllocation|"
                  r"CUDA_ERROR_OUT_OF_MEMORY|insufficient (device |gpu )?memory|failed to allocate", re.IGNORECASE)

Shape = tuple[int, ...]
HW = tuple[int, int]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name → (min, opt, max)


# --------------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class BuildSpec:
    """What a plan must serve. Image sizes are (height, width) in pixels; None: the model's native size."""

    batch: int = 1  # N images per call: the UNet runs at N (uncond-only steps) and 2N (guided steps)
    min_batch: int | None = None  # the UNet profile's smallest batch (default: 1 dynamic, N static)
    image: HW | None = None  # the size the kernels are tuned for
    min_image: HW | None = None  # None: = image
    max_image: HW | None = None  # None: = image
    static: bool = False  # one fixed shape per batch size (N, 2N): fastest kernels, allows CUDA graphs
    fp16: bool = True  # text encoder and UNet in fp16
    vae_fp16: bool = False  # the SD VAE decoder overflows fp16 at large activations: fp32 unless asked
    workspace_mib: int | None = None  # cap on the builder's scratch memory (None: TensorRT's default)
    opt_level: int | None = None  # builder optimization level 0-5 (None: TensorRT's default, 3)
    tf32: bool = True  # fp32 layers on TF32 tensor cores (TensorRT's default); False: strict fp32

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
class ModelGeometry:
    """What profiles need from a model folder (`runtime.spec.ModelSpec.engine_geometry`)."""

    vae_factor: int  # pixels per latent cell
    native: HW  # the model's own (height, width) in pixels
    multiple: int  # image sides must be multiples of this
    seq_len: int = DEFAULT_SEQ_LEN  # the input_ids length: what the runtime pads prompts to


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
    Dynamic: one profile per model from batch 1 (a batch job's short last batch) to those batches, over the
    image-size range. Static: one fixed shape per batch size used (--min-batch adds a smaller one).
    """
    if role not in ROLES:
        raise EngineError(f"unknown model {role!r}; choose from {', '.join(ROLES)}")
    spec.validate()
    n = spec.batch
    lo, opt, hi = resolve_sizes(spec, native, multiple)
    text = role.startswith("text_encoder")
    latent = None if text else tuple((h // vae_factor, w // vae_factor) for h, w in (lo, opt, hi))
    if spec.static:
        latent = None if latent is None else (latent[1],) * 3
        batches = [2 * n] if text else {"unet": sorted({spec.min_batch or n, n, 2 * n}), "vae_decoder": [n]}[role]
        return [RoleProfile((b, b, b), latent, seq_len) for b in batches]  # type: ignore[arg-type]
    batch = (1, 2 * n, 2 * n) if text else {"unet": (spec.min_batch or 1, 2 * n, 2 * n), "vae_decoder": (1, n, n)}[role]
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
        values: Sequence[int]
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


def pick_profile(shapes: dict[str, Shape], profiles: Sequence[Mapping[str, Sequence[Sequence[int]]]]) -> int | None:
    """Index of the first profile whose ranges hold every input shape; None when none does."""
    for index, profile in enumerate(profiles):
        if all(name in shapes and len(shapes[name]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[name], hi))
               for name, (lo, _, hi) in profile.items()):
            return index
    return None


def merged_input_profile(profiles: Sequence[Mapping[str, Sequence[Sequence[int]]]]) -> ProfileShapes:
    """One (min, opt, max) per input spanning several profiles (ORT's TensorRT EP takes a single profile)."""
    merged: ProfileShapes = {}
    for profile in profiles:
        for name, (lo_, opt_, hi_) in profile.items():
            lo, opt, hi = tuple(lo_), tuple(opt_), tuple(hi_)
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

    def covers(self, shapes: dict[str, Shape]) -> bool:
        """Whether one of the plan's profiles holds these input shapes (an all-static plan: its own shapes)."""
        return pick_profile(shapes, self.input_profiles or [{}]) is not None


def engine_dir(onnx_dir: Path) -> Path:
    """Where plans of the model folder `onnx_dir` live: $BASINGUARD_ENGINE_DIR, else ONNX_DIR/tensorrt."""
    env = os.environ.get(ENGINE_DIR_ENV)
    return Path(env) if env else Path(onnx_dir) / "tensorrt"


def hash_memo(cache_dir: Path) -> Path:
    """The file-hash memo: the user's (shared with model identities), else one beside the plans."""
    return digest_memo() or Path(cache_dir) / "digests.json"


def onnx_digest(onnx_path: Path, memo: Path | None = None) -> str:
    """sha256 over the ONNX file and its external data (`onnx_files`); `memo`: see `files.file_digests`."""
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
                    "builder": {"workspace_mib": spec.workspace_mib, "opt_level": spec.opt_level, "tf32": spec.tf32}})


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
    if (plan.stat().st_size != sidecar.get("plan_bytes")
            or file_digests([plan], hash_memo(sidecar_path.parent))[0] != sidecar.get("plan_sha256")):
        return None, f"{plan.name}: plan file truncated or altered since the build"
    return PlanRecord(plan, sidecar), None


def find_plans(cache_dir: Path, role: str, onnx_sha: str, env: EngineEnv) -> tuple[list[PlanRecord], list[str]]:
    """The valid plans for `role` built from this ONNX file on this TensorRT and GPU, best first (static ones,
    with the fastest kernels, then the newest); and why each other plan found was rejected."""
    expected = {"format": PLAN_FORMAT, "onnx_sha256": onnx_sha, "tensorrt": env.tensorrt, "gpu": env.gpu,
                "compute_capability": env.compute_capability}
    valid, why = [], []
    for sidecar in sorted(Path(cache_dir).glob(f"{role}-*.json")):
        record, problem = verify_plan(sidecar, expected)
        if record is not None:
            valid.append(record)
        elif problem:
            why.append(problem)
    valid.sort(key=lambda r: (bool(r.sidecar.get("static")), str(r.sidecar.get("built_at", ""))), reverse=True)
    return valid, why


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


def out_of_profile(name: str, shapes: dict[str, Shape], profiles: Sequence[Mapping[str, Sequence[Sequence[int]]]],
                   plan: Path | str | None) -> EngineError:
    ranges = "; ".join(", ".join(f"{k} {tuple(lo)}..{tuple(hi)}" for k, (lo, _, hi) in p.items()) for p in profiles)
    got = ", ".join(f"{k} {v}" for k, v in shapes.items())
    return EngineError(f"{name}: input shapes ({got}) are outside the TensorRT plan's profiles ({ranges or 'none'}) "
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
