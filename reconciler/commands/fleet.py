"""The commands of a tenant fleet ([fleet] set, no --tenant): apply and resume's lift (status:
`inspect.fleet`).

`suspend` needs nothing of its own: it writes the base target's `suspended` flag, which every
replica's fleet read honours (`control.fleetread.fleet_flags`).
"""

from __future__ import annotations

from reconciler import logs
from reconciler.control import fleet
from reconciler.control.fleet import FleetRun
from reconciler.control.fleetread import lift_value, lifted_key
from reconciler.control.locking import ensure_journal, target_lock
from reconciler.control.target import journal_exists
from reconciler.db import connection, flags
from reconciler.errors import Refused, RevisionFailed
from reconciler.settings import Settings

log = logs.get("reconciler.fleet")


def apply(settings: Settings) -> FleetRun:
    """Every tenant the waves allow, to the heads; raises when a tenant failed (exit 1) or the
    rollout halted or is suspended (exit 6), after the others finished."""
    found = fleet.open_fleet(settings)
    try:
        run = fleet.reconcile_fleet(found, trigger="apply")
    finally:
        fleet.release_fleet(found)
    failed = [r for r in run.runs if r.outcome in ("failed", "refused", "blocked")]
    if failed:
        shown = "; ".join(f"{r.name}: {r.error}" for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        raise RevisionFailed(
            f"{len(failed)} of {len(run.status.tenants)} tenants failed{more}: {shown}; the others "
            "went on; fix the revision or the tenant's data and run `reconciler apply` again "
            "(`reconciler status --tenant NAME` shows one)"
        )
    if run.status.suspended:
        raise Refused("the fleet is suspended (`reconciler suspend`); `reconciler resume` ends it")
    if run.status.wave.halted:
        raise Refused(f"the rollout is halted: {run.status.wave.reason}")
    return run


def summary(run: FleetRun) -> str:
    status = run.status
    applied = sum(1 for r in run.runs if r.outcome == "applied")
    held = sum(1 for r in run.runs if r.outcome == "held")
    counts = ", ".join(f"{n} {state}" for state, n in status.counts.items()) or "no tenants"
    wave = status.wave
    waves = f"; wave {wave.index + 1} of {wave.count}" if wave.count > 1 else ""
    elsewhere = f", {held} held by another replica" if held else ""
    return f"fleet: {len(status.tenants)} tenants ({counts}); {applied} applied{elsewhere}{waves}"


def lift_halt(settings: Settings) -> int | None:
    """`resume` on a fleet: lift a halted wave (the next wave may start); the wave lifted."""
    found = fleet.open_fleet(settings)
    try:
        read = fleet.read_fleet(found)
        wave = read.wave
        if not wave.halted:
            return None
        base = found.base
        with connection.connect(base.engine) as conn:
            if not journal_exists(base, conn):
                with target_lock(base, conn, settings.apply.lock_acquire_timeout):
                    ensure_journal(base, conn)
            flags.put(conn, base.journal, lifted_key(found.name), lift_value(wave.index, read.repo_heads))
        log.info("fleet_halt_lifted", fleet=found.name, wave=wave.index + 1)
        return wave.index
    finally:
        fleet.release_fleet(found)
