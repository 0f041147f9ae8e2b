"""Will an export fit in memory? An estimate from the source's parameter counts, checked before any model loads.

An export that runs out of memory is killed by the kernel minutes in, with no message; this says so before it
starts, naming the estimate, what is available and what to do. The estimate follows the exporter's order
(`onnx_export._export_graphs`): every torch module is loaded in float32, then each graph in turn is traced
(its module, the modules not yet exported, and the TorchScript exporter's copies of the weights it constant-folds,
e.g. every Linear weight transposed for MatMul), then freed, and the exported file is re-saved by onnx and
validated by ONNX Runtime (its weights once more, at the export's dtype) while the later modules wait.

The factors round up what was measured here (benchmarks/full_size.py export, peak RSS by /usr/bin/time -v, 2
threads): SD 2.1-768-v (1.29 B parameters) peaked at 7.3 GiB, estimated 7.5; SD 1.5 (1.07 B) at 4.7 GiB,
estimated 7.4. Part of what the factors cover is activations while tracing at the native size (the UNet's
attention at 96x96 latents), so they overestimate smaller-latent models, as SD 1.5 shows.

A single-file checkpoint is estimated the same way from its parts' parameter counts (read from its safetensors
header): diffusers' `from_single_file` reads the file through a memory map, so the checkpoint's own tensors are
page cache the kernel can drop, not memory the export holds, and the float32 modules it builds are the ones the
folder export loads too. LoRAs fused in are small beside them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from basinguard.export.errors import ExportError

GIB = 2**30
# Bytes per parameter while a graph is traced, beyond its float32 module: the exporter's folded copies and the
# trace's activations (float16 export: the module's half copy, 2, and half-size copies, 1.5).
TRACE_EXTRA = {"float32": 3.0, "float16": 3.5}
# Bytes per parameter while a saved graph is re-saved by onnx and then validated by ONNX Runtime (one after the
# other: the weights once, at the graph's dtype, and a margin).
FINISH = {"float32": 5.0, "float16": 2.5}
BASE = 1.5 * GIB  # interpreter, torch, onnxruntime, activations at the reduced validation size
# The order the exporter handles the parts in; the VAE's decoder is most of the VAE but the whole VAE is loaded.
ORDER = ("text_encoder", "text_encoder_2", "unet", "vae")


def _header(path: Path) -> dict:
    """A safetensors file's JSON header (tensor names → dtype, shape, offsets), without reading the tensors."""
    try:
        with path.open("rb") as stream:
            (size,) = struct.unpack("<Q", stream.read(8))
            if size > 100 * 2**20:  # a header is kilobytes; anything else is not safetensors
                raise ValueError("header too large")
            header = json.loads(stream.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise ExportError(f"cannot read the safetensors header of {path}: {exc}") from None
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _loaded_files(component: Path) -> list[Path]:
    """The weight files `from_pretrained` loads: the plain ones, else an fp16 variant's."""
    files = sorted(component.glob("*.safetensors"))
    plain = [p for p in files if ".fp16." not in p.name]
    return plain or files


def parameter_count(component: Path) -> int:
    """Number of parameters (elements of every tensor) in a component folder's safetensors weights."""
    total = 0
    for path in _loaded_files(component):
        for entry in _header(path).values():
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            total += count
    return total


@dataclass
class Estimate:
    """Peak resident memory of an export, in bytes, and what it is made of."""

    peak: int
    parameters: dict[str, int]  # per component, in ORDER
    dtype: str
    phase: str  # the graph whose export sets the peak

    def describe(self) -> str:
        parts = ", ".join(f"{name} {count / 1e6:,.0f} M" for name, count in self.parameters.items())
        return f"{parts} parameters, {self.dtype} export; peak while exporting the {self.phase}"


def estimate_export(source: Path | Mapping[str, int], fp16: bool) -> Estimate:
    """The export's peak memory from the parameter counts of a diffusers folder's components, or of a single-file
    checkpoint's parts (`single_file.CheckpointInfo.part_parameters`; see the module's docstring)."""
    if isinstance(source, Mapping):
        counts = {name: int(source[name]) for name in ORDER if name in source}
    else:
        counts = {name: parameter_count(source / name) for name in ORDER if (source / name).is_dir()}
    dtype = "float16" if fp16 else "float32"
    peak, phase = 0, ""
    for k, name in enumerate(counts):
        waiting = 4 * sum(list(counts.values())[k + 1:])  # float32 modules not yet exported
        graph_dtype = "float32" if name == "vae" else dtype  # the VAE decoder stays float32 in an fp16 export
        trace = 4 * counts[name] + TRACE_EXTRA[graph_dtype] * counts[name] + waiting
        finish = FINISH[graph_dtype] * counts[name] + waiting
        if max(trace, finish) > peak:
            peak, phase = int(max(trace, finish)), name
    return Estimate(int(peak + BASE), counts, dtype, phase)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _inactive_file(stat: Path) -> int:
    """Page cache the kernel reclaims before the limit bites (memory.stat's inactive_file), as kubelet's working
    set leaves it out; 0 where unreadable."""
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_room(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
                 ) -> tuple[int, str] | None:
    """Room left under this process's cgroup memory limits (v2 "0::PATH", v1 "N:memory:PATH"; each level up to
    the root), if any limit is set."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            folder, limit_name, usage_name = root / path.lstrip("/"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            folder, limit_name, usage_name = root / "memory" / path.lstrip("/"), "memory.limit_in_bytes", \
                "memory.usage_in_bytes"
        else:
            continue
        for level in (folder, *folder.parents):
            if not level.is_relative_to(root):
                break
            candidates.append((level / limit_name, level / usage_name))
    room: tuple[int, str] | None = None
    for limit_path, usage_path in candidates:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is None or usage is None or limit >= 2**60:  # v1 writes a huge number for no limit
            continue
        usage = max(0, usage - _inactive_file(limit_path.with_name("memory.stat")))
        left = max(0, limit - usage)
        if room is None or left < room[0]:
            room = (left, f"cgroup limit {limit / GIB:.1f} GiB, {usage / GIB:.1f} GiB used ({limit_path})")
    return room


def available_memory() -> tuple[int, str] | None:
    """Bytes this process can still take, and where that number comes from: the least of /proc/meminfo's
    MemAvailable and the room under a cgroup limit. None where neither can be read (not Linux)."""
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, ValueError, IndexError):
        pass
    room = _cgroup_room()
    if room is not None:
        found.append(room)
    return min(found) if found else None


def check_export_memory(folder: Path | Mapping[str, int], fp16: bool, available: tuple[int, str] | None = None
                        ) -> Estimate:
    """Raise ExportError, before anything loads, when the export's estimated peak exceeds the memory available."""
    estimate = estimate_export(folder, fp16)
    available = available if available is not None else available_memory()
    if available is None or estimate.peak <= available[0]:
        return estimate
    free, source = available
    advice = [f"free memory or export on a machine with at least {estimate.peak / GIB:.1f} GiB available"]
    if not fp16:
        half = estimate_export(folder, True)
        if half.peak <= free:
            advice.append(f"or export with --fp16 (float16 weights, for GPU providers: about {half.peak / GIB:.1f} "
                          "GiB)")
    raise ExportError(f"the export would need about {estimate.peak / GIB:.1f} GiB of memory "
                      f"({estimate.describe()}) but {free / GIB:.1f} GiB is available ({source}); "
                      f"{', '.join(advice)}; or pass --no-memory-check to try anyway (the kernel may kill it)")

