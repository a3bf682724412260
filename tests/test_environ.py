"""`os.environ` is read in `reconciler/config/` only: every other module gets its values passed in."""

from __future__ import annotations

import ast
from pathlib import Path

import reconciler

PACKAGE = Path(reconciler.__file__).resolve().parent
ALLOWED = PACKAGE / "config"
READERS = frozenset({"environ", "environb", "getenv", "getenvb"})


def environ_reads(source: str) -> list[int]:
    """The lines of `source` that read the process environment through the `os` module (as
    `os.environ`, `os.getenv`, `os.environb`, an alias of `os`, or a name imported from it)."""
    tree = ast.parse(source)
    modules = {"os"}
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name for alias in node.names if alias.name == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            lines += [node.lineno for alias in node.names if alias.name in READERS]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in READERS
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_module_outside_config_reads_the_environment() -> None:
    found = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if ALLOWED not in path.parents
        for lines in [environ_reads(path.read_text(encoding="utf-8"))]
        if lines
    }
    assert found == {}, f"os.environ read outside reconciler/config/ (use config.load): {found}"


def test_negative_control_the_scan_flags_every_way_of_reading_it() -> None:
    sample = (
        "import os\n"
        "import os as system\n"
        "from os import getenv\n"
        "from os import environ as env\n"
        "a = os.environ.get('HOSTNAME')\n"
        "b = os.getenv('HOME')\n"
        "c = system.environb\n"
        "d = os.path.join('environ', 'getenv')\n"
    )
    assert environ_reads(sample) == [3, 4, 5, 6, 7]


def test_the_config_package_is_where_the_environment_is_read() -> None:
    """The scan would see the one reader it allows (else it scans nothing)."""
    assert environ_reads((ALLOWED / "processenv.py").read_text(encoding="utf-8"))
