"""What a prod run produced and what the loop keeps of its runs; the next delay and the alert input."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from reconciler import errors
from reconciler.commands import inspect
from reconciler.control.fleetread import FleetStatus
from reconciler.control.target import TargetHandle
from reconciler.core.alert_rules import Observation
from reconciler.core.backoff import backoff
from reconciler.core.status import Status
from reconciler.errors import ReconcilerError
from reconciler.redact import redact
from reconciler.runtime.metrics import Metrics
from reconciler.runtime.statusdoc import RunState
from reconciler.settings import DaemonSettings

# the outcomes counted as failures in a row; all but a busy lock back off (`next_delay`)
TRANSIENT = (errors.OUTCOME_UNREACHABLE, errors.OUTCOME_LOCK_BUSY, errors.OUTCOME_FAILED)


@dataclass
class RunRecord:
    """What the last runs said; read by /status, /readyz and the heartbeat line."""

    started_at: float = field(default_factory=time.time)
    runs: int = 0
    last_run_at: float | None = None
    last_outcome: str = ""
    last_error: str = ""
    last_success_at: float | None = None
    consecutive_failures: int = 0
    state: RunState | None = None
    lock_holder: dict[str, Any] | None = None
    lock_busy_since: float | None = None
    missing_revision_seen: bool = False


@dataclass(frozen=True)
class RunResult:
    outcome: str
    status: Status | None = None
    applied: tuple[tuple[str, float], ...] = ()
    lock_wait: float = 0.0
    error: str = ""
    failed_revision: str | None = None
    failure_signature: str = ""
    lock_holder: dict[str, Any] | None = None
    lock_timeout: bool = False
    foreign: tuple[str, ...] = ()
    unreadable: dict[str, Any] | None = None  # the revision file that does not parse: path, line
    fleet: FleetStatus | None = None  # a fleet's tick: the fleet read after it ([fleet] set)
    of_fleet: bool = False  # a fleet's tick, read or not (the fleet's alert rules judge it)

    @property
    def state(self) -> RunState:
        """The state this run read (or, blind, why it read none)."""
        if self.fleet is not None:
            return RunState.of_fleet(self.fleet)
        if self.status is not None:
            return RunState.read(self.status)
        return RunState.blind(self.error, self.unreadable)


def paced_outcome(result: RunResult) -> str:
    """The outcome the next delay is decided by: a tenant's failure is its own (its retries wait
    for `retry_after`), so a fleet that was read keeps its interval."""
    if result.fleet is not None and result.outcome in TRANSIENT:
        return errors.OUTCOME_NOOP
    return result.outcome


def next_delay(outcome: str, failures: int, daemon: DaemonSettings) -> float | None:
    """Seconds from the end of a run with `outcome` to the next run; None: the normal interval.

    After a failure (the `failures`-th in a row) never sooner than the interval (a failing
    replica must not query more than a healthy one), growing to backoff_max: 1-2 intervals, then
    2-4, ... A busy lock is another replica applying, not a failure: look again at the interval,
    so the replica sees the new heads within an interval of the applier finishing.
    """
    if outcome not in TRANSIENT or outcome == "lock_busy":
        return None
    return backoff(failures, base=daemon.interval, cap=daemon.backoff_max)


def observation(result: RunResult, state: RunState, record: RunRecord) -> Observation:
    """What the alert policy judges of a run: typed fields of its result, of the status it read
    and of the record of the runs before it."""
    status = result.status
    # the journal's blocked record: the same on every replica
    blocked = status.blocked if status is not None else None
    return Observation(
        outcome=result.outcome,
        state=state.state,
        sync_state=state.sync_state,
        conditions=tuple(state.conditions),
        applied=tuple(rev for rev, _ in result.applied),
        failed_revision=(blocked.revision if blocked else None) or result.failed_revision,
        failure_signature=(blocked.signature if blocked else "") or result.failure_signature,
        blocked=f"{blocked.revision or '-'}:{blocked.signature or ''}" if blocked else "",
        error=redact(result.error),
        consecutive_failures=record.consecutive_failures,
        lock_holder=result.lock_holder,
        lock_held_for=(time.time() - record.lock_busy_since) if record.lock_busy_since else 0.0,
        **_read_fields(status),
        lock_timeout=result.lock_timeout,
        unreadable=_where(result.unreadable),
        unreadable_hash=str((result.unreadable or {}).get("file_hash") or ""),
        **_drift_fields(status),
        foreign=tuple(dict.fromkeys((*result.foreign, *(status.foreign if status is not None else ())))),
        **_fleet_fields(result),
    )


def _fleet_fields(result: RunResult) -> dict[str, Any]:
    """A fleet tick's part: the halted wave and the failed tenants (the same on every replica
    that read the same fleet), never one field per tenant run."""
    fleet = result.fleet
    if fleet is None:
        return {"fleet": result.of_fleet}
    failed = fleet.failed
    wave = fleet.wave
    return {
        "fleet": True,
        "fleet_read": True,
        "halted": f"wave {wave.index + 1}:{','.join(fleet.repo_heads)}" if wave.halted else "",
        "halt_reason": wave.reason,
        "tenants": len(fleet.tenants),
        "failed_tenants": tuple(t.name for t in failed),
        "failed_causes": tuple(sorted({t.revision or t.state for t in failed})),
    }


def _read_fields(status: Status | None) -> dict[str, Any]:
    """The revisions the status names: unknown to the repository, the fork (else the repository's
    heads), dirty, and those whose applied file changed or vanished."""
    if status is None:
        return {}
    decision = status.decision
    return {
        "unknown": tuple(decision.unknown),
        "heads": tuple(decision.fork or sorted(decision.repo_heads)),
        "dirty": tuple(status.dirty),
        "mismatched": tuple(m.revision for m in status.audit.mismatches),
    }


def _where(unreadable: dict[str, Any] | None) -> str:
    """`path:line` of an unreadable revision file ("" when there is none)."""
    if unreadable is None:
        return ""
    line = unreadable.get("line")
    return f"{unreadable['path']}:{line}" if line else str(unreadable["path"])


def _drift_fields(status: Status | None) -> dict[str, Any]:
    report = status.drift if status is not None and "drift" in status.conditions else None
    if report is None:
        return {}
    texts = tuple(str(d.get("text", d["key"])) for d in report.differences)
    return {"drift": report.keys, "drift_texts": texts}


def report_metrics(
    m: Metrics, result: RunResult, seconds: float, state: RunState, now: float, failures: int
) -> None:
    """What one run tells the Prometheus metrics."""
    m.observe_run(result.outcome, seconds)
    m.set_state(state.state, state.sync_state, state.conditions)
    m.set_pending(len(state.pending))
    m.set_applying(0, 0)
    for _rev, took in result.applied:
        m.observe_revision_apply(took)
    if result.outcome in ("noop", "applied"):
        m.set_last_success(now)
    if result.lock_wait:
        m.observe_lock_wait(result.lock_wait)
    m.set_consecutive_failures(failures)
    if result.fleet is not None:
        m.set_tenants(result.fleet.counts)
    status = result.status
    if status is not None and status.sync_state != "unknown":
        report = status.drift
        m.set_drift(report.count if report else 0, report.checked_at if report else 0.0)


def last_steps(handle: TargetHandle, limit: int = 50) -> list[dict[str, Any]]:
    """The journal's newest steps of the target, newest first (`journal`'s rows; none when the
    journal cannot be read: the page says so, the run is not the worse for it)."""
    try:
        return list(reversed(inspect.steps(handle, limit)))
    except (ReconcilerError, sa.exc.DBAPIError):
        return []
