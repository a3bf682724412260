"""The state a prod run left, typed (metrics, logs, alerts and readiness read it); the `/status` dict of it.

The dict is made only here, for the HTTP edge (`Daemon.status`): nothing reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.control.fleetread import FleetStatus
from reconciler.core.alerting import iso_utc
from reconciler.core.state import CONDITIONS, SYNC_STATES
from reconciler.core.status import SYNC_SEVERITY, Progress, Status
from reconciler.redact import redact

UNREADABLE = "revision_unreadable"  # the condition (and alert event) of a revision file we cannot read
# Every /status document has these keys, whatever the state (a dashboard or `jq` never meets a
# missing key): those of `Status.as_dict` that only some states fill, at their empty value.
STATUS_DEFAULTS: dict[str, Any] = {
    "state": "unknown",
    "sync_state": "unknown",
    "conditions": [],
    "db_heads": [],
    "repo_heads": [],
    "pending": [],
    "unknown": [],
    "message": "",
    "fork": [],
    "branch_point": None,
    "dirty": [],
    "blocked": None,
    "drift": None,
    "checksum_mismatch": [],
    "foreign_writes": [],
    "guard": None,
    "chains": [],
    UNREADABLE: None,
    "applying": None,
    "fleet": None,  # [fleet]: the fleet read of the last tick (`FleetStatus.as_dict`)
}


@dataclass(frozen=True)
class RunState:
    """What one run read (`status`), or where an apply in progress is (`status` is its plan, read
    under the lock, and `progress` the revision it runs), or why nothing was read (`unreadable`:
    the revision file that does not parse; else the database was not reached)."""

    status: Status | None = None
    progress: Progress | None = None
    unreadable: dict[str, Any] | None = None  # the revision file that does not parse: path, line
    error: str = ""
    fleet: FleetStatus | None = None  # a fleet's tick: the fleet read (`status` is then None)

    @classmethod
    def of_fleet(cls, fleet: FleetStatus) -> RunState:
        """The fleet as one target: the worst sync state of its tenants, their conditions."""
        return cls(fleet=fleet)

    @classmethod
    def read(cls, status: Status) -> RunState:
        return cls(status)

    @classmethod
    def in_progress(cls, plan: Status, progress: Progress | None) -> RunState:
        return cls(plan, progress)

    @classmethod
    def blind(cls, error: str, unreadable: dict[str, Any] | None) -> RunState:
        """A run that decided nothing (no status was read)."""
        return cls(None, unreadable=unreadable, error=error)

    @property
    def _started(self) -> bool:
        """A revision of a first apply is in: the database is `behind`, no longer empty."""
        return self.progress is not None and self.progress.n > 1

    @property
    def sync_state(self) -> str:
        if self.fleet is not None:
            return fleet_sync_state(self.fleet)
        if self.status is None:
            return "unknown"
        sync_state = self.status.sync_state
        if self._started and sync_state == "uninitialized_empty":
            return "behind"
        return sync_state

    @property
    def state(self) -> str:
        if self.fleet is not None:
            return self.conditions[0] if self.conditions else self.sync_state
        if self.status is None:
            return "unknown" if self.unreadable is None else UNREADABLE
        state = self.status.state
        if (
            self._started
            and self.status.sync_state == "uninitialized_empty"
            and state == "uninitialized_empty"
        ):
            return "behind"
        return state

    @property
    def conditions(self) -> tuple[str, ...]:
        if self.fleet is not None:
            return fleet_conditions(self.fleet)
        if self.status is None:
            return () if self.unreadable is None else (UNREADABLE,)
        return self.status.conditions

    @property
    def pending(self) -> tuple[str, ...]:
        """Of an apply in progress, counting down."""
        if self.status is None:
            return ()
        return self.progress.remaining if self.progress is not None else self.status.pending

    def as_dict(self) -> dict[str, Any]:
        """This state's part of the /status document (STATUS_DEFAULTS fill the rest)."""
        if self.fleet is not None:
            return self._fleet_doc(self.fleet)
        if self.status is None:
            return self._blind_doc()
        doc = self.status.as_dict()
        if self.progress is None:
            return doc
        progress = self.progress
        doc["pending"] = list(self.pending)
        doc["sync_state"] = self.sync_state
        doc["state"] = self.state
        doc["applying"] = progress.as_dict()
        doc["message"] = (
            f"applying {progress.revision} ({progress.n} of {progress.total}); "
            f"{len(progress.remaining)} pending"
        )
        return doc

    def _fleet_doc(self, fleet: FleetStatus) -> dict[str, Any]:
        counts = ", ".join(f"{n} {state}" for state, n in fleet.counts.items()) or "no tenants"
        wave = fleet.wave
        message = f"fleet: {len(fleet.tenants)} tenants ({counts})"
        if wave.count > 1:
            message += f"; wave {wave.index + 1} of {wave.count}"
        if wave.halted:
            message += f"; halted: {wave.reason}"
        return {
            "state": self.state,
            "sync_state": self.sync_state,
            "conditions": list(self.conditions),
            "repo_heads": list(fleet.repo_heads),
            "message": message,
            "fleet": fleet.as_dict(),
        }

    def _blind_doc(self) -> dict[str, Any]:
        if self.unreadable is None:
            return {"state": "unknown", "sync_state": "unknown"}
        return {
            "state": UNREADABLE,
            "sync_state": "unknown",
            "conditions": [UNREADABLE],
            "message": redact(self.error),
            UNREADABLE: self.unreadable,
        }


def fleet_sync_state(fleet: FleetStatus) -> str:
    """The worst sync state of the tenants (`in_sync` for none); a tenant in a condition or a
    fleet state (failed, held) counts as `behind` while it has revisions pending."""
    states = {_tenant_sync_state(t.state, t.pending) for t in fleet.tenants} or {"in_sync"}
    return min(states, key=lambda s: SYNC_SEVERITY.index(s) if s in SYNC_SEVERITY else 0)


def _tenant_sync_state(state: str, pending: int) -> str:
    if state in SYNC_STATES:
        return state
    return "behind" if pending else "in_sync"


def fleet_conditions(fleet: FleetStatus) -> tuple[str, ...]:
    """The conditions any tenant is in (and `suspended` for a suspended fleet), worst first."""
    seen = {t.state for t in fleet.tenants} | ({"suspended"} if fleet.suspended else set())
    return tuple(c for c in CONDITIONS if c in seen)


def state_dict(state: RunState | None) -> dict[str, Any]:
    """`state.as_dict()`, or nothing (before the first run, or with no apply in progress)."""
    return state.as_dict() if state is not None else {}


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else iso_utc(timestamp)
