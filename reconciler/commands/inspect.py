"""What a person runs to look, never to change: status analysed, plan, history, drift, journal.

Each one reads through the control plane of `control/reconcile.py`; none writes to the database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from reconciler import logs
from reconciler.commands.common import revision_id
from reconciler.control import fleet as control_fleet
from reconciler.control import guard
from reconciler.control.drift import compare, read_worker
from reconciler.control.reading import read_graph, read_status
from reconciler.control.target import TargetHandle, locate_journal, missing_database_file
from reconciler.core import graphlayout, safety
from reconciler.core.drift import without_ignored
from reconciler.core.status import Status, applied_revisions, refuse_unless_applicable
from reconciler.db import connection, journal
from reconciler.errors import ConfigError, ReconcilerError, Refused, StateError, UnreachableError
from reconciler.settings import Settings

log = logs.get("reconciler.admin")


# --- plan and history --------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanStep:
    revision: str
    message: str
    path: str


def plan(handle: TargetHandle) -> tuple[Status, list[PlanStep]]:
    """The status and the pending steps; refused as `apply` would refuse (dirty, diverged, ...)."""
    status = read_status(handle)
    graph = read_graph(handle)
    steps = [
        PlanStep(rev, graph.revisions[rev].message, str(graph.revisions[rev].path))
        for rev in status.decision.pending
    ]
    refuse_unless_applicable(status)
    return status, steps


def plan_findings(handle: TargetHandle, status: Status) -> guard.Analysis:
    """What the destructive-change guard finds in the pending revisions (each with its line)."""
    pending = status.decision.pending
    # A SQLite file that does not exist yet is an empty database, where nothing is refused (nothing
    # can be lost); starting a worker would connect, and create the file.
    if not pending or missing_database_file(handle) is not None:
        return guard.Analysis((), "built-in")
    with read_worker(handle) as worker:
        return guard.check_pending(
            handle, worker, read_graph(handle), pending, empty=status.sync_state == "uninitialized_empty"
        )


def status(handle: TargetHandle) -> Status:
    """`reconciler status`: the target's state, pending revisions analysed by the guard (not a
    fleet's base target: its tenants are what a fleet applies, `fleet` reads them)."""
    if handle.settings.fleet.enabled:
        return read_status(handle)
    return analysed_status(handle, read_status(handle))


def fleet(settings: Settings) -> dict[str, Any] | None:
    """The fleet's part of `status` ([fleet] set, no --tenant): None without a fleet."""
    if not settings.fleet.enabled:
        return None
    found = control_fleet.open_fleet(settings)
    try:
        return control_fleet.read_fleet(found).as_dict()
    finally:
        control_fleet.release_fleet(found)


def analysed_status(handle: TargetHandle, status: Status) -> Status:
    """`status` with the `destructive_pending` condition decided (analysing needs a worker)."""
    if not status.decision.pending or status.sync_state not in ("behind", "uninitialized_empty"):
        return status
    try:
        plan_findings(handle, status)
    except ReconcilerError as exc:  # env.py or the models do not load: status still reports
        log.warning("pending_not_analysed", target=handle.target_name, error=str(exc))
        return status
    return read_status(handle)


def fail_on(analysis: guard.Analysis, kinds: Iterable[str]) -> None:
    """`plan --fail-on`: Refused (exit 6) when unacknowledged findings of these kinds exist;
    an unanalysable revision counts as possible data loss."""
    wanted = set(kinds)
    if safety.DATA_LOSS in wanted:
        wanted.add(safety.UNANALYSABLE)
    hits = [
        f
        for f in analysis.findings
        if f.kind in wanted and (not f.acknowledged or f.rule == safety.DROP_JOURNAL)
    ]
    if hits:
        fix = (
            safety.JOURNAL_FIX
            if any(f.rule == safety.DROP_JOURNAL for f in hits)
            else "fix the revisions, or acknowledge data loss with `allow_destructive = True` in the "
            "revision file"
        )
        raise Refused(
            f"the pending plan has {len(hits)} finding(s) of {', '.join(sorted(set(kinds)))}: "
            f"{'; '.join(f'{f.revision} ({f.where}) {f.message}' for f in hits)} — {fix}"
        )


def plan_sql(handle: TargetHandle, status: Status) -> str:
    """Offline SQL of the pending revisions (Alembic's `upgrade --sql start:heads`)."""
    if not status.decision.pending:
        return ""
    heads = sorted(status.decision.db_heads)
    if len(heads) > 1:
        raise ConfigError(
            f"the database has several heads ({', '.join(heads)}); Alembic cannot render offline "
            "SQL from more than one starting revision: use `reconciler plan` without --sql"
        )
    with read_worker(handle) as worker:
        return str(worker.sql(heads[0] if heads else None, "heads"))


def history(handle: TargetHandle) -> tuple[list[str], bool]:
    """Lines of the revision graph, newest first, applied ones marked; and whether the db was read."""
    graph = read_graph(handle)
    status = read_status(handle)
    reachable = status.sync_state != "unknown"
    applied = applied_revisions(graph, status)
    heads = set(graph.heads)
    lines = []
    for rev in graph.newest_first():
        revision = graph.revisions[rev]
        downs = ", ".join(revision.down_revisions) or "<base>"
        tags = []
        if rev in heads:
            tags.append("head")
        if rev in status.decision.db_heads:
            tags.append("current")
        if revision.branch_labels:
            tags.append("branch: " + ", ".join(revision.branch_labels))
        mark = "[applied]" if rev in applied else "[pending]" if reachable else ""
        tag = f" ({'; '.join(tags)})" if tags else ""
        lines.append(f"{downs} -> {rev}{tag}, {revision.message} {mark}".rstrip())
    return lines, reachable


def history_graph(handle: TargetHandle) -> list[tuple[str, str]]:
    """`history --graph`'s lanes: the characters and revision of each line (newest first, as
    `history`'s lines)."""
    return graphlayout.text_rows(graphlayout.layout(read_graph(handle)))


# --- drift -------------------------------------------------------------------------------------
def drift(handle: TargetHandle) -> list[dict[str, str]]:
    """What the daemon's drift compare would report now: compare minus `[drift] ignore`."""
    status = read_status(handle)
    if status.sync_state == "unknown":
        raise UnreachableError(status.message)
    if status.sync_state != "in_sync":
        raise StateError(
            f"the database is {status.sync_state} ({status.message}); drift is compared at the "
            "repository's heads: run `reconciler apply` first"
        )
    return [dict(d) for d in without_ignored(compare(handle), handle.settings.drift.ignore)]


# --- journal -----------------------------------------------------------------------------------
COLUMNS = (
    "id",
    "started_at",
    "operation",
    "revision",
    "outcome",
    "duration_ms",
    "trigger",
    "host",
    "tool_version",
    "file_hash",
    "error",
)

FIELDS = (
    "id",
    "target",
    "operation",
    "revision",
    "down_revisions",
    "file_hash",
    "started_at",
    "completed_at",
    "duration_ms",
    "outcome",
    "error_class",
    "error",
    "sqlstate",
    "host",
    "tool_version",
    "trigger",
)


def steps(handle: TargetHandle, limit: int = 50, revision: str | None = None) -> list[dict[str, Any]]:
    """The target's newest `limit` journal steps, oldest first, as JSON-ready dicts."""
    if limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1")
    wanted = revision_id(handle, revision) if revision else None
    if missing_database_file(handle) is not None:
        return []  # no database yet, so no journal; connecting would create the file
    with connection.connect(handle.engine) as conn:
        where = locate_journal(handle, conn)  # the side place, or where the previous release left it
        rows = journal.steps(conn, where, target=handle.journal_targets, revision=wanted, limit=limit)
    return [{name: _plain(row.get(name)) for name in FIELDS} for row in rows]


def _plain(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as aligned text columns (hashes shortened, errors cut to one line)."""
    cells = [[_cell(name, row.get(name)) for name in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    return lines


def _cell(name: str, value: object) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    if name == "file_hash":
        return text[:12]
    if name == "error":
        return text.strip().splitlines()[0] if text.strip() else "-"
    return text
