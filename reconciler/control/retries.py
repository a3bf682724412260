"""Failures, fleet-wide: count them, block a revision that keeps failing the same way, and hold
a run back until the fleet's `retry_after` (the retry gate).

Invariant 10 of docs/architecture.md: the same revision failing the same way (revision, file
hash, error class, SQLSTATE) N times becomes `blocked` until its file changes; lock timeouts
never lead to `blocked`. The counts live in the journal's flags, so 200 replicas share them.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from reconciler import logs
from reconciler.control.target import TargetHandle, journal_seen
from reconciler.core import failures
from reconciler.core.graph import RevisionGraph
from reconciler.core.status import (
    APPLICABLE,
    Status,
    block_lifted,
    is_lock_timeout,
    refuse_unless_applicable,
)
from reconciler.db import flags
from reconciler.errors import ReconcilerError, RetryDeferred, RevisionFailed

log = logs.get("reconciler.reconcile")


def failure_of(
    handle: TargetHandle, exc: RevisionFailed, graph: RevisionGraph | None = None
) -> failures.Failure:
    """The fleet-wide identity of a failure: revision, its file hash, error class, SQLSTATE."""
    revision = (graph or handle.project.graph()).revisions.get(exc.revision or "")
    return failures.Failure(
        revision=exc.revision or "",
        file_hash=revision.file_hash if revision else "",
        error_class=exc.error_class or "",
        sqlstate=exc.sqlstate or "",
        message=str(exc)[:500],
    )


def count_failure(
    handle: TargetHandle, conn: sa.engine.Connection, graph: RevisionGraph, exc: RevisionFailed
) -> None:
    """Count `exc` for the fleet; the count that reaches `[daemon] blocked_after` blocks it."""
    target = handle.target_name
    if is_lock_timeout(exc):
        log.warning(
            "revision_lock_timeout",
            target=target,
            revision=exc.revision,
            sqlstate=exc.sqlstate,
            hint="retried with backoff; never blocks",
        )
        return
    failure = failure_of(handle, exc, graph)
    daemon = handle.settings.daemon
    counted = flags.record_failure(
        conn,
        handle.journal,
        handle.journal_target,
        failure,
        daemon.blocked_after,
        retry_base=daemon.interval,
        retry_cap=daemon.backoff_max,
    )
    handle.cache.conditions = None
    log.warning(
        "revision_failure_counted",
        target=target,
        revision=counted.revision,
        failures=counted.count,
        failed_at=round(counted.failed_at, 3),
        retry_after=round(counted.retry_after, 3),
    )
    if counted.count >= daemon.blocked_after > 0:
        log.error(
            "revision_blocked",
            target=target,
            revision=counted.revision,
            failures=counted.count,
            error_class=counted.error_class,
        )


def defer_unless_due(
    handle: TargetHandle, conn: sa.engine.Connection, graph: RevisionGraph, status: Status
) -> None:
    """The fleet's retry gate, under the lock, before any worker starts: raise RetryDeferred
    when a pending revision failed and its `retry_after` (database clock) is still ahead.
    The whole run waits (every chain of the database): at most one backoff."""
    if "retry_gate" in handle.settings.unsafe:
        return
    try:
        refuse_unless_applicable(status)
    except ReconcilerError:
        return  # blocked, suspended, dirty...: refused as before, not deferred
    if status.sync_state not in APPLICABLE or not journal_seen(handle, conn):
        return
    key = flags.failures_key(handle.journal_target)
    failure = failures.Failure.loads(flags.read(conn, handle.journal, [key]).get(key))
    pending = {
        rev: graph.revisions[rev].file_hash for rev in status.decision.pending if rev in graph.revisions
    }
    if failure is None or not failure.retry_after or failure.revision not in pending:
        return
    now = flags.db_time(conn)
    if now is None:
        return  # no clock to judge by: the gate never holds a run back
    fields = {
        "target": handle.target_name,
        "revision": failure.revision,
        "failures": failure.count,
        "retry_after": round(failure.retry_after, 3),
        "db_time": round(now, 3),
    }
    if not failures.retry_deferred(failure, pending, now):
        log.info("retry_due", **fields)
        return
    log.info("retry_deferred", **fields)
    raise RetryDeferred(_deferred_message(failure), failure.revision, failure.signature)


def unblock_if_changed(handle: TargetHandle, conn: sa.engine.Connection, graph: RevisionGraph) -> None:
    """A blocked revision whose file changed is tried again: the block and its count go."""
    key = flags.blocked_key(handle.journal_target)
    blocked = failures.Failure.loads(flags.read(conn, handle.journal, [key]).get(key))
    if blocked and block_lifted(blocked, graph):
        flags.delete(conn, handle.journal, key)
        flags.clear_failures(conn, handle.journal, handle.journal_target)
        log.info(
            "revision_unblocked",
            target=handle.target_name,
            revision=blocked.revision,
            reason="its file changed",
        )


def _deferred_message(failure: failures.Failure) -> str:
    when = dt.datetime.fromtimestamp(failure.retry_after, dt.timezone.utc).replace(tzinfo=None)
    at = when.isoformat(timespec="milliseconds")
    return (
        f"revision {failure.revision} failed {failure.count} time(s) the same way "
        f"({failure.error_class or 'error'}): {failure.message} — the fleet retries it no sooner "
        f"than {at}Z (database clock; backoff from the interval), or at once when its file changes"
    )
