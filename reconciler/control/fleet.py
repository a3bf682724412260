"""A tenant fleet: one migrations directory, many schemas, databases or files, every replica helping.

Each tenant is an ordinary target (`config.tenants`): its own version table, lock key, journal
rows and failure counts, reconciled by `reconcile_once` with a zero lock wait. A tenant another
replica holds is skipped (`held`): the database's lock manager is the only coordinator, and a
replica that dies frees its tenants with its session.

- One read of the fleet per pass (`fleetread.fleet_status`), never an Alembic environment per
  tenant; the revision graph is read once per tick and shared by every tenant.
- At most `[fleet] concurrency` tenants run at once on this replica, each in a fresh worker (a
  fresh interpreter, Alembic environment and connection): no tenant's state reaches another's.
  The fleet read stands for each tenant's first look: a run goes straight to the tenant's
  try-lock, and its worker is forked only once the lock is held and there is work under it.
- Each replica takes the pass's tenants in its own random order and, every few tenants, reads
  the fleet again to drop the ones other replicas finished: replicas share a fleet without
  trying each tenant once each.
- Connections: with a schema per tenant on psycopg, every tenant's control-plane work (locks,
  journal, reads) shares one server session (`db.connection.make_engine(shared=True)`), so the
  fleet holds that one plus a worker's per running tenant. Elsewhere (a database or file per
  tenant) each running tenant has its own control connection, closed when its run ends.
- Waves (`core.fleet`): a pass applies the tenants the current wave allows; when the wave is
  done the next pass goes on with the next one, in the same call, until the rollout is complete,
  halted, or nothing changes.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from reconciler import logs
from reconciler.config.tenants import check_dialect, tenant_kind, tenant_settings
from reconciler.control import fleetread
from reconciler.control.fleetread import FleetMemory, FleetStatus, TenantState
from reconciler.control.locking import ensure_journal, target_lock
from reconciler.control.progress import LiveRun
from reconciler.control.reconcile import reconcile_once
from reconciler.control.target import (
    Engines,
    TargetHandle,
    journal_exists,
    journal_seen,
    log_worker_line,
    open_target,
    release_target,
)
from reconciler.control.workerpool import WarmWorker
from reconciler.control.workers import Worker, WorkerJob
from reconciler.core import fleet as rules
from reconciler.core.graph import RevisionGraph
from reconciler.db import connection, flags, placement
from reconciler.errors import ConfigError, LockTimeout, ReconcilerError
from reconciler.redact import redact
from reconciler.sessions import backend_name
from reconciler.settings import Settings

log = logs.get("reconciler.fleet")

_MAX_PASSES = 100  # waves and retries of one call; a rollout has at most a handful of waves
_REFRESH = 32  # tenants a replica takes between two reads of the fleet (pruning the finished)


class FleetEngines(Engines):
    """The fleet's engines: the base target's, its main one a shared session where the driver
    allows it (`shared`); `for_tenant` gives a tenant engines that use that same session."""

    def __init__(self, settings: Settings, place: placement.Place, shared: bool) -> None:
        super().__init__(settings, place)
        self.shared = shared

    def get_main(self) -> sa.engine.Engine:
        if self.main is None:
            self.main = connection.make_engine(
                self._settings.target.url,
                self._settings.target.name,
                self._settings.apply.connect_timeout,
                shared=self.shared,
            )
        return self.main

    def for_tenant(self, settings: Settings, place: placement.Place) -> Engines:
        return _TenantEngines(settings, place, self) if self.shared else Engines(settings, place)


class _TenantEngines(Engines):
    """A tenant's engines on the fleet's shared session."""

    shared = True

    def __init__(self, settings: Settings, place: placement.Place, fleet: FleetEngines) -> None:
        super().__init__(settings, place, fleet.proof)
        self._fleet = fleet

    def get_main(self) -> sa.engine.Engine:
        return self._fleet.get_main()

    def get_lock(self) -> sa.engine.Engine:
        return self.get_main() if not self._settings.target.lock_url else super().get_lock()

    def dispose(self) -> None:
        """The fleet's session stays: `release_fleet` closes it."""
        if self.lock is not None:
            self.lock.dispose()


@dataclass
class TenantRun:
    """What one tenant's run ended in: an outcome (noop, applied, held, failed, ...)."""

    name: str
    outcome: str
    applied: tuple[str, ...] = ()
    error: str = ""
    revision: str = ""
    exit_code: int = 0


@dataclass
class FleetRun:
    """One `reconcile_fleet` call: every tenant run, and the fleet read after them."""

    status: FleetStatus
    runs: list[TenantRun] = field(default_factory=list)

    @property
    def outcomes(self) -> dict[str, int]:
        return rules.counts({r.name: r.outcome for r in self.runs})

    @property
    def outcome(self) -> str:
        """The fleet's run outcome: applied when any tenant was, else failed, held, or noop."""
        seen = {r.outcome for r in self.runs}
        for outcome in ("failed", "applied", "blocked", "lock_busy"):
            if outcome in seen:
                return outcome
        if self.status.suspended:
            return "suspended"
        return "noop"


@dataclass
class Fleet:
    """The fleet's handles: the base target (the listing, the fleet's flags) and each tenant's."""

    settings: Settings
    base: TargetHandle
    kind: str
    engines: FleetEngines
    memory: FleetMemory = field(default_factory=FleetMemory)
    _pool: WarmWorker | None = None
    _handles: dict[str, TargetHandle] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # a schema fleet's shared journal, once ensured: the tenants whose own schema still holds a
    # previous release's journal tables (they look for themselves); None: not ensured yet
    _legacy: frozenset[str] | None = None

    @property
    def name(self) -> str:
        return self.base.target_name

    def handle(self, tenant: str) -> TargetHandle:
        """The tenant's handle, opened on first use (it connects to nothing by itself) and kept
        until `forget`: a fleet holds handles only for the tenants it is running."""
        with self._lock:
            found = self._handles.get(tenant)
            if found is None:
                found = self._handles[tenant] = self._open(tenant)
            return found

    def forget(self, tenant: str) -> None:
        """Close the tenant's connections and drop its handle: memory stays bounded by the
        tenants running, not the fleet's size (the fleet read is each run's first look)."""
        with self._lock:
            handle = self._handles.pop(tenant, None)
        if handle is None:
            return
        if handle.engines.shared:
            handle.engines.dispose()  # its own lock engine, if any; the shared session stays
        else:
            release_target(handle)

    def _open(self, tenant: str) -> TargetHandle:
        settings = tenant_settings(self.settings, tenant, self.kind)
        handle = open_target(
            settings, self.base.on_worker_log, engines_of=self.engines.for_tenant, project=self.base.project
        )
        if self.kind != "schemas":
            return handle
        if self._legacy is not None and tenant not in self._legacy:
            handle.place.assume_ready()  # the shared journal exists: no look per tenant
            handle.cache.journal_seen = handle.place.ready
        # every tenant's steps are in the one shared journal: a tenant judges only its own rows
        # (another tenant's step in flight is neither this tenant's interrupted step nor dirty)
        return dataclasses.replace(handle, own_rows=True)

    def start_worker(self, job: WorkerJob) -> Worker:
        """A fresh worker for a tenant's job (`starting.start_worker` made it, checked against
        the tenant's database), forked from the fleet's zygote (Linux; spawned elsewhere). It
        is asked for only once the tenant's lock is held: a tenant another replica holds, or one
        already in sync, costs no worker."""
        with self._lock:
            if self._pool is None:
                settings = self.settings
                self._pool = WarmWorker(
                    WorkerJob.from_settings(settings),
                    python=settings.target.python or None,
                    on_log=self.base.on_worker_log,
                    timeout=settings.target.worker_timeout,
                    spare=False,
                    prefault=False,  # see WarmWorker: a tenant's worker is short, CPU is the cost
                )
            pool = self._pool
        return pool.start(job)

    def close_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def connect_database(self, database: str) -> Any:
        return fleetread.database_connection(self.base, database)

    def read_own_flags(self, names: list[str]) -> fleetread.TenantFlags:
        """The blocked / failures / suspended flags in each named tenant's own journal (a
        database or file per tenant), `concurrency` tenants at a time, each connection closed
        when read: the connection bound holds. A tenant that cannot be read has none."""
        width = max(1, min(self.settings.fleet.concurrency, len(names)))
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="tenant-read") as pool:
            found = list(pool.map(self._own_flags, names))
        return fleetread.flags_by_kind(row for rows in found for row in rows)

    def _own_flags(self, name: str) -> list[tuple[str, str]]:
        handle = self.handle(name)
        try:
            with connection.connect(handle.engine) as conn:
                if not journal_seen(handle, conn):
                    return []
                keys = fleetread.own_flag_keys(handle.target_name)
                read = flags.read(conn, handle.journal, keys)
        except (sa.exc.SQLAlchemyError, ReconcilerError) as exc:
            log.debug("tenant_journal_unread", tenant=name, error=redact(str(exc)))
            return []
        finally:
            self.forget(name)
        # the tenant's journal knows it by its target name: the fleet's rows are by tenant
        return [(f"{key.partition('/')[0]}/{name}", value) for key, value in read.items()]


def open_fleet(settings: Settings, on_worker_log: Callable[[str], None] | None = None) -> Fleet:
    """The fleet of `settings` ([fleet] set). Connects to nothing; a wrong layout for the URL's
    database is refused here (a ConfigError), before anything is connected."""
    dialect = backend_name(settings.target.url)
    kind = tenant_kind(settings, dialect)
    check_dialect(kind, dialect)
    shared = kind == "schemas" and connection.shares_sessions(settings.target.url)
    made: list[FleetEngines] = []

    def engines_of(base_settings: Settings, place: placement.Place) -> Engines:
        made.append(FleetEngines(base_settings, place, shared))
        return made[0]

    base = open_target(settings, on_worker_log or log_worker_line, engines_of=engines_of)
    return Fleet(settings, base, kind, made[0])


def release_fleet(fleet: Fleet) -> None:
    """Close every tenant's connections and the fleet's own."""
    with fleet._lock:
        handles = list(fleet._handles.values())
    for handle in handles:
        release_target(handle)
    release_target(fleet.base)
    fleet.close_pool()


def read_graph(fleet: Fleet, check_files: bool = True) -> RevisionGraph:
    return fleet.base.project.graph(check=check_files)


def read_fleet(fleet: Fleet, graph: RevisionGraph | None = None, own_journals: bool = True) -> FleetStatus:
    """The fleet read: every tenant's state and the rollout's wave (see `fleetread`);
    `own_journals` False skips a database or file fleet's tenant journals (a pass's re-read,
    which only asks which tenants are still pending)."""
    graph = graph if graph is not None else read_graph(fleet)
    own = fleet.read_own_flags if own_journals else None
    return fleetread.fleet_status(fleet.base, graph, fleet.kind, fleet.memory, fleet.connect_database, own)


def reconcile_fleet(
    fleet: Fleet,
    *,
    trigger: str = "apply",
    only: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    check_files: bool = True,
    retry_gate: bool = False,
    on_tenant: Callable[[TenantRun], None] | None = None,
) -> FleetRun:
    """Bring every tenant the waves allow to the repository's heads (`only`: that tenant, at
    once, whatever its wave: the sign-up path). Tenants another replica holds are skipped."""
    graph = read_graph(fleet, check_files)
    status = read_fleet(fleet, graph)
    run = FleetRun(status)
    if only is not None:
        require_tenant(fleet, only, status)
        if not status.suspended:
            run.runs.append(_run_tenant(fleet, only, trigger, should_stop, retry_gate, 300.0))
            run.status = read_fleet(fleet, graph)
        return run
    tried: set[str] = set()
    if status.wave.allowed and not status.suspended:
        _shared_journal(fleet)
    for _ in range(_MAX_PASSES):
        todo = sorted(status.wave.allowed - tried)
        if status.suspended or not todo or (should_stop and should_stop()):
            break
        tried.update(todo)
        queue = _Queue(fleet, graph, todo)
        run.runs.extend(_run_all(fleet, queue, trigger, should_stop, retry_gate, on_tenant))
        status = run.status = read_fleet(fleet, graph)
    _log_pass(fleet, run)
    return run


def _shared_journal(fleet: Fleet) -> None:
    """With a schema per tenant every tenant's journal rows go to one shared journal: create it
    once, under the fleet's own lock (the base target's), before tenants run. Each tenant's run
    would create it under its own lock, and two tenants' CREATE TABLE at once collide."""
    if fleet.kind != "schemas":
        return
    base = fleet.base
    with connection.connect(base.engine) as conn:
        if not journal_exists(base, conn):
            with target_lock(base, conn, base.settings.apply.lock_acquire_timeout):
                ensure_journal(base, conn)
        if base.journal is base.place.side:
            fleet._legacy = frozenset(_schemas_with(conn, base.journal.steps.name, base.journal.steps.schema))


def _schemas_with(conn: sa.engine.Connection, table: str, side: str | None) -> list[str]:
    """The schemas, besides the side place, holding a table named `table` (a previous release's
    journal in a tenant's schema, moved by that tenant's own run): one statement for the fleet."""
    rows = conn.execute(
        sa.text(
            "SELECT n.nspname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " WHERE c.relname = :table AND c.relkind IN ('r', 'p') AND n.nspname <> :side"
        ),
        {"table": table, "side": side or ""},
    ).fetchall()
    if conn.in_transaction():
        conn.commit()
    return [str(row[0]) for row in rows]


class _Queue:
    """One pass's tenants, in this replica's own random order (replicas reading the same fleet
    then start apart instead of all trying the first one's lock). Every `_REFRESH` tenants it
    reads the fleet again (one statement for a schema fleet) and drops the tenants no longer
    pending: the ones other replicas finished meanwhile are not tried again here."""

    def __init__(self, fleet: Fleet, graph: RevisionGraph, names: list[str]) -> None:
        self._fleet, self._graph = fleet, graph
        self._names = random.sample(names, len(names))
        self._taken = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._names)

    def take(self) -> str | None:
        with self._lock:
            if self._taken and self._taken % _REFRESH == 0 and self._names:
                self._prune()
            if not self._names:
                return None
            self._taken += 1
            return self._names.pop()

    def _prune(self) -> None:
        try:
            status = read_fleet(self._fleet, self._graph, own_journals=False)
        except ReconcilerError as exc:  # the tenants' own runs will say it; try them as listed
            log.debug("fleet_reread_failed", error=redact(str(exc)))
            return
        pending = {t.name for t in status.tenants if t.state in rules.PENDING_STATES}
        self._names = [name for name in self._names if name in pending]


def require_tenant(fleet: Fleet, name: str, status: FleetStatus | None = None) -> None:
    """Refuse a tenant the fleet does not list (a typo must not create a schema's tables)."""
    status = status if status is not None else read_fleet(fleet)
    if status.tenant(name) is None:
        shown = ", ".join(t.name for t in status.tenants[:5]) or "none"
        raise ConfigError(
            f"tenant {name!r} is not in the fleet ([fleet] source = {status.source!r} lists "
            f"{len(status.tenants)}: {shown}{', ...' if len(status.tenants) > 5 else ''}); "
            "create it first, or check [fleet] match"
        )


def _run_all(
    fleet: Fleet,
    queue: _Queue,
    trigger: str,
    should_stop: Callable[[], bool] | None,
    retry_gate: bool,
    on_tenant: Callable[[TenantRun], None] | None,
) -> list[TenantRun]:
    def lane() -> list[TenantRun]:
        done: list[TenantRun] = []
        while not (should_stop and should_stop()) and (name := queue.take()) is not None:
            done.append(_run_tenant(fleet, name, trigger, should_stop, retry_gate, 0.0))
            if on_tenant is not None:
                on_tenant(done[-1])
        return done

    width = max(1, min(fleet.settings.fleet.concurrency, len(queue)))
    # Why threads: each tenant waits on its worker process; the pool's threads live until every
    # run ended, so a worker never outlives the thread that started it (PR_SET_PDEATHSIG).
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="tenant") as pool:
        lanes = [pool.submit(lane) for _ in range(width)]
        return [result for future in lanes for result in future.result()]


def _run_tenant(
    fleet: Fleet,
    name: str,
    trigger: str,
    should_stop: Callable[[], bool] | None,
    retry_gate: bool,
    lock_timeout: float,
) -> TenantRun:
    """One tenant, reconciled; a failure is its own, never the fleet's."""
    handle = fleet.handle(name)
    try:
        result = reconcile_once(
            handle,
            run=LiveRun(starter=fleet.start_worker),
            look_first=False,  # the fleet read was the first look
            trigger=trigger,
            lock_timeout=lock_timeout,
            should_stop=should_stop,
            check_files=False,
            retry_gate=retry_gate,
        )
        fleet.memory.failed.pop(name, None)
        return TenantRun(name, result.outcome, tuple(rev for rev, _ in result.applied))
    except LockTimeout:
        log.debug("tenant_held", tenant=name)
        return TenantRun(name, "held")
    except ReconcilerError as exc:
        message = redact(str(exc))
        revision = str(getattr(exc, "revision", "") or "")
        outcome = exc.outcome if exc.outcome != "lock_busy" else "held"
        log.warning("tenant_failed", tenant=name, outcome=outcome, revision=revision or None, error=message)
        if outcome in ("failed", "refused", "blocked"):
            state = "blocked" if outcome == "blocked" else "failed"
            fleet.memory.failed[name] = TenantState(name, state, revision=revision, error=message)
        return TenantRun(name, outcome, error=message, revision=revision, exit_code=exc.exit_code)
    finally:
        fleet.forget(name)  # a connection and a handle per running tenant at most, never per tenant


def _log_pass(fleet: Fleet, run: FleetRun) -> None:
    status = run.status
    log.info(
        "fleet_reconciled",
        fleet=fleet.name,
        tenants=len(status.tenants),
        counts=status.counts,
        runs=run.outcomes,
        wave=status.wave.index + 1,
        waves=status.wave.count,
        halted=status.wave.halted,
    )
    if status.wave.halted:
        log.warning("fleet_halted", fleet=fleet.name, reason=status.wave.reason)
