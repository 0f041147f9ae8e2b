"""The TensorRT backend checked without a GPU: its calls typed against TensorRT's stubs, and no API that TensorRT 11
removed used outside a version check.

- pyright with tensorrt-stubs (10.13) over basinguard/engine/tensorrt.py: the engine and execution contexts are
  annotated (`tensorrt.ICudaEngine`, `tensorrt.IExecutionContext`), so every call on them is checked (names,
  arguments, return types). mypy cannot read these stubs (they contain parameters named `in`); pyright can.
  A misuse of the same API in a scratch file must be reported, which shows the stubs are really in use.
- an AST scan of basinguard/ and benchmarks/ for the names below.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
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


def removed_api_uses(source: str, filename: str = "<source>") -> list[str]:
    """'file:line name' for each use of a removed name (an attribute, or a string given to getattr/hasattr) that
    no enclosing `if` on a version guards."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If | ast.IfExp) and "version" in ast.unparse(node.test).lower():
                return True
        return False

    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and node.attr in REMOVED_IN_TENSORRT_11:
            name = node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in REMOVED_IN_TENSORRT_11):
            name = node.args[1].value
        if name is not None and not guarded(node):
            found.append((node.lineno, name))
    return [f"{filename}:{line} {name}" for line, name in sorted(found)]


def test_the_removed_api_scan_finds_unguarded_uses_only() -> None:
    source = """
config.set_flag(trt.BuilderFlag.FP16)
size = engine.device_memory_size
ok = getattr(builder, "platform_has_fast_fp16")
if trt_version < (11, 0):
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
size2 = engine.device_memory_size_v2  # kept in 11
"""
    assert removed_api_uses(source) == ["<source>:2 FP16", "<source>:3 device_memory_size",
                                        "<source>:4 platform_has_fast_fp16"]


def test_no_api_removed_in_tensorrt_11_is_used_outside_a_version_check() -> None:
    files = sorted([*(ROOT / "basinguard").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
    assert TENSORRT_MODULE in files
    uses = [use for f in files for use in removed_api_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert uses == []


def _pyright() -> Path:
    exe = Path(sys.executable).with_name("pyright")
    if not exe.is_file():
        found = shutil.which("pyright")
        if found is None:
            pytest.skip("pyright is not installed (the test extra: pip install -e '.[test]')")
        exe = Path(found)
    try:
        importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (scripts/setup.sh test installs it)")
    return exe


MISUSE = """
from __future__ import annotations

import tensorrt


def misuse(engine: tensorrt.ICudaEngine, context: tensorrt.IExecutionContext) -> None:
    context.set_input_shape(0, (1, 4))  # the name must be a str
    context.set_optimization_profile_async(0)  # the stream handle is missing
    engine.get_device_memory_size_for_profile_v3(0)  # no such method
"""


def test_tensorrt_module_type_checks_against_tensorrt_stubs(tmp_path: Path) -> None:
    exe = _pyright()
    scratch = tmp_path / "misuse.py"
    scratch.write_text(MISUSE)
    config = {"include": [str(TENSORRT_MODULE), str(scratch)], "extraPaths": [str(ROOT)],
              "pythonVersion": "3.10", "typeCheckingMode": "standard"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    run = subprocess.run([str(exe), "--outputjson", "--pythonpath", sys.executable, "-p", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        pytest.fail(f"pyright gave no report: {run.stdout[-2000:]} {run.stderr[-2000:]}")
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    in_scratch = [d for d in errors if Path(d["file"]) == scratch]
    assert {d["range"]["start"]["line"] + 1 for d in in_scratch} >= {8, 9, 10}, in_scratch  # the stubs are in use
    in_module = [f"{d['range']['start']['line'] + 1}: {d['message']}" for d in errors if Path(d["file"]) == TENSORRT_MODULE]
    assert in_module == []
