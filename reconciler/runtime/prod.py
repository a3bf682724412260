"""Composition root of `reconciler run` (prod mode): settings, loop, watcher, HTTP, alerts, signals.

Each run is the reconcile of `control/reconcile.py`; this module turns its result (or its exception)
into an outcome, metrics, a `/status` document, log lines and alert transitions, and decides when
the next run happens (the interval, or after a failure a jittered backoff that grows from the
interval to `backoff_max`), and whether to keep the connection until then.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import sqlalchemy as sa

from reconciler import __version__, logs, sessions
from reconciler.config.validate import check_sink_events, parse_http
from reconciler.control import claims
from reconciler.control.drift import DriftChecker
from reconciler.control.progress import LiveRun
from reconciler.control.reading import read_status
from reconciler.control.reconcile import reconcile_once
from reconciler.control.retries import failure_of
from reconciler.control.target import open_target, release_target
from reconciler.core.alert_rules import EVENTS
from reconciler.core.alerting import Alert, AlertPolicy
from reconciler.core.graph import MissingRevision
from reconciler.core.headers import RevisionFileError, RevisionSyntaxError
from reconciler.core.status import ApplyResult, Status, is_lock_timeout
from reconciler.db import connection
from reconciler.errors import (
    OUTCOME_UNREACHABLE,
    ConfigError,
    LockTimeout,
    ReconcilerError,
    RetryDeferred,
    RevisionFailed,
    UnreachableError,
)
from reconciler.redact import redact
from reconciler.runtime import runs, signals, statuspage
from reconciler.runtime.alerthistory import AlertHistory
from reconciler.runtime.delivery import AlertDispatcher
from reconciler.runtime.filescan import fingerprint
from reconciler.runtime.fleetloop import FleetLoop
from reconciler.runtime.http import SHED_SWITCH, HttpServer
from reconciler.runtime.metrics import Metrics
from reconciler.runtime.runs import RunRecord, RunResult, next_delay, paced_outcome
from reconciler.runtime.scheduler import Loop
from reconciler.runtime.statusdoc import STATUS_DEFAULTS, RunState, iso, state_dict
from reconciler.runtime.watcher import DirWatcher
from reconciler.settings import Settings

log = logs.get("reconciler.daemon")

DAEMON_LOCK_WAIT = 5.0  # a tick waits this long for the lock; then lock_busy and a backoff
EXIT_GRACE_EXPIRED = 1


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fleet = FleetLoop(settings) if settings.fleet.enabled else None  # the fleet is the target
        self.handle = self.fleet.base if self.fleet else open_target(settings)
        self.target = self.handle.target_name
        self.drift = DriftChecker(self.handle, settings.drift, settings.unsafe)
        self.metrics = Metrics(self.target, __version__, fleet=self.fleet is not None)
        self.policy = AlertPolicy(self.target, settings.alerting)
        check_sink_events(settings)
        self.metrics.declare_sinks([sink.name for sink in settings.alerts], EVENTS)
        self.alert_history = AlertHistory()  # the status page's
        self.dispatcher = AlertDispatcher(
            settings.alerts,
            settings.alerting,
            on_sent=self.alert_history.counting("sent", self.metrics.alert_sent),
            on_failed=self.alert_history.counting("failed", self.metrics.alert_failed),
            on_dropped=self.alert_history.counting("dropped", self.metrics.alert_dropped),
        )
        daemon = settings.daemon
        # Jitter spreads 200 sidecars' ticks; more than half the interval would only slow them.
        self.loop = Loop(self._run, daemon.interval, min(daemon.jitter, daemon.interval / 2))
        dirs, _ = self.handle.project.version_dirs
        self.version_dirs = dirs
        self.watcher = DirWatcher(dirs, self._files_changed, debounce=daemon.debounce, suffixes=(".py",))
        host, port = parse_http(daemon.http)
        self.http = HttpServer(
            host,
            port,
            self,
            self.metrics,
            daemon.allowed_hosts,
            header_timeout=daemon.http_header_timeout,
            shed=SHED_SWITCH not in settings.unsafe,
        )
        self.record = RunRecord()
        self._live = LiveRun(on_plan=self._on_plan)  # the run in progress (a new one per run)
        self._check_files = True  # stat the revision files each run: off while the watcher works
        self._record_lock = threading.Lock()
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._exit_code = 0
        self._fingerprint = ""
        self._last_heartbeat = time.monotonic()
        self._last_state = ""
        self._marked_prod = False
        self._journal_rows: list[dict[str, Any]] = []  # the journal's last steps (the status page's)
        self._journal_stale = True  # read them after the next run that reached the database

    # --- HealthSource (http.py) -------------------------------------------------------------
    def alive(self) -> bool:
        """Alive while the loop heartbeats; never depends on the database."""
        limit = max(60.0, 3 * self.settings.daemon.interval + self.settings.daemon.backoff_max)
        return self.loop.running or time.monotonic() - self.loop.last_beat < limit

    def ready(self) -> bool:
        with self._record_lock:
            attempted = self.record.runs > 0
            state = self.record.state
            sync_state = state.sync_state if state is not None else None
            conditions = set(state.conditions if state is not None else ())
            conditions.discard("drift")  # reported, not gating
        if self.settings.daemon.ready_when == "in_sync":
            return sync_state == "in_sync" and not conditions
        return attempted

    def status(self) -> dict[str, Any]:
        with self._record_lock:
            record = self.record
            out = {**STATUS_DEFAULTS, **state_dict(record.state), **state_dict(self._live_apply())}
            out.update(
                {
                    "target": self.target,
                    "url": self.handle.redacted_url,
                    "mode": "prod",
                    "apply": self.settings.daemon.apply,
                    "version": __version__,
                    "started_at": iso(record.started_at),
                    "runs": record.runs,
                    "last_run": iso(record.last_run_at),
                    "last_outcome": record.last_outcome,
                    "last_error": record.last_error or None,
                    "last_success": iso(record.last_success_at),
                    "consecutive_failures": record.consecutive_failures,
                    "lock_holder": record.lock_holder,
                    "watching": self.watcher.healthy,
                }
            )
        return out

    def page(self) -> str:
        """The status page from what the loop cached: no file read, no database."""
        refresh, alerts = self.settings.daemon.page_refresh, self.alert_history.rows()
        return statuspage.page_of(self.status(), self.handle.project, refresh, self._journal_rows, alerts)

    def _live_apply(self) -> RunState | None:
        """The state of an apply in progress, from what it read under the lock: the last run's
        state (or none, on a first apply) would hide it for as long as the apply takes."""
        live = self._live.live(self.handle)
        return RunState.in_progress(*live) if live is not None else None

    def _on_plan(self, _status: Status) -> None:
        """A run read what it will apply: the gauges say that state at once, not at its end."""
        self._on_progress(0, 0, "", "")

    def _on_progress(self, n: int, total: int, _rev: str, _message: str) -> None:
        """A revision of this run is about to start (n of total; 0 before the first): /status and
        the metrics say which."""
        state = self._live_apply()
        if state is None:
            return
        if n:
            with self._record_lock:
                self.record.state = state  # kept until the run's report replaces it
        m = self.metrics
        m.set_state(state.state, state.sync_state, state.conditions)
        m.set_pending(len(state.pending))
        m.set_applying(n, total)

    # --- lifecycle ---------------------------------------------------------------------------
    def run(self) -> int:
        """Start everything and block until a signal has stopped it; the process exit code."""
        self._install_signals()
        self.http.start()
        self.dispatcher.start()
        if not self.watcher.start():
            log.warning("watch_unavailable", fallback="stat fingerprint each tick")
        host, port = self.http.address
        log.info(
            "daemon_started",
            target=self.target,
            url=self.handle.redacted_url,
            interval=self.settings.daemon.interval,
            http=f"{host}:{port}",
            apply=self.settings.daemon.apply,
            version=__version__,
        )
        self.loop.start()
        signals.wait_for(self._done)
        return self._exit_code

    def _install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stopping.is_set():
            log.warning("second_signal", signal=signal.Signals(signum).name, action="exit now")
            os._exit(EXIT_GRACE_EXPIRED)
        self._stopping.set()
        log.info("shutdown_requested", signal=signal.Signals(signum).name, grace=self.settings.daemon.grace)
        threading.Thread(target=self._shutdown, name="shutdown", daemon=True).start()

    def _shutdown(self) -> None:
        """Stop everything; the process ends even when a part fails to stop cleanly."""
        try:
            grace = self.settings.daemon.grace
            finished = self.loop.stop(wait=True, timeout=grace)
            if not finished:
                log.warning("grace_expired", action="cancelling our statement on the server")
                self._cancel_in_flight()
                finished = self.loop.stop(wait=True, timeout=max(10.0, grace))
                self._exit_code = EXIT_GRACE_EXPIRED
            self.watcher.stop()
            self.http.stop()
            self.dispatcher.close(timeout=2.0)
            self._release()
            log.info("daemon_stopped", target=self.target, clean=finished and not self._exit_code)
        except Exception as exc:  # a hung SIGTERM is worse than an untidy stop
            log.error("daemon_stop_failed", error=redact(str(exc)), kind=exc.__class__.__name__)
            self._exit_code = self._exit_code or EXIT_GRACE_EXPIRED
        finally:
            self._done.set()

    def _cancel_in_flight(self) -> None:
        """Cancel the revision our worker is running (PostgreSQL), else stop the worker."""
        if self.fleet is not None:
            return self.fleet.cancel_in_flight()
        name = sessions.application_name(self.target, "apply")
        if self.handle.backend == "postgresql" and connection.cancel_statements(self.handle.engine, [name]):
            return
        worker = self._live.current_worker
        if worker is not None:
            worker.kill()

    # --- one run -------------------------------------------------------------------------------
    def _files_changed(self, paths: set[Any]) -> None:
        log.info("revision_files_changed", count=len(paths))
        self.handle.project.invalidate()
        self.loop.trigger("revision_files_changed")

    def _run(self, reason: str) -> float | None:
        started = time.monotonic()
        self._poll_files_if_blind()
        result = self._check_drift(self._reconcile(reason))
        seconds = time.monotonic() - started
        self._report(result, seconds)
        if result.outcome in ("noop", "applied") and not self._marked_prod:
            self._mark_prod()
        delay = self._next_delay(result)
        self._release_if_idle(delay)
        return delay

    def _release_if_idle(self, delay: float | None) -> None:
        """Close our connections when the next run is `idle_disconnect_after` or more away: 200
        sidecars holding one idle backend each would take 200 server slots for nothing."""
        daemon = self.settings.daemon
        if (daemon.interval if delay is None else delay) >= daemon.idle_disconnect_after:
            self._release()

    def _release(self) -> None:
        self.fleet.release() if self.fleet is not None else release_target(self.handle)

    def _mark_prod(self) -> None:
        """Record in the journal that a prod reconciler owns this database: dev mode refuses it."""
        try:
            self._marked_prod = claims.mark_prod(self.handle)
        except (ReconcilerError, sa.exc.DBAPIError) as exc:
            log.warning("environment_mark_failed", error=redact(str(exc)))

    def _poll_files_if_blind(self) -> None:
        self._check_files = not self.watcher.healthy
        if self.watcher.healthy:
            return
        current = fingerprint(self.version_dirs)
        if current != self._fingerprint:
            self._fingerprint = current
            self.handle.project.invalidate()

    def _reconcile(self, reason: str) -> RunResult:
        if self.fleet is not None:
            return self.fleet.tick(reason, self._stopping.is_set, self._check_files, self._ended_by)
        try:
            if not self.settings.daemon.apply:
                return RunResult("noop", read_status(self.handle, check_files=self._check_files))
            self._live = LiveRun(on_plan=self._on_plan)
            result: ApplyResult = reconcile_once(
                self.handle,
                run=self._live,
                trigger=reason,
                progress=self._on_progress,
                fast=True,
                lock_timeout=min(DAEMON_LOCK_WAIT, self.settings.apply.lock_acquire_timeout),
                should_stop=self._stopping.is_set,
                check_files=self._check_files,
                retry_gate=True,  # a tick never tries a failed revision before the fleet's retry_after
            )
            self.record.missing_revision_seen = False
            return RunResult(
                result.outcome, result.status, result.applied, result.lock_wait, foreign=result.foreign
            )
        except ReconcilerError as exc:
            return self._ended_by(exc)

    def _ended_by(self, exc: ReconcilerError) -> RunResult:
        """The one place an error becomes a run's result: its outcome is the error class's (the
        tree in errors.py); a revision file we cannot read names the file instead."""
        if isinstance(exc, MissingRevision):
            return self._missing_revision(exc)
        if isinstance(exc, RevisionFileError):  # nothing can be decided or applied until it is fixed
            return self._unreadable(exc)
        details = self._details(exc)
        # unreachable: the status says so (`unknown`); any other error: what can still be read
        status = (
            read_status(self.handle, check_files=self._check_files)
            if isinstance(exc, UnreachableError)
            else self._quiet_status()
        )
        return RunResult(exc.outcome, status, error=str(exc), **details)

    def _details(self, exc: ReconcilerError) -> dict[str, Any]:
        """What the result says beside the outcome: the lock's holder, the failure's revision."""
        if isinstance(exc, LockTimeout):
            return {"lock_holder": dict(exc.holder)}
        if isinstance(exc, RevisionFailed):
            signature = failure_of(self.handle, exc).signature
            return {
                "failed_revision": exc.revision,
                "failure_signature": signature,
                "lock_timeout": is_lock_timeout(exc),
            }
        if isinstance(exc, RetryDeferred):  # not a failure: no count toward blocked_after or unreachable
            return {"failed_revision": exc.revision, "failure_signature": exc.signature}
        return {}

    def _check_drift(self, result: RunResult) -> RunResult:
        """Compare the schema with the models when due (see drift.py); the status then says so."""
        if result.outcome == "applied":
            self.drift.expire()  # new heads: the last compare says nothing about them
        if result.status is None or result.outcome not in ("noop", "applied"):
            return result
        try:
            if not self.drift.tick(result.status, time.time()):
                return result
        except (ReconcilerError, sa.exc.DBAPIError) as exc:
            log.warning("drift_check_failed", target=self.target, error=redact(str(exc)))
            return result
        return dataclasses.replace(result, status=self._quiet_status() or result.status)

    def _unreadable(self, exc: RevisionFileError | MissingRevision) -> RunResult:
        """A revision file that does not parse (or has no usable header, or names a parent that
        is not there) is a failure of the run: counted, alerted with the file and line, and in
        /status until the file is fixed."""
        self.handle.project.invalidate()  # read again next run, whatever the watcher says
        line = exc.line if isinstance(exc, RevisionFileError) else None
        where = {
            "path": _shown(exc.path, self.settings.root_dir),
            "line": line,
            "file_hash": exc.file_hash if isinstance(exc, RevisionSyntaxError) else None,
        }
        return RunResult("failed", None, error=str(exc), unreadable=where)

    def _missing_revision(self, exc: MissingRevision) -> RunResult:
        """A half-synced checkout is transient for one debounce window, then an error."""
        first = not self.record.missing_revision_seen
        self.record.missing_revision_seen = True
        self.handle.project.invalidate()
        if first:
            log.info("revision_files_incomplete", missing=exc.missing, retry_in=self.settings.daemon.debounce)
            return RunResult("noop", None, error="")
        return self._unreadable(exc)

    def _quiet_status(self) -> Status | None:
        try:
            return read_status(self.handle, check_files=self._check_files)
        except (ReconcilerError, ConfigError):
            return None

    def _next_delay(self, result: RunResult) -> float | None:
        if result.outcome == "noop" and self.record.missing_revision_seen:
            return self.settings.daemon.debounce
        if result.unreadable is not None:
            return None  # retrying sooner cannot help: the watcher (or the next tick) sees the fix
        return next_delay(paced_outcome(result), self.record.consecutive_failures, self.settings.daemon)

    # --- reporting -----------------------------------------------------------------------------
    def _report(self, result: RunResult, seconds: float) -> None:
        now = time.time()
        state = result.state
        with self._record_lock:
            record = self.record
            record.runs += 1
            record.last_run_at = now
            record.last_outcome = result.outcome
            record.last_error = redact(result.error)
            if result.outcome in ("noop", "applied"):
                record.last_success_at = now
                record.consecutive_failures = 0
            elif result.outcome in runs.TRANSIENT:
                record.consecutive_failures += 1
            record.state = state
            self._track_lock(record, result, now)
        runs.report_metrics(self.metrics, result, seconds, state, now, self.record.consecutive_failures)
        self._journal_stale |= result.outcome != "noop"
        if self.fleet is None and self._journal_stale and result.outcome != OUTCOME_UNREACHABLE:
            self._journal_rows, self._journal_stale = runs.last_steps(self.handle), False
        self._log(result, seconds, state)
        self._alert(result, state)

    def _track_lock(self, record: RunRecord, result: RunResult, now: float) -> None:
        if result.outcome == "lock_busy":
            record.lock_holder = result.lock_holder
            record.lock_busy_since = record.lock_busy_since or now
        else:
            record.lock_holder = None
            record.lock_busy_since = None

    def _log(self, result: RunResult, seconds: float, run_state: RunState) -> None:
        state = run_state.state
        changed = state != self._last_state
        self._last_state = state
        fields = {
            "target": self.target,
            "outcome": result.outcome,
            "state": state,
            "duration_ms": round(seconds * 1000, 2),
        }
        if result.error:
            log.warning("run_finished", error=result.error, **fields)
        elif changed or result.outcome != "noop":
            log.info("run_finished", **fields)
        else:
            log.debug("run_finished", **fields)
        now = time.monotonic()
        if now - self._last_heartbeat >= self.settings.daemon.heartbeat:
            self._last_heartbeat = now
            log.info("heartbeat", target=self.target, state=state, runs=self.record.runs)

    def _alert(self, result: RunResult, state: RunState) -> None:
        observation = runs.observation(result, state, self.record)
        for alert, episode in self.policy.observe(observation, time.time()):
            if episode is None or self._claim(alert, episode):
                self.dispatcher.submit(alert)

    def _claim(self, alert: Alert, episode: str) -> bool:
        """The first replica to record this transition in the journal sends it. A recovery is
        recorded under the event it ends, so a later return of the same episode is claimable."""
        event = str(alert.details.get("recovered_from") or alert.event)
        try:
            return claims.claim_alert(self.handle, event, episode)
        except (ReconcilerError, sa.exc.DBAPIError) as exc:
            # cannot coordinate: better twice than never, and said, so a double alert is explained
            log.warning("alert_claim_failed", target=self.target, alert_event=event, error=redact(str(exc)))
            return True


def _shown(path: Any, root: Any) -> str:
    """A path as a person reads it in an alert: relative to the project root when inside it."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except (ValueError, OSError, AttributeError):
        return str(path)


def run_daemon(settings: Settings) -> int:
    return Daemon(settings).run()
