"""Prometheus metrics of one target, exposed through prometheus_client.

Each `Metrics` owns its own `CollectorRegistry`, so several can live in one process (tests) and
nothing leaks into the library's global registry. Every series that can be known up front (run
outcomes, states, conditions, the per-target histograms) exists from the start with value 0, so
alert rules never see a series appear out of nowhere. All calls are thread-safe and cheap: the
loop calls `observe_run` on every run, the no-op ones included.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from reconciler import errors
from reconciler.core.state import CONDITIONS, SYNC_STATES

OUTCOMES = (
    errors.OUTCOME_NOOP,
    errors.OUTCOME_APPLIED,
    errors.OUTCOME_LOCK_BUSY,
    errors.OUTCOME_FAILED,
    errors.OUTCOME_UNREACHABLE,
    errors.OUTCOME_REFUSED,
    errors.OUTCOME_BLOCKED,
    errors.OUTCOME_SUSPENDED,
    errors.OUTCOME_DEFERRED,
)
STATES = SYNC_STATES + CONDITIONS

# Seconds: from half a millisecond (a no-op run) to ten minutes (a long run).
# fmt: off
RUN_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
# A single revision may legitimately take much longer (a backfill, an index build).
APPLY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
# fmt: on

RUNS_TOTAL = "reconciler_runs_total"
RUN_DURATION = "reconciler_run_duration_seconds"
STATE = "reconciler_state"
SYNC_STATE = "reconciler_sync_state"
CONDITION = "reconciler_condition"
PENDING = "reconciler_pending_revisions"
REVISION_APPLY = "reconciler_revision_apply_duration_seconds"
LAST_SUCCESS = "reconciler_last_success_timestamp_seconds"
CONSECUTIVE_FAILURES = "reconciler_consecutive_failures"
LOCK_WAIT = "reconciler_lock_wait_seconds"
ALERTS_TOTAL = "reconciler_alerts_total"
ALERTS_FAILED = "reconciler_alerts_failed_total"
ALERTS_DROPPED = "reconciler_alerts_dropped_total"
APPLYING = "reconciler_applying"
APPLYING_REVISION = "reconciler_applying_revision_number"
APPLYING_TOTAL = "reconciler_applying_revisions"
INFO = "reconciler_info"
DRIFT_DIFFERENCES = "reconciler_drift_differences"
DRIFT_CHECKED = "reconciler_drift_checked_timestamp_seconds"
TENANTS = "reconciler_tenants"
# a fleet's tenant states known up front (a tenant's sync state or condition, or the fleet's own)
TENANT_STATES = tuple(dict.fromkeys((*STATES, "failed", "held")))

# The metric family names as they appear in the exposition (and in PromQL). Histograms expose
# their samples as NAME_bucket, NAME_count and NAME_sum.
METRIC_NAMES = (
    RUNS_TOTAL,
    RUN_DURATION,
    STATE,
    SYNC_STATE,
    CONDITION,
    PENDING,
    REVISION_APPLY,
    LAST_SUCCESS,
    CONSECUTIVE_FAILURES,
    LOCK_WAIT,
    ALERTS_TOTAL,
    ALERTS_FAILED,
    ALERTS_DROPPED,
    APPLYING,
    APPLYING_REVISION,
    APPLYING_TOTAL,
    INFO,
    DRIFT_DIFFERENCES,
    DRIFT_CHECKED,
)
FLEET_METRIC_NAMES = (TENANTS,)  # a fleet daemon's ([fleet] set) besides METRIC_NAMES
HISTOGRAM_NAMES = (RUN_DURATION, REVISION_APPLY, LOCK_WAIT)


def _counter_name(exposed: str) -> str:
    """prometheus_client appends `_total` to counters itself."""
    return exposed[: -len("_total")]


class _OneHot:
    """A labelled gauge where the members of a set are 1 and every other known value is 0."""

    def __init__(self, gauge: Gauge, target: str, known: Iterable[str]) -> None:
        self._gauge = gauge
        self._target = target
        self._lock = threading.Lock()
        self._children = {name: gauge.labels(target, name) for name in known}
        for child in self._children.values():
            child.set(0)

    def set(self, active: Iterable[str]) -> None:
        wanted = set(active)
        with self._lock:
            for name in wanted - self._children.keys():
                self._children[name] = self._gauge.labels(self._target, name)
            for name, child in self._children.items():
                child.set(1 if name in wanted else 0)


class Metrics:
    """The metrics of one target; `exposition()` renders them for `/metrics`."""

    def __init__(
        self, target: str, version: str, registry: CollectorRegistry | None = None, fleet: bool = False
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.target = target
        reg = self.registry
        self._runs = Counter(
            _counter_name(RUNS_TOTAL), "Reconcile runs by outcome.", ["target", "outcome"], registry=reg
        )
        self._run_children = {outcome: self._runs.labels(target, outcome) for outcome in OUTCOMES}
        self._run_duration = Histogram(
            RUN_DURATION,
            "Duration of reconcile runs, no-op runs included.",
            ["target"],
            buckets=RUN_BUCKETS,
            registry=reg,
        ).labels(target)
        self._state = _OneHot(
            Gauge(
                STATE,
                "1 for the target's current state (worst condition, else sync state).",
                ["target", "state"],
                registry=reg,
            ),
            target,
            STATES,
        )
        self._sync_state = _OneHot(
            Gauge(
                SYNC_STATE, "1 for the target's current sync state.", ["target", "sync_state"], registry=reg
            ),
            target,
            SYNC_STATES,
        )
        self._conditions = _OneHot(
            Gauge(
                CONDITION,
                "1 for each condition the target currently has.",
                ["target", "condition"],
                registry=reg,
            ),
            target,
            CONDITIONS,
        )
        self._pending = self._gauge(PENDING, "Revisions in the repository not yet applied.")
        self._apply_duration = Histogram(
            REVISION_APPLY,
            "Duration of applying one revision.",
            ["target"],
            buckets=APPLY_BUCKETS,
            registry=reg,
        ).labels(target)
        self._last_success = self._gauge(
            LAST_SUCCESS, "Unix time of the last run that ended in sync (0: never)."
        )
        self._failures = self._gauge(CONSECUTIVE_FAILURES, "Failed runs since the last successful one.")
        self._lock_wait = Histogram(
            LOCK_WAIT,
            "Time spent waiting for the advisory lock.",
            ["target"],
            buckets=RUN_BUCKETS,
            registry=reg,
        ).labels(target)
        self._alerts = Counter(
            _counter_name(ALERTS_TOTAL),
            "Alerts sent, by event and sink.",
            ["target", "event", "sink"],
            registry=reg,
        )
        self._alerts_failed = Counter(
            _counter_name(ALERTS_FAILED),
            "Alerts given up on: every attempt within send_timeout failed (HTTP error, timeout).",
            ["target", "event", "sink"],
            registry=reg,
        )
        self._alerts_dropped = Counter(
            _counter_name(ALERTS_DROPPED),
            "Alerts never attempted: pushed out of a full queue ([alerting] queue_size) or left at shutdown.",
            ["target", "event", "sink"],
            registry=reg,
        )
        self._applying = self._gauge(APPLYING, "1 while a run of this replica applies revisions, else 0.")
        self._applying_n = self._gauge(
            APPLYING_REVISION, "The position (1..N) of the revision being applied in this run (0: none)."
        )
        self._applying_total = self._gauge(
            APPLYING_TOTAL, "The revisions this run applies in all (N; 0 when not applying)."
        )
        self._drift = self._gauge(
            DRIFT_DIFFERENCES, "Differences between the schema and the models at the last drift compare."
        )
        self._drift_checked = self._gauge(DRIFT_CHECKED, "Unix time of the last drift compare (0: never).")
        self._tenants_gauge = (
            None
            if not fleet
            else Gauge(
                TENANTS,
                "A fleet's tenants per state ([fleet] set; no per-tenant label).",
                ["target", "state"],
                registry=reg,
            )
        )
        self._tenants: dict[str, Gauge] = {}
        self._tenants_lock = threading.Lock()
        self.set_tenants({})  # a fleet's every known state from the start, at 0
        Gauge(
            INFO, "Constant 1, labelled with the reconciler version.", ["target", "version"], registry=reg
        ).labels(target, version).set(1)

    def _gauge(self, name: str, documentation: str) -> Gauge:
        child: Gauge = Gauge(name, documentation, ["target"], registry=self.registry).labels(self.target)
        child.set(0)
        return child

    def observe_run(self, outcome: str, seconds: float) -> None:
        child = self._run_children.get(outcome)
        if child is None:
            child = self._run_children.setdefault(outcome, self._runs.labels(self.target, outcome))
        child.inc()
        self._run_duration.observe(max(seconds, 0.0))

    def set_state(self, state: str, sync_state: str, conditions: Iterable[str]) -> None:
        self._state.set((state,))
        self._sync_state.set((sync_state,))
        self._conditions.set(conditions)

    def set_tenants(self, counts: dict[str, int]) -> None:
        """Tenants per state; a state no tenant is in any more is 0, never left at its old count."""
        gauge = self._tenants_gauge
        if gauge is None:
            return
        with self._tenants_lock:
            if not self._tenants:
                self._tenants = {state: gauge.labels(self.target, state) for state in TENANT_STATES}
            for state in counts.keys() - self._tenants.keys():
                self._tenants[state] = gauge.labels(self.target, state)
            for state, child in self._tenants.items():
                child.set(counts.get(state, 0))

    def set_pending(self, count: int) -> None:
        self._pending.set(count)

    def observe_revision_apply(self, seconds: float) -> None:
        self._apply_duration.observe(max(seconds, 0.0))

    def set_last_success(self, timestamp: float) -> None:
        self._last_success.set(timestamp)

    def set_consecutive_failures(self, count: int) -> None:
        self._failures.set(count)

    def set_drift(self, differences: int, checked_at: float) -> None:
        self._drift.set(differences)
        self._drift_checked.set(checked_at)

    def observe_lock_wait(self, seconds: float) -> None:
        self._lock_wait.observe(max(seconds, 0.0))

    def alert_sent(self, event: str, sink: str) -> None:
        self._alerts.labels(self.target, event, sink).inc()

    def alert_failed(self, event: str, sink: str) -> None:
        self._alerts_failed.labels(self.target, event, sink).inc()

    def alert_dropped(self, event: str, sink: str) -> None:
        self._alerts_dropped.labels(self.target, event, sink).inc()

    def declare_sinks(self, sinks: Iterable[str], events: Iterable[str]) -> None:
        """Create every (event, sink) series of the alert counters at 0, so a rule on
        `increase(...)` sees the first failure (a series that appears at 1 shows no increase)."""
        wanted = list(events)
        for sink in sinks:
            for event in wanted:
                for family in (self._alerts, self._alerts_failed, self._alerts_dropped):
                    family.labels(self.target, event, sink)

    def set_applying(self, n: int, total: int) -> None:
        """Revision `n` of `total` is being applied; (0, 0) when the run is not applying."""
        self._applying.set(1 if total else 0)
        self._applying_n.set(n)
        self._applying_total.set(total)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
