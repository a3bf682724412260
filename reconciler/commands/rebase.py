"""`reconciler rebase [--onto REV]`: one linear head instead of a merge revision.

Two branches that each added revisions leave two heads. Rebase keeps one head's history as it is
and re-parents the first revision of each other branch onto it (its `down_revision` and the
"Revises:" line, nothing else in the file), so the revisions apply one after the other. A
revision that any database we can see has applied (the target's version table, every tenant of
`[fleet]`, the journal) is never moved: its database would then hold a history the files no
longer have. The HEADS marker is rewritten (git's conflict markers in it included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reconciler import logs
from reconciler.commands import heads
from reconciler.control import fleet as control_fleet
from reconciler.control.reading import read_status
from reconciler.control.target import open_target, release_target
from reconciler.core import state
from reconciler.core.graph import RevisionGraph
from reconciler.db import connection, journal
from reconciler.errors import ConfigError, Refused, StateError, UnreachableError
from reconciler.project import edits
from reconciler.project import heads as marker
from reconciler.settings import Settings

log = logs.get("reconciler.admin")

_CREATE_DATE = re.compile(r"(?m)^Create Date:\s*(\S.*)$")


@dataclass(frozen=True)
class Moved:
    """One branch re-parented: its first revision, its revisions, its parent before and after."""

    root: str
    revisions: tuple[str, ...]
    was: str
    onto: str
    path: Path


@dataclass(frozen=True)
class RebaseResult:
    kept: str  # the head whose history stays as it is
    moved: tuple[Moved, ...]
    head: str  # the one head after the rebase


def rebase(settings: Settings, onto: str | None = None) -> RebaseResult:
    graph = heads.repository_graph(settings)
    if len(graph.heads) < 2:
        if onto is not None:
            graph.resolve(onto)  # a wrong --onto is still an error
        marker.keep(settings, graph.heads)
        head = graph.heads[0] if graph.heads else ""
        return RebaseResult(head, (), head)
    applied = applied_revisions(settings, graph)
    kept = _kept_head(graph, onto, applied)
    plan = _plan(graph, kept, applied)
    fix = "set its down_revision by hand, or run `reconciler merge`"
    texts = [edits.reparented(m.path.read_text(encoding="utf-8"), m.onto, fix) for m in plan]
    for move, text in zip(plan, texts):  # every new text made first: no file written for a refusal
        edits.write_replacing(move.path, move.path, text)
        log.info("revision_rebased", revision=move.root, was=move.was, onto=move.onto, path=str(move.path))
    after = heads.repository_graph(settings)
    marker.keep(settings, after.heads)
    if len(after.heads) != 1:  # the plan is built to leave one head: say so if it did not
        raise StateError(f"the rebase left {len(after.heads)} heads ({', '.join(after.heads)})")
    return RebaseResult(kept, tuple(plan), after.heads[0])


def _kept_head(graph: RevisionGraph, onto: str | None, applied: frozenset[str]) -> str:
    """The head whose branch stays: `--onto`'s, else the one branch with applied revisions,
    else the branch whose first revision was created first (its Create Date)."""
    if onto is not None:
        rev = graph.resolve(onto)
        if rev not in graph.heads:
            raise ConfigError(
                f"--onto {onto!r} is not a head ({', '.join(graph.heads)}): name the head whose "
                "history stays as it is"
            )
        return rev
    touched = [h for h in graph.heads if _branch(graph, h, _others(graph, h)) & applied]
    if len(touched) == 1:
        return touched[0]
    return min(graph.heads, key=lambda h: (_created(graph, _branch(graph, h, _others(graph, h))), h))


def _plan(graph: RevisionGraph, kept: str, applied: frozenset[str]) -> list[Moved]:
    """Each other branch, oldest first, re-parented onto the tip the previous one left."""
    tip = kept
    plan: list[Moved] = []
    others = [h for h in graph.heads if h != kept]
    others.sort(key=lambda h: (_created(graph, _branch(graph, h, [kept])), h))
    placed = set(graph.ancestors(kept)) | {kept}
    for head in others:
        members = (set(graph.ancestors(head)) | {head}) - placed
        _refuse_applied(members, applied)
        root = _root(graph, members, head)
        first = graph.revisions[root]
        plan.append(Moved(root, tuple(graph.topological(members)), first.down_revisions[0], tip, first.path))
        placed |= members
        tip = head
    return plan


def _root(graph: RevisionGraph, members: set[str], head: str) -> str:
    roots = [r for r in members if any(p not in members for p in graph.revisions[r].down_revisions)]
    roots += [r for r in members if not graph.revisions[r].down_revisions]
    if len(roots) != 1 or len(graph.revisions[roots[0]].down_revisions) != 1:
        names = ", ".join(sorted(roots)) or head
        raise Refused(
            f"the branch of head {head} does not start with one revision on one parent ({names}): "
            "rebase moves a branch by its first revision; write a merge revision with "
            "`reconciler merge` instead"
        )
    return roots[0]


def _refuse_applied(members: Iterable[str], applied: frozenset[str]) -> None:
    hit = sorted(set(members) & applied)
    if hit:
        raise Refused(
            f"revision(s) {', '.join(hit)} are applied on a database this configuration reaches; "
            "moving them would give that database a history the files no longer have. Rebase the "
            "other branch onto them (`reconciler rebase --onto <its head>`), or write a merge "
            "revision (`reconciler merge`)"
        )


def _branch(graph: RevisionGraph, head: str, others: Iterable[str]) -> set[str]:
    shared: set[str] = set()
    for other in others:
        shared |= set(graph.ancestors(other)) | {other}
    return (set(graph.ancestors(head)) | {head}) - shared


def _others(graph: RevisionGraph, head: str) -> list[str]:
    return [h for h in graph.heads if h != head]


def _created(graph: RevisionGraph, members: set[str]) -> str:
    """The earliest Create Date among `members` (ISO text sorts by time); "~" when none has one."""
    dates = []
    for rev in members:
        try:
            found = _CREATE_DATE.search(graph.revisions[rev].path.read_text(encoding="utf-8"))
        except OSError:
            continue
        if found:
            dates.append(found.group(1).strip())
    return min(dates, default="~")


def applied_revisions(settings: Settings, graph: RevisionGraph) -> frozenset[str]:
    """Every revision of `graph` that a database we can see has applied: below the target's
    version rows, below every fleet tenant's, and each the journal recorded as applied. No URL:
    nothing to see (the files alone). An unreachable database: refused, it may have them."""
    if not settings.target.url:
        return frozenset()
    found: set[str] = set()
    handle = open_target(settings)
    try:
        status = read_status(handle)
        if status.sync_state == "unknown":
            raise UnreachableError(
                f"{status.message}; rebase reads which revisions the database has applied before "
                "it moves any: run it when the database is reachable"
            )
        found |= state.applied_revisions(graph, status.decision.db_heads)
        with connection.connect(handle.engine) as conn:
            rows = journal.rows_with_outcome(conn, handle.journal, "applied")
        found |= {str(r["revision"]) for r in rows if r.get("operation", "upgrade") == "upgrade"}
    finally:
        release_target(handle)
    if settings.fleet.enabled:
        fleet = control_fleet.open_fleet(settings)
        try:
            for tenant in control_fleet.read_fleet(fleet, graph).tenants:
                found |= state.applied_revisions(graph, tenant.db_heads)
        finally:
            control_fleet.release_fleet(fleet)
    return frozenset(r for r in found if r in graph)
