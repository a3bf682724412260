"""A plan of revisions, one journaled step each: `started` before a revision runs, its outcome after.

The worker applies the whole plan in one run of env.py. The first revision is journaled `started`
(and the progress noted) before the request; before each next one the worker stops to say so
(`protocol.StepEvent`), and goes on once that step is journaled `started` and the previous one,
committed, with its outcome; a stop asked for (SIGTERM) is the answer that ends the plan between
two revisions. A revision that hit the DDL lock
timeout is retried in place with backoff (the plan goes on from it); one that left its transaction
before failing is `dirty`; one Alembic found already applied is `skipped` and counted as another
writer's (`LiveRun.foreign`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from reconciler import logs, protocol
from reconciler.control.progress import LiveRun, record_progress
from reconciler.control.target import TargetHandle
from reconciler.control.workers import Worker
from reconciler.core.backoff import backoff
from reconciler.core.graph import RevisionGraph
from reconciler.core.status import is_lock_timeout
from reconciler.db import journal
from reconciler.errors import Refused, RevisionFailed, WorkerError

log = logs.get("reconciler.reconcile")

ProgressFn = Callable[[int, int, str, str], None]
Steps = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class _Closed:
    """A step that ended: its journal row, what the worker said, whether it had been marked."""

    row: int
    step: protocol.StepDone
    marked: bool


class PlanRun:
    """Applies `pending` through a worker, journaling each step as the worker reaches it.
    `position`: the index in `pending` of the revision running or next to run."""

    def __init__(
        self,
        handle: TargetHandle,
        run: LiveRun,
        conn: sa.engine.Connection,
        graph: RevisionGraph,
        pending: tuple[str, ...],
        *,
        trigger: str,
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.handle, self.run, self.conn, self.graph = handle, run, conn, graph
        self.pending, self.trigger = pending, trigger
        self.progress, self.should_stop = progress, should_stop
        self.done: list[tuple[str, float]] = []
        self.position = 0
        self._row: int | None = None  # the open journal step, of pending[position]
        self._began = 0.0
        self._marked: list[str] = []
        self._later: _Closed | None = None  # an outcome to write once the worker went on

    def apply(self, worker: Worker) -> Steps:
        """Run the plan to its end or to a stop; (revision, seconds) per revision that ran."""
        with journal.flushed_by_the_worker(self.conn):
            return self._apply(worker)

    def _apply(self, worker: Worker) -> Steps:
        retries = max(0, self.handle.settings.apply.lock_timeout_retries)
        attempt = 0
        while self.position < len(self.pending):
            reached = self.position
            if not self._may_start(self.pending[reached]):
                break
            try:
                try:
                    result = worker.upgrade(
                        self.pending[reached:],
                        on_step=self._on_step,
                        after_step=self._flush,
                        on_non_transactional=self._leaving,
                    )
                finally:
                    self._flush()  # the outcome an event left, before what this one ends with
            except RevisionFailed as exc:
                self._failed(exc)
                if not is_lock_timeout(exc) or attempt >= retries:
                    raise
                attempt += 1
                self._pause_before_retry(exc.revision or self.pending[self.position], attempt, retries)
                continue
            except Refused as exc:  # the guard's per-operation check: the revision was rolled back
                self._refused(exc)
                raise
            for step in result.steps:
                self._record(self._close(step))
            if result.stopped:
                break
            if self.position == reached:
                raise WorkerError(
                    f"the worker ended the upgrade before {self.pending[reached]} without an error; "
                    "run the apply again (and report this, with the worker's log)"
                )
            attempt = 0
        return tuple(self.done)

    # the worker's events

    def _on_step(self, event: protocol.StepEvent) -> bool:
        """The worker is about to run `event.begins` (`event.finished` committed): journal it
        `started` now; the finished one's outcome is written once the worker goes on
        (`_flush`, called after the answer is sent), beside the next revision's run."""
        closed = self._close(event.finished)
        if event.begins != self.pending[self.position]:
            self._record(closed)
            raise WorkerError(
                f"the worker began {event.begins}, not {self.pending[self.position]} as planned"
            )
        self._later = closed
        return self._may_start(event.begins)

    def _flush(self) -> None:
        """Write the outcome an event left for after its answer."""
        closed, self._later = self._later, None
        self._record(closed)

    def _may_start(self, rev: str) -> bool:
        """Journal `rev` as started, unless a stop was asked for (then: False)."""
        if self.should_stop and self.should_stop():
            log.info("apply_stopped", target=self.handle.target_name, before=rev, applied=len(self.done))
            return False
        self._started(rev, self.position + 1)
        return True

    def _started(self, rev: str, index: int) -> None:
        handle, revision = self.handle, self.graph.revisions[rev]
        # Why here: before the revision runs, so /status, the metrics and `wait` name it.
        record_progress(handle, self.run, self.conn, rev, revision.message, index, self.pending)
        if self.progress:
            self.progress(index, len(self.pending), rev, revision.message)
        self._row = journal.record_started(
            self.conn,
            handle.journal,
            target=handle.journal_target,
            operation="upgrade",
            revision=rev,
            down_revisions=revision.down_revisions,
            file_hash=revision.file_hash,
            trigger=self.trigger,
        )
        self._began, self._marked = time.monotonic(), []

    def _leaving(self, revision: str, reason: str) -> None:
        # Why here: the worker waits until this is durable; a kill from now on is `dirty`.
        if "dirty" in self.handle.settings.unsafe or self._row is None:
            return
        journal.mark_non_transactional(self.conn, self.handle.journal, self._row, revision, reason)
        self._marked.append(reason)
        log.info(
            "revision_non_transactional", target=self.handle.target_name, revision=revision, reason=reason
        )

    def _close(self, step: protocol.StepDone | None) -> _Closed | None:
        """The open step `step` ends (once: the reply repeats the steps events reported)."""
        if step is None or self._row is None or step.revision != self.pending[self.position]:
            return None
        closed = _Closed(self._row, step, bool(self._marked))
        self._row = None
        self.position += 1
        return closed

    def _record(self, closed: _Closed | None) -> None:
        """Journal a closed step's outcome."""
        if closed is None:
            return
        row, step, tables, target = closed.row, closed.step, self.handle.journal, self.handle.target_name
        seconds = step.duration_ms / 1000.0
        self.done.append((step.revision, seconds))
        if not step.ran:
            # Alembic found nothing to run: something without our lock applied it meanwhile.
            journal.record_finished(self.conn, tables, row, outcome="skipped", duration_ms=step.duration_ms)
            self.run.foreign.append(step.revision)
            log.warning(
                "foreign_writer",
                target=target,
                revisions=[step.revision],
                detail="revision already applied when our turn came",
                hint="another process applies migrations without the advisory lock",
            )
            return
        journal.record_finished(self.conn, tables, row, outcome="applied", duration_ms=step.duration_ms)
        if closed.marked:
            journal.unmark(self.conn, tables, [row])
        message = self.graph.revisions[step.revision].message
        log.info(
            "revision_applied",
            target=target,
            revision=step.revision,
            message=message,
            duration_ms=step.duration_ms,
        )

    # failures

    def _failed(self, exc: RevisionFailed) -> None:
        # A failed revision that had left its transaction (DDL that commits as it goes on MySQL /
        # MariaDB, an autocommit block) may be half-applied: it is `dirty` and is not retried
        # until an operator resolves it (the mark stays for status to say why). A lock timeout
        # is not: its statement never ran, and a retry of statements that did fails in a way
        # that is. One that never left it was rolled back.
        row, self._row = self._row, None
        if row is None:
            return
        handle, ms = self.handle, self._elapsed_ms()
        outcome = "dirty" if self._marked and "dirty" not in handle.settings.unsafe else "failed"
        if is_lock_timeout(exc):
            outcome = "lock_timeout"
        if outcome != "dirty":
            journal.unmark(self.conn, handle.journal, [row])
        journal.record_finished(
            self.conn,
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
            revision=exc.revision,
            error_class=exc.error_class,
            sqlstate=exc.sqlstate,
            error=str(exc),
        )

    def _refused(self, exc: Refused) -> None:
        row, self._row = self._row, None
        if row is not None:
            journal.record_finished(
                self.conn, self.handle.journal, row, outcome="refused", duration_ms=self._elapsed_ms()
            )
        rev = self.pending[self.position]
        log.error("destructive_refused", target=self.handle.target_name, revisions=[rev], findings=[str(exc)])

    def _pause_before_retry(self, rev: str, attempt: int, retries: int) -> None:
        """A revision that hit the DDL lock timeout is retried in place with exponential backoff
        and jitter, `[apply] lock_timeout_retries` times, each attempt journaled."""
        pause = backoff(attempt, base=self.handle.settings.apply.lock_timeout_backoff, cap=math.inf)
        log.warning(
            "revision_lock_timeout_retry",
            target=self.handle.target_name,
            revision=rev,
            attempt=attempt,
            retries=retries,
            retry_in=round(pause, 3),
        )
        time.sleep(pause)

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self._began) * 1000)
