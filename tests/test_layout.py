"""The package's shape: small modules, imports at the top (or a reason beside them), the import
contract of .importlinter, and pure modules that use the standard library only.

Each checker is a plain function over source text, so a negative control shows it flags a sample.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reconciler"
MAX_LINES = 500
# core and the base modules: standard library only (logs: structlog too). docs/architecture.md
PURE = ("core", "errors.py", "redact.py", "sessions.py", "settings.py", "protocol.py", "logs.py")
PURE_EXTRA = {"logs.py": {"structlog"}}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- module length


def too_long(source: str, limit: int = MAX_LINES) -> bool:
    return len(source.splitlines()) > limit


def test_no_module_is_over_500_lines() -> None:
    long = {name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in modules()}
    assert {n: lines for n, lines in long.items() if lines > MAX_LINES} == {}


def test_the_length_check_flags_a_long_module() -> None:
    assert too_long("x = 1\n" * (MAX_LINES + 1))
    assert not too_long("x = 1\n" * MAX_LINES)


# --------------------------------------------------------------------------- imports in functions


def _comment_lines(source: str) -> dict[int, bool]:
    """Line number -> whether the comment on it stands alone (True) or follows code (False)."""
    lines: dict[int, bool] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row] = not tok.line[:col].strip()
    return lines


def _function_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def unexplained_imports(source: str) -> list[int]:
    """Lines of imports made inside a function with no comment on the line or alone above it."""
    comments = _comment_lines(source)
    bare = set()
    for node in _function_imports(ast.parse(source)):
        end = node.end_lineno or node.lineno
        on_line = any(row in comments for row in range(node.lineno, end + 1))
        above = comments.get(node.lineno - 1, False)
        if not (on_line or above):
            bare.add(node.lineno)
    return sorted(bare)


def test_every_import_inside_a_function_says_why() -> None:
    """An import that stays inside a function has a reason (CLI start-up time, Flask only when
    asked) in a comment on its line or the line above; the others belong at the top."""
    found = {name(p): unexplained_imports(p.read_text(encoding="utf-8")) for p in modules()}
    assert {n: lines for n, lines in found.items() if lines} == {}


def test_the_import_check_flags_an_unexplained_import_in_a_function() -> None:
    sample = (
        "import os\n"
        "\n"
        "def f():\n"
        "    import json\n"
        "    import click  # CLI start-up time\n"
        "    # Flask only when asked\n"
        "    import flask\n"
        "    x = 1  # a comment on another line\n"
        "    from a import (\n"
        "        b,\n"
        "    )\n"
        "    return json, click, flask, x, b\n"
    )
    assert unexplained_imports(sample) == [4, 9]


# --------------------------------------------------------------------------- the import contract


def test_the_import_contract_holds() -> None:
    """`lint-imports` keeps every contract of .importlinter (the layers, the worker's
    independence, user code only in the worker, pure core, one home per library, no cycles)."""
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (the test extras on Python 3.10+)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = subprocess.run(
        [sys.executable, "-c", run, "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


# --------------------------------------------------------------------------- pure modules


def third_party_imports(source: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Top-level names imported by the source that are neither ours nor the standard library's."""
    stdlib = set(sys.stdlib_module_names) | {"__future__", "reconciler"} | allowed
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(names - stdlib)


def pure_modules() -> list[Path]:
    found = []
    for entry in PURE:
        path = PACKAGE / entry
        found.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else [])
    return found


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is Python 3.10+")
def test_core_and_the_base_modules_use_the_standard_library_only() -> None:
    found = {
        name(p): third_party_imports(p.read_text(encoding="utf-8"), frozenset(PURE_EXTRA.get(p.name, ())))
        for p in pure_modules()
    }
    assert {n: names for n, names in found.items() if names} == {}


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is Python 3.10+")
def test_the_purity_check_flags_a_third_party_import() -> None:
    sample = "import json\nfrom reconciler import errors\n\ndef f():\n    import sqlalchemy.engine\n"
    assert third_party_imports(sample) == ["sqlalchemy"]
    assert third_party_imports("import structlog\n", frozenset({"structlog"})) == []
