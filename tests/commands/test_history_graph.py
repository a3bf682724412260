"""`reconciler history --graph`: the same revisions and marks as `history`, drawn in lanes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.commands.test_rebase import forked
from tests.system.test_cli_admin import ok

pytestmark = pytest.mark.core


def test_history_graph_draws_the_fork_with_the_same_lines(tmp_path: Path) -> None:
    project = forked(tmp_path)
    plain = ok(project, "history").stdout.splitlines()
    graph = ok(project, "history", "--graph").stdout.splitlines()
    nodes = [line for line in graph if "->" in line]
    assert [line.split("*", 1)[1].strip().lstrip("| ") for line in nodes] == plain
    assert "|/" in graph  # the two branches meet at base0
    assert nodes[-1].startswith("*") and "base0" in nodes[-1]
