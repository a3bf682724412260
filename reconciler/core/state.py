"""The sync state of a target: a pure function of (database snapshot, revision graph, journal).

No I/O. The rules (ARCHITECTURE.md, "State model" and invariant 1), first match wins:

1. database not reachable -> `unknown`;
2. the repository has an unmerged fork -> `multiple_heads`. Several heads are legitimate only
   as independent labelled branches: each head's exclusive ancestry (ancestors of that head and
   of no other head) contains a revision that declares a branch label;
3. no version table, or an empty one -> `uninitialized_empty` (plan: every revision) or, when
   the database has tables, `uninitialized_with_tables` (adopt with `stamp`; never replay);
4. the version table holds revisions the repository does not know -> trace them back through
   the journal's ancestry: `ahead` when what the database holds covers every repo head,
   `diverged` when the repository has revisions the database lacks, `ahead` (with a note) when
   the ancestry cannot be traced;
5. one row is an ancestor of another -> `diverged` (Alembic never writes such a table);
6. `in_sync` iff set(db heads) == set(repo heads); `behind` when revisions are pending;
   anything else -> `diverged`.

"Repo heads" are the graph's `version_heads`: the rows a fully upgraded version table holds.
They differ from Alembic's `heads` only when a head is reached through another head's
`depends_on`: Alembic then keeps no row for it, so comparing against `heads` could never match.
A repository with no revisions and a database with no rows is `in_sync`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from reconciler.core.graph import RevisionGraph
from reconciler.errors import ConfigError

SYNC_STATES = (
    "uninitialized_empty",
    "uninitialized_with_tables",
    "in_sync",
    "behind",
    "ahead",
    "diverged",
    "multiple_heads",
    "unknown",
)
# Conditions reported beside the sync state, worst first: `state` is the worst one present.
# `revision_unreadable` (a revision file does not parse) is the daemon's: no status is read then.
CONDITIONS = (
    "dirty",
    "revision_unreadable",
    "checksum_mismatch",
    "blocked",
    "suspended",
    "destructive_pending",
    "drift",
)
_NO_ANCESTRY: Mapping[str, tuple[str, ...]] = MappingProxyType({})


@dataclass(frozen=True)
class DbSnapshot:
    reachable: bool
    version_table_exists: bool
    db_heads: frozenset[str]  # rows of the version table
    has_user_tables: bool  # tables other than the version table and our journal tables


@dataclass(frozen=True)
class Decision:
    sync_state: str  # one of SYNC_STATES
    pending: tuple[str, ...]  # ancestors first; empty unless behind / uninitialized_empty
    repo_heads: tuple[str, ...]
    db_heads: tuple[str, ...]
    unknown: tuple[str, ...]  # db revisions the repository does not know
    fork: tuple[str, ...]  # the unmerged heads when multiple_heads
    branch_point: str | None  # their nearest common ancestor when multiple_heads
    message: str  # one sentence with the next step


def _ids(revs: Iterable[str]) -> str:
    return ", ".join(revs) or "none"


def _count(revs: tuple[str, ...]) -> str:
    return f"{len(revs)} revision{'' if len(revs) == 1 else 's'}"


def _span(revs: tuple[str, ...]) -> str:
    return revs[0] if len(revs) == 1 else f"{revs[0]} ... {revs[-1]}"


def applied_revisions(graph: RevisionGraph, db_heads: Iterable[str]) -> frozenset[str]:
    """The repository revisions a database with these rows has applied (unknown rows ignored)."""
    return graph.closure(h for h in db_heads if h in graph)


def unmerged_heads(graph: RevisionGraph) -> tuple[str, ...]:
    """The heads forming an unmerged fork (empty when the heads are legitimate)."""
    heads = graph.version_heads
    if len(heads) < 2:
        return ()
    ancestry = {head: graph.ancestors(head) for head in heads}
    shared = Counter(rev for revs in ancestry.values() for rev in revs)
    bad = tuple(
        head
        for head in heads
        if not any(graph.revisions[r].branch_labels for r in ancestry[head] if shared[r] == 1)
    )
    if not bad:
        return ()
    return bad if len(bad) > 1 else heads


def _branch_point(graph: RevisionGraph, fork: tuple[str, ...]) -> str | None:
    common = frozenset.intersection(*(graph.ancestors(head) for head in fork))
    if not common:
        return None
    return max(common, key=lambda r: (graph.depth(r), r))


def _trace(
    unknown: tuple[str, ...], graph: RevisionGraph, ancestry: Mapping[str, tuple[str, ...]]
) -> tuple[set[str], list[str]]:
    """Known revisions reached from the unknown ones via the journal, and the untraceable ones."""
    reached: set[str] = set()
    untraceable: list[str] = []
    for start in unknown:
        stack, seen, traced = [start], set(), True
        while stack:
            rev = stack.pop()
            if rev in seen:
                continue
            seen.add(rev)
            if rev in graph:
                reached.add(rev)
            elif rev in ancestry:
                stack.extend(ancestry[rev])
            else:
                traced = False
        if not traced:
            untraceable.append(start)
    return reached, untraceable


def _inconsistent_row(graph: RevisionGraph, db_heads: tuple[str, ...]) -> tuple[str, str] | None:
    for low in db_heads:
        for high in db_heads:
            if low != high and low in graph.ancestors(high):
                return low, high
    return None


class _Builder:
    """Fills the fields every Decision shares."""

    def __init__(self, graph: RevisionGraph, snapshot: DbSnapshot) -> None:
        self.repo_heads = graph.version_heads
        self.db_heads = tuple(sorted(snapshot.db_heads))
        self.unknown = tuple(h for h in self.db_heads if h not in graph)

    def __call__(
        self,
        state: str,
        message: str,
        pending: tuple[str, ...] = (),
        fork: tuple[str, ...] = (),
        branch_point: str | None = None,
    ) -> Decision:
        return Decision(
            sync_state=state,
            pending=pending,
            repo_heads=self.repo_heads,
            db_heads=self.db_heads,
            unknown=self.unknown,
            fork=fork,
            branch_point=branch_point,
            message=message,
        )


def decide(
    snapshot: DbSnapshot,
    graph: RevisionGraph,
    journal_ancestry: Mapping[str, tuple[str, ...]] = _NO_ANCESTRY,
) -> Decision:
    """Decide the sync state and the pending plan; `journal_ancestry` maps a revision we applied
    to the down_revisions the journal recorded for it (to place revisions the repo lacks)."""
    if not graph.complete:
        raise ConfigError(
            "the revision graph is partial (some files await the worker); complete it with "
            "build_graph before deciding"
        )
    build = _Builder(graph, snapshot)
    if not snapshot.reachable:
        return build("unknown", "the database could not be reached; it is read again next tick")
    fork = unmerged_heads(graph)
    if fork:
        return _multiple_heads(build, graph, fork)
    if not snapshot.version_table_exists or not snapshot.db_heads:
        return _uninitialized(build, graph, snapshot)
    if build.unknown:
        return _unknown_rows(build, graph, journal_ancestry)
    return _known_rows(build, graph)


def _multiple_heads(build: _Builder, graph: RevisionGraph, fork: tuple[str, ...]) -> Decision:
    point = _branch_point(graph, fork)
    where = f"forked at {point}" if point else "with no common ancestor"
    heads = " ".join(fork)
    return build(
        "multiple_heads",
        f"the repository has unmerged heads {_ids(fork)} ({where}); nothing is applied until "
        f'they are merged: run `flask db merge -m "merge heads" {heads}` or '
        f'`alembic merge -m "merge heads" {heads}`, or label each independent branch',
        fork=fork,
        branch_point=point,
    )


def _uninitialized(build: _Builder, graph: RevisionGraph, snapshot: DbSnapshot) -> Decision:
    everything = tuple(graph.topological(graph.revisions))
    if not everything:
        return build("in_sync", "the repository has no revisions and the database records none")
    if not snapshot.has_user_tables:
        return build(
            "uninitialized_empty",
            f"the database is empty: {_count(everything)} will be applied ({_span(everything)})",
            pending=everything,
        )
    target = build.repo_heads[0] if len(build.repo_heads) == 1 else "<rev>"
    return build(
        "uninitialized_with_tables",
        "the database has tables but no recorded revision; check which revision its schema "
        f"matches, then adopt it with `reconciler stamp {target}` (history is never replayed "
        "over existing tables)",
    )


def _unknown_rows(build: _Builder, graph: RevisionGraph, ancestry: Mapping[str, tuple[str, ...]]) -> Decision:
    reached, untraceable = _trace(build.unknown, graph, ancestry)
    known = [h for h in build.db_heads if h in graph]
    contained = graph.closure([*known, *reached])
    lacking = tuple(h for h in build.repo_heads if h not in contained)
    names = _ids(build.unknown)
    if untraceable:
        return build(
            "ahead",
            f"the database has revisions this repository does not know ({names}); the ancestry "
            f"of {_ids(untraceable)} is unknown, so this is taken for an older deployment: "
            "nothing is applied or downgraded; deploy the repository that contains them",
        )
    if lacking:
        return build(
            "diverged",
            f"the database has revisions this repository does not know ({names}) and lacks "
            f"repository heads {_ids(lacking)}; nothing is applied: deploy a repository that "
            "contains both lines (merge the branch that created them)",
        )
    return build(
        "ahead",
        f"the database is ahead: it has revisions this repository does not know ({names}), "
        "normal for an older replica during a rollout; nothing is applied or downgraded",
    )


def _known_rows(build: _Builder, graph: RevisionGraph) -> Decision:
    bad = _inconsistent_row(graph, build.db_heads)
    if bad is not None:
        low, high = bad
        return build(
            "diverged",
            f"the version table is inconsistent: row {low} is an ancestor of row {high}; check "
            f"the schema, then remove the row {low} (or `reconciler stamp` the real heads)",
        )
    applied = graph.closure(build.db_heads)
    pending = tuple(graph.topological(r for r in graph.revisions if r not in applied))
    if set(build.db_heads) == set(build.repo_heads):
        return build("in_sync", f"the database is at the repository heads ({_ids(build.db_heads)})")
    if pending:
        return build(
            "behind",
            f"{_count(pending)} pending ({_span(pending)}); applied on the next reconcile "
            "(or run `reconciler apply`)",
            pending=pending,
        )
    return build(
        "diverged",
        f"the version table rows ({_ids(build.db_heads)}) differ from the repository heads "
        f"({_ids(build.repo_heads)}) with nothing pending; check the table, then "
        "`reconciler stamp` the real heads",
    )
