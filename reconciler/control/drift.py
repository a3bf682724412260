"""Drift: the live schema compared with the models, on a schedule, once per fleet.

The compare is the worker's (Alembic's autogenerate compare, our journal tables excluded), minus
the known-differences file, minus the `[drift] ignore` rules. Its result is one journal flag,
`drift/<target>`, holding when it ran, at which database heads, by whom and what differed:

- every replica reads the flag with its other fleet flags (reconcile.py), so every replica's
  `/status`, metrics and alerts show the same drift;
- a replica whose drift interval is due runs a compare only if the flag is older than the
  interval (or names other heads), only while the database is in sync, and only as the lock
  holder: it takes the target's advisory lock with one try; when the lock is busy another replica
  is applying or comparing, and it looks again on its next tick. Under the lock the flag is read
  again, so one compare per interval is made for the whole fleet.

The ignore rules and the report itself are pure: core.drift.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from reconciler import logs
from reconciler.control.conditions import forget_conditions
from reconciler.control.locking import ensure_journal, target_lock
from reconciler.control.starting import start_worker
from reconciler.control.target import TargetHandle, journal_exists
from reconciler.core.drift import UNSAFE_SWITCH, DriftReport, flag_key, report_of, without_ignored
from reconciler.db import connection, flags
from reconciler.errors import LockTimeout
from reconciler.project import differences
from reconciler.sessions import replica_id

if TYPE_CHECKING:
    import sqlalchemy as sa

    from reconciler.core.status import Status
    from reconciler.settings import DriftSettings

log = logs.get("reconciler.drift")


# --- the compare -------------------------------------------------------------------------------------
@contextmanager
def read_worker(handle: TargetHandle) -> Iterator[Any]:
    """A worker that only reads (analysis, offline SQL, compares)."""
    with connection.connect(handle.engine) as conn, start_worker(handle, conn, role="read") as worker:
        yield worker


def compare(handle: TargetHandle) -> list[dict[str, str]]:
    """Differences between the target database and the models, minus the known ones."""
    known = differences.load_for(handle.settings)
    with read_worker(handle) as worker:
        found = list(worker.compare())
    return [dict(d) for d in differences.unknown(found, known)]


# --- the schedule ------------------------------------------------------------------------------------
class DriftChecker:
    """Decides on each daemon run whether this replica compares now; see the module doc."""

    def __init__(
        self, handle: TargetHandle, settings: DriftSettings, unsafe: frozenset[str] = frozenset()
    ) -> None:
        self.handle = handle
        self.settings = settings
        self.fleet = UNSAFE_SWITCH not in unsafe
        self._next = 0.0  # wall-clock time of the next look

    @property
    def enabled(self) -> bool:
        return self.settings.interval > 0

    def expire(self) -> None:
        """Look at the next run (the heads changed: the last compare says nothing about them)."""
        self._next = 0.0

    def tick(self, status: Status, now: float) -> bool:
        """Compare if due and ours to do; True when a compare ran (the drift flag was written)."""
        if not self.enabled or now < self._next or status.sync_state != "in_sync":
            return False
        heads = tuple(sorted(status.decision.db_heads))
        with connection.connect(self.handle.engine) as conn:
            if not self.fleet:
                log.warning("safeguards_disabled", target=self.handle.target_name, disabled=[UNSAFE_SWITCH])
                self._compare(conn, heads, self._read(conn))
                return True
            return self._compare_as_lock_holder(conn, heads, now)

    def _compare_as_lock_holder(self, conn: sa.engine.Connection, heads: tuple[str, ...], now: float) -> bool:
        if self._fresh(self._read(conn), heads, now):
            return False
        try:
            with target_lock(self.handle, conn, 0.0):
                last = self._read(conn)  # again, under the lock: another replica may just have
                if self._fresh(last, heads, now):
                    return False
                self._compare(conn, heads, last)
                return True
        except LockTimeout:
            log.debug("drift_check_skipped", target=self.handle.target_name, reason="lock busy")
            return False  # someone is applying or comparing; look again next run

    def _fresh(self, last: DriftReport | None, heads: tuple[str, ...], now: float) -> bool:
        if last is None or last.heads != heads or now - last.checked_at >= self.settings.interval:
            return False
        self._next = last.checked_at + self.settings.interval
        return True

    def _read(self, conn: sa.engine.Connection) -> DriftReport | None:
        if not journal_exists(self.handle, conn):
            return None
        key = flag_key(self.handle.target_name)
        return DriftReport.loads(flags.read(conn, self.handle.journal, [key]).get(key))

    def _compare(self, conn: sa.engine.Connection, heads: tuple[str, ...], last: DriftReport | None) -> None:
        started = time.monotonic()
        self._next = time.time() + self.settings.interval
        found = without_ignored(compare(self.handle), self.settings.ignore)
        report = report_of(found, heads, replica_id(), time.monotonic() - started)
        ensure_journal(self.handle, conn)
        flags.put(conn, self.handle.journal, flag_key(self.handle.target_name), report.dumps())
        forget_conditions(self.handle)
        log.info(
            "drift_compared",
            target=self.handle.target_name,
            differences=report.count,
            duration_ms=report.duration_ms,
            heads=list(heads),
        )
        _log_change(self.handle.target_name, last, report)


def _log_change(target: str, last: DriftReport | None, report: DriftReport) -> None:
    before = last.whole if last else frozenset()
    if report.drifted and report.whole != before:
        log.warning(
            "drift_detected",
            target=target,
            count=report.count,
            differences=[d.get("text", d["key"]) for d in report.differences],
        )
    elif not report.drifted and before:
        log.info("drift_cleared", target=target)
