"""What a run in progress is doing: `LiveRun`, and the progress note other processes read.

A `LiveRun` is made by the caller for one run and passed to it (never kept on the target
handle): the daemon reads it from its HTTP thread for `/status` and the metrics while the run
applies, and to stop the worker on shutdown. The progress note in the journal's flags lets
`wait` in another process say n of N, since when.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from reconciler import logs, sessions
from reconciler.control.target import TargetHandle, journal_exists, missing_database_file
from reconciler.core.alerting import iso_utc
from reconciler.core.status import Progress, Status
from reconciler.db import connection, flags, journal
from reconciler.errors import ReconcilerError
from reconciler.redact import redact

if TYPE_CHECKING:
    from reconciler.control.workers import Worker, WorkerJob

log = logs.get("reconciler.reconcile")


@dataclass
class LiveRun:
    """One run's state, per chain where it differs (keyed by the chain's name, "" for [target])."""

    on_plan: Callable[[Status], None] | None = None  # told when a chain's plan is set (the daemon)
    lent: Worker | None = None  # a worker the caller already has (dev mode): no second start
    starter: Callable[[WorkerJob], Worker] | None = None  # starts the apply's worker instead of
    # Worker.start (a fleet's zygote), once the lock is held: a tenant held elsewhere starts none
    current_worker: Worker | None = None  # the worker of the apply in progress
    plans: dict[str, Status] = field(default_factory=dict)  # first look, then the lock's re-read
    applying: dict[str, Progress] = field(default_factory=dict)  # the revision each chain runs
    foreign: list[str] = field(default_factory=list)  # revisions another writer applied meanwhile

    def live(self, handle: TargetHandle) -> tuple[Status, Progress | None] | None:
        """The plan of the chain applying now and its current revision, if any."""
        for chain in handle.every_chain:
            plan = self.plans.get(chain.chain)
            if plan is not None:
                progress = self.applying.get(chain.chain)
                return plan, progress if progress is not None and progress.plan is plan else None
        return None


def set_plan(handle: TargetHandle, run: LiveRun, status: Status) -> None:
    run.plans[handle.chain] = status
    if run.on_plan is not None:
        run.on_plan(status)


def clear_plan(handle: TargetHandle, run: LiveRun) -> None:
    run.plans.pop(handle.chain, None)


def record_progress(
    handle: TargetHandle,
    run: LiveRun,
    conn: sa.engine.Connection,
    rev: str,
    message: str,
    n: int,
    pending: tuple[str, ...],
) -> None:
    """Say which revision this run applies now, in memory (the daemon's /status and metrics).
    Before the first one, the run's plan goes into the journal's flags, once: `wait` in
    another process reads it with the journal's open step (n of N, since when)."""
    now = time.time()
    current = run.applying.get(handle.chain)
    first = current.run_started_at if current is not None and n > 1 else now
    run.applying[handle.chain] = Progress(
        rev, message, n, len(pending), now, first, run.plans.get(handle.chain)
    )
    if n == 1:
        note = {"pending": list(pending), "run_started_at": iso_utc(now), "replica": sessions.replica_id()}
        flags.put(conn, handle.journal, flags.progress_key(handle.journal_target), json.dumps(note))


def progress_done(handle: TargetHandle, run: LiveRun, conn: sa.engine.Connection) -> None:
    """The run stopped applying: forget its progress (a failed write leaves a stale note that
    `wait` shows with its start time, and the next run overwrites)."""
    if run.applying.pop(handle.chain, None) is None:
        return
    try:
        flags.delete(conn, handle.journal, flags.progress_key(handle.journal_target))
    except sa.exc.DBAPIError as exc:
        if conn.in_transaction():
            conn.rollback()
        log.debug("progress_not_cleared", target=handle.target_name, error=redact(str(exc)))


def read_progress(handle: TargetHandle) -> dict[str, Any] | None:
    """The revision an apply in progress on this target runs (any replica's), n of N and
    since when: the run's plan from the flags, its open step from the journal."""
    if missing_database_file(handle) is not None:
        return None
    try:
        with connection.connect(handle.engine) as conn:
            if not journal_exists(handle, conn):
                return None
            key = flags.progress_key(handle.journal_target)
            note = _loads(flags.read(conn, handle.journal, [key]).get(key))
            if note is None:
                return None
            steps = journal.open_rows(conn, handle.journal, handle.row_target)
    except (ReconcilerError, sa.exc.DBAPIError):
        return None
    return _progress_of(note, steps)


def _loads(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text else None
    except ValueError:
        return None
    return value if isinstance(value, dict) and isinstance(value.get("pending"), list) else None


def _progress_of(note: dict[str, Any], steps: list[Any]) -> dict[str, Any] | None:
    """The open step of the plan in `note` (one the run started: not before the run began)."""
    pending = [str(r) for r in note["pending"]]
    since = str(note.get("run_started_at") or "")
    for step in sorted(steps, key=lambda r: r["started_at"], reverse=True):
        started = step["started_at"].strftime("%Y-%m-%dT%H:%M:%SZ")
        if step["revision"] in pending and started >= since:  # both ISO 8601 UTC, in seconds
            return {
                "revision": step["revision"],
                "n": pending.index(step["revision"]) + 1,
                "total": len(pending),
                "started_at": started,
                "run_started_at": since,
                "replica": note.get("replica"),
            }
    return None
