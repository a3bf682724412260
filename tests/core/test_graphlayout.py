"""The revision graph in lanes (`history --graph`, the status page's graph), as git draws it."""

from __future__ import annotations

from pathlib import Path

from reconciler.core.graph import Revision, build_graph
from reconciler.core.graphlayout import layout, text_rows


def rev(name: str, *down: str) -> Revision:
    return Revision(name, tuple(down), (), (), Path(f"{name}.py"), name, name)


def drawn(*revisions: Revision) -> list[str]:
    return [f"{chars:<4}{name}".rstrip() for chars, name in text_rows(layout(build_graph(revisions)))]


def test_a_linear_history_is_one_lane() -> None:
    assert drawn(rev("a"), rev("b", "a"), rev("c", "b")) == ["*   c", "*   b", "*   a"]


def test_two_heads_meet_at_their_branch_point() -> None:
    assert drawn(rev("base"), rev("a1", "base"), rev("b1", "base")) == ["*   b1", "| * a1", "|/", "*   base"]


def test_a_merge_revision_opens_a_lane_for_its_second_parent() -> None:
    lines = drawn(rev("base"), rev("x", "base"), rev("y", "base"), rev("m", "x", "y"), rev("top", "m"))
    assert lines == ["*   top", "*   m", "|\\", "| * y", "* | x", "|/", "*   base"]


def test_every_revision_has_one_node_row_and_a_lane_within_the_width() -> None:
    graph = build_graph([rev("a"), rev("b", "a"), rev("c", "a"), rev("d", "a"), rev("m", "b", "c", "d")])
    rows = layout(graph)
    assert sorted(r.revision for r in rows) == sorted(graph.revisions)
    assert all(0 <= r.lane < r.width for r in rows)
    assert max(r.width for r in rows) == 3
