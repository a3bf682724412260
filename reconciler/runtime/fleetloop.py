"""The prod daemon's tick with `[fleet]` set: one `reconcile_fleet` call, the fleet as the target.

The daemon's one target is the fleet (`Daemon.handle` is the fleet's base target: its journal
holds the alert claims and the prod marker). Each tick re-reads the tenants, so a tenant added
at sign-up is built to head within one tick. A tenant's failure is the tenant's: the tick's
result carries the fleet read (`RunResult.fleet`), from which `/status`, `reconciler_tenants`
and the fleet alerts (`fleet_halted`, `tenants_blocked`) are made, never one per tenant.
Connections: `reconcile_fleet` releases each tenant's own as its run ends; the fleet keeps its
shared session until `release`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from reconciler import logs, sessions
from reconciler.config.tenants import TENANT_NAME_LIMIT
from reconciler.control import fleet
from reconciler.control.fleet import Fleet, FleetRun
from reconciler.control.fleetread import FleetStatus
from reconciler.control.target import TargetHandle
from reconciler.core.graph import MissingRevision
from reconciler.core.headers import RevisionFileError
from reconciler.db import connection
from reconciler.errors import ReconcilerError
from reconciler.runtime.runs import RunResult
from reconciler.settings import Settings

log = logs.get("reconciler.daemon")


class FleetLoop:
    """The fleet of one daemon: its handles, and the last fleet read."""

    def __init__(self, settings: Settings) -> None:
        self.fleet: Fleet = fleet.open_fleet(settings)
        self.apply = settings.daemon.apply
        self.last: FleetStatus | None = None

    @property
    def base(self) -> TargetHandle:
        return self.fleet.base

    def tick(
        self,
        reason: str,
        should_stop: Callable[[], bool],
        check_files: bool,
        ended_by: Callable[[ReconcilerError], RunResult],
    ) -> RunResult:
        """One tick: every tenant the waves allow, to the heads (an observer only reads)."""
        try:
            if not self.apply:
                status = fleet.read_fleet(self.fleet, fleet.read_graph(self.fleet, check_files))
                run = FleetRun(status)
            else:
                run = fleet.reconcile_fleet(
                    self.fleet,
                    trigger=reason,
                    should_stop=should_stop,
                    check_files=check_files,
                    retry_gate=True,  # a tenant's failed revision waits for retry_after, like a target's
                )
        except (RevisionFileError, MissingRevision) as exc:
            return dataclasses.replace(ended_by(exc), of_fleet=True)
        except ReconcilerError as exc:
            return RunResult(exc.outcome, error=str(exc), of_fleet=True)
        self.last = run.status
        return RunResult(run.outcome, error=_errors(run), fleet=run.status, of_fleet=True)

    def release(self) -> None:
        fleet.release_fleet(self.fleet)

    def cancel_in_flight(self) -> None:
        """Cancel the revisions our tenants' workers run (PostgreSQL): each tenant's applying
        session is named after the tenant and this replica."""
        if self.base.backend != "postgresql" or self.last is None:
            return
        names = [sessions.application_name(t.name[:TENANT_NAME_LIMIT], "apply") for t in self.last.tenants]
        # a database per tenant: the tenants' sessions are on other databases of the server
        connection.cancel_statements(self.base.engine, names, this_database=self.fleet.kind == "schemas")


def _errors(run: FleetRun) -> str:
    """The tick's error text: how many tenants failed, and the first ones' errors."""
    failed = [r for r in run.runs if r.outcome in ("failed", "refused", "blocked")]
    if not failed:
        return ""
    shown = "; ".join(f"{r.name}: {r.error}" for r in failed[:3])
    more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
    return f"{len(failed)} of {len(run.status.tenants)} tenants failed{more}: {shown}"
