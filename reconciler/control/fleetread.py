"""A fleet's state in one read: every tenant listed with its version rows, the journal's word on
each (blocked, failed, suspended), and the rollout's wave.

For a schema per tenant that is two round trips however many tenants there are: one statement
lists the schemas with every version table's rows (`db.tenants`), one reads the shared journal's
flags of all of them. With a database or a file per tenant each tenant keeps its own journal: the
caller's `own_flags` reads those of the tenants not in sync (one short connection each; a fleet
in sync costs none), so that a failure another process recorded is seen by a new one. Nothing
here starts a worker or an Alembic environment: a tenant's state is `core.state.decide` over its
rows and the revision graph read once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from reconciler.control.target import TargetHandle, journal_seen
from reconciler.core import fleet as rules
from reconciler.core.failures import Failure
from reconciler.core.graph import RevisionGraph
from reconciler.core.state import DbSnapshot, decide
from reconciler.db import connection, flags, tenants
from reconciler.db.tenants import TenantVersions
from reconciler.errors import ConfigError
from reconciler.redact import redact

FLEET_LIFTED = "fleet_lifted"  # flag key prefix: the highest wave index `resume` lifted
_TENANT_FLAGS = ("blocked", "failures", "suspended")


@dataclass(frozen=True)
class TenantState:
    """One tenant as the fleet read sees it."""

    name: str
    state: str  # a sync state, or blocked / failed / suspended / held (core.fleet's vocabulary)
    db_heads: tuple[str, ...] = ()
    pending: int = 0
    revision: str = ""  # the failing revision, when failed or blocked
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "revision": self.revision or None, "error": self.error}


@dataclass(frozen=True)
class FleetStatus:
    """The fleet's tenants (sorted by name), its rollout wave, and whether it is suspended."""

    tenants: tuple[TenantState, ...]
    wave: rules.WaveDecision
    repo_heads: tuple[str, ...]
    suspended: bool = False
    source: str = ""

    @property
    def states(self) -> dict[str, str]:
        return {t.name: t.state for t in self.tenants}

    @property
    def counts(self) -> dict[str, int]:
        return rules.counts(self.states)

    @property
    def failed(self) -> tuple[TenantState, ...]:
        return tuple(t for t in self.tenants if t.state in rules.FAILED_STATES)

    def tenant(self, name: str) -> TenantState | None:
        return next((t for t in self.tenants if t.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        """The `fleet` object of `status --json` and `/status`."""
        return {
            "source": self.source,
            "tenants": len(self.tenants),
            "counts": self.counts,
            "failed": [t.as_dict() for t in self.failed],
            "wave": self.wave.as_dict(),
            "suspended": self.suspended,
            "repo_heads": list(self.repo_heads),
        }


@dataclass
class FleetMemory:
    """What this replica saw of its own tenant runs: failures of tenants whose journal is not
    the shared one (a database or a file per tenant), until the tenant's next run."""

    failed: dict[str, TenantState] = field(default_factory=dict)


Connect = Callable[[str], AbstractContextManager[sa.engine.Connection]]
TenantFlags = dict[str, dict[str, str]]  # {flag kind: {tenant: value}}
OwnFlags = Callable[[list[str]], TenantFlags]  # the named tenants' own journals' flags


def list_tenants(
    base: TargetHandle, conn: sa.engine.Connection, kind: str, connect: Connect
) -> list[TenantVersions]:
    """Every tenant of `[fleet]` with its version rows, sorted by name."""
    fleet = base.settings.fleet
    table = base.settings.target.version_table
    if fleet.source == "schemas":
        return tenants.discover_schemas(conn, fleet.match, table)
    if fleet.source == "databases":
        return tenants.discover_databases(conn, fleet.match, table, connect)
    if fleet.source == "files":
        return tenants.discover_files(base.settings.base_dir, fleet.match, table)
    names = list(fleet.names) if fleet.source == "list" else tenants.query_names(conn, fleet.query)
    names = sorted({n for n in names if rules.matches(n, fleet.match)})
    for name in names:
        if problem := rules.check_tenant_name(name):
            raise ConfigError(f"[fleet] {fleet.source}: tenant {name!r}: {problem}")
    if kind == "files":
        return [_one_file(base, name, table) for name in names]
    return tenants.read_versions(conn, names, table, kind, connect)


def _one_file(base: TargetHandle, name: str, table: str) -> TenantVersions:
    found = tenants.discover_files(base.settings.base_dir, name, table)
    return found[0] if found else TenantVersions(name, None, f"file {name!r} does not exist")


def read_tenant_flags(
    base: TargetHandle, conn: sa.engine.Connection, also: tuple[str, ...] = ()
) -> TenantFlags:
    """The shared journal's blocked / failures / suspended flags of every tenant, and the keys
    `also` (the fleet's own), in one query: {flag kind: {tenant: value}}. Empty when the journal
    does not exist yet."""
    if not journal_seen(base, conn):
        return {}
    jt = base.journal
    where = sa.or_(*(jt.flags.c.key.like(f"{kind}/%") for kind in _TENANT_FLAGS), jt.flags.c.key.in_(also))
    try:
        rows = conn.execute(sa.select(jt.flags.c.key, jt.flags.c.value).where(where)).fetchall()
    except sa.exc.DBAPIError:
        if conn.in_transaction():  # PostgreSQL: the failed statement ended the transaction
            conn.rollback()
        return {}
    return flags_by_kind((str(key), str(value)) for key, value in rows)


def flags_by_kind(rows: Iterable[tuple[str, str]]) -> TenantFlags:
    """Flag rows (`kind/tenant`, value) as {kind: {tenant: value}}, every tenant kind present."""
    out: TenantFlags = {kind: {} for kind in _TENANT_FLAGS}
    for key, value in rows:
        kind, _, tenant = key.partition("/")
        out.setdefault(kind, {})[tenant] = value
    return out


def own_flag_keys(target: str) -> list[str]:
    """The keys `tenant_state` reads of one tenant, in the tenant's own journal."""
    return [flags.blocked_key(target), flags.failures_key(target), flags.suspended_key(target)]


def fleet_flags(base: TargetHandle, conn: sa.engine.Connection, heads: tuple[str, ...]) -> tuple[bool, int]:
    """(suspended, lifted wave index) of the fleet, from the base target's journal. A lift
    holds for the rollout it was given in (the same repo heads), not for the next one."""
    if not journal_seen(base, conn):
        return False, -1
    name = base.target_name
    found = flags.read(conn, base.journal, [flags.suspended_key(name), lifted_key(name)])
    return _fleet_flags(found, name, heads)


def _fleet_flags(found: Mapping[str, str], name: str, heads: tuple[str, ...]) -> tuple[bool, int]:
    index, _, lifted_heads = found.get(lifted_key(name), "-1").partition(" ")
    lifted = int(index) if index.lstrip("-").isdigit() and lifted_heads == ",".join(heads) else -1
    return flags.suspended_key(name) in found, lifted


def lift_value(wave: int, heads: tuple[str, ...]) -> str:
    return f"{wave} {','.join(heads)}"


def lifted_key(fleet_name: str) -> str:
    return f"{FLEET_LIFTED}/{fleet_name}"


def tenant_state(
    graph: RevisionGraph,
    found: TenantVersions,
    tenant_flags: Mapping[str, Mapping[str, str]],
    memory: FleetMemory,
) -> TenantState:
    """One tenant's state from its version rows, its journal flags and this replica's memory."""
    if found.error:
        return TenantState(found.name, "unknown", error=redact(found.error))
    heads = found.heads or ()
    decision = decide(DbSnapshot(True, found.heads is not None, frozenset(heads), False), graph)
    state = TenantState(found.name, decision.sync_state, tuple(sorted(heads)), len(decision.pending))
    if state.state == "in_sync":
        memory.failed.pop(found.name, None)
        return state
    if found.name in tenant_flags.get("suspended", {}):
        return TenantState(found.name, "suspended", state.db_heads, state.pending)
    for kind, label in (("blocked", "blocked"), ("failures", "failed")):
        failure = Failure.loads(tenant_flags.get(kind, {}).get(found.name))
        if failure is not None:
            return TenantState(
                found.name, label, state.db_heads, state.pending, failure.revision, redact(failure.message)
            )
    # a failure this replica saw holds while its revision is still pending (the run that failed
    # knows the revision, not the tenant's heads; a failure without one: while the heads stand)
    remembered = memory.failed.get(found.name)
    if remembered is not None and (
        remembered.revision in decision.pending
        if remembered.revision
        else remembered.db_heads == state.db_heads
    ):
        return TenantState(
            found.name, remembered.state, state.db_heads, state.pending, remembered.revision, remembered.error
        )
    return state


def fleet_status(
    base: TargetHandle,
    graph: RevisionGraph,
    kind: str,
    memory: FleetMemory,
    connect: Connect,
    own_flags: OwnFlags | None = None,
) -> FleetStatus:
    """The fleet read (see the module docstring). `own_flags` None: a database or file fleet's
    tenant journals are not read (this replica's memory stands for them)."""
    settings = base.settings.fleet
    with connection.connect(base.engine) as conn:
        found = list_tenants(base, conn, kind, connect)
        heads = tuple(sorted(graph.heads))
        if kind == "schemas":  # the fleet's flags come with the tenants': two statements in all
            tenant_flags = read_tenant_flags(base, conn, also=(lifted_key(base.target_name),))
            fleet_keys = {f"{k}/{t}": v for k, by in tenant_flags.items() for t, v in by.items()}
            suspended, lifted = _fleet_flags(fleet_keys, base.target_name, heads)
        else:
            tenant_flags = {}
            suspended, lifted = fleet_flags(base, conn, heads)
    if own_flags is not None and kind != "schemas":
        tenant_flags = own_flags([t.name for t in found if not t.error and not _at(t, graph)])
    states = tuple(tenant_state(graph, item, tenant_flags, memory) for item in found)
    waves = rules.parse_waves(settings.waves)
    wave = rules.decide_wave({t.name: t.state for t in states}, waves, settings.halt_after, lifted)
    return FleetStatus(states, wave, tuple(sorted(graph.heads)), suspended, settings.source)


def _at(found: TenantVersions, graph: RevisionGraph) -> bool:
    """The tenant's rows are the repository's heads: nothing its journal says changes its state."""
    return found.heads is not None and frozenset(found.heads) == frozenset(graph.heads)


@contextmanager
def database_connection(base: TargetHandle, database: str) -> Iterator[sa.engine.Connection]:
    """A short connection to another database of the base target's server (a tenant's)."""
    url = base.engine.url.set(database=database).render_as_string(hide_password=False)
    engine = connection.make_engine(url, base.target_name, base.settings.apply.connect_timeout, pooled=False)
    try:
        with connection.connect(engine) as conn:
            yield conn
    finally:
        engine.dispose()
