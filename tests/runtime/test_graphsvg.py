"""The status page's revision graph as SVG: one node per revision, marked in its class and title,
an edge per parent, and every text escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from reconciler.core.graph import Revision, build_graph
from reconciler.core.graphlayout import layout
from reconciler.runtime.graphsvg import svg

NS = "{http://www.w3.org/2000/svg}"


def rev(name: str, *down: str) -> Revision:
    return Revision(name, tuple(down), (), (), Path(f"{name}.py"), f"<b>{name}</b>", name)


def drawn() -> ET.Element:
    graph = build_graph([rev("base"), rev("x", "base"), rev("y", "base"), rev("m", "x", "y"), rev("d", "m")])
    parents = {r: graph.revisions[r].down_revisions for r in graph.revisions}
    marks = {"base": "applied", "x": "applied", "y": "applied", "m": "pending", "d": "draft"}
    labels = {r: graph.revisions[r].message for r in graph.revisions}
    return ET.fromstring(svg(layout(graph), parents, marks, labels, frozenset(graph.heads)))


def test_each_revision_is_one_node_marked_in_its_class() -> None:
    nodes = {g.get("data-revision"): set(str(g.get("class")).split()) for g in drawn().iter(f"{NS}g")}
    assert nodes["d"] == {"node", "draft", "head"}
    assert nodes["m"] == {"node", "pending", "merge"}
    assert nodes["base"] == {"node", "applied", "branch-point"}
    assert nodes["x"] == {"node", "applied"}


def test_one_edge_per_parent_and_the_texts_escaped() -> None:
    root = drawn()
    edges = [e for e in root.iter() if "edge" in str(e.get("class"))]
    assert len(edges) == 5  # d-m, m-x, m-y, x-base, y-base
    texts = [t.text or "" for t in root.iter(f"{NS}text")]
    assert "m <b>m</b>" in texts  # parsed back from &lt;b&gt;: escaped in the SVG
