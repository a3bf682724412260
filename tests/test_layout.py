"""The package's shape, checked without a database: the import contract (`.importlinter`), where
the environment is read, why an import sits inside a function, module size, and no import cycles.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

import reconciler
from reconciler.config.load import load_settings
from tests.test_environ import environ_reads

PACKAGE = Path(reconciler.__file__).resolve().parent
ROOT = PACKAGE.parent
MAX_LINES = 500
ENVIRON_READER = PACKAGE / "config" / "processenv.py"


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _lint_imports() -> Path:
    """The `lint-imports` beside this interpreter (the test extras install it)."""
    script = Path(sys.executable).with_name("lint-imports")
    if sys.version_info < (3, 11):
        pytest.skip("import-linter needs Python 3.11 (the test extras install it only there)")
    assert script.is_file(), f"{script} is missing: pip install -e '.[test]' installs import-linter"
    return script


def test_the_import_contract_holds() -> None:
    """`.importlinter`: the layers, the worker's independence, the user-code libraries only in the
    worker, a standard-library-only core, one home per library, no cycles between siblings."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [str(_lint_imports()), "--no-cache", "--config", str(ROOT / ".importlinter")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_only_config_processenv_reads_the_environment() -> None:
    """Narrower than tests/test_environ.py (the config package): within it, processenv.py alone."""
    found = {
        str(path.relative_to(ROOT)): lines
        for _name, path in modules()
        if path != ENVIRON_READER
        for lines in [environ_reads(path.read_text(encoding="utf-8"))]
        if lines
    }
    assert found == {}, f"os.environ read outside reconciler/config/processenv.py: {found}"
    assert environ_reads(ENVIRON_READER.read_text(encoding="utf-8")), "the scan sees the reader it allows"


def function_imports(source: str) -> list[ast.stmt]:
    """Every `import` / `from ... import` inside a function or method body (nested ones too)."""
    found: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(source), False)
    return found


def comment_lines(source: str) -> set[int]:
    return {
        token.start[0]
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }


def unexplained_imports(source: str) -> list[int]:
    """Lines of function-level imports with no comment on their own lines or the line above."""
    comments = comment_lines(source)
    out = []
    for node in function_imports(source):
        lines = range(node.lineno - 1, (node.end_lineno or node.lineno) + 1)
        if not comments.intersection(lines):
            out.append(node.lineno)
    return out


def test_every_import_inside_a_function_says_why() -> None:
    found = {
        str(path.relative_to(ROOT)): lines
        for _name, path in modules()
        for lines in [unexplained_imports(path.read_text(encoding="utf-8"))]
        if lines
    }
    assert found == {}, f"imports inside functions without a comment saying why (or move them up): {found}"


def test_negative_control_the_scan_finds_an_unexplained_import() -> None:
    sample = (
        "import os\n"
        "def f():\n"
        "    import json\n"
        "    # deferred: start-up time\n"
        "    import csv\n"
        "    import ast  # deferred: only when asked\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from x import (\n"
        "                y,\n"
        "            )\n"
    )
    assert unexplained_imports(sample) == [3, 9]


def test_no_module_is_longer_than_500_lines() -> None:
    lengths = {
        str(path.relative_to(ROOT)): n
        for _name, path in modules()
        for n in [len(path.read_text(encoding="utf-8").splitlines())]
        if n > MAX_LINES
    }
    assert lengths == {}, f"modules over {MAX_LINES} lines (split them by job): {lengths}"


def module_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports at module level (run when it is imported: not inside
    functions, not under `if TYPE_CHECKING:`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([node.module] if node.module else [])])
                out.add(base)
                out.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in out if m in known and m != name}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module → modules it imports) as a path, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_between_modules() -> None:
    found = dict(modules())
    known = set(found)
    graph = {name: module_imports(name, path, known) for name, path in found.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_negative_control_a_cycle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_version_is_the_same_in_pyproject_and_the_package() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'\nversion = "{reconciler.__version__}"\n' in text


def test_importing_the_package_is_cheap() -> None:
    """`import reconciler` (an app's env.py, `reconciler.hooks`) loads no third-party library."""
    code = (
        "import sys, reconciler\n"
        "names = ('sqlalchemy', 'alembic', 'structlog', 'click', 'flask')\n"
        "heavy = sorted(m for m in names if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_the_public_api_is_sorted_and_every_name_resolves() -> None:
    assert reconciler.__all__ == sorted(reconciler.__all__)
    for name in reconciler.__all__:
        assert getattr(reconciler, name) is not None, name
    assert reconciler.load_settings is load_settings  # the lazy name is the real function
