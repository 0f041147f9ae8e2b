"""Native TensorRT backend: plans built with polygraphy from the exported ONNX files, run on a GPU.

Pieces, in order (what plans are, their profiles and cache: `basinguard.engine.plans`):
- builds: polygraphy's loaders (strongly typed network from ONNX, CreateConfig with our profiles and the timing
  cache, which polygraphy merges under a file lock). fp16 is a property of the ONNX graph, not a builder flag
  (TensorRT 11 removed the weakly typed precision flags): an fp16 export builds as it is, an fp32 one is first
  converted by ONNX Runtime's float16 converter with float32 inputs and outputs.
- `TensorRTModel`: `LoadedModel` over one plan through polygraphy's `TrtRunner` (one execution context, so one
  activation-memory block for all profiles); static plans with CUDA graphs run on `_GraphRunner` instead.
  `TensorRTPlans`: every valid plan of one ONNX file, each call run by a plan whose profiles cover its shapes.
- `load_tensorrt`: what `--provider tensorrt` loads: native TensorRT when it is installed and a valid plan exists,
  else ONNX Runtime's TensorRT EP, else an error naming what to install or build.

tensorrt, polygraphy and cuda-python are imported inside functions only: this module imports on machines without
a GPU. It uses no API that TensorRT 11 removed, and its calls on engines and contexts are type-checked against
tensorrt-stubs (tests/test_tensorrt_static.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsInt

import numpy as np

from basinguard.engine.base import EngineError, LoadedModel, TensorSpec, conform
from basinguard.engine.cuda import (
    INSTALL_HINT,
    Cuda,
    CudaError,
    cuda_device,
    cudart_load_problem,
    driver_hint,
    import_cudart,
    polygraphy_cuda,
)
from basinguard.engine.plans import (
    ROLES,
    BuildSpec,
    EngineEnv,
    ModelGeometry,
    PlanRecord,
    ProfileShapes,
    RoleProfile,
    Shape,
    build_failure,
    choose_backend,
    engine_dir,
    find_plans,
    hash_memo,
    input_profile,
    key_fields,
    merged_input_profile,
    newest_input_profiles,
    onnx_digest,
    out_of_profile,
    pick_profile,
    plan_key,
    plan_paths,
    precision_for,
    role_profiles,
    store_plan,
    verify_plan,
)

if TYPE_CHECKING:  # tensorrt-stubs: pyright checks the calls (tests/test_tensorrt_static.py); never imported at run time
    import tensorrt

CUDA_GRAPH_ENV = "BASINGUARD_CUDA_GRAPH"  # "1": capture CUDA graphs when a plan is static
MIN_TENSORRT = (10, 1)  # strongly typed networks, named tensors, per-profile device memory (_v2) queries
_MAX_SLOTS = 4  # CUDA-graph buffer sets kept per model: N and 2N (and a partial batch) without reallocating
_MAX_OPEN_PLANS = 2  # plans of one model kept deserialized at once (each holds its weights on the GPU)


# ---------------------------------------------------------------------------------------- GPU libraries (lazy)


def _import_tensorrt():  # no annotation: pyright infers the tensorrt module, so uses are checked against the stubs
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(f"tensorrt is not installed ({exc}); {INSTALL_HINT}") from None
    if not hasattr(trt, "__version__"):  # a bare namespace: only tensorrt-stubs' .pyi files are installed
        raise EngineError(f"tensorrt is not installed (only its type stubs are); {INSTALL_HINT}")
    version = tuple(int(p) for p in re.findall(r"\d+", trt.__version__)[:2])
    if version < MIN_TENSORRT:
        raise EngineError(f"TensorRT {trt.__version__} is too old; basinguard needs >= "
                          f"{'.'.join(map(str, MIN_TENSORRT))}: {INSTALL_HINT}")
    return trt


def native_problem() -> str | None:
    """Why the native backend cannot run here (a package missing or too old), or None."""
    try:
        _import_tensorrt()
        import_cudart()
        import polygraphy.backend.trt  # noqa: F401
    except ImportError as exc:
        return f"polygraphy is not installed ({exc}); {INSTALL_HINT}"
    except EngineError as exc:
        return str(exc)
    return None


def engine_env() -> EngineEnv:
    """TensorRT version and the current GPU; an EngineError naming what to install when either is missing."""
    trt = _import_tensorrt()
    name, cc = cuda_device()
    return EngineEnv(trt.__version__, name, cc)


class _Errors(logging.Handler):
    """Polygraphy's (and through it TensorRT's) warnings and errors: printed, and the errors kept for messages."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.messages.append(text)
        print(f"TensorRT: {text}", file=sys.stderr)


@contextlib.contextmanager
def _polygraphy_errors() -> Iterator[_Errors]:
    """Route polygraphy's logger through Python logging for the duration, to collect its ERROR and CRITICAL
    lines (TensorRT's errors among them) for the EngineError; its progress lines (INFO) are not shown."""
    from polygraphy.logger import G_LOGGER

    handler, logger, before = _Errors(), logging.getLogger("Polygraphy"), G_LOGGER.use_python_logging_system
    G_LOGGER.use_python_logging_system = True
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        G_LOGGER.use_python_logging_system = before


# --------------------------------------------------------------------------------------------------- builds


def _timing_cache_path(cache_dir: Path, env: EngineEnv) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", env.gpu).strip("-")
    return Path(cache_dir) / f"timing-trt{env.tensorrt}-{slug}-sm{env.compute_capability}.cache"


def float_dtype(onnx_path: Path) -> str:
    """'float16' when the graph's float weights are mostly float16 (`export --fp16`), else 'float32'."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    f32, f16 = int(onnx.TensorProto.FLOAT), int(onnx.TensorProto.FLOAT16)
    count = {f32: 0, f16: 0}
    for init in model.graph.initializer:
        if init.data_type in count:
            count[init.data_type] += int(np.prod(init.dims))
    return "float16" if count[f16] > count[f32] else "float32"


def fp16_onnx(onnx_path: Path, work_dir: Path, log: Callable[[str], None] = print) -> Path:
    """A float16 copy of a float32 ONNX graph with float32 inputs and outputs, for a strongly typed fp16 build:
    ONNX Runtime's float16 converter (kept from onnxconverter-common), nodes sorted topologically on save (the
    converter appends Casts that TensorRT's parser would otherwise reject). Made once into `work_dir`."""
    target = Path(work_dir) / "model.onnx"
    if target.is_file():
        return target
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    log(f"converting {onnx_path} to float16 (float32 inputs and outputs) for an fp16 plan")
    tmp = target.with_name(".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # Types for the converter from ONNX's file-based inference (in-memory inference stops at 2 GiB, below an
        # fp32 SD UNet); the weights are then read from beside the original file.
        onnx.shape_inference.infer_shapes_path(str(onnx_path), str(tmp / "typed.onnx"))
        model = onnx.load(str(tmp / "typed.onnx"), load_external_data=False)
        (tmp / "typed.onnx").unlink()
        onnx.load_external_data_for_model(model, str(onnx_path.parent))
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        large = model.ByteSize() > 2**31 - 2**26  # protobuf's 2 GiB limit, less a margin
        OnnxModel(model).save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=large)
    except Exception as exc:
        raise EngineError(f"converting {onnx_path} to float16 failed: {exc}") from None
    for part in tmp.iterdir():
        part.replace(target.with_name(part.name))
    tmp.rmdir()
    return target


def _serialize(onnx_path: Path, role: str, profiles: Sequence[RoleProfile], spec: BuildSpec,
               timing_cache: Path) -> tuple[Any, list[dict]]:
    """Parse (strongly typed), configure and build with polygraphy; returns (serialized plan, per-input profiles)."""
    trt = _import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    with _polygraphy_errors() as errors:
        try:
            # NATIVE_INSTANCENORM: GroupNorm exports as InstanceNorm; polygraphy sets it unless told otherwise.
            builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
            inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
            resolved: list[dict] = []
            for rp in profiles:
                shapes = {name: ranges for name, shape in inputs.items()
                          if (ranges := input_profile(name, shape, rp)) is not None}
                if not shapes:  # an all-static ONNX file: TensorRT needs (and takes) no profile
                    break
                resolved.append({name: [list(s) for s in ranges] for name, ranges in shapes.items()})
            trt_profiles = []
            for shapes_of in resolved:
                trt_profiles.append(Profile())
                for name, (lo, opt, hi) in shapes_of.items():
                    trt_profiles[-1].add(name, min=lo, opt=opt, max=hi)
            pools = {trt.MemoryPoolType.WORKSPACE: spec.workspace_mib << 20} if spec.workspace_mib else None
            # Timing cache: tactic timings from earlier builds (any model) on this TensorRT + GPU skip re-measuring;
            # polygraphy reads it, and merges this build's timings into it, under a file lock.
            # tf32: polygraphy's default (False) clears TensorRT's TF32 flag, which TensorRT sets by default; with
            # it fp32 layers (an fp32 plan's, and the fp32 islands of an fp16 graph) run matmuls and convolutions on
            # TF32 tensor cores. BuildSpec(tf32=False) keeps strict fp32.
            config = CreateConfig(profiles=trt_profiles or None, load_timing_cache=str(timing_cache),
                                  memory_pool_limits=pools, builder_optimization_level=spec.opt_level, tf32=spec.tf32)
            serialized = EngineBytesFromNetwork((builder, network, parser), config=config,
                                                save_timing_cache=str(timing_cache))()
        except EngineError:
            raise
        except (PolygraphyException, RuntimeError, MemoryError, TypeError) as exc:  # allocation failures may raise
            hint = [f"if the timing cache is damaged, delete {timing_cache}"] if timing_cache.is_file() else []
            raise build_failure(role, [*errors.messages, str(exc), *hint], profiles) from None
    return serialized, resolved


def build_plan(onnx_path: Path, role: str, profiles: Sequence[RoleProfile], spec: BuildSpec, cache_dir: Path,
               *, force: bool = False, log: Callable[[str], None] = print, env: EngineEnv | None = None) -> PlanRecord:
    """The plan for one ONNX file under `profiles`: from the cache when its sidecar checks out, else built."""
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    if not onnx_path.is_file():
        raise EngineError(f"model file not found: {onnx_path}")
    env = env or engine_env()
    precision = precision_for(role, spec)
    onnx_sha = onnx_digest(onnx_path, hash_memo(cache_dir))
    fields = key_fields(role, onnx_sha, env, profiles, precision, spec)
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
    # A strongly typed network runs in its graph's types: fp16 comes from an fp16 graph.
    source, graph = onnx_path, float_dtype(onnx_path)
    if precision["fp16"] and graph == "float32":
        source = fp16_onnx(onnx_path, cache_dir / "fp16" / f"{role}-{onnx_sha[:16]}", lambda text: log(f"{role}: {text}"))
    elif not precision["fp16"] and graph == "float16":
        log(f"{role}: the ONNX graph is float16 (export --fp16), so the plan runs in float16; export in float32 "
            "for an fp32 plan")
    log(f"{role}: building a TensorRT {'fp16' if precision['fp16'] or graph == 'float16' else 'fp32'} plan "
        f"({ranges}); a full-size UNet takes minutes")
    cache_dir.mkdir(parents=True, exist_ok=True)  # the timing cache's lock file is made there before the build
    start = time.perf_counter()
    serialized, resolved = _serialize(source, role, profiles, spec, _timing_cache_path(cache_dir, env))
    record = store_plan(cache_dir, fields, serialized, resolved, onnx_path, time.perf_counter() - start)
    log(f"{role}: built {record.plan} in {record.sidecar['build_seconds']} s "
        f"({record.sidecar['plan_bytes'] / 2**20:.0f} MiB)")
    return record


def build_engines(onnx_dir: Path, geometry: ModelGeometry, spec: BuildSpec | None = None,
                  cache_dir: Path | None = None, roles: Sequence[str] | None = None, *, force: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, PlanRecord]:
    """Plans for the models of an exported folder (`basinguard build-engines`, `export --tensorrt`); `geometry`:
    the folder's (`ModelSpec.engine_geometry()`); `roles`: default, every model of ROLES the folder has."""
    spec = spec or BuildSpec()
    onnx_dir = Path(onnx_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else engine_dir(onnx_dir)
    if roles is None:
        roles = [r for r in ROLES if (onnx_dir / r / "model.onnx").is_file()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise EngineError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}")
    g = geometry
    plans = {role: role_profiles(role, spec, g.vae_factor, g.native, g.multiple, g.seq_len) for role in roles}  # validate all first
    env = engine_env()
    return {role: build_plan(onnx_dir / role / "model.onnx", role, profiles, spec, cache_dir, force=force, log=log,
                             env=env) for role, profiles in plans.items()}


# -------------------------------------------------------------------------------------------------- runtime


def _io_specs(trt: Any, engine: tensorrt.ICudaEngine, plan: Path) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """The engine's inputs and outputs as numpy specs; bf16/fp8 tensors (no numpy type) are a clear error."""
    inputs: dict[str, TensorSpec] = {}
    outputs: dict[str, TensorSpec] = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        try:
            np_type = np.dtype(trt.nptype(dtype))
        except TypeError:  # trt.nptype raises TypeError for types numpy lacks (bf16, fp8, fp4)
            raise EngineError(f"{plan}: tensor {name!r} is {dtype}, which numpy cannot hold; export the model with "
                              "float32 or float16 inputs and outputs") from None
        shape = tuple(None if d < 0 else int(d) for d in engine.get_tensor_shape(name))
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        (inputs if is_input else outputs)[name] = TensorSpec(name, np_type, shape)
    return inputs, outputs


def _profile_shapes(engine: tensorrt.ICudaEngine, inputs: dict[str, TensorSpec], plan: Path) -> list[ProfileShapes]:
    """(min, opt, max) of each input per profile; a static input's own shape when TensorRT reports none."""
    profiles = []
    for p in range(engine.num_optimization_profiles):
        shapes: ProfileShapes = {}
        for name, spec in inputs.items():
            try:
                got = tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, p))
            except (RuntimeError, TypeError, ValueError):
                got = ()
            if len(got) != 3 or any(d < 0 for s in got for d in s):
                if any(d is None for d in spec.shape):
                    raise EngineError(f"no profile shape for dynamic input {name!r} in {plan}")
                got = (tuple(int(d) for d in spec.shape if d is not None),) * 3
            shapes[name] = got  # type: ignore[assignment]
        profiles.append(shapes)
    return profiles


class TensorRTModel:
    """One TensorRT plan behind `LoadedModel`: host arrays in, host arrays out.

    Runs on polygraphy's `TrtRunner`: one execution context (so one activation-memory block for every profile),
    the profile switched when a call's shapes need another. With `cuda_graph` (static plans only) each batch
    size's execution is captured once and replayed (`_GraphRunner`)."""

    provider = "tensorrt"

    def __init__(self, plan: Path, name: str | None = None, cuda_graph: bool = False):
        plan = Path(plan)
        self.name = name or plan.stem.split("-")[0]
        self.plan_path = plan
        self._closed = True
        trt = _import_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.exception import PolygraphyException

        try:
            data = plan.read_bytes()
        except OSError as exc:
            raise EngineError(f"cannot read TensorRT plan {plan}: {exc}") from None
        with _polygraphy_errors() as errors:
            try:
                engine = EngineFromBytes(data)()
            except (PolygraphyException, RuntimeError) as exc:
                raise EngineError(f"cannot load TensorRT plan {plan}: "
                                  f"{' | '.join([*errors.messages[-2:], str(exc)])}") from None
        self.inputs, self.outputs = _io_specs(trt, engine, plan)
        self._profiles = _profile_shapes(engine, self.inputs, plan)
        self.static = all(lo == hi for prof in self._profiles for lo, _, hi in prof.values())
        if cuda_graph and not self.static:
            raise EngineError(f"{self.name}: CUDA graphs need a static plan (basinguard build-engines --static); "
                              f"{plan.name} has dynamic shapes")
        self.cuda_graph = cuda_graph
        self._profile = 0
        self._runner: Any = None
        self._graphs: _GraphRunner | None = None
        if cuda_graph:
            self._graphs = _GraphRunner(engine, self.name, self.inputs, self.outputs)
        else:
            self._runner = TrtRunner(engine, name=self.name)
            self._call(polygraphy_cuda)  # the CUDA runtime for the runner's stream, from the wheel of TensorRT's CUDA
            self._call(self._runner.activate)
        self._closed = False

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a polygraphy/TensorRT call; its failures (logged by TensorRT, raised by polygraphy) as EngineError."""
        from polygraphy.exception import PolygraphyException

        with _polygraphy_errors() as errors:
            try:
                return fn(*args, **kwargs)
            except OSError as exc:  # a library polygraphy loads with ctypes: libcudart
                raise EngineError(f"{self.name}: {cudart_load_problem(exc)}") from None
            except (PolygraphyException, RuntimeError) as exc:
                logged = errors.messages[-2:]  # polygraphy logs its critical message ("[!] ...") before raising it
                detail = " | ".join(logged if any(str(exc) in m for m in logged) else [*logged, str(exc)])
                if re.search(r"CUDA Error: 35\b", detail):  # polygraphy's cudart calls: cudaErrorInsufficientDriver
                    with contextlib.suppress(EngineError):  # no cuda-python to ask: the error as polygraphy put it
                        detail += f"; {driver_hint(Cuda())}"
                raise EngineError(f"{self.name}: TensorRT failed on {self.plan_path.name}: {detail}") from None

    def profile_for(self, shapes: dict[str, Shape]) -> int:
        profile = pick_profile(shapes, self._profiles) if self._profiles else 0
        if profile is None:
            raise out_of_profile(self.name, shapes, self._profiles, self.plan_path)
        return profile

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise EngineError(f"{self.name}: model was closed")
        feed = {}
        for name, spec in self.inputs.items():
            if name not in inputs:
                raise EngineError(f"{self.name}: missing input {name!r} (model takes {', '.join(self.inputs)})")
            feed[name] = np.ascontiguousarray(conform(spec, inputs[name]))
        profile = self.profile_for({n: v.shape for n, v in feed.items()})
        if self._graphs is not None:
            return self._graphs.run(feed, profile)
        if profile != self._profile:
            self._call(self._runner.set_profile, profile)  # TensorRT raises RuntimeError where it refuses
            self._profile = profile
        out = self._call(self._runner.infer, feed, check_inputs=False)
        return {name: np.array(out[name], copy=True) for name in self.outputs}  # the runner reuses its buffers

    def close(self) -> None:
        """Free device memory now (also done, best effort, when the object is collected)."""
        if self._closed:
            return
        self._closed = True
        if self._graphs is not None:
            self._graphs.close()
        elif self._runner is not None and self._runner.is_active:
            self._runner.deactivate()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass


@dataclass
class _Slot:
    """Device and pinned host buffers for one set of input shapes, and its CUDA graph."""

    profile: int
    shapes: dict[str, Shape]
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, np.ndarray] = field(default_factory=dict)
    host_ptrs: list[int] = field(default_factory=list)
    graph: Any = None
    graph_exec: Any = None


class _GraphRunner:
    """A static plan run through CUDA graphs (cuda-python): one execution context per profile, all sharing one
    user-managed activation-memory block sized by the largest per-profile (_v2) need, as NVIDIA's diffusion demo
    does; buffers per shape set (pinned host staging, so replays see fixed addresses); each shape set's
    execution captured after one plain run and replayed from then on."""

    def __init__(self, engine: tensorrt.ICudaEngine, name: str, inputs: dict[str, TensorSpec],
                 outputs: dict[str, TensorSpec]):
        self.trt = _import_tensorrt()  # typed from the stubs: its enum members are checked
        self.engine, self.name, self.inputs, self.outputs = engine, name, inputs, outputs
        self.cuda = Cuda()
        rt = self.cuda.rt
        # cuda-python's cudaStream_t, for cuda-python calls; TensorRT takes the handle (an int). Typed as what it
        # is, not int, so that passing the object to TensorRT is a type error (tests/test_tensorrt_static.py).
        self.stream: SupportsInt = self.cuda("cudaStreamCreate", rt.cudaStreamCreate())
        self.handle = int(self.stream)
        self.contexts: dict[int, tensorrt.IExecutionContext] = {}
        self.slots: OrderedDict[tuple[Shape, ...], _Slot] = OrderedDict()
        size = max(engine.get_device_memory_size_for_profile_v2(p) for p in range(max(1, engine.num_optimization_profiles)))
        self.memory_size = int(size)
        self.memory = self._malloc(max(1, self.memory_size), "activation memory")

    def _malloc(self, nbytes: int, what: str) -> int:
        try:
            return self.cuda("cudaMalloc", self.cuda.rt.cudaMalloc(nbytes))
        except CudaError as exc:
            if exc.out_of_memory:
                raise EngineError(f"{self.name}: out of GPU memory allocating {nbytes / 2**20:.0f} MiB of {what}; "
                                  "run fewer images per call (--batch-size) or a smaller size") from None
            raise

    def _context(self, profile: int) -> tensorrt.IExecutionContext:
        context = self.contexts.get(profile)
        if context is None:
            strategy = self.trt.ExecutionContextAllocationStrategy.USER_MANAGED
            context = self.engine.create_execution_context(strategy)
            if context is None:
                raise EngineError(f"{self.name}: TensorRT could not create an execution context")
            context.set_device_memory(self.memory, self.memory_size)
            why = ""
            try:  # TensorRT raises RuntimeError for some refusals and returns False for others
                selected = context.set_optimization_profile_async(profile, self.handle)
            except RuntimeError as exc:
                selected, why = False, f": {exc}"
            if not selected:
                raise EngineError(f"{self.name}: TensorRT could not select optimization profile {profile}{why}")
            self.cuda("cudaStreamSynchronize", self.cuda.rt.cudaStreamSynchronize(self.stream))
            self.contexts[profile] = context
        return context

    def _slot(self, key: tuple[Shape, ...], feed: dict[str, np.ndarray], profile: int) -> _Slot:
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            return slot
        context = self._context(profile)
        shapes = {name: value.shape for name, value in feed.items()}
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise EngineError(f"{self.name}: TensorRT rejected shape {shape} for input {name!r}")
        for name in self.outputs:
            shapes[name] = tuple(int(d) for d in context.get_tensor_shape(name))
            if any(d < 0 for d in shapes[name]):
                raise EngineError(f"{self.name}: output {name!r} has a data-dependent shape {shapes[name]}; not supported")
        while len(self.slots) >= _MAX_SLOTS:
            self._free(self.slots.popitem(last=False)[1])
        slot = _Slot(profile, shapes)
        try:
            self._prepare(context, slot, feed)
        except BaseException as exc:
            self._free(slot)
            if isinstance(exc, CudaError) and not exc.out_of_memory:
                raise EngineError(f"{self.name}: CUDA graph capture failed ({exc}); run without {CUDA_GRAPH_ENV}") from None
            raise
        self.slots[key] = slot
        return slot

    def _prepare(self, context: tensorrt.IExecutionContext, slot: _Slot, feed: dict[str, np.ndarray]) -> None:
        """Buffers, one plain run, then the capture."""
        rt, specs = self.cuda.rt, {**self.inputs, **self.outputs}
        for name, shape in slot.shapes.items():
            nbytes = max(1, int(np.prod(shape)) * specs[name].dtype.itemsize)
            slot.device[name] = self._malloc(nbytes, f"buffers for shapes {slot.shapes}")
            ptr = self.cuda("cudaMallocHost", rt.cudaMallocHost(nbytes))
            slot.host_ptrs.append(ptr)
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
            slot.host[name] = raw[: int(np.prod(shape)) * specs[name].dtype.itemsize].view(specs[name].dtype).reshape(shape)
            if not context.set_tensor_address(name, slot.device[name]):
                raise EngineError(f"{self.name}: TensorRT rejected the buffer address of {name!r}")
        for name in feed:  # the first run, plain: TensorRT's lazy first-run setup stays out of the graph
            self._copy_in(slot, name, feed[name])
        if not context.execute_async_v3(self.handle):
            raise EngineError(f"{self.name}: TensorRT execution failed (see TensorRT's messages above)")
        self._capture(context, slot)

    def _copy_in(self, slot: _Slot, name: str, value: np.ndarray) -> None:
        rt = self.cuda.rt
        np.copyto(slot.host[name], value)  # into pinned memory: a true async copy, at an address the graph keeps
        self.cuda("cudaMemcpyAsync", rt.cudaMemcpyAsync(slot.device[name], slot.host[name].ctypes.data, value.nbytes,
                                                        rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def _capture(self, context: tensorrt.IExecutionContext, slot: _Slot) -> None:
        rt, cuda = self.cuda.rt, self.cuda
        cuda("cudaStreamSynchronize", rt.cudaStreamSynchronize(self.stream))
        cuda("cudaStreamBeginCapture", rt.cudaStreamBeginCapture(
            self.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        try:
            ok = context.execute_async_v3(self.handle)
        finally:  # always leave capture mode, or the stream stays unusable
            slot.graph = cuda("cudaStreamEndCapture", rt.cudaStreamEndCapture(self.stream))
        if not ok:
            raise EngineError(f"{self.name}: TensorRT execution failed during CUDA graph capture")
        slot.graph_exec = cuda("cudaGraphInstantiate", rt.cudaGraphInstantiate(slot.graph, 0))

    def run(self, feed: dict[str, np.ndarray], profile: int) -> dict[str, np.ndarray]:
        rt, key = self.cuda.rt, tuple(v.shape for v in feed.values())
        fresh = key not in self.slots
        slot = self._slot(key, feed, profile)
        if not fresh:
            for name, value in feed.items():
                self._copy_in(slot, name, value)
        self.cuda("cudaGraphLaunch", rt.cudaGraphLaunch(slot.graph_exec, self.stream))
        for name in self.outputs:
            out = slot.host[name]
            self.cuda("cudaMemcpyAsync", rt.cudaMemcpyAsync(out.ctypes.data, slot.device[name], out.nbytes,
                                                            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        self.cuda("cudaStreamSynchronize", rt.cudaStreamSynchronize(self.stream))
        return {name: slot.host[name].copy() for name in self.outputs}  # the pinned buffers are reused next call

    def _free(self, slot: _Slot) -> None:
        rt = self.cuda.rt
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
        rt = self.cuda.rt
        try:
            self.cuda("cudaStreamSynchronize", rt.cudaStreamSynchronize(self.stream))
        finally:
            while self.slots:
                self._free(self.slots.popitem(last=False)[1])
            self.contexts.clear()
            rt.cudaFree(self.memory)
            rt.cudaStreamDestroy(self.stream)


class TensorRTPlans:
    """Every valid plan of one ONNX file behind `LoadedModel`: each call runs on the first plan (best first: see
    `find_plans`) whose profiles cover its shapes, deserialized when first needed; at most _MAX_OPEN_PLANS stay
    loaded. So a batch-4 job runs although a static batch-1 plan was built after the batch-4 one."""

    provider = "tensorrt"

    def __init__(self, records: Sequence[PlanRecord], name: str, cuda_graph: bool = False,
                 open_plan: Callable[[Path, str, bool], Any] | None = None):
        if not records:
            raise EngineError(f"{name}: no TensorRT plan to load")
        self.name, self.records, self.cuda_graph = name, list(records), cuda_graph
        self._open_plan = open_plan or (lambda plan, role, graph: TensorRTModel(plan, role, cuda_graph=graph))
        self._open: OrderedDict[Path, Any] = OrderedDict()
        first = self._model(self.records[0])
        self.inputs: dict[str, TensorSpec] = first.inputs
        self.outputs: dict[str, TensorSpec] = first.outputs

    def _model(self, record: PlanRecord) -> Any:
        model = self._open.get(record.plan)
        if model is None:
            while len(self._open) >= _MAX_OPEN_PLANS:
                _, old = self._open.popitem(last=False)
                old.close()
            graph = self.cuda_graph and bool(record.sidecar.get("static"))
            model = self._open[record.plan] = self._open_plan(record.plan, self.name, graph)
        self._open.move_to_end(record.plan)
        return model

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {name: np.shape(conform(spec, inputs[name])) for name, spec in self.inputs.items() if name in inputs}
        record = next((r for r in self.records if r.covers(shapes)), None)
        if record is None:
            ranges = [p for r in self.records for p in r.input_profiles]
            raise out_of_profile(self.name, shapes, ranges, f"{len(self.records)} plan(s) in {self.records[0].plan.parent}")
        return self._model(record).run(inputs)

    def close(self) -> None:
        while self._open:
            self._open.popitem(last=False)[1].close()


# ---------------------------------------------------------------------------------------------- selection


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_tensorrt(path: Path, threads: int | None = None) -> LoadedModel:
    """`--provider tensorrt`: native TensorRT when tensorrt is installed and a valid plan for this ONNX file,
    TensorRT version and GPU exists (built by `basinguard build-engines`, never here: a build takes minutes
    and needs the profile chosen); else ONNX Runtime's TensorRT EP; else an EngineError naming what is missing."""
    import onnxruntime as ort

    from basinguard.engine.ort import OrtModel

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"model file not found: {path}")
    role, cache = path.parent.name, engine_dir(path.parent.parent)
    problem, plan_problem, records = native_problem(), None, list[PlanRecord]()
    # No sidecar for this role, no plans and no profiles: skip hashing the ONNX file (seconds for a full-size UNet).
    sidecars = cache.is_dir() and any(cache.glob(f"{role}-*.json"))
    sha = onnx_digest(path, hash_memo(cache)) if sidecars else None
    if problem is None:
        try:
            env = engine_env()
        except EngineError as exc:
            problem = str(exc)
        else:
            records, why = find_plans(cache, role, sha, env) if sha is not None else ([], [])
            if not records:
                found = f" ({'; '.join(why)})" if why else ""
                plan_problem = (f"no valid TensorRT plan for {role} in {cache}{found}; build them with "
                                f"`basinguard build-engines {path.parent.parent}`")
    choice = choose_backend(problem, plan_problem, "TensorrtExecutionProvider" in ort.get_available_providers())
    if choice == "native":
        graphs = _env_flag(CUDA_GRAPH_ENV)
        if graphs and not any(r.sidecar.get("static") for r in records):
            warnings.warn(f"{CUDA_GRAPH_ENV} ignored for {role}: its plans are dynamic (build-engines --static)",
                          stacklevel=2)
        return TensorRTPlans(records, role, cuda_graph=graphs)
    if plan_problem is not None:
        warnings.warn(f"{plan_problem}; running {role} on ONNX Runtime's TensorRT EP instead", stacklevel=2)
    profiles = newest_input_profiles(cache, role, sha) if sha is not None else []
    return OrtModel(path, provider="tensorrt", threads=threads, trt_profile=merged_input_profile(profiles) or None)
