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
        "         if not m.name.startswith(('basinguard.export', 'basinguard.diffusers.'))]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(' '.join(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    files = [p.relative_to(PACKAGE.parent).with_suffix("").parts for p in _sources(PACKAGE)]
    expected = {".".join(parts[:-1] if parts[-1] == "__init__" else parts) for parts in files}
    torch_side = {m for m in expected if ".export" in m or m.startswith("basinguard.diffusers.")}
    assert set(proc.stdout.split()) == expected - {"basinguard"} - torch_side
    assert "basinguard.diffusers" in expected
