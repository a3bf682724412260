"""The sync-state decision, table-driven over small in-memory graphs."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reconciler.core.graph import Revision, RevisionGraph, build_graph
from reconciler.core.state import (
    SYNC_STATES,
    DbSnapshot,
    applied_revisions,
    decide,
    unmerged_heads,
)
from reconciler.errors import ConfigError


def rev(
    name: str, down: tuple[str, ...] = (), labels: tuple[str, ...] = (), deps: tuple[str, ...] = ()
) -> Revision:
    return Revision(name, down, labels, deps, Path(f"{name}.py"), f"make {name}", "0" * 64)


GRAPHS: dict[str, RevisionGraph] = {
    "empty": build_graph([]),
    # a <- b <- c
    "linear": build_graph([rev("a"), rev("b", ("a",)), rev("c", ("b",))]),
    # a <- b, a <- c, (b, c) <- m
    "merge": build_graph([rev("a"), rev("b", ("a",)), rev("c", ("a",)), rev("m", ("b", "c"))]),
    # two independent labelled branches
    "labelled": build_graph(
        [rev("x1", labels=("xs",)), rev("x2", ("x1",)), rev("y1", labels=("ys",)), rev("y2", ("y1",))]
    ),
    # labelled branches from a shared root
    "labelled_root": build_graph(
        [rev("a"), rev("b", ("a",), labels=("bs",)), rev("c", ("a",), labels=("cs",))]
    ),
    # a <- b, a <- c: an unmerged fork
    "fork": build_graph([rev("a"), rev("b", ("a",)), rev("c", ("a",))]),
    # one labelled branch, one unlabelled fork off the same root
    "half_labelled": build_graph([rev("a"), rev("b", ("a",), labels=("bs",)), rev("c", ("a",))]),
    # two unlabelled roots
    "two_roots": build_graph([rev("a"), rev("b", ("a",)), rev("s"), rev("t", ("s",))]),
    # labelled branches, y2 depends on x2 across branches
    "depends": build_graph(
        [
            rev("x1", labels=("xs",)),
            rev("x2", ("x1",)),
            rev("y1", labels=("ys",)),
            rev("y2", ("y1",), deps=("x2",)),
        ]
    ),
}


def snap(*heads: str, table: bool = True, tables: bool = True, reachable: bool = True) -> DbSnapshot:
    return DbSnapshot(reachable, table, frozenset(heads), tables)


@dataclass(frozen=True)
class Case:
    graph: str
    snapshot: DbSnapshot
    state: str
    pending: tuple[str, ...] = ()
    ancestry: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()
    fork: tuple[str, ...] = ()
    branch_point: str | None = None
    says: tuple[str, ...] = ()  # fragments the message must contain


CASES: dict[str, Case] = {
    "unreachable": Case("linear", snap(reachable=False, table=False), "unknown"),
    "unreachable-fork": Case("fork", snap(reachable=False), "unknown"),
    "no-table-empty-db": Case(
        "linear",
        snap(table=False, tables=False),
        "uninitialized_empty",
        ("a", "b", "c"),
        says=("3 revisions",),
    ),
    "empty-table-empty-db": Case("merge", snap(tables=False), "uninitialized_empty", ("a", "b", "c", "m")),
    "no-table-with-tables": Case(
        "linear",
        snap(table=False),
        "uninitialized_with_tables",
        says=("reconciler stamp c", "never replayed"),
    ),
    "empty-table-with-tables": Case(
        "labelled", snap(), "uninitialized_with_tables", says=("reconciler stamp <rev>",)
    ),
    "empty-repo-empty-db": Case("empty", snap(table=False, tables=False), "in_sync"),
    "linear-in-sync": Case("linear", snap("c"), "in_sync"),
    "linear-behind": Case("linear", snap("a"), "behind", ("b", "c"), says=("2 revisions pending",)),
    "merge-behind-one-side": Case("merge", snap("b"), "behind", ("c", "m")),
    "merge-behind-both-sides": Case(
        "merge", snap("b", "c"), "behind", ("m",), says=("1 revision pending (m)",)
    ),
    "merge-in-sync": Case("merge", snap("m"), "in_sync"),
    "labelled-in-sync": Case("labelled", snap("x2", "y2"), "in_sync"),
    "labelled-behind": Case("labelled", snap("x2"), "behind", ("y1", "y2")),
    "labelled-root-in-sync": Case("labelled_root", snap("b", "c"), "in_sync"),
    "fork": Case(
        "fork",
        snap("b"),
        "multiple_heads",
        fork=("b", "c"),
        branch_point="a",
        says=('alembic merge -m "merge heads" b c', "flask db merge", "forked at a"),
    ),
    "fork-wins-over-behind": Case("fork", snap("a"), "multiple_heads", fork=("b", "c"), branch_point="a"),
    "fork-wins-over-uninitialized": Case(
        "fork",
        snap(table=False, tables=False),
        "multiple_heads",
        fork=("b", "c"),
        branch_point="a",
    ),
    "half-labelled-fork": Case(
        "half_labelled", snap("b", "c"), "multiple_heads", fork=("b", "c"), branch_point="a"
    ),
    "two-unlabelled-roots": Case(
        "two_roots",
        snap("b", "t"),
        "multiple_heads",
        fork=("b", "t"),
        says=("no common ancestor",),
    ),
    "depends-in-sync": Case("depends", snap("y2"), "in_sync"),
    "depends-behind-in-order": Case("depends", snap("x1", "y1"), "behind", ("x2", "y2")),
    "depends-behind-one-branch": Case("depends", snap("x2", "y1"), "behind", ("y2",)),
    "ahead-with-journal": Case(
        "linear",
        snap("e"),
        "ahead",
        ancestry={"e": ("d",), "d": ("c",)},
        unknown=("e",),
        says=("e", "nothing is applied"),
    ),
    "ahead-one-branch-with-journal": Case(
        "labelled", snap("x3", "y2"), "ahead", ancestry={"x3": ("x2",)}, unknown=("x3",)
    ),
    "diverged-with-journal": Case(
        "linear",
        snap("q"),
        "diverged",
        ancestry={"q": ("b",)},
        unknown=("q",),
        says=("q", "lacks repository heads c"),
    ),
    "diverged-journal-to-base": Case("linear", snap("q"), "diverged", ancestry={"q": ()}, unknown=("q",)),
    "ahead-without-ancestry": Case(
        "linear", snap("zz"), "ahead", unknown=("zz",), says=("zz", "ancestry of zz is unknown")
    ),
    "ahead-ancestry-gap": Case(
        "linear",
        snap("e"),
        "ahead",
        ancestry={"e": ("d",)},
        unknown=("e",),
        says=("ancestry of e is unknown",),
    ),
    "ahead-of-empty-repo": Case("empty", snap("zz"), "ahead", unknown=("zz",)),
    "inconsistent-table": Case("linear", snap("a", "c"), "diverged", says=("row a is an ancestor of row c",)),
    "inconsistent-table-through-depends-on": Case(
        "depends", snap("x2", "y2"), "diverged", says=("row x2 is an ancestor of row y2",)
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decide(case: Case) -> None:
    graph = GRAPHS[case.graph]
    decision = decide(case.snapshot, graph, case.ancestry)
    assert decision.sync_state == case.state, decision.message
    assert decision.pending == case.pending
    assert decision.unknown == case.unknown
    assert decision.fork == case.fork
    assert decision.branch_point == case.branch_point
    assert decision.repo_heads == graph.version_heads
    assert decision.db_heads == tuple(sorted(case.snapshot.db_heads))
    for fragment in case.says:
        assert fragment in decision.message
    assert "downgrade " not in decision.message  # never suggests one


def test_every_state_is_covered() -> None:
    assert {case.state for case in CASES.values()} == set(SYNC_STATES)


@pytest.mark.parametrize("name", ["linear", "merge", "labelled", "depends"])
def test_in_sync_means_equal_sets(name: str) -> None:
    """Invariant 1, over every consistent and inconsistent set of rows."""
    graph = GRAPHS[name]
    for size in range(1, len(graph) + 1):
        for rows in itertools.combinations(sorted(graph.revisions), size):
            decision = decide(snap(*rows), graph)
            assert (decision.sync_state == "in_sync") == (set(rows) == set(graph.version_heads))
            assert decision.sync_state in ("in_sync", "behind", "diverged")
            if decision.sync_state == "behind":
                applied = applied_revisions(graph, rows)
                assert set(decision.pending) == set(graph.revisions) - applied


def test_unmerged_heads_helper() -> None:
    assert unmerged_heads(GRAPHS["labelled"]) == ()
    assert unmerged_heads(GRAPHS["depends"]) == ()
    assert unmerged_heads(GRAPHS["fork"]) == ("b", "c")


def test_applied_revisions_ignores_unknown_rows() -> None:
    assert applied_revisions(GRAPHS["merge"], ["b", "zz"]) == {"a", "b"}


def test_partial_graph_is_refused() -> None:
    partial = build_graph([rev("b", ("a",))], partial=True)
    with pytest.raises(ConfigError, match="partial"):
        decide(snap("b"), partial)
