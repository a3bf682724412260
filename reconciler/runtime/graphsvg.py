"""The revision graph as an inline SVG for the status page: the lanes of `core.graphlayout`, one
row per revision, newest at the top. Each node says what it is in its class and its `<title>`
(applied, pending, draft; head, branch point, merge), so the page is read without a script and a
test reads it from the DOM; every text is escaped."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from reconciler.core.graphlayout import Row

LANE = 18  # px between lanes
ROW = 22  # px between rows
RADIUS = 5
MARKS = ("applied", "pending", "draft")


def svg(
    rows: list[Row],
    parents: Mapping[str, tuple[str, ...]],
    marks: Mapping[str, str],
    labels: Mapping[str, str],
    heads: frozenset[str],
) -> str:
    """`parents`: revision → its down revisions; `marks`: revision → applied / pending / draft / tenants;
    `labels`: revision → the text beside it; `heads`: the repository's heads."""
    width = max((r.width for r in rows), default=1)
    text_x = width * LANE + 12
    height = max(len(rows), 1) * ROW + 8
    where = {row.revision: (row.lane, n) for n, row in enumerate(rows)}
    edges = [
        _edge(_x(row.lane), _y(n), _x(where[p][0]), _y(where[p][1]))
        for n, row in enumerate(rows)
        for p in parents.get(row.revision, ())
        if p in where
    ]
    nodes = [_node(row, n, marks, labels, heads, text_x) for n, row in enumerate(rows)]
    return (
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{text_x + 420}" '
        f'height="{height}" role="img" aria-label="revision graph, newest first">'
        + "".join(edges)
        + "".join(nodes)
        + "</svg>"
    )


def _x(lane: int) -> int:
    return 10 + lane * LANE


def _y(n: int) -> int:
    return 12 + n * ROW


def _edge(x1: int, y1: int, x2: int, y2: int) -> str:
    if x1 == x2:
        return f'<line class="edge" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}"/>'
    bend = y2 - ROW // 2 if x2 < x1 else y1 + ROW // 2
    return f'<path class="edge" d="M{x1},{y1} L{x1 if x2 < x1 else x2},{bend} L{x2},{y2}" fill="none"/>'


def _node(
    row: Row, n: int, marks: Mapping[str, str], labels: Mapping[str, str], heads: frozenset[str], text_x: int
) -> str:
    kinds = [marks.get(row.revision, "pending")]
    if row.revision in heads:
        kinds.append("head")
    if row.ends:
        kinds.append("branch-point")
    if row.starts:
        kinds.append("merge")
    rev, x, y = escape(row.revision), _x(row.lane), _y(n)
    title = escape(f"{row.revision}: {', '.join(kinds)}")
    return (
        f'<g class="node {" ".join(kinds)}" data-revision="{rev}"><title>{title}</title>'
        f'<circle cx="{x}" cy="{y}" r="{RADIUS}"/>'
        f'<text x="{text_x}" y="{y + 4}">{rev} {escape(labels.get(row.revision, ""))}</text></g>'
    )
