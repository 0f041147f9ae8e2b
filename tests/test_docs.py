"""The commands in README.md and docs/*.md run as printed.

Every ```bash and ```python block, and every inline `basinguard ...` / `python ...` / `bash ...` / `pip ...` span,
is checked:
- parsed, always: `basinguard` commands by the CLI's own parser (every flag and value it would accept),
  `python SCRIPT` commands against the script's `--help` (the script exists and lists every flag shown),
  `bash SCRIPT` against the script (and the Python script it runs), `pip install -e '.[X]'` against pyproject's
  extras; any other program must be one the checker knows (KNOWN_PROGRAMS), so a new kind of command is noticed;
- executed, for blocks marked `<!-- docs-test: run -->` on the line before: the block runs as one bash script (or
  Python program) on the shipped model, in a scratch folder that mirrors the checkout, and must exit 0.
Relative links must point at files (and headings) that exist, and each figure in docs/images must be written by a
command the docs show.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from basinguard.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- docs-test: run -->"
PYTHONS = {"python", "python3", ".venv/bin/python"}
# Programs shown in the docs that need no check of their own (shell utilities; `ray start`, Ray's own CLI).
KNOWN_PROGRAMS = {"cat", "printf", "echo", "ls", "head", "mkdir", "cd", "ray"}
CONTROL = {"&&", "||", "|", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}


@dataclass(frozen=True)
class Block:
    where: str  # file:line, for messages
    lang: str
    text: str
    run: bool


def read_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, end = i, i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        before = next((line.strip() for line in reversed(lines[:start]) if line.strip()), "")
        blocks.append(Block(f"{path.relative_to(ROOT)}:{start + 1}", fence.group(1), "\n".join(lines[start + 1:end]),
                            before == RUN_MARK))
        i = end + 1
    return blocks


def inline_commands(path: Path) -> list[tuple[str, str]]:
    """Inline code spans in prose that are commands: (file:line, command)."""
    found, in_block = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            for span in re.findall(r"`((?:basinguard|python|bash|pip) [^`]+)`", line):
                found.append((f"{path.relative_to(ROOT)}:{number}", span))
    return found


BLOCKS = [block for doc in DOCS for block in read_blocks(doc)]
INLINE = [item for doc in DOCS for item in inline_commands(doc)]


def shell_lines(script: str) -> list[str]:
    """The script's command lines: continuations joined, heredoc bodies dropped."""
    out, heredoc_end, pending = [], None, ""
    for line in script.splitlines():
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        marker = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if marker:
            heredoc_end = marker.group(1)
        out.append(line)
    return out


def simple_commands(line: str) -> list[list[str]]:
    """Split one shell line into simple commands (argv lists), without comments, redirections or env prefixes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in CONTROL:
            commands.append([])
        elif token in REDIRECTS or token.startswith("<<"):
            i += 1  # skip the target (file or heredoc word)
        elif not commands[-1] and re.match(r"^[A-Z_][A-Z0-9_]*=", token):
            pass  # VAR=value before a command
        else:
            commands[-1].append(token)
        i += 1
    return [c for c in commands if c]


@cache
def script_help(script: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def flags_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if re.match(r"^--?[A-Za-z]", a)]


def check_script_flags(script: str, argv: list[str]) -> list[str]:
    help_text = script_help(script)
    return [f"{script} does not accept {flag} (not in its --help)" for flag in flags_of(argv)
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text)]


def check_command(argv: list[str]) -> list[str]:
    """Problems with one simple command, [] when it would run as printed."""
    head, args = argv[0], argv[1:]
    if head in ("basinguard", ".venv/bin/basinguard"):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(args)
        except SystemExit as exc:
            if exc.code != 0:
                return [f"basinguard {' '.join(args)}: {err.getvalue().strip().splitlines()[-1]}"]
        return []
    if head in PYTHONS:
        if args[:1] == ["-m"]:
            import importlib.util

            return [] if importlib.util.find_spec(args[1]) else [f"no module {args[1]} to run with -m"]
        if args[:1] == ["-c"]:
            compile(args[1], "<-c>", "exec")
            return []
        script = args[0]
        if not (ROOT / script).is_file():
            return [f"no script {script} in the repository"]
        return check_script_flags(script, args[1:])
    if head == "bash":
        script = args[0]
        if not (ROOT / script).is_file():
            return [f"no script {script} in the repository"]
        text = (ROOT / script).read_text()
        problems = []
        if script == "scripts/setup.sh":
            problems += [f"scripts/setup.sh takes no argument {a!r}" for a in args[1:] if f'= "{a}"' not in text]
        else:
            runs = re.search(r"(\S+\.py)\"?\s+\"\$@\"", text)  # a wrapper passing its arguments to a Python script
            if args[1:] and not runs:
                problems.append(f"{script} takes no arguments")
            elif args[1:]:
                problems += check_script_flags(runs.group(1), args[1:])
        return problems
    if head in ("pip", ".venv/bin/pip"):
        tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        problems = []
        for arg in args:
            ours = re.match(r"^(?:\.|basinguard)\[(.+)\]$", arg)
            if ours:
                problems += [f"pyproject has no extra {e!r}" for e in ours.group(1).split(",") if e not in extras]
        return problems
    if head == "source":
        made = "python3 -m venv .venv" in (ROOT / "scripts/setup.sh").read_text()
        return [] if args == [".venv/bin/activate"] and made else [f"cannot source {args}"]
    if head in KNOWN_PROGRAMS:
        return []
    return [f"unknown program {head!r}: add a check for it to tests/test_docs.py"]


def bash_problems(script: str) -> list[str]:
    return [p for line in shell_lines(script) for argv in simple_commands(line) for p in check_command(argv)]


def test_docs_have_commands() -> None:
    assert len(DOCS) >= 7, DOCS
    assert sum(b.run for b in BLOCKS) >= 4, "the quick-start blocks are no longer marked to run"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.where)
def test_bash_block_parses(block: Block) -> None:
    assert bash_problems(block.text) == [], block.where


@pytest.mark.parametrize("where,command", INLINE, ids=[w for w, _ in INLINE])
def test_inline_command_parses(where: str, command: str) -> None:
    words = command.split()
    if len(words) == 2 and words[0] == "basinguard":  # a command named in prose, e.g. `basinguard export`
        subcommands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        assert words[1] in subcommands, f"{where}: no subcommand {words[1]!r}"
        return
    assert bash_problems(command) == [], where


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.where)
def test_python_block_imports_resolve(block: Block) -> None:
    import ast
    import importlib

    for node in ast.walk(ast.parse(block.text, block.where)):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{block.where}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A scratch folder whose entries link to the checkout's, so repo-relative paths resolve and outputs stay here."""
    mirror = tmp_path / "checkout"
    mirror.mkdir()
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") or entry.name == ".venv":  # no caches or VCS state shared with the checkout
            (mirror / entry.name).symlink_to(entry)
    return mirror


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.run], ids=lambda b: b.where)
def test_marked_block_runs(block: Block, checkout: Path) -> None:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(checkout),
           "BASINGUARD_CACHE_DIR": str(checkout / ".cache")}
    if block.lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", block.text]
    elif block.lang == "python":
        cmd = [sys.executable, "-c", block.text]
    else:
        pytest.fail(f"{block.where}: cannot run a {block.lang!r} block")
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{block.where} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_readme_test_command_is_what_ci_runs() -> None:
    first = read_blocks(ROOT / "README.md")[0].text
    command = next(line.split("#")[0].strip() for line in first.splitlines() if "pytest" in line)
    assert command in (ROOT / ".ci/run").read_text()


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    anchors = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"^#+\s+(.*)$", line)
        if heading:
            text = re.sub(r"[`*_]", "", heading.group(1)).strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text)))
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_headings(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to missing {target}"
        if anchor:
            assert anchor in heading_anchors(path), f"{doc.name}: no heading #{anchor} in {path.name}"


def test_each_figure_has_its_command() -> None:
    commands = [c for b in BLOCKS for c in b.text.splitlines()] + [c for _, c in INLINE]
    for figure in sorted((ROOT / "docs/images").glob("*.png")):
        name = f"docs/images/{figure.name}"
        assert any(f"--out {name}" in c for c in commands), f"no command in the docs writes {name}"


def test_the_checker_catches_what_would_not_run() -> None:
    # Each of these would fail as printed; the checker must say so.
    assert bash_problems("basinguard generate --prompt x --no-such-flag 1")
    assert bash_problems("basinguard generate --prompt x --policy nonsense")
    assert bash_problems("basinguard generate --policy dtp")  # --prompt is required
    assert bash_problems("python benchmarks/memorization.py --no-such-flag")
    assert bash_problems("python benchmarks/no_such_script.py")
    assert bash_problems("bash scripts/setup.sh gpu")
    assert bash_problems("pip install -e '.[no-such-extra]'")
    assert bash_problems("frobnicate --now")
    assert not bash_problems("OMP_NUM_THREADS=1 basinguard generate --prompt 'a b' --steps 5 > log.txt  # ok")
