"""Install sets: every install basinguard offers has exactly one onnxruntime distribution.

onnxruntime (CPU) and onnxruntime-gpu are two distributions that write the same onnxruntime/ package; installed
together, the one installed last wins file by file, and uninstalling either deletes files the other needs. So
onnxruntime is no base dependency: the `cpu` extra brings the CPU build (scripts/setup.sh installs it), and each GPU
set brings onnxruntime-gpu instead.

The requirements are read from pyproject.toml and followed through the metadata of the distributions installed
here (so an extra that pulls onnxruntime through another package, e.g. optimum-onnx[onnxruntime], is seen); pip's
own resolver against the index (`pip install --dry-run --report`) gives the same sets but takes tens of seconds.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
requirements = pytest.importorskip("packaging.requirements")
utils = pytest.importorskip("packaging.utils")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ORT_DISTRIBUTIONS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-training", "onnxruntime-rocm", "onnxruntime-migraphx"}
DOCUMENTED = [ROOT / "scripts" / "setup.sh", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@functools.cache
def installed_requires() -> dict[str, list[str]]:
    """Requirement lines of every distribution installed here, by normalized name (one pass over sys.path)."""
    found: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions():
        found.setdefault(utils.canonicalize_name(dist.metadata["Name"] or ""), dist.requires or [])
    return found


@functools.cache
def parsed(line: str) -> requirements.Requirement:
    return requirements.Requirement(line)


def distributions(extras: set[str]) -> set[str]:
    """Normalized names of every distribution `pip install '.[extras]'` asks for: basinguard's own requirements,
    then, for distributions installed here, theirs (with the extras asked of them)."""
    name = utils.canonicalize_name(PYPROJECT["name"])
    wanted: list[tuple[str, frozenset[str]]] = [(name, frozenset(extras))]
    seen: dict[str, set[str]] = {}
    while wanted:
        dist, asked = wanted.pop()
        if dist in seen and asked <= seen[dist]:
            continue
        seen.setdefault(dist, set()).update(asked)
        if dist == name:
            lines = [*PYPROJECT["dependencies"], *(r for e in asked for r in PYPROJECT["optional-dependencies"][e])]
            markers = [{"extra": ""}]  # the extras' lists are taken whole above
        else:
            if dist not in installed_requires():
                continue  # not installed here: its own requirements are unknown (onnxruntime-gpu, tensorrt, ...)
            lines = installed_requires()[dist]
            markers = [{"extra": e} for e in ("", *asked)]
        for line in lines:
            req = parsed(line)
            if req.marker is None or any(req.marker.evaluate(m) for m in markers):
                wanted.append((utils.canonicalize_name(req.name), frozenset(req.extras)))
    return set(seen)


@functools.cache
def ort_extras() -> list[str]:
    return [e for e in PYPROJECT["optional-dependencies"] if distributions({e}) & ORT_DISTRIBUTIONS]


def test_the_base_install_has_no_onnxruntime_and_each_set_exactly_one() -> None:
    assert not distributions(set()) & ORT_DISTRIBUTIONS
    assert set(ort_extras()) == {"cpu", "gpu-cu12", "gpu-cu13", "tensorrt-cu12", "tensorrt-cu13"}
    others = {e for e in PYPROJECT["optional-dependencies"] if e not in ort_extras()}
    assert {"export", "test", "ray"} <= others
    for extra in ort_extras():  # a runtime set with every other extra besides it (export, tests, ray, ...)
        expected = {"onnxruntime"} if extra == "cpu" else {"onnxruntime-gpu"}
        assert distributions({extra}) & ORT_DISTRIBUTIONS == expected, extra
        assert distributions({extra, *others}) & ORT_DISTRIBUTIONS == expected, extra


def documented_installs() -> list[tuple[str, set[str]]]:
    """(where, extras) of each `.[...]` / `basinguard[...]` install shown in setup.sh, the README and docs/."""
    found = []
    for path in DOCUMENTED:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "pip" not in line and "$PIP" not in line:
                continue
            for extras in re.findall(r"(?:\.|basinguard)\[([\w,-]+)\]", line):
                found.append((f"{path.relative_to(ROOT)}:{n}", set(extras.split(","))))
    return found


def test_documented_installs_have_one_onnxruntime() -> None:
    installs = documented_installs()
    setup = [extras for where, extras in installs if where.startswith("scripts/setup.sh")]
    assert len(setup) == 2 and all(distributions(e) & ORT_DISTRIBUTIONS == {"onnxruntime"} for e in setup)
    for where, extras in installs:
        assert len(distributions(extras) & ORT_DISTRIBUTIONS) <= 1, where
    gpu = [where for where, extras in installs if extras & {"gpu-cu12", "gpu-cu13", "tensorrt-cu12", "tensorrt-cu13"}]
    assert any(w.startswith("docs/gpu.md") for w in gpu)


def test_without_onnxruntime_loading_a_model_names_the_extra(tmp_path: Path) -> None:
    """A base install (no extra) has no onnxruntime: loading a model says which extra brings it, as one error."""
    code = (
        "import sys; sys.modules['onnxruntime'] = None  # as if not installed\n"
        "from basinguard.engine import EngineError, load_model\n"
        "try:\n    load_model('model.onnx')\nexcept EngineError as exc:\n    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("onnxruntime is not installed") and "pip install 'basinguard[cpu]'" in run.stdout


def test_export_without_onnxruntime_names_the_set_to_install(tmp_path: Path) -> None:
    """onnxruntime comes from one set (cpu or a GPU one), not from the export extra: an export without it names the
    set, not the export extra it already has."""
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from basinguard.cli import main\n"
            f"sys.exit(main(['export', {str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "export needs ONNX Runtime: pip install 'basinguard[cpu]'" in proc.stderr
    assert "Traceback" not in proc.stderr
