"""One revision, one journaled step: `started` before it runs, its outcome after.

A revision that hit the DDL lock timeout is retried in place with backoff; one that left its
transaction before failing is `dirty`; one Alembic found already applied is `skipped` and
counted as another writer's (`LiveRun.foreign`).
"""

from __future__ import annotations

import math
import time

import sqlalchemy as sa

from reconciler import logs
from reconciler.control.progress import LiveRun
from reconciler.control.target import TargetHandle
from reconciler.control.workers import Worker
from reconciler.core.backoff import backoff
from reconciler.core.graph import RevisionGraph
from reconciler.core.status import is_lock_timeout
from reconciler.db import journal
from reconciler.errors import Refused, RevisionFailed

log = logs.get("reconciler.reconcile")


def apply_retrying(
    handle: TargetHandle,
    run: LiveRun,
    conn: sa.engine.Connection,
    worker: Worker,
    rev: str,
    graph: RevisionGraph,
    trigger: str,
) -> float:
    """Apply one revision; one that hit the DDL lock timeout is retried in place with exponential
    backoff and jitter, `[apply] lock_timeout_retries` times, each attempt journaled."""
    retries = max(0, handle.settings.apply.lock_timeout_retries)
    attempt = 0
    while True:
        try:
            return apply_one(handle, run, conn, worker, rev, graph, trigger)
        except RevisionFailed as exc:
            if not is_lock_timeout(exc) or attempt >= retries:
                raise
            attempt += 1
            pause = backoff(attempt, base=handle.settings.apply.lock_timeout_backoff, cap=math.inf)
            log.warning(
                "revision_lock_timeout_retry",
                target=handle.target_name,
                revision=rev,
                attempt=attempt,
                retries=retries,
                retry_in=round(pause, 3),
            )
            time.sleep(pause)


def apply_one(
    handle: TargetHandle,
    run: LiveRun,
    conn: sa.engine.Connection,
    worker: Worker,
    rev: str,
    graph: RevisionGraph,
    trigger: str,
) -> float:
    """Run `rev` in the worker between its two journal writes; its duration in seconds."""
    revision = graph.revisions[rev]
    tables, target = handle.journal, handle.target_name
    row = journal.record_started(
        conn,
        tables,
        target=handle.journal_target,
        operation="upgrade",
        revision=rev,
        down_revisions=revision.down_revisions,
        file_hash=revision.file_hash,
        trigger=trigger,
    )
    began = time.monotonic()
    marked: list[str] = []

    def leaving(revision: str, reason: str) -> None:
        # Why here: the worker waits until this is durable; a kill from now on is `dirty`.
        if "dirty" in handle.settings.unsafe:
            return
        journal.mark_non_transactional(conn, tables, row, revision, reason)
        marked.append(reason)
        log.info("revision_non_transactional", target=target, revision=revision, reason=reason)

    try:
        step = worker.upgrade(rev, on_non_transactional=leaving)
    except RevisionFailed as exc:
        _record_failure(handle, conn, row, rev, exc, int((time.monotonic() - began) * 1000), bool(marked))
        raise
    except Refused as exc:  # the guard's per-operation check: the revision was rolled back
        ms = int((time.monotonic() - began) * 1000)
        journal.record_finished(conn, tables, row, outcome="refused", duration_ms=ms)
        log.error("destructive_refused", target=target, revisions=[rev], findings=[str(exc)])
        raise
    ms = int(step.seconds * 1000)
    if rev not in step.revisions:
        # Alembic found nothing to run: something without our lock applied it meanwhile.
        journal.record_finished(conn, tables, row, outcome="skipped", duration_ms=ms)
        run.foreign.append(rev)
        log.warning(
            "foreign_writer",
            target=target,
            revisions=[rev],
            detail="revision already applied when our turn came",
            hint="another process applies migrations without the advisory lock",
        )
        return step.seconds
    journal.record_finished(conn, tables, row, outcome="applied", duration_ms=ms)
    if marked:
        journal.unmark(conn, tables, [row])
    log.info("revision_applied", target=target, revision=rev, message=revision.message, duration_ms=ms)
    return step.seconds


def _record_failure(
    handle: TargetHandle,
    conn: sa.engine.Connection,
    row: int,
    rev: str,
    exc: RevisionFailed,
    ms: int,
    marked: bool = False,
) -> None:
    # A failed revision that had left its transaction (DDL that commits as it goes on MySQL /
    # MariaDB, an autocommit block) may be half-applied: it is `dirty` and is not retried
    # until an operator resolves it (the mark stays for status to say why). A lock timeout
    # is not: its statement never ran, and a retry of statements that did fails in a way
    # that is. One that never left it was rolled back.
    outcome = "dirty" if marked and "dirty" not in handle.settings.unsafe else "failed"
    if is_lock_timeout(exc):
        outcome = "lock_timeout"
    if outcome != "dirty":
        journal.unmark(conn, handle.journal, [row])
    journal.record_finished(
        conn,
        handle.journal,
        row,
        outcome=outcome,
        duration_ms=ms,
        error_class=exc.error_class,
        error=str(exc),
        sqlstate=exc.sqlstate,
    )
    log.error(
        "revision_failed",
        target=handle.target_name,
        revision=rev,
        error_class=exc.error_class,
        sqlstate=exc.sqlstate,
        error=str(exc),
    )
