"""`reconciler test`'s pure rules: the fingerprint difference, the revisions `--since` steps."""

from __future__ import annotations

from pathlib import Path

from reconciler.core.graph import Revision, build_graph
from reconciler.core.stairway import difference, failure_line, stepped


def rev(name: str, *down: str) -> Revision:
    return Revision(name, tuple(down), (), (), Path(f"{name}.py"), name, name)


GRAPH = build_graph([rev("a"), rev("b", "a"), rev("c", "b"), rev("x", "a"), rev("m", "c", "x")])


def test_difference_puts_tables_first_and_says_which_side() -> None:
    after = {"column t.a BIGINT", "table t", "table u", "index u.i"}
    found = difference({"column t.a INT", "table t"}, after)
    assert found == ["missing column t.a INT", "extra table u", "extra column t.a BIGINT", "extra index u.i"]


def test_every_revision_is_stepped_without_since() -> None:
    assert stepped(GRAPH, None) == ([], GRAPH.topological(GRAPH.revisions))


def test_since_steps_the_changed_and_their_descendants_only() -> None:
    before, steps = stepped(GRAPH, ["x"])
    assert steps == ["x", "m"] and set(before) == {"a", "b", "c"}
    assert stepped(GRAPH, []) == (GRAPH.topological(GRAPH.revisions), [])


def test_a_failure_line_names_the_revision_the_step_and_the_difference() -> None:
    line = failure_line("r1", "downgrade", "", [f"extra table t{n}" for n in range(8)])
    assert line.startswith("r1: downgrade: extra table t0; ") and line.endswith("; and 2 more")
