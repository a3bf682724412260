"""The revision graph built from revisions: heads, ancestry, order, labels and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.core import graph as graphs
from reconciler.core.graph import GraphError, MissingRevision, Revision, RevisionGraph
from reconciler.errors import ConfigError


def rev(
    name: str, down: tuple[str, ...] = (), labels: tuple[str, ...] = (), deps: tuple[str, ...] = ()
) -> Revision:
    return Revision(name, down, labels, deps, Path(f"{name}.py"), name, "0" * 64)


def test_missing_depends_on(tmp_path: Path) -> None:
    with pytest.raises(MissingRevision, match="depends_on 'nope'"):
        graphs.build_graph([rev("a0"), rev("b0", ("a0",), deps=("nope",))])


@pytest.mark.parametrize(
    ("revisions", "fragment"),
    [
        ([rev("a0"), rev("b0", ("c0",)), rev("c0", ("b0",))], "b0 -> c0 -> b0"),
        ([rev("a0", ("a0",))], "a0 -> a0"),
        ([rev("a0"), rev("b0", ("a0",), deps=("c0",)), rev("c0", ("b0",))], "b0 -> c0 -> b0"),
    ],
    ids=["two", "self", "through-depends-on"],
)
def test_cycles_are_refused(revisions: list[Revision], fragment: str) -> None:
    with pytest.raises(GraphError, match="revision cycle") as info:
        graphs.build_graph(revisions)
    assert fragment in str(info.value)


def test_duplicate_branch_label_is_refused() -> None:
    with pytest.raises(GraphError, match="branch label 'x'"):
        graphs.build_graph([rev("a0", labels=("x",)), rev("b0", labels=("x",))])


LABELLED = [
    rev("x1", labels=("xs",)),
    rev("x2", ("x1",)),
    rev("y1", labels=("ys",)),
    rev("y2", ("y1",), deps=("xs",)),  # depends_on a branch label
    rev("m1", ("x2", "y2")),
]


def test_heads_bases_ancestors_and_order() -> None:
    graph = graphs.build_graph(LABELLED)
    assert graph.heads == ("m1",) and graph.bases == ("x1", "y1")
    assert graph.ancestors("y2") == {"y2", "y1", "x1"}
    assert graph.closure(["x2", "y1"]) == {"x1", "x2", "y1"}
    order = graph.topological(graph.revisions)
    assert order.index("x1") < order.index("y2") and order[-1] == "m1"
    assert graph.newest_first() == order[::-1]
    assert graph.topological(["m1", "x1"]) == ["x1", "m1"]
    assert graph.branch_labels_of("m1") == ("xs", "ys") and graph.branch_labels_of("y2") == ("ys",)


def test_depends_on_does_not_remove_a_head_but_covers_its_row() -> None:
    revisions = [rev("a1"), rev("a2", ("a1",)), rev("b1"), rev("b2", ("b1",), deps=("a2",))]
    graph = graphs.build_graph(revisions)
    assert graph.heads == ("a2", "b2")
    assert graph.version_heads == ("b2",)
    order = graph.topological(graph.revisions)
    assert order.index("a2") < order.index("b2")


def test_resolve() -> None:
    graph = graphs.build_graph([rev("abcd1234"), rev("abcd9999", ("abcd1234",), labels=("main",))])
    assert graph.resolve("abcd1234") == "abcd1234"
    assert graph.resolve("abcd9") == "abcd9999"
    assert graph.resolve("main") == "abcd9999"
    with pytest.raises(ConfigError, match="ambiguous: abcd1234, abcd9999"):
        graph.resolve("abcd")
    with pytest.raises(ConfigError, match="no revision or branch label 'zzz'"):
        graph.resolve("zzz")
    with pytest.raises(ConfigError, match="not in the migrations directory"):
        graph.ancestors("nope")


def test_fingerprint_is_stable_and_follows_content() -> None:
    one = graphs.build_graph(LABELLED)
    again = graphs.build_graph(list(reversed(LABELLED)))
    assert one.fingerprint == again.fingerprint
    changed = [*LABELLED[:-1], Revision("m1", ("x2", "y2"), (), (), Path("m1.py"), "m1", "1" * 64)]
    assert graphs.build_graph(changed).fingerprint != one.fingerprint
    assert isinstance(one, RevisionGraph) and len(one) == 5 and "m1" in one
