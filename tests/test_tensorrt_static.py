"""The TensorRT backend checked without a GPU: its calls typed against TensorRT's stubs, and no API that TensorRT 11
removed used outside a version check, directly or through polygraphy.

- pyright with tensorrt-stubs (10.13) over basinguard/engine/tensorrt.py, the files given on its command line (a
  pyrightconfig "include" of absolute paths is ignored, with only a printed warning, so the test also checks that
  pyright reports having analyzed every file). The engine, execution contexts and the tensorrt module are typed
  (`tensorrt.ICudaEngine`, `tensorrt.IExecutionContext`, `_import_tensorrt()` inferred as the module), and the CUDA
  stream object is typed apart from its int handle, so calls on them are checked (names, enum members, arguments).
  mypy cannot read these stubs (they contain parameters named `in`); pyright can.
- an AST scan of basinguard/ and benchmarks/ for the names TensorRT 11 removed, for polygraphy arguments that make
  polygraphy use them (`CreateConfig(fp16=True)` sets BuilderFlag.FP16, ...), and for networks not built strongly
  typed. A use counts as guarded only inside the branch of an `if` that holds for TensorRT < 11 alone.
- planted misuses: copies of engine/tensorrt.py with one realistic mistake each; every one must be reported by the
  check that covers it, and the unmodified file by neither.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TENSORRT_MODULE = ROOT / "basinguard" / "engine" / "tensorrt.py"

# TensorRT 10.x Python API names absent from the TensorRT 11.4 bindings (tensorrt_cu12_bindings 10.13.0.35 against
# 11.4.0.106, compared by the bindings' exported names; see NVIDIA's 10.x -> 11.x migration guide).
REMOVED_IN_TENSORRT_11 = frozenset({
    "FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "EXPLICIT_BATCH", "WEIGHTLESS", "CUBLAS",
    "CUBLAS_LT", "CUDNN", "algorithm_selector", "int8_calibrator", "device_memory_size",
    "get_device_memory_size_for_profile", "create_execution_context_without_device_memory", "platform_has_fast_fp16",
    "platform_has_fast_int8", "platform_has_tf32", "weight_streaming_budget", "minimum_weight_streaming_budget",
    "get_dynamic_range", "clear_quantization_flag", "set_quantization_flag", "precision_is_set",
})
# polygraphy 0.53.6's arguments that make it use one of those names (backend/trt/config.py, loader.py): the name
# it then uses. A value of None or False leaves it unused.
POLYGRAPHY_CONFIG = ("CreateConfig", "create_config")
POLYGRAPHY_NETWORKS = ("NetworkFromOnnxPath", "NetworkFromOnnxBytes", "network_from_onnx_path", "network_from_onnx_bytes",
                       "CreateNetwork")
POLYGRAPHY_REMOVED_ARGS = {
    "fp16": "FP16", "precision_constraints": "OBEY_PRECISION_CONSTRAINTS/PREFER_PRECISION_CONSTRAINTS",
    "algorithm_selector": "algorithm_selector", "calibrator": "int8_calibrator",
    "quantization_flags": "set_quantization_flag", "explicit_batch": "EXPLICIT_BATCH",
}
TENSORRT_11 = (11,)


def _version_literal(node: ast.expr) -> tuple[int, ...] | None:
    """A version written in the code: 11, (11, 0), or a call on one string such as version("11.0"); trailing zeros
    dropped, so (11, 0) == (11,)."""
    value: object
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], ast.Constant):
        text = node.args[0].value
        if not isinstance(text, str) or not re.fullmatch(r"\d+(\.\d+)*", text):
            return None
        value = tuple(int(p) for p in text.split("."))
    else:
        try:
            value = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not (isinstance(value, tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return None
    while len(value) > 1 and value[-1] == 0:
        value = value[:-1]
    return value


_FLIPPED = {ast.Lt: ast.Gt, ast.Gt: ast.Lt, ast.LtE: ast.GtE, ast.GtE: ast.LtE, ast.Eq: ast.Eq, ast.NotEq: ast.NotEq}


def _below_11(test: ast.expr, taken: bool) -> bool:
    """Whether `test` evaluating to `taken` implies a TensorRT version below 11: the test compares something named
    *version* with a literal version (`trt_version < (11, 0)`; `else` of `version >= (11,)`)."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return _below_11(test.operand, not taken)
    if isinstance(test, ast.BoolOp):
        conjunction = isinstance(test.op, ast.And) == taken  # `a and b` true, or `a or b` false: every part holds
        parts = [_below_11(v, taken) for v in test.values]
        return any(parts) if conjunction else all(parts)
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    left, right, op = test.left, test.comparators[0], type(test.ops[0])
    if "version" in ast.unparse(left).lower() and (bound := _version_literal(right)) is not None:
        pass
    elif "version" in ast.unparse(right).lower() and (bound := _version_literal(left)) is not None and op in _FLIPPED:
        op = _FLIPPED[op]
    else:
        return False
    if not taken:  # the else branch: the negated comparison
        op = {ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.NotEq: ast.Eq}.get(op, type(None))
    if op is ast.Lt:
        return bound <= TENSORRT_11
    if op in (ast.LtE, ast.Eq):
        return bound < TENSORRT_11
    return False


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute) and node.func.attr != "create_network":  # TensorRT's own Builder method
        return node.func.attr
    return None


def _unused_value(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value in (None, False)


def removed_api_uses(source: str, filename: str = "<source>") -> list[str]:
    """'file:line what' for each use of a name TensorRT 11 removed (an attribute, a string given to getattr/hasattr,
    or a polygraphy argument that makes polygraphy use one) outside a branch that only TensorRT < 11 takes, and for
    each network polygraphy parses without strongly_typed=True."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node: ast.AST) -> bool:
        while node in parents:
            child, node = node, parents[node]
            if isinstance(node, ast.If) and child is not node.test:
                if _below_11(node.test, taken=child in node.body):
                    return True
            elif isinstance(node, ast.IfExp) and child is not node.test:
                if _below_11(node.test, taken=child is node.body):
                    return True
        return False

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        uses: list[tuple[int, str]] = []  # (line, what): an argument's own line, in a call written over several
        if isinstance(node, ast.Attribute) and node.attr in REMOVED_IN_TENSORRT_11:
            uses.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call):
            called = _call_name(node)
            if (called in ("getattr", "hasattr") and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in REMOVED_IN_TENSORRT_11):
                uses.append((node.lineno, node.args[1].value))
            if called in (*POLYGRAPHY_CONFIG, *POLYGRAPHY_NETWORKS):
                for kw in node.keywords:
                    if kw.arg is None:
                        uses.append((kw.lineno, f"{called}(**...) hides which flags it sets"))
                    elif kw.arg in POLYGRAPHY_REMOVED_ARGS and not _unused_value(kw.value):
                        uses.append((kw.lineno, f"{called}({kw.arg}=...) uses {POLYGRAPHY_REMOVED_ARGS[kw.arg]}"))
            if called in POLYGRAPHY_NETWORKS:
                strongly = [kw.value for kw in node.keywords if kw.arg == "strongly_typed"]
                if not (strongly and isinstance(strongly[0], ast.Constant) and strongly[0].value is True):
                    found.append((node.lineno, f"{called} without strongly_typed=True: a weakly typed network"))
        if uses and not guarded(node):
            found += uses
    return [f"{filename}:{line} {what}" for line, what in sorted(found)]


def test_the_removed_api_scan_finds_unguarded_uses_only() -> None:
    source = """
config.set_flag(trt.BuilderFlag.FP16)
size = engine.device_memory_size
ok = getattr(builder, "platform_has_fast_fp16")
if trt_version < (11, 0):
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
size2 = engine.device_memory_size_v2  # kept in 11
if mod.version(trt.__version__) >= mod.version("11.0"):
    size3 = engine.device_memory_size_v2
else:
    size3 = engine.device_memory_size
if trt_version >= (11, 0):
    size4 = engine.device_memory_size
else:
    size4 = engine.device_memory_size_v2
if "version" in notes:
    context = engine.create_execution_context_without_device_memory()
size5 = engine.device_memory_size if version_major <= 10 else engine.device_memory_size_v2
size6 = engine.device_memory_size if trt_version < (11, 2) else engine.device_memory_size_v2
if not trt_version >= (11,) and ok:
    builder.platform_has_tf32
config = CreateConfig(fp16=True, tf32=True)
config = CreateConfig(fp16=False, precision_constraints=None, profiles=profiles)
config = CreateConfig(precision_constraints="obey", **options)
network = NetworkFromOnnxPath(path)
network = NetworkFromOnnxPath(path, strongly_typed=True, explicit_batch=True)
network = network_from_onnx_bytes(data, strongly_typed=True)
flags = builder.create_network(0)
"""
    assert removed_api_uses(source) == [
        "<source>:2 FP16", "<source>:3 device_memory_size", "<source>:4 platform_has_fast_fp16",
        "<source>:13 device_memory_size",  # the branch TensorRT 11 takes
        "<source>:17 create_execution_context_without_device_memory",  # "version" in a string is no version check
        "<source>:19 device_memory_size",  # < (11, 2) holds for 11.0 and 11.1
        "<source>:22 CreateConfig(fp16=...) uses FP16",
        "<source>:24 CreateConfig(**...) hides which flags it sets",
        "<source>:24 CreateConfig(precision_constraints=...) uses OBEY_PRECISION_CONSTRAINTS/PREFER_PRECISION_CONSTRAINTS",
        "<source>:25 NetworkFromOnnxPath without strongly_typed=True: a weakly typed network",
        "<source>:26 NetworkFromOnnxPath(explicit_batch=...) uses EXPLICIT_BATCH",
    ]


def test_no_api_removed_in_tensorrt_11_is_used_outside_a_version_check() -> None:
    files = sorted([*(ROOT / "basinguard").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
    assert TENSORRT_MODULE in files
    uses = [use for f in files for use in removed_api_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert uses == []


# Realistic mistakes in engine/tensorrt.py: (name, text in the module, its replacement, the check that must see it).
PLANTED = [
    ("fp16 builder flag", "tf32=spec.tf32)", "tf32=spec.tf32, fp16=True)", "scan"),
    ("precision constraints", "tf32=spec.tf32)", 'tf32=spec.tf32, precision_constraints="obey")', "scan"),
    ("weakly typed network", "NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)",
     "NetworkFromOnnxPath(str(onnx_path))", "scan"),
    ("explicit batch", "NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)",
     "NetworkFromOnnxPath(str(onnx_path), strongly_typed=True, explicit_batch=True)", "scan"),
    ("removed memory query", "get_device_memory_size_for_profile_v2(p)", "get_device_memory_size_for_profile(p)", "scan"),
    ("removed name through getattr", "engine.get_device_memory_size_for_profile_v2(p)",
     'getattr(engine, "get_device_memory_size_for_profile")(p)', "scan"),
    ("removed API in the TensorRT 11 branch",
     "        size = max(engine.get_device_memory_size_for_profile_v2(p)",
     "        if tuple(int(v) for v in self.trt.__version__.split('.')[:2]) >= (11, 0):\n"
     "            size = engine.device_memory_size\n"
     "        size = max(engine.get_device_memory_size_for_profile_v2(p)", "scan"),
    ("allocation strategy typo", "ExecutionContextAllocationStrategy.USER_MANAGED",
     "ExecutionContextAllocationStrategy.USER_MANGED", "pyright"),
    ("stream object for its handle (profile)", "set_optimization_profile_async(profile, self.handle)",
     "set_optimization_profile_async(profile, self.stream)", "pyright"),
    ("stream object for its handle (capture)", "ok = context.execute_async_v3(self.handle)",
     "ok = context.execute_async_v3(self.stream)", "pyright"),
    ("stream handle missing", "set_optimization_profile_async(profile, self.handle)",
     "set_optimization_profile_async(profile)", "pyright"),
    ("input index for its name", "context.set_input_shape(name, shape)", "context.set_input_shape(0, shape)", "pyright"),
    ("method that does not exist", "engine.get_device_memory_size_for_profile_v2(p)",
     "engine.get_device_memory_size_for_profile_v3(p)", "pyright"),
]


def planted(old: str, new: str) -> tuple[str, int]:
    """engine/tensorrt.py with `old` replaced by `new` (it must occur once), and the line of the mistake: the first
    line of `new`, or with lines inserted, the line before the one that was there."""
    source = TENSORRT_MODULE.read_text()
    assert source.count(old) == 1, f"the planted text no longer occurs once in tensorrt.py: {old!r}"
    line = source[:source.index(old)].count("\n") + 1 + max(0, new.count("\n") - 1)
    return source.replace(old, new), line


@pytest.mark.parametrize("name, old, new", [(n, o, w) for n, o, w, check in PLANTED if check == "scan"])
def test_the_scan_catches_planted_misuses(name: str, old: str, new: str) -> None:
    source, line = planted(old, new)
    uses = removed_api_uses(source, "tensorrt.py")
    assert any(use.startswith(f"tensorrt.py:{line} ") for use in uses), (name, uses)


def _pyright() -> Path:
    exe = Path(sys.executable).with_name("pyright")
    if not exe.is_file():
        found = shutil.which("pyright")
        if found is None:
            pytest.skip("pyright is not installed (the test extra: pip install -e '.[cpu,test]')")
        exe = Path(found)
    try:
        importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (scripts/setup.sh test installs it)")
    return exe


def test_tensorrt_module_type_checks_and_pyright_catches_planted_misuses(tmp_path: Path) -> None:
    exe = _pyright()
    misuses = [(name, *planted(old, new)) for name, old, new, check in PLANTED if check == "pyright"]
    files = [TENSORRT_MODULE]
    for i, (_, source, _) in enumerate(misuses):
        files.append(tmp_path / f"misuse_{i}.py")
        files[-1].write_text(source)
    config = {"extraPaths": [str(ROOT)], "pythonVersion": "3.10", "typeCheckingMode": "standard"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    run = subprocess.run([str(exe), "--outputjson", "--pythonpath", sys.executable, "-p", str(tmp_path),
                          *map(str, files)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        pytest.fail(f"pyright gave no report: {run.stdout[-2000:]} {run.stderr[-2000:]}")
    assert report["summary"]["filesAnalyzed"] == len(files), (report["summary"], run.stderr[-2000:])
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    in_module = [f"{d['range']['start']['line'] + 1}: {d['message']}" for d in errors if Path(d["file"]) == TENSORRT_MODULE]
    assert in_module == []
    for (name, _, line), path in zip(misuses, files[1:]):
        lines = {d["range"]["start"]["line"] + 1 for d in errors if Path(d["file"]) == path}
        assert line in lines, (name, line, [d["message"] for d in errors if Path(d["file"]) == path])
