"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers behind `LoadedModel`."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from basinguard.engine.base import EngineError, TensorSpec, conform
from basinguard.errors import first_line

try:
    import onnxruntime as ort
except ImportError as exc:  # it comes from an extra (cpu, or a GPU set), not from the base install
    raise EngineError(f"onnxruntime is not installed ({exc}); pip install 'basinguard[cpu]', or a GPU set such as "
                      "'basinguard[gpu-cu12]' (docs/gpu.md)") from None

PROVIDERS = {  # what --provider asks for, in ORT's priority order (CPU takes the ops a GPU provider cannot)
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
T = TypeVar("T")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _specs(args: list) -> dict[str, TensorSpec]:
    specs = {}
    for a in args:
        if a.type not in _ORT_DTYPES:
            raise EngineError(f"unsupported tensor type {a.type} for {a.name!r}")
        shape = tuple(d if isinstance(d, int) else None for d in a.shape)
        specs[a.name] = TensorSpec(a.name, np.dtype(_ORT_DTYPES[a.type]), shape)
    return specs


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: what taskset, cgroup cpusets and batch schedulers
    allow), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def thread_count_problem(threads: int | None) -> str | None:
    """Why `threads` intra-op threads cannot run here, or None: more threads than CPUs only contend (999 threads on
    2 CPUs made a 2.6 s generate take 170 s), so a count above the CPUs available is refused, not capped: a
    silent cap would record one count and run another."""
    cpus = available_cpus()
    if threads is not None and threads > cpus:
        return (f"threads {threads} is more than the {cpus} CPU{'s' if cpus > 1 else ''} this process may use; "
                f"give 1 to {cpus} (or leave it out for ONNX Runtime's default, one per CPU)")
    return None


def session_options(threads: int | None) -> ort.SessionOptions:
    """Sequential execution, full graph optimisation; `threads` caps intra-op threads (None: ORT's default). A count
    above the CPUs available is an EngineError (`thread_count_problem`)."""
    problem = thread_count_problem(threads)
    if problem:
        raise EngineError(problem)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return opts


LABELS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "ort-tensorrt"}
_INSTALL = {  # what a provider that fails to start usually lacks
    "CUDAExecutionProvider": "the CUDA and cuDNN 9 libraries of the CUDA major this onnxruntime-gpu was built for "
                             "(pip install 'basinguard[gpu-cu12]' or 'basinguard[gpu-cu13]', matching the driver's "
                             "CUDA in nvidia-smi; or a CUDA torch: onnxruntime.preload_dlls() finds either) or a "
                             "visible GPU (nvidia-smi, CUDA_VISIBLE_DEVICES)",
    "TensorrtExecutionProvider": "TensorRT's libraries (pip install tensorrt, the major version this onnxruntime-gpu "
                                 "was built for) on the library path, besides CUDA and cuDNN",
}


def trt_profile_options(profile: dict[str, tuple] | None) -> dict[str, str]:
    """ORT TensorRT EP's explicit profile: "name:1x4x64x64,name2:..." per min/opt/max (every dynamic input).
    Without it the EP builds for the first shapes it sees and rebuilds when STP moves from batch N to 2N."""
    if not profile:
        return {}
    keys = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")
    return {key: ",".join(f"{name}:{'x'.join(str(int(d)) for d in shapes[i])}" for name, shapes in profile.items())
            for i, key in enumerate(keys)}


def provider_list(provider: str, cache_dir: Path | None = None, *, fp16: bool = True,
                  trt_profile: dict[str, tuple] | None = None) -> list:
    """ORT provider names (with options) for `provider`; a clear error when this build lacks it.

    `fp16` (TensorRT EP): off for the VAE decoder, whose activations overflow fp16. `trt_profile`: input name →
    (min, opt, max) shapes for the TensorRT EP (see `trt_profile_options`).
    """
    if provider not in PROVIDERS:
        raise EngineError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        gpu_sets = "for the driver's CUDA major (nvidia-smi): CUDA 12 or 13"
        extra = {"cpu": "onnxruntime",
                 "cuda": f"'basinguard[gpu-cu12]' or 'basinguard[gpu-cu13]' (onnxruntime-gpu {gpu_sets})",
                 "tensorrt": f"'basinguard[tensorrt-cu12]' or 'basinguard[tensorrt-cu13]' for the native TensorRT backend "
                             f"({gpu_sets}), or onnxruntime-gpu for its TensorRT EP"}
        raise EngineError(f"provider {provider!r} needs {wanted[0]}, which this onnxruntime build lacks "
                          f"(it has: {', '.join(available)}); install {extra[provider]}")
    providers: list = []
    for name in wanted:
        if name == "TensorrtExecutionProvider":
            opts: dict = {"trt_fp16_enable": fp16} | trt_profile_options(trt_profile)
            if cache_dir is not None:
                opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                         "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)}
            providers.append((name, opts))
        elif name == "CUDAExecutionProvider":
            # HEURISTIC: no per-shape cuDNN benchmark on first use (N and 2N would each pay it);
            # kSameAsRequested: the arena grows by what is asked, not to the next power of two (a 2N UNet).
            providers.append((name, {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}))
        else:
            providers.append(name)
    return providers


def check_active(provider: str, active: list[str]) -> None:
    """ORT silently falls back to the next provider when one fails to start (missing CUDA, cuDNN or TensorRT
    libraries); running on CPU after asking for a GPU is an error here, not a surprise in the timings."""
    wanted = PROVIDERS[provider][0]
    if wanted not in active:
        raise EngineError(f"provider {provider!r}: ONNX Runtime could not start {wanted} and fell back to "
                          f"{active[0] if active else 'nothing'}; it needs {_INSTALL.get(wanted, 'its libraries')}")


_preloaded = False


def _preload_gpu_libraries() -> None:
    """onnxruntime-gpu >= 1.21 loads CUDA/cuDNN from pip wheels or torch if asked to, before the first session."""
    global _preloaded
    if not _preloaded and hasattr(ort, "preload_dlls"):
        _preloaded = True
        try:
            ort.preload_dlls()
        except Exception:  # best effort: a failure shows up as the provider not starting, which check_active names
            pass


class _Canceller:
    """Cancels the main thread's running ONNX Runtime call when a signal arrives.

    Python runs a signal's handler (Ctrl-C's KeyboardInterrupt, the CLI's SIGTERM handler) in the main thread only
    once the C call it is in returns, and a UNet call at a large size runs for minutes. But Python's C-level
    handler also writes the signal's number to the wakeup fd (`signal.set_wakeup_fd`) at once: a thread waiting on
    it sets ONNX Runtime's `terminate` flag on the main thread's running call, which then ends at its next node,
    and the handler runs. Installed at the first call, only where no one else uses the wakeup fd (asyncio may);
    without it a call is interrupted when it returns, as before. Nothing is added to a call but a RunOptions."""

    def __init__(self) -> None:
        self.running: set[ort.RunOptions] = set()
        self.installed: bool | None = None  # None: not tried yet

    def install(self) -> bool:
        if self.installed is None:
            self.installed = False
            reader, writer = socket.socketpair()
            writer.setblocking(False)  # Python's handler must never block on it
            try:
                previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            except ValueError:  # not the main thread's interpreter
                previous = None
            if previous != -1:  # someone else's: theirs stays
                if previous is not None:
                    signal.set_wakeup_fd(previous)
                reader.close()
                writer.close()
                return False
            self._sockets = (reader, writer)  # kept open for the process's life
            threading.Thread(target=self._watch, args=(reader,), name="basinguard-cancel", daemon=True).start()
            self.installed = True
        return self.installed

    def _watch(self, reader: socket.socket) -> None:
        while reader.recv(64):
            for options in list(self.running):
                options.terminate = True

    def run(self, call: Callable[[ort.RunOptions], T]) -> T:
        options = ort.RunOptions()
        if threading.current_thread() is not threading.main_thread() or not self.install():
            return call(options)  # other threads receive no signals
        self.running.add(options)
        try:
            return call(options)
        except Exception:
            if options.terminate:  # the signal's own handler runs (and raises) at the next Python call
                _let_signal_handlers_run()
                raise KeyboardInterrupt from None  # where the handler did not raise
            raise
        finally:
            self.running.discard(options)


def _let_signal_handlers_run() -> None:
    """A Python-level call: the interpreter runs pending signal handlers on entering it."""


_canceller = _Canceller()


def cancellable(call: Callable[[ort.RunOptions], T]) -> T:
    """`call(run_options)` (a session run), cancelled by a signal that arrives while it runs (see `_Canceller`)."""
    return _canceller.run(call)


MAX_SPECIALISED = 4  # shape-specialised sessions per model (e.g. N and 2N for STP, at one or two sizes)
RESIDENT_BYTES = 256 << 20  # device copies of read-only inputs kept per model (least recently used dropped)


class DeviceBinding:
    """ONNX Runtime IO binding that keeps what does not change on the device.

    A read-only input array (`flags.writeable` False: the runtime marks the conditioning and the timestep arrays
    it reuses across the denoising loop so) is uploaded once, as an OrtValue on the device, and found again by
    the array object itself (the caller's, before any dtype cast); a writable array is copied in at each call.
    Outputs are bound on the device and only they are copied to the host. One binding per session, used under a
    lock (ONNX Runtime's IOBinding is not thread-safe). `device`: "cuda" for the GPU providers, "cpu" in tests.
    """

    def __init__(self, session: ort.InferenceSession, device: str):
        self.session, self.device = session, device
        self.binding = session.io_binding()
        self.lock = threading.Lock()
        # id(caller's array) → (that array, kept alive so the id stays its own; its device copy; its bytes)
        self.resident: OrderedDict[int, tuple[np.ndarray, ort.OrtValue, int]] = OrderedDict()
        self.resident_bytes = 0
        self.bound: dict[str, int] = {}  # input name → id of the resident value bound to it

    def _resident(self, given: np.ndarray, value: np.ndarray) -> tuple[int, ort.OrtValue]:
        key = id(given)
        entry = self.resident.get(key)
        if entry is not None and entry[0] is given:
            self.resident.move_to_end(key)
            return key, entry[1]
        device_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
        self.resident[key] = (given, device_value, value.nbytes)
        self.resident_bytes += value.nbytes
        while self.resident_bytes > RESIDENT_BYTES and len(self.resident) > 1:
            self.resident_bytes -= self.resident.popitem(last=False)[1][2]
            self.bound = {n: k for n, k in self.bound.items() if k in self.resident}
        return key, device_value

    def run(self, feed: dict[str, np.ndarray], given: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        with self.lock:
            for name, value in feed.items():
                original = given[name]
                if isinstance(original, np.ndarray) and not original.flags.writeable:
                    key, device_value = self._resident(original, value)
                    if self.bound.get(name) != key:  # bound already: nothing to upload or rebind
                        self.binding.bind_ortvalue_input(name, device_value)
                        self.bound[name] = key
                else:
                    self.binding.bind_cpu_input(name, np.ascontiguousarray(value))  # copied to the device by ORT
                    self.bound.pop(name, None)
            for name in outputs:
                self.binding.bind_output(name, self.device, 0)
            cancellable(lambda options: self.session.run_with_iobinding(self.binding, options))
            return self.binding.copy_outputs_to_cpu()


class OrtModel:
    """One ONNX model in an ONNX Runtime session.

    `static_shapes` (CPU): the first call at a set of input shapes builds a session with every dynamic axis fixed
    to those shapes (ONNX Runtime's free-dimension overrides), so shape arithmetic is folded and buffers are
    planned once; every later call at those shapes runs on it, so within a process an output never depends on
    whether its shapes were seen before (the dynamic session's outputs differ in the last bits). The first
    MAX_SPECIALISED shape sets get one; later ones run on the dynamic session, always (evicting would rebuild
    sessions, seconds each at SD size, whenever more shape sets are in use), so across processes an output is the
    same where the same shape sets came first (a CLI job's few shapes always do). Measured on this project's small
    UNets: 10-20 % faster calls (benchmarks/compare.py), for ~0.5 s and one more copy of the weights per shape set.

    `fuse_attention` (CPU): the exporter's decomposed attention runs as ONNX Runtime's fused MultiHeadAttention
    (`basinguard.engine.fusion`); `fused_attention` counts the rewritten attentions (0: the file as it is).
    Not on GPU providers: there it is untested here, and TensorRT fuses attention itself.
    """

    def __init__(self, path: Path, provider: str = "cpu", threads: int | None = None, name: str | None = None,
                 trt_profile: dict[str, tuple] | None = None, static_shapes: bool = False,
                 fuse_attention: bool = True, io_binding: bool | None = None):
        path = Path(path)
        problem = thread_count_problem(threads)  # here, or a session's failure to start would be blamed on the file
        if problem:
            raise EngineError(problem)
        self.path, self.threads = path, threads
        self.name = name or path.parent.name
        if not path.is_file():
            raise EngineError(f"model file not found: {path}")
        cache = None
        if provider == "tensorrt":  # next to the native plans (ONNX_DIR/tensorrt or $BASINGUARD_ENGINE_DIR)
            from basinguard.engine.plans import engine_dir

            cache = engine_dir(path.parent.parent) / "ort-tensorrt" / path.parent.name
        fp16 = path.parent.name != "vae_decoder"
        providers = provider_list(provider, cache, fp16=fp16, trt_profile=trt_profile)  # raises when missing
        if cache is not None:
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError:  # a read-only model folder: the EP then rebuilds its engines each run
                providers = provider_list(provider, None, fp16=fp16, trt_profile=trt_profile)
        if provider != "cpu":
            _preload_gpu_libraries()
        source: str | bytes = str(path)
        self.fused_attention = 0
        self.session = None
        if fuse_attention and provider == "cpu":
            # The fusion is an optimisation: whatever goes wrong in it (a graph it should not have rewritten, a
            # kernel ORT lacks), the model is opened as it is, so it never makes a loadable model unloadable.
            try:
                from basinguard.engine.fusion import fused_model

                fused, count = fused_model(path)
                if count:
                    self.session = ort.InferenceSession(fused, session_options(threads), providers=providers)
                    source, self.fused_attention = fused, count
            except Exception:
                self.session = None
        try:
            if self.session is None:
                self.session = ort.InferenceSession(source, session_options(threads), providers=providers)
        except Exception as exc:  # ORT raises its own exception types for a corrupt or truncated file
            raise EngineError(f"cannot load {path}: {first_line(exc)}") from None
        check_active(provider, self.session.get_providers())
        # "ort-tensorrt": ORT's TensorRT EP, told apart in traces from the native backend ("tensorrt").
        self.provider = LABELS[self.session.get_providers()[0]]
        self.inputs = _specs(self.session.get_inputs())
        self.session_inputs = {a.name: a for a in self.session.get_inputs()}
        self.outputs = _specs(self.session.get_outputs())
        self._output_names = list(self.outputs)
        # IO binding: by default on GPU providers; `io_binding=True` on CPU runs the same logic (CI tests it there).
        use_binding = self.provider != "cpu" if io_binding is None else io_binding
        self._binding = DeviceBinding(self.session, "cpu" if self.provider == "cpu" else "cuda") if use_binding else None
        # Inputs that `conform` must fit (a scalar or (1,) timestep); the rest pass through when dtypes match.
        self._fitted = {name for name, spec in self.inputs.items() if spec.takes_one}
        self.static_shapes = static_shapes and self.provider == "cpu"
        self._source = source if self.static_shapes else None  # a fused model's bytes: kept only to build more sessions
        self._by_shapes: dict[tuple, ort.InferenceSession] = {}  # the dynamic session where none is built
        self._building = threading.Lock()  # two threads at a new shape set build one session, not two

    @property
    def sessions(self) -> list[ort.InferenceSession]:
        """The dynamic session and the shape-specialised ones (benchmarks time them all)."""
        return [self.session, *(s for s in list(self._by_shapes.values()) if s is not self.session)]

    def _session_for(self, feed: dict[str, np.ndarray]) -> ort.InferenceSession:
        key = tuple(value.shape for value in feed.values())
        session = self._by_shapes.get(key)
        if session is None:
            with self._building:
                session = self._by_shapes.get(key)
                if session is None:
                    if len(self._by_shapes) > 256:  # shape sets run dynamic: forget them rather than grow
                        self._by_shapes = {k: v for k, v in self._by_shapes.items() if v is not self.session}
                    session = self._by_shapes[key] = self._specialised(feed)
        return session

    def _specialised(self, feed: dict[str, np.ndarray]) -> ort.InferenceSession:
        """A session with each dynamic axis fixed to its size in `feed`; the dynamic session where no axis can be
        fixed (none, or one name with two sizes) or MAX_SPECIALISED are built already."""
        dims: dict[str, int | None] = {}
        for name, value in feed.items():
            for axis, size in zip(self.session_inputs[name].shape, value.shape):
                if isinstance(axis, str):
                    dims[axis] = size if dims.get(axis, size) == size else None
        built = sum(s is not self.session for s in self._by_shapes.values())
        if built >= MAX_SPECIALISED or all(size is None for size in dims.values()):
            return self.session
        options = session_options(self.threads)
        for axis, size in dims.items():
            if size is not None:
                options.add_free_dimension_override_by_name(axis, size)
        return ort.InferenceSession(self._source, options, providers=["CPUExecutionProvider"])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, spec in self.inputs.items():
            value = inputs.get(name)
            if value is None:
                raise EngineError(f"{self.name}: missing input {name!r} (model takes {', '.join(self.inputs)})")
            # The common case skips conform's checks: every call costs, and a denoising loop makes 50-100 of them.
            fits = type(value) is np.ndarray and value.dtype == spec.dtype and name not in self._fitted
            feed[name] = value if fits else conform(spec, value)
        try:  # a try block costs nothing until something raises
            if self._binding is not None:
                values = self._binding.run(feed, inputs, self._output_names)
            else:
                session = self._session_for(feed) if self.static_shapes else self.session
                values = cancellable(lambda options: session.run(self._output_names, feed, options))
        except EngineError:
            raise
        except Exception as exc:  # ORT's own types (InvalidArgument, Fail...): shapes that do not fit, a bad kernel
            if self.static_shapes:  # shapes that fail to run keep no session (nor its slot), and build none again
                with self._building:
                    self._by_shapes[tuple(value.shape for value in feed.values())] = self.session
            shapes = ", ".join(f"{name} {tuple(value.shape)} {value.dtype}" for name, value in feed.items())
            raise EngineError(f"{self.name}: ONNX Runtime could not run {self.path} on inputs ({shapes}): "
                              f"{first_line(exc)}") from None
        return dict(zip(self._output_names, values))
