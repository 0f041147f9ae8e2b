"""The package's import rules (design.md): nothing outside basinguard/export (and the torch side of the diffusers
adapter, basinguard/diffusers) imports torch, diffusers or transformers, and basinguard/engine imports nothing from
basinguard/runtime. Checked twice: by parsing every module (imports inside functions count too) and by importing
every module with those libraries made unimportable (basinguard.diffusers itself imports without them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "basinguard"
HEAVY = ("torch", "diffusers", "transformers")  # export-only dependencies
TORCH_SIDE = ("export", "diffusers")  # the subpackages that may import them


def _imported_modules(source: str, package: str) -> set[str]:
    """Every module `source` (a module of `package`) imports anywhere in its body, relative imports resolved as
    Python resolves them, and `from X import y` also as X.y (y may be a submodule)."""
    here = package.split(".")
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return names


def _module_imports(path: Path) -> set[str]:
    package = ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
    return _imported_modules(path.read_text(encoding="utf-8"), package)


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_the_checker_sees_imports_inside_functions_and_relative_ones() -> None:
    source = "def f():\n    import torch.nn\nfrom ..runtime import pipeline\nfrom . import base\n"
    assert {"torch.nn", "basinguard.runtime.pipeline", "basinguard.engine.base"} <= _imported_modules(
        source, "basinguard.engine")


@pytest.mark.parametrize("path", [p for p in _sources(PACKAGE) if p.relative_to(PACKAGE).parts[0] not in TORCH_SIDE],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_export_imports_torch_diffusers_transformers(path: Path) -> None:
    heavy = sorted(m for m in _module_imports(path) if m.split(".")[0] in HEAVY)
    assert not heavy, f"{path.relative_to(PACKAGE.parent)} imports {heavy}; only basinguard/export and basinguard/diffusers may"


@pytest.mark.parametrize("path", _sources(PACKAGE / "runtime") + _sources(PACKAGE / "engine"), ids=lambda p: p.name)
def test_runtime_and_engine_import_nothing_from_the_diffusers_adapter(path: Path) -> None:
    adapter = sorted(m for m in _module_imports(path) if m.startswith("basinguard.diffusers"))
    assert not adapter, f"{path.relative_to(PACKAGE.parent)} imports {adapter}"


@pytest.mark.parametrize("path", _sources(PACKAGE / "engine"), ids=lambda p: p.name)
def test_engine_imports_nothing_from_runtime(path: Path) -> None:
    upward = sorted(m for m in _module_imports(path)
                    if m.startswith(("basinguard.runtime", "basinguard.cli", "basinguard.export")))
    assert not upward, f"{path.relative_to(PACKAGE.parent)} imports {upward}; the engine knows only numpy arrays"


@pytest.mark.parametrize("path", _sources(PACKAGE / "runtime"), ids=lambda p: p.name)
def test_runtime_imports_neither_export_nor_cli(path: Path) -> None:
    upward = sorted(m for m in _module_imports(path) if m.startswith(("basinguard.cli", "basinguard.export")))
    assert not upward, f"{path.relative_to(PACKAGE.parent)} imports {upward}"


def test_every_module_outside_export_imports_without_torch_diffusers_transformers() -> None:
    """As on a runtime-only install: importing torch, diffusers or transformers raises ImportError. The adapter's
    package imports (its `guard` names the extra to install); its torch-side modules are not imported."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {HEAVY!r}:\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        "import basinguard\n"
        "names = [m.name for m in pkgutil.walk_packages(basinguard.__path__, 'basinguard.')\n"
        "         if not m.name.startswith(('basinguard.export', 'basinguard.diffusers.'))\n"
        "         and not m.name.endswith('.__main__')]  # `python -m` entry points run, not import\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    files = [p.relative_to(PACKAGE.parent).with_suffix("").parts for p in _sources(PACKAGE)]
    expected = {".".join(parts[:-1] if parts[-1] == "__init__" else parts) for parts in files
                if parts[-1] != "__main__"}
    torch_side = {m for m in expected if ".export" in m or m.startswith("basinguard.diffusers.")}
    assert set(proc.stdout.split()) == expected - {"basinguard"} - torch_side
    assert "basinguard.diffusers" in expected


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module → the basinguard modules it imports (a `from package import name` edge goes to the package's module
    that defines name, where name is a submodule)."""
    modules = {_module_name(p): p for p in _sources(PACKAGE)}
    return {name: {m for m in _module_imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_the_package_modules() -> None:
    """One direction of flow (docs/architecture.md): a circle means two modules each own part of the other's job.
    Imports inside functions count, as they are edges all the same."""
    assert _cycle(_import_graph()) is None


def test_the_folder_format_is_the_lowest_floor() -> None:
    """basinguard.model_format is read by export, engine and runtime alike, so it imports none of them."""
    ours = sorted(m for m in _module_imports(PACKAGE / "model_format.py") if m.startswith("basinguard."))
    assert ours == ["basinguard.errors", "basinguard.errors.BasinguardError"]


@pytest.mark.parametrize("path", _sources(PACKAGE / "export"), ids=lambda p: p.name)
def test_export_reads_the_folder_format_from_its_own_module(path: Path) -> None:
    """The export writes the format; it takes the format's rules (JSON reading, family) from basinguard.model_format,
    not from the runtime's view of a folder."""
    assert not [m for m in _module_imports(path) if m.startswith("basinguard.runtime.model_folder")]


@pytest.mark.parametrize("path", _sources(PACKAGE / "runtime"), ids=lambda p: p.name)
def test_runtime_imports_no_batch_job(path: Path) -> None:
    """Batch jobs are built on the runtime, not the other way round."""
    assert not [m for m in _module_imports(path) if m.startswith("basinguard.batch")]


@pytest.mark.parametrize("path", _sources(PACKAGE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_holds_several_concerns_worth_of_lines(path: Path) -> None:
    """~750 lines at most: a longer file has always held several concerns here (a sampler family a file is fine)."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 760, f"{path.relative_to(PACKAGE.parent)} has {lines} lines; split it by concern"
