"""One reconcile of one target: read → decide → lock → re-read → apply → verify → record.

`Reconciler` is reusable across runs (the daemon keeps one per target): it keeps one pooled
connection and the revision graph in memory, so a run that finds the database in sync costs one
query and takes no lock. Applying happens one revision per step, each journaled before it starts
and after it ends, in a worker subprocess that runs the project's env.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from reconciler import logs, sessions
from reconciler.config.load import chain_settings
from reconciler.control import guard
from reconciler.control.workers import start_headers_worker
from reconciler.core import checksums, failures, safety
from reconciler.core import drift as drift_rules
from reconciler.core.backoff import backoff
from reconciler.core.graph import RevisionGraph
from reconciler.core.state import CONDITIONS, DbSnapshot, Decision, decide
from reconciler.db import affinity, connection, flags, journal, locks, placement, roles
from reconciler.db.journal import JournalTables
from reconciler.db.placement import Place as JournalPlace
from reconciler.errors import (
    Blocked,
    LockTimeout,
    ReconcilerError,
    Refused,
    RetryDeferred,
    RevisionFailed,
    StateError,
    Suspended,
    UnreachableError,
    WaitTimeout,
)
from reconciler.project.repository import Project
from reconciler.redact import redact
from reconciler.settings import MAIN_CHAIN, Settings

if TYPE_CHECKING:
    from reconciler.control.workers import Worker, WorkerJob

log = logs.get("reconciler.reconcile")

APPLICABLE = ("behind", "uninitialized_empty")
CONDITION_ORDER = CONDITIONS
# The worst first: the overall sync state of several chains is the first one of them in this list.
SYNC_SEVERITY = (
    "unknown",
    "diverged",
    "multiple_heads",
    "ahead",
    "uninitialized_with_tables",
    "behind",
    "uninitialized_empty",
    "in_sync",
)

ProgressFn = Callable[[int, int, str, str], None]
T = TypeVar("T")
# A revision that hit our DDL lock timeout is retried with backoff, never counted toward
# `blocked` (PostgreSQL lock_not_available; MySQL / MariaDB ER_LOCK_WAIT_TIMEOUT).
LOCK_TIMEOUT_CODES = frozenset({"55P03", "1205"})
CONDITIONS_TTL = 10.0  # seconds the in-sync fast path may reuse the flags it read last
_SESSION_ID_SQL = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


@dataclass(frozen=True)
class Conditions:
    """What the journal says beside the version table: dirty steps, fleet flags, checksums."""

    names: tuple[str, ...] = ()
    dirty: tuple[str, ...] = ()
    blocked: failures.Failure | None = None
    messages: dict[str, str] = field(default_factory=dict)
    read_at: float = 0.0
    drift: drift_rules.DriftReport | None = None
    audit: checksums.Audit = field(default_factory=checksums.Audit)
    baseline: bool = False  # hashes were recorded once: an unrecorded applied revision is foreign
    inputs: tuple[object, ...] = ()  # (db heads, graph fingerprint) they were read for
    settle: tuple[str, ...] = ()  # interrupted, not dirty: settled under a one-try lock


@dataclass(frozen=True)
class Status:
    target: str
    url: str
    decision: Decision
    conditions: tuple[str, ...] = ()
    dirty: tuple[str, ...] = ()
    messages: dict[str, str] = field(default_factory=dict)
    blocked: failures.Failure | None = None
    drift: drift_rules.DriftReport | None = None  # the fleet's last drift compare, when enabled
    audit: checksums.Audit = field(default_factory=checksums.Audit)
    baseline: bool = False
    guard: dict[str, Any] | None = None  # the guard's last analysis of these pending revisions
    chain: str = ""  # "" for [target]'s own migrations directory, else a [[target.chains]] name
    version_table: str = ""
    chains: tuple[Status, ...] = ()  # the statuses of the other chains, in config order
    settle: tuple[str, ...] = ()  # interrupted steps that are not dirty (see Conditions)

    @property
    def every_chain(self) -> tuple[Status, ...]:
        return (self, *self.chains)

    @property
    def chain_name(self) -> str:
        return self.chain or MAIN_CHAIN

    @property
    def foreign(self) -> tuple[str, ...]:
        """Applied revisions without a journal row, after hashes were first recorded."""
        own = self.audit.unrecorded if self.baseline else ()
        return tuple(dict.fromkeys((*own, *(r for c in self.chains for r in c.foreign))))

    @property
    def needs_recording(self) -> bool:
        """Hashes to record under the lock, or the checksum baseline still to set."""
        own = bool(self.audit.unrecorded or self.audit.sealed) or not self.baseline
        return own or any(c.needs_recording for c in self.chains)

    @property
    def sync_state(self) -> str:
        """The worst sync state of every chain (the only one's, with a single chain)."""
        return self._worst_chain().decision.sync_state

    def _worst_chain(self) -> Status:
        states = [c.decision.sync_state for c in self.every_chain]
        worst = min(states, key=lambda s: SYNC_SEVERITY.index(s) if s in SYNC_SEVERITY else 0)
        return self.every_chain[states.index(worst)]

    @property
    def pending(self) -> tuple[str, ...]:
        """The revisions to apply, every chain's, in the order apply takes them."""
        return tuple(r for c in self.every_chain for r in c.decision.pending)

    @property
    def state(self) -> str:
        worst = [c for c in CONDITION_ORDER if c in self.conditions]
        return worst[0] if worst else self.sync_state

    @property
    def message(self) -> str:
        for condition in CONDITION_ORDER:
            if condition in self.conditions and condition in self.messages:
                return self.messages[condition]
        worst = self._worst_chain()
        if worst is self:
            return self.decision.message
        return f"chain {worst.chain_name}: {worst.decision.message}"

    def chain_dict(self) -> dict[str, Any]:
        """This chain alone: what `status --json` lists under `chains`."""
        own = [c for c in CONDITION_ORDER if c in self.conditions]
        return {
            "chain": self.chain_name,
            "version_table": self.version_table,
            "state": own[0] if own else self.decision.sync_state,
            "sync_state": self.decision.sync_state,
            "conditions": own,
            "db_heads": sorted(self.decision.db_heads),
            "repo_heads": sorted(self.decision.repo_heads),
            "pending": list(self.decision.pending),
            "message": self.messages.get(own[0], self.decision.message) if own else self.decision.message,
        }

    def as_dict(self, graph: RevisionGraph | None = None) -> dict[str, Any]:
        pending = list(self.pending)
        out: dict[str, Any] = {
            "target": self.target,
            "url": self.url,
            "state": self.state,
            "sync_state": self.sync_state,
            "conditions": list(self.conditions),
            "db_heads": sorted(self.decision.db_heads),
            "repo_heads": sorted(self.decision.repo_heads),
            "pending": pending,
            "unknown": list(self.decision.unknown),
            "message": self.message,
        }
        if self.decision.fork:
            out["fork"] = list(self.decision.fork)
            out["branch_point"] = self.decision.branch_point
        if self.dirty:
            out["dirty"] = list(self.dirty)
        if self.blocked:
            out["blocked"] = {
                "revision": self.blocked.revision,
                "failures": self.blocked.count,
                "error_class": self.blocked.error_class,
                "signature": self.blocked.signature,
            }
        if self.drift:
            out["drift"] = self.drift.as_dict()
        if self.audit.mismatches:
            out["checksum_mismatch"] = [m.as_dict() for m in self.audit.mismatches]
        if self.foreign:
            out["foreign_writes"] = list(self.foreign)
        if self.guard:
            out["guard"] = self.guard
        if self.chains:  # several chains: each one's state (the top-level heads are [target]'s)
            out["chains"] = [c.chain_dict() for c in self.every_chain]
        return out


def with_chains(main: Status, others: tuple[Status, ...]) -> Status:
    """[target]'s status with the other chains': conditions and messages of them all (a chain's
    message says its name), so refusals, `wait` and the overall state see every chain."""
    if not others:
        return main
    every = (main, *others)
    names = tuple(c for c in CONDITION_ORDER if any(c in s.conditions for s in every))
    messages: dict[str, str] = {}
    for one in every:
        for key, text in one.messages.items():
            messages.setdefault(key, text if one is main else f"chain {one.chain_name}: {text}")
    dirty = tuple(dict.fromkeys(r for s in every for r in s.dirty))
    blocked = next((s.blocked for s in every if s.blocked), None)
    settle = tuple(dict.fromkeys(r for s in every for r in s.settle))
    return dataclasses.replace(
        main, conditions=names, messages=messages, dirty=dirty, blocked=blocked, chains=others, settle=settle
    )


@dataclass(frozen=True)
class Progress:
    """The revision an apply in progress is running: `n` of `total` in this run."""

    revision: str
    message: str
    n: int
    total: int
    started_at: float  # wall-clock seconds, when this revision began
    run_started_at: float  # when the run's first revision began
    plan: Status | None = None  # what the run read under the lock before its first revision

    def as_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "message": self.message,
            "n": self.n,
            "total": self.total,
            "started_at": _iso_utc(self.started_at),
            "run_started_at": _iso_utc(self.run_started_at),
        }

    @property
    def remaining(self) -> tuple[str, ...]:
        """The plan's pending revisions not applied yet in this run (the current one first)."""
        pending = self.plan.pending if self.plan is not None else (self.revision,)
        done = set(pending[: self.n - 1])
        return tuple(r for r in pending if r not in done)


def _iso_utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


@dataclass(frozen=True)
class ApplyResult:
    outcome: str  # noop | applied
    applied: tuple[tuple[str, float], ...]
    status: Status
    lock_wait: float = 0.0
    duration: float = 0.0
    foreign: tuple[str, ...] = ()  # revisions found applied by something else in this run


class Reconciler:
    """The control plane for one target."""

    def __init__(
        self,
        settings: Settings,
        on_worker_log: Callable[[str], None] | None = None,
        chain: str = "",
        parent: Reconciler | None = None,
    ):
        self.settings = settings
        self.chain = chain  # "" for [target]'s own directory; else a [[target.chains]] name
        self._parent = parent  # the main chain's reconciler: its engine, its lock
        self.project = Project(settings, start_worker=start_headers_worker)
        # Where the journal lives (placement.Place): one place per database, shared by its chains.
        self._place: JournalPlace = (
            parent._place
            if parent
            else placement.Place(
                settings.journal.table,
                settings.target.url,
                settings.journal.placement,
                settings.journal.schema,
                settings.target.version_table_schema or None,
            )
        )
        self._engine: sa.engine.Engine | None = None
        self._lock_engine: sa.engine.Engine | None = None
        self._probe_engine: sa.engine.Engine | None = None  # the affinity proof's second client
        self._on_worker_log = on_worker_log or _log_worker_line
        self._conditions: Conditions | None = None
        self._decided: tuple[object, Decision] | None = None  # the last decision, by its inputs
        self.current_worker: Worker | None = None  # the worker of an apply in progress
        self.applying: Progress | None = None  # the revision an apply in progress is running
        # What an apply in progress works from: its first look, then what it read under the lock.
        self.plan: Status | None = None
        self.on_plan: Callable[[Status], None] | None = None  # told when `plan` is set (the daemon)
        self._lent: Worker | None = None
        self._journal_seen = False
        self._foreign: list[str] = []
        self._mismatch_logged: tuple[checksums.Mismatch, ...] = ()
        self.check_files = True  # stat the revision files each run (the daemon turns it off while it watches)
        self.guard = True  # the destructive-change guard ([safety]); dev mode has its own
        # The fleet's retry gate (failures.retry_deferred): daemon ticks honour it, a person's
        # `reconciler apply` runs the revision when asked (the daemon turns it on).
        self.retry_gate = False
        self._refusal: tuple[tuple[str, tuple[str, ...]], str] | None = None  # (graph, pending), message
        self._guard_info: tuple[tuple[str, tuple[str, ...]], dict[str, Any]] | None = None
        self._announcement: str | None = None  # the lock holder's note, until the journal exists
        # The other chains of the database ([[target.chains]]): reconciled under our lock, after us.
        self.extra: tuple[Reconciler, ...] = (
            ()
            if parent
            else tuple(
                Reconciler(chain_settings(settings, c), on_worker_log, chain=c.name, parent=self)
                for c in settings.chains
            )
        )
        main = parent.settings if parent else settings
        tables = (main.target.version_table, *(c.version_table for c in main.chains))
        self._other_version_tables = tuple(t for t in tables if t != settings.target.version_table)

    # --- connections -------------------------------------------------------------------------
    @property
    def target(self) -> str:
        return self.settings.target.name

    @property
    def journal_target(self) -> str:
        """The journal's `target` for this chain's rows and flags: the target's name, and for
        another chain `<target>/<chain>` (so its hashes, failures and blocks are its own)."""
        return f"{self.target}/{self.chain}"[:64] if self.chain else self.target

    def journal_targets(self) -> tuple[str, ...]:
        """Every chain's journal target, [target]'s first."""
        return (self.journal_target, *(c.journal_target for c in self.extra))

    def _row_target(self) -> str | None:
        """Which journal rows are this chain's: all of them with a single chain (as always)."""
        return self.journal_target if self.chain or self.extra else None

    @property
    def engine(self) -> sa.engine.Engine:
        if self._parent is not None:
            return self._parent.engine  # one database, one pooled connection
        if self._engine is None:
            attachment = self._place.attachment
            self._engine = connection.make_engine(
                self.settings.target.url,
                self.target,
                self.settings.apply.connect_timeout,
                on_connect=attachment.attach if attachment else None,
            )
        return self._engine

    @property
    def journal(self) -> JournalTables:
        """The journal's tables, where `locate_journal` found them (before that: the side place)."""
        return self._place.tables

    def locate_journal(self, conn: sa.engine.Connection) -> JournalTables:
        """Find the journal (once per process): its side place, or the target's schema while the
        previous release's tables are still there."""
        return self._place.locate(conn)

    def journal_exists(self, conn: sa.engine.Connection) -> bool:
        self.locate_journal(conn)
        return self._journal_exists(conn)

    @property
    def backend(self) -> str:
        return connection.backend_of(self.engine)

    @property
    def redacted_url(self) -> str:
        return redact(self.engine.url.render_as_string(hide_password=True))

    def release(self) -> None:
        """Close every pooled connection, keeping the engines: the next run connects anew but,
        its dialect already initialised, sends none of SQLAlchemy's first-connect queries."""
        self.project.close_worker()
        for chain in self.extra:
            chain.release()
        for engine in (self._engine, self._lock_engine, self._probe_engine):
            if engine is not None:
                engine.dispose()

    def close(self) -> None:
        self.project.close_worker()
        for chain in self.extra:
            chain.close()
        for engine in (self._engine, self._lock_engine, self._probe_engine):
            if engine is not None:
                engine.dispose()
        self._engine = self._lock_engine = self._probe_engine = None

    # --- reading -----------------------------------------------------------------------------
    def graph(self) -> RevisionGraph:
        return self.project.graph(check=self.check_files)

    def status(self) -> Status:
        """The state of the target; `unknown` (not an exception) when the database is unreachable."""
        graph = self.graph()
        missing = self.missing_database_file()
        if missing is not None:
            return self._status_of_missing_file(graph, missing)
        try:
            return self._retrying(lambda: self._read_status(graph))
        except UnreachableError as exc:
            decision = decide(connection.unreachable_snapshot(), graph)
            return Status(self.target, self.redacted_url, dataclasses.replace(decision, message=str(exc)))

    def missing_database_file(self) -> Path | None:
        """A SQLite target whose file does not exist yet, in a folder that does. Reading must not
        connect to it: sqlite3 creates a missing file on connect, and a `status` would leave an
        empty database behind (in the wrong folder, if the path was wrong). `apply` creates it.
        A missing folder is no such case: connecting fails there (`unknown`), creating nothing."""
        path = self._sqlite_path()
        if path is None or path.exists() or not path.parent.is_dir():
            return None
        return path

    def _status_of_missing_file(self, graph: RevisionGraph, path: Path) -> Status:
        """Every chain as on an empty database (all pending), saying the file does not exist. The
        guard has nothing to refuse there (nothing can be lost), so no worker is started for it."""
        empty = DbSnapshot(
            reachable=True, version_table_exists=False, db_heads=frozenset(), has_user_tables=False
        )
        note = f"; the database file {path} does not exist yet (`reconciler apply` creates it)"
        nothing = guard.summary(guard.Analysis((), "built-in"), self.settings)

        def one(rec: Reconciler, chain_graph: RevisionGraph) -> Status:
            decision = decide(empty, chain_graph)
            decision = dataclasses.replace(decision, message=decision.message + note)
            return Status(
                rec.target,
                rec.redacted_url,
                decision,
                chain=rec.chain,
                version_table=rec.settings.target.version_table,
                guard=nothing if decision.pending else None,
            )

        return with_chains(one(self, graph), tuple(one(c, c.graph()) for c in self.extra))

    def _read_status(self, graph: RevisionGraph) -> Status:
        with connection.connect(self.engine) as conn:
            return self._status_all(conn, graph)

    def _status_all(self, conn: sa.engine.Connection, graph: RevisionGraph, fresh: bool = True) -> Status:
        """Every chain's status, [target]'s carrying the others' (see `with_chains`)."""
        main = self._status(conn, graph, fresh)
        return with_chains(main, tuple(c._status(conn, c.graph(), fresh) for c in self.extra))

    def _retrying(self, read: Callable[[], T]) -> T:
        """Run `read`; once more if the pooled connection turned out dead (server restart, idle
        timeout): a stale connection is not an unreachable database."""
        try:
            return read()
        except UnreachableError:
            if self._engine is None:
                raise
            self._engine.dispose()
            return read()

    def _status(self, conn: sa.engine.Connection, graph: RevisionGraph, fresh: bool = True) -> Status:
        """Read and decide. With `fresh` False and the database in sync, one query: the journal's
        flags are reused for up to CONDITIONS_TTL seconds (nothing would be applied anyway)."""
        schema = self.settings.target.version_table_schema or None
        try:
            self.locate_journal(conn)
            snap = connection.snapshot(
                conn,
                self.settings.target.version_table,
                schema,
                (*self.journal.names, *self._other_version_tables),
            )
            if self.chain and not snap.version_table_exists:
                # Another chain's tables are no reason to adopt: this chain starts from base.
                snap = dataclasses.replace(snap, has_user_tables=False)
            ancestry = self._ancestry(conn, snap.db_heads, graph)
            decision = self._decide(snap, graph, ancestry)
            inputs = (snap.db_heads, graph.fingerprint)
            cached = self._conditions
            if (
                fresh
                or decision.sync_state != "in_sync"
                or cached is None
                or (cached.inputs != inputs or time.monotonic() - cached.read_at > CONDITIONS_TTL)
            ):
                cached = self._conditions = self._read_conditions(conn, graph, inputs, ancestry)
        except sa.exc.DBAPIError as exc:
            if connection.is_disconnect(exc):
                raise connection.unreachable(self.engine, exc) from None
            raise
        names, messages = cached.names, cached.messages
        refusal = self._refusal_for(graph, decision.pending)
        if refusal:
            names, messages = (*names, "destructive_pending"), {**messages, "destructive_pending": refusal}
        return Status(
            self.target,
            self.redacted_url,
            decision,
            names,
            cached.dirty,
            messages,
            cached.blocked,
            cached.drift,
            cached.audit,
            cached.baseline,
            self._guard_for(graph, decision.pending),
            self.chain,
            self.settings.target.version_table,
            settle=cached.settle,
        )

    def _guard_for(self, graph: RevisionGraph, pending: tuple[str, ...]) -> dict[str, Any] | None:
        """The guard's last analysis, while the same revision files are pending."""
        if self._guard_info is None or not pending:
            return None
        key, info = self._guard_info
        return info if key == (graph.fingerprint, pending) else None

    def _refusal_for(self, graph: RevisionGraph, pending: tuple[str, ...]) -> str | None:
        """The guard's last refusal, while the same revision files are pending."""
        if self._refusal is None or not pending:
            return None
        key, message = self._refusal
        return message if key == (graph.fingerprint, pending) else None

    def check_pending(
        self, worker: Worker, graph: RevisionGraph, pending: tuple[str, ...], empty: bool = False
    ) -> guard.Analysis:
        """Analyse the pending revisions (`empty`: from an empty database); remember what would
        refuse them (the `destructive_pending` condition)."""
        analysis = guard.analyse(worker, graph, pending, self.backend, self.settings, empty)
        loss = guard.pending_refusals(analysis, self.settings)
        self._guard_info = ((graph.fingerprint, pending), guard.summary(analysis, self.settings))
        if loss:
            self._refusal = ((graph.fingerprint, pending), safety.refusal_message(self.target, loss))
        elif self._refusal and self._refusal[0] == (graph.fingerprint, pending):
            self._refusal = None
        return analysis

    def _decide(
        self, snap: DbSnapshot, graph: RevisionGraph, ancestry: dict[str, tuple[str, ...]]
    ) -> Decision:
        """`decide` is pure: the same inputs give the same decision, so the no-op tick reuses it."""
        key = (snap, graph.fingerprint, tuple(sorted(ancestry.items())))
        if self._decided is not None and self._decided[0] == key:
            return self._decided[1]
        decision = decide(snap, graph, ancestry)
        self._decided = (key, decision)
        return decision

    def _ancestry(
        self, conn: sa.engine.Connection, db_heads: frozenset[str], graph: RevisionGraph
    ) -> dict[str, tuple[str, ...]]:
        if all(head in graph.revisions for head in db_heads):
            return {}  # the common case: no journal query needed
        return journal.ancestry(conn, self.journal)

    def _read_conditions(
        self,
        conn: sa.engine.Connection,
        graph: RevisionGraph,
        inputs: tuple[frozenset[str], str],
        ancestry: dict[str, tuple[str, ...]],
    ) -> Conditions:
        if not self._journal_exists(conn):  # everything applied so far is seen for the first time
            audit = checksums.audit(graph, inputs[0], {}, ancestry)
            return Conditions(read_at=time.monotonic(), audit=audit, inputs=inputs)
        names: list[str] = []
        messages: dict[str, str] = {}
        applied = frozenset(graph.closure(h for h in inputs[0] if h in graph.revisions))
        dirty, reasons, settle = self._dirty(conn, applied)
        if dirty:
            names.append("dirty")
            messages["dirty"] = _dirty_message(dirty, reasons, applied)
        keys = [
            flags.suspended_key(self.target),
            flags.blocked_key(self.journal_target),
            flags.checksums_key(self.journal_target),
            drift_rules.flag_key(self.target),
        ]
        found = flags.read(conn, self.journal, keys)
        held = journal.recorded_hashes(conn, self.journal, self.journal_target)
        audit = checksums.audit(graph, inputs[0], held, ancestry)
        if audit.mismatches and "checksums" not in self.settings.unsafe:
            names.append("checksum_mismatch")
            messages["checksum_mismatch"] = _mismatch_message(audit.mismatches)
        blocked = failures.Failure.loads(found.get(keys[1]))
        if blocked and still_blocked(blocked, graph):
            names.append("blocked")
            messages["blocked"] = _blocked_message(blocked)
        else:
            blocked = None
        if keys[0] in found:
            names.append("suspended")
            messages["suspended"] = _suspended_message(found[keys[0]])
        report = self._drift_report(found.get(keys[3]))
        if report and report.drifted:
            names.append("drift")
            messages["drift"] = report.message()
        names.sort(key=CONDITION_ORDER.index)
        return Conditions(
            tuple(names),
            dirty,
            blocked,
            messages,
            time.monotonic(),
            report,
            audit,
            keys[2] in found,
            inputs,
            settle,
        )

    def _drift_report(self, value: str | None) -> drift_rules.DriftReport | None:
        if self.settings.drift.interval <= 0 or self.chain:
            return None  # one compare for the database, reported with [target]'s chain
        report = drift_rules.DriftReport.loads(value)
        return report.filtered(self.settings.drift.ignore) if report else None

    def forget_conditions(self) -> None:
        """The journal's flags changed: the next status reads them again."""
        self._conditions = None

    def _dirty(
        self, conn: sa.engine.Connection, applied: frozenset[str]
    ) -> tuple[tuple[str, ...], dict[str, str], tuple[str, ...]]:
        """(dirty revisions, why each left its transaction, interrupted revisions that are not
        dirty and can be settled under the lock): the journal's steps judged with the version
        table (`applied`), as `settle_interrupted` will judge them."""
        # one query for both kinds: this runs on every conditions read
        steps = journal.rows_with_outcome(conn, self.journal, ("dirty", "started"), self._row_target())
        rows = [r for r in steps if r["outcome"] == "dirty"]
        open_rows = [r for r in steps if r["outcome"] == "started"]
        if open_rows and self._lock_holder(conn) is not None:
            open_rows = []  # somebody is applying it now
        reasons = journal.marks(conn, self.journal, [r["id"] for r in (*rows, *open_rows)])
        unsafe = "dirty" in self.settings.unsafe
        settle: list[str] = []
        for row in open_rows:
            if journal.judge(row, applied, row["id"] in reasons, self.backend, unsafe) == "dirty":
                rows.append(row)
            else:
                settle.append(str(row["revision"]))
        why = {str(r["revision"]): reasons.get(r["id"], "") for r in rows}
        return tuple(dict.fromkeys(str(r["revision"]) for r in rows)), why, tuple(settle)

    def _journal_exists(self, conn: sa.engine.Connection) -> bool:
        if not self._journal_seen:
            try:
                self.locate_journal(conn)
                self._journal_seen = journal.exists(conn, self.journal)
            except sa.exc.DBAPIError:
                return False
        return self._journal_seen

    # --- locking -----------------------------------------------------------------------------
    def lock_key(self) -> locks.LockKey:
        if self._parent is not None:
            return self._parent.lock_key()  # every chain of the database under [target]'s lock
        url = self.engine.url
        database = url.database or ""
        return locks.lock_key(
            database,
            self.settings.target.version_table_schema or None,
            self.settings.target.version_table,
            self.settings.target.lock_key,
        )

    def _sqlite_path(self) -> Path | None:
        database = self.engine.url.database
        if self.backend == "sqlite" and database and database != ":memory:":
            return Path(database)
        return None

    def _lock_conn_engine(self) -> sa.engine.Engine:
        if not self.settings.target.lock_url:
            return self.engine
        if self._lock_engine is None:
            self._lock_engine = connection.make_engine(
                self.settings.target.lock_url,
                self.target,
                self.settings.apply.connect_timeout,
                role="lock",
            )
        return self._lock_engine

    def _lock_holder(self, conn: sa.engine.Connection) -> dict[str, object] | None:
        lock = locks.AdvisoryLock(conn, self.lock_key(), self._sqlite_path())
        try:
            return lock.holder()
        except sa.exc.DBAPIError:
            return None

    @contextmanager
    def locked(self, conn: sa.engine.Connection, timeout: float) -> Iterator[float]:
        """Hold the target's advisory lock (polling, never blocking); yields seconds waited."""
        unsafe = self.settings.unsafe
        if unsafe:
            log.warning("safeguards_disabled", target=self.target, disabled=sorted(unsafe))
        with ExitStack() as stack:
            engine = self._lock_conn_engine()
            lock_conn = conn if engine is self.engine else stack.enter_context(connection.connect(engine))
            lock = locks.AdvisoryLock(lock_conn, self.lock_key(), self._sqlite_path())
            stack.callback(lock.release)
            stack.callback(self._forget_announcement)
            started = time.monotonic()
            if lock.dialect == "postgresql" and "affinity" not in unsafe:
                self._prove_affinity(lock_conn, engine)
            if "lock" not in unsafe:
                self._acquire(conn, lock, timeout)
                self._announce_holder(conn, lock_conn)
            if self.backend == "postgresql" and "orphan_wait" not in unsafe:
                locks.wait_for_orphans(
                    conn,
                    sessions.apply_prefix(self.target),
                    self.settings.apply.orphan_wait_timeout,
                )
            yield time.monotonic() - started

    def _acquire(self, conn: sa.engine.Connection, lock: locks.AdvisoryLock, timeout: float) -> None:
        """Take the lock; a waiter names the holder's process (host, pid) when it announced itself."""

        def waiting(event: dict[str, Any]) -> None:
            holder = event.get("holder")
            if holder:
                holder.update(self._announced(conn, holder))
            log.info("lock_waiting", target=self.target, holder=holder)

        try:
            lock.acquire(timeout, on_wait=waiting)
        except LockTimeout as exc:
            announced = self._announced(conn, exc.holder) if exc.holder else {}
            if not announced:
                raise
            holder = {**exc.holder, **announced}
            raise LockTimeout(
                f"{exc} The holder is replica {announced['replica']} (pid {announced['replica_pid']} "
                f"on host {announced['replica_host']}).",
                holder=holder,
            ) from None

    def _announce_holder(self, conn: sa.engine.Connection, lock_conn: sa.engine.Connection) -> None:
        """Record, under the lock, which process and database session hold it: MariaDB's holder
        report has no pid, and PostgreSQL's names the backend, not our process. Into an existing
        journal at once; else when `ensure_journal` creates it (nothing is created before then)."""
        sql = _SESSION_ID_SQL.get(self.backend)
        if sql is None:
            return  # SQLite: the lock file already says pid and host
        session = lock_conn.execute(sa.text(sql)).scalar()
        if lock_conn.in_transaction():
            lock_conn.commit()
        replica = sessions.replica_id()
        value = {
            "replica": replica,
            "replica_host": replica.rsplit(":", 1)[0],
            "replica_pid": os.getpid(),
            "session": int(session or 0),
        }
        self._announcement = json.dumps(value)
        if self._journal_exists(conn):
            self._announce(conn)

    def _announce(self, conn: sa.engine.Connection) -> None:
        if self._announcement is not None:
            flags.put(conn, self.journal, flags.holder_key(self.target), self._announcement)
            self._announcement = None

    def _forget_announcement(self) -> None:
        self._announcement = None

    def ensure_journal(self, conn: sa.engine.Connection) -> None:
        """Create the journal tables if missing, and announce the lock holder there (under the
        lock). Called only once what is about to be written was validated: a command that ends
        in a configuration error (exit 2) leaves the database as it found it."""
        self._place.ensure(conn)
        self._journal_seen = True
        self._announce(conn)

    def _announced(self, conn: sa.engine.Connection, holder: dict[str, object]) -> dict[str, object]:
        """The announcement of the process behind `holder`'s session, if it made one."""
        try:
            text = flags.read(conn, self.journal, [flags.holder_key(self.target)]).get(
                flags.holder_key(self.target)
            )
            value = json.loads(text) if text else {}
        except (ValueError, sa.exc.DBAPIError):
            return {}
        session = holder.get("connection_id", holder.get("pid"))
        if not isinstance(value, dict) or session is None or value.get("session") != session:
            return {}  # stale: another session holds it now
        return {k: value[k] for k in ("replica", "replica_host", "replica_pid") if k in value}

    def _prove_affinity(self, lock_conn: sa.engine.Connection, engine: sa.engine.Engine) -> None:
        """Invariant 5: a session lock is trusted only on a provably private server session."""
        where = redact(engine.url.render_as_string(hide_password=True))
        affinity.require(
            lock_conn,
            lambda: connection.connect(self._prober(engine)),
            where,
            bool(self.settings.target.lock_url),
        )

    def _prober(self, engine: sa.engine.Engine) -> sa.engine.Engine:
        """An unpooled engine to `engine`'s URL: each probe is a new client and is closed after.
        (A pooled one would keep a session-mode pooler's server connection that the worker then
        lacks; an invalidated pooled one takes the pool's slot, so the next run reconnects.)"""
        if self._probe_engine is None:
            self._probe_engine = connection.make_engine(
                engine.url.render_as_string(hide_password=False),
                self.target,
                self.settings.apply.connect_timeout,
                pooled=False,
            )
        return self._probe_engine

    # --- applying ----------------------------------------------------------------------------
    def apply(
        self,
        trigger: str = "apply",
        progress: ProgressFn | None = None,
        fast: bool = False,
        lock_timeout: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> ApplyResult:
        """Bring the database to the repository's heads, or raise saying why not.

        `fast` lets an in-sync run reuse recent journal flags (the daemon's no-op: one query);
        `should_stop` is asked before each revision (graceful shutdown)."""
        started = time.monotonic()
        self._foreign = []
        graph = self.graph()
        status = self._retrying(lambda: self._first_look(graph, fast))
        self._refuse(status)
        if status.sync_state == "in_sync" and status.settle:
            status = self._settle_once(graph, status)
        if status.sync_state == "in_sync" and not status.needs_recording:
            self.project.close_worker()  # nothing to apply: a worker kept from the headers goes
            return self._finish("noop", (), status, 0.0, started)
        if self.guard and "destructive_pending" in status.conditions:
            raise Refused(status.messages["destructive_pending"])  # nothing changed since it was refused
        timeout = self.settings.apply.lock_acquire_timeout if lock_timeout is None else lock_timeout
        self._set_plan(status)  # until the lock's re-read: the lock wait and the worker's start show it
        try:
            with connection.connect(self.engine) as conn, self.locked(conn, timeout) as waited:
                return self.apply_locked(conn, graph, trigger, progress, should_stop, waited, started)
        finally:
            self.plan = None

    def _settle_once(self, graph: RevisionGraph, status: Status) -> Status:
        """In sync with an interrupted step that is not dirty (its revision committed before the
        step was recorded): record it under a one-try lock, so that no later run is held up by
        it; a busy lock means its holder settles it. The fresh status afterwards."""
        try:
            with connection.connect(self.engine) as conn, self.locked(conn, 0.0):
                for chain in (self, *self.extra):
                    chain._settled_status(conn, graph if chain is self else chain.graph())
        except LockTimeout:
            return status
        self.forget_conditions()
        for chain in self.extra:
            chain.forget_conditions()
        return self._first_look(graph, False)

    def apply_locked(
        self,
        conn: sa.engine.Connection,
        graph: RevisionGraph,
        trigger: str = "apply",
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
        waited: float = 0.0,
        started: float | None = None,
    ) -> ApplyResult:
        """`apply`'s work under the lock, for a caller that holds it on `conn` (`locked`): the
        state is read again there, so what another applier did meanwhile counts. Every chain
        of the database, in config order; each one's worker is started and checked before
        anything is written for any of them."""
        started = time.monotonic() if started is None else started
        chains = (self, *self.extra)
        results: list[tuple[str, tuple[tuple[str, float], ...], Status]] = []
        with ExitStack() as stack:
            plans = []
            for chain in chains:
                chain._foreign = []
                chain.guard = self.guard  # its files are stat'ed each run: nothing watches them
                chain_graph = graph if chain is self else chain.graph()
                before = chain._settled_status(conn, chain_graph)
                chain._defer_unless_due(conn, chain_graph, before)
                worker = stack.enter_context(chain._validated(conn, before))
                plans.append((chain, chain_graph, before, worker))
            for chain, chain_graph, before, worker in plans:
                results.append(
                    chain._apply_chain(conn, chain_graph, before, worker, trigger, progress, should_stop)
                )
        if not self.extra:
            outcome, applied, final = results[0]
            return self._finish(outcome, applied, final, waited, started)
        self._foreign = [rev for chain in chains for rev in chain._foreign]
        outcome = "applied" if any(r[0] == "applied" for r in results) else "noop"
        applied = tuple(step for r in results for step in r[1])
        return self._finish(outcome, applied, self._status_all(conn, graph), waited, started)

    def _apply_chain(
        self,
        conn: sa.engine.Connection,
        graph: RevisionGraph,
        before: Status,
        worker: Worker | None,
        trigger: str,
        progress: ProgressFn | None,
        should_stop: Callable[[], bool] | None,
    ) -> tuple[str, tuple[tuple[str, float], ...], Status]:
        """This chain's part of `apply_locked`: (outcome, revisions we applied, its status)."""
        # Why here: the worker and env.py's connection were checked; writing starts.
        self.ensure_journal(conn)
        # env.py ran in the worker: an app factory may have migrated the database meanwhile.
        status = before if worker is None else self._status(conn, graph)
        during = _applied(graph, status) - _applied(graph, before)
        if self._record_hashes(conn, graph, status, during):
            status = self._status(conn, graph)
        self._refuse(status)
        if status.sync_state == "in_sync" or worker is None:  # another replica did the work
            return ("applied" if during else "noop"), (), status  # "applied": moved, not by us
        steps = self._apply_counted(conn, worker, graph, status, trigger, progress, should_stop)
        final = self._status(conn, graph)
        if len(steps) == len(status.decision.pending):
            verify(final)
        # A step Alembic found already done (an app factory upgrading inside the worker) was
        # journaled `skipped`: it is the other writer's, never counted as applied by us.
        ours = tuple(step for step in steps if step[0] not in self._foreign)
        return "applied", ours, final

    def _refuse(self, status: Status) -> None:
        """`refuse_unless_applicable`, saying `checksum_mismatch` once per distinct mismatch."""
        found = status.audit.mismatches if "checksum_mismatch" in status.conditions else ()
        if found and found != self._mismatch_logged:
            log.error(
                "checksum_mismatch",
                target=self.target,
                revisions=[m.as_dict() for m in found],
                hint="review the change, then `reconciler accept REV` (or --all)",
            )
        self._mismatch_logged = found
        refuse_unless_applicable(status)

    def _record_hashes(
        self,
        conn: sa.engine.Connection,
        graph: RevisionGraph,
        status: Status,
        during: frozenset[str] = frozenset(),
    ) -> bool:
        """Under the lock: record the hashes of applied revisions we hold none for (first sight,
        or a foreign writer's: after the baseline, or applied `during` this run) and of sealed
        drafts. True when something was recorded."""
        audit = status.audit
        foreign = [r for r in audit.unrecorded if status.baseline or r in during]
        for rev in (*audit.unrecorded, *audit.sealed):
            revision = graph.revisions[rev]
            trigger = "seal" if rev in audit.sealed else "foreign" if rev in foreign else "first_sight"
            journal.record_hash(
                conn,
                self.journal,
                target=self.journal_target,
                operation=journal.RECORD,
                revision=rev,
                file_hash=revision.file_hash,
                down_revisions=revision.down_revisions,
                trigger=trigger,
            )
        if audit.sealed:
            log.info("checksum_recorded_after_seal", target=self.target, revisions=list(audit.sealed))
        if foreign:
            self._foreign.extend(foreign)
            log.warning(
                "foreign_writer",
                target=self.target,
                revisions=foreign,
                hint="applied without reconciler (an app upgrading itself at start-up?): "
                "switch that off, or take our lock with reconciler.hooks.migration_lock",
            )
        first_sight = [r for r in audit.unrecorded if r not in foreign]
        if first_sight:
            log.info(
                "checksum_recorded_first_sight",
                target=self.target,
                revisions=first_sight,
                detail="applied before the journal recorded hashes; trusted as they are now",
            )
        if not status.baseline:
            flags.put(conn, self.journal, flags.checksums_key(self.journal_target), journal.now_iso())
        self._conditions = None
        return status.needs_recording

    @contextmanager
    def _validated(self, conn: sa.engine.Connection, status: Status) -> Iterator[Worker | None]:
        """The worker that will apply `status`'s pending revisions, once everything that can
        refuse as a configuration error (exit 2) was checked: the role, the worker's start, the
        models, env.py's connection and version table (a run of env.py that applies and creates
        nothing). None when nothing is to be applied (or a refusal follows anyway). The guard
        comes later: its refusal is no configuration error, and is claimed in the journal."""
        try:
            refuse_unless_applicable(status)
        except ReconcilerError:
            yield None
            return
        if status.sync_state not in APPLICABLE:
            yield None
            return
        lent = self._lent is not None  # dev mode's worker already ran env.py for its generation
        with self.start_worker(conn) as worker:
            if not lent:
                worker.probe()
            yield worker

    def _first_look(self, graph: RevisionGraph, fast: bool) -> Status:
        with connection.connect(self.engine) as conn:
            return self._status_all(conn, graph, fresh=not fast)

    def _apply_counted(
        self,
        conn: sa.engine.Connection,
        worker: Worker,
        graph: RevisionGraph,
        status: Status,
        trigger: str,
        progress: ProgressFn | None,
        should_stop: Callable[[], bool] | None,
    ) -> tuple[tuple[str, float], ...]:
        """Apply the pending revisions; count a failure fleet-wide, block it when it repeats."""
        self._set_plan(status)
        try:
            applied = self._run_pending(
                conn,
                worker,
                graph,
                status.decision.pending,
                trigger,
                progress,
                should_stop,
                empty=status.sync_state == "uninitialized_empty",
            )
        except RevisionFailed as exc:
            self._count_failure(conn, graph, exc)
            raise
        finally:
            self.plan = None
            self._progress_done(conn)
        flags.clear_failures(conn, self.journal, self.journal_target)
        return applied

    def failure_of(self, exc: RevisionFailed, graph: RevisionGraph | None = None) -> failures.Failure:
        """The fleet-wide identity of a failure: revision, its file hash, error class, SQLSTATE."""
        revision = (graph or self.graph()).revisions.get(exc.revision or "")
        return failures.Failure(
            revision=exc.revision or "",
            file_hash=revision.file_hash if revision else "",
            error_class=exc.error_class or "",
            sqlstate=exc.sqlstate or "",
            message=str(exc)[:500],
        )

    def _count_failure(self, conn: sa.engine.Connection, graph: RevisionGraph, exc: RevisionFailed) -> None:
        if is_lock_timeout(exc):
            log.warning(
                "revision_lock_timeout",
                target=self.target,
                revision=exc.revision,
                sqlstate=exc.sqlstate,
                hint="retried with backoff; never blocks",
            )
            return
        failure = self.failure_of(exc, graph)
        daemon = self.settings.daemon
        counted = flags.record_failure(
            conn,
            self.journal,
            self.journal_target,
            failure,
            daemon.blocked_after,
            retry_base=daemon.interval,
            retry_cap=daemon.backoff_max,
        )
        self._conditions = None
        log.warning(
            "revision_failure_counted",
            target=self.target,
            revision=counted.revision,
            failures=counted.count,
            failed_at=round(counted.failed_at, 3),
            retry_after=round(counted.retry_after, 3),
        )
        if counted.count >= self.settings.daemon.blocked_after > 0:
            log.error(
                "revision_blocked",
                target=self.target,
                revision=counted.revision,
                failures=counted.count,
                error_class=counted.error_class,
            )

    def _defer_unless_due(self, conn: sa.engine.Connection, graph: RevisionGraph, status: Status) -> None:
        """The fleet's retry gate, under the lock, before any worker starts: raise RetryDeferred
        when a pending revision failed and its `retry_after` (database clock) is still ahead.
        The whole run waits (every chain of the database): at most one backoff."""
        if not (self._parent or self).retry_gate or "retry_gate" in self.settings.unsafe:
            return
        try:
            refuse_unless_applicable(status)
        except ReconcilerError:
            return  # blocked, suspended, dirty...: refused as before, not deferred
        if status.sync_state not in APPLICABLE or not self._journal_exists(conn):
            return
        key = flags.failures_key(self.journal_target)
        failure = failures.Failure.loads(flags.read(conn, self.journal, [key]).get(key))
        pending = {
            rev: graph.revisions[rev].file_hash for rev in status.decision.pending if rev in graph.revisions
        }
        if failure is None or not failure.retry_after or failure.revision not in pending:
            return
        now = flags.db_time(conn)
        if now is None:
            return  # no clock to judge by: the gate never holds a run back
        fields = {
            "target": self.target,
            "revision": failure.revision,
            "failures": failure.count,
            "retry_after": round(failure.retry_after, 3),
            "db_time": round(now, 3),
        }
        if not failures.retry_deferred(failure, pending, now):
            log.info("retry_due", **fields)
            return
        log.info("retry_deferred", **fields)
        raise RetryDeferred(_deferred_message(failure), failure.revision, failure.signature)

    def _settled_status(self, conn: sa.engine.Connection, graph: RevisionGraph) -> Status:
        if not self._journal_exists(conn):
            return self._status(conn, graph)  # nothing to settle, and nothing is created here
        self._unblock_if_changed(conn, graph)
        status = self._status(conn, graph)
        applied = graph.closure(h for h in status.decision.db_heads if h in graph.revisions)
        dirty = journal.settle_interrupted(
            conn, self.journal, applied, self.backend, self._row_target(), "dirty" in self.settings.unsafe
        )
        if dirty:
            return self._status(conn, graph)
        return status

    def _unblock_if_changed(self, conn: sa.engine.Connection, graph: RevisionGraph) -> None:
        key = flags.blocked_key(self.journal_target)
        blocked = failures.Failure.loads(flags.read(conn, self.journal, [key]).get(key))
        if blocked and not still_blocked(blocked, graph):
            flags.delete(conn, self.journal, key)
            flags.clear_failures(conn, self.journal, self.journal_target)
            log.info(
                "revision_unblocked", target=self.target, revision=blocked.revision, reason="its file changed"
            )

    def _run_pending(
        self,
        conn: sa.engine.Connection,
        worker: Worker,
        graph: RevisionGraph,
        pending: tuple[str, ...],
        trigger: str,
        progress: ProgressFn | None,
        should_stop: Callable[[], bool] | None = None,
        empty: bool = False,
    ) -> tuple[tuple[str, float], ...]:
        done: list[tuple[str, float]] = []
        if self.guard:
            analysis = self.check_pending(worker, graph, pending, empty)
            verdict = guard.enforce(analysis, self.settings, self.target)
            worker.check_operations({rev: c.payload() for rev, c in verdict.live.items()})
        for index, rev in enumerate(pending, start=1):
            if should_stop and should_stop():
                log.info("apply_stopped", target=self.target, before=rev, applied=len(done))
                break
            revision = graph.revisions[rev]
            # Why here: before the revision runs, so /status, the metrics and `wait` name it.
            self._progress(conn, rev, revision.message, index, pending)
            if progress:
                progress(index, len(pending), rev, revision.message)
            try:
                seconds = self._apply_retrying(conn, worker, rev, graph, trigger)
            except Refused as exc:  # refused as it ran: say so until the files change
                self._refusal = ((graph.fingerprint, pending[index - 1 :]), str(exc))
                raise
            done.append((rev, seconds))
        return tuple(done)

    def _set_plan(self, status: Status) -> None:
        self.plan = status
        if self.on_plan is not None:
            self.on_plan(status)

    def _progress(
        self, conn: sa.engine.Connection, rev: str, message: str, n: int, pending: tuple[str, ...]
    ) -> None:
        """Say which revision this run applies now, in memory (the daemon's /status and metrics).
        Before the first one, the run's plan goes into the journal's flags, once: `wait` in
        another process reads it with the journal's open step (n of N, since when)."""
        now = time.time()
        first = self.applying.run_started_at if self.applying is not None and n > 1 else now
        self.applying = Progress(rev, message, n, len(pending), now, first, self.plan)
        if n == 1:
            note = {
                "pending": list(pending),
                "run_started_at": _iso_utc(now),
                "replica": sessions.replica_id(),
            }
            flags.put(conn, self.journal, flags.progress_key(self.journal_target), json.dumps(note))

    def _progress_done(self, conn: sa.engine.Connection) -> None:
        """The run stopped applying: forget its progress (a failed write leaves a stale note that
        `wait` shows with its start time, and the next run overwrites)."""
        if self.applying is None:
            return
        self.applying = None
        try:
            flags.delete(conn, self.journal, flags.progress_key(self.journal_target))
        except sa.exc.DBAPIError as exc:
            if conn.in_transaction():
                conn.rollback()
            log.debug("progress_not_cleared", target=self.target, error=redact(str(exc)))

    def read_progress(self) -> dict[str, Any] | None:
        """The revision an apply in progress on this target runs (any replica's), n of N and
        since when: the run's plan from the flags, its open step from the journal."""
        if self.missing_database_file() is not None:
            return None
        try:
            with connection.connect(self.engine) as conn:
                if not self.journal_exists(conn):
                    return None
                key = flags.progress_key(self.journal_target)
                text = flags.read(conn, self.journal, [key]).get(key)
                note = _loads(text)
                if note is None:
                    return None
                steps = journal.open_rows(conn, self.journal, self._row_target())
        except (ReconcilerError, sa.exc.DBAPIError):
            return None
        return _progress_of(note, steps)

    @contextmanager
    def lending(self, worker: Worker) -> Iterator[None]:
        """Apply with a worker the caller already has (dev mode's generating worker, models
        loaded): no second interpreter start. The caller keeps and closes it."""
        self._lent = worker
        try:
            yield
        finally:
            self._lent = None

    @contextmanager
    def start_worker(self, conn: sa.engine.Connection, role: str = "apply") -> Iterator[Worker]:
        """A worker checked against `conn`'s database. `role` "read" for one that applies
        nothing: its sessions are not the orphan wait's (see sessions.application_name)."""
        from reconciler.control.workers import Worker, WorkerJob

        roles.check(conn, self.backend, self.settings.apply.role)
        if self._lent is not None:
            yield self._lent
            return

        job = WorkerJob.from_settings(self.settings, role=role)
        job = dataclasses.replace(
            job,
            expected_identity=sessions.identity_from_dbapi(conn.connection, self.backend),
            exclude_tables=[*self.journal.names, *self._other_version_tables],
        )
        # the headers worker's sessions are named `apply`: it is kept for the apply only
        kept = self._headers_worker(job) if role == "apply" else None
        worker = kept or Worker.start(
            job,
            python=self.settings.target.python or None,
            on_log=self._on_worker_log,
            timeout=self.settings.target.worker_timeout,
        )
        self.current_worker = worker
        try:
            yield worker
        finally:
            self.current_worker = None
            worker.close()

    def _headers_worker(self, job: WorkerJob) -> Worker | None:
        """The worker that read the graph's headers, bound to this job: no second start."""
        worker = self.project.take_worker()
        if worker is None:
            return None
        identity = dict(job.expected_identity) if job.expected_identity else None
        timeout = self.settings.target.worker_timeout
        if worker.bind(identity, job.exclude_tables, self._on_worker_log, timeout):
            return worker
        worker.close()
        return None

    def _apply_retrying(
        self, conn: sa.engine.Connection, worker: Worker, rev: str, graph: RevisionGraph, trigger: str
    ) -> float:
        """Apply one revision; one that hit the DDL lock timeout is retried in place with exponential
        backoff and jitter, `[apply] lock_timeout_retries` times, each attempt journaled."""
        retries = max(0, self.settings.apply.lock_timeout_retries)
        attempt = 0
        while True:
            try:
                return self._apply_one(conn, worker, rev, graph, trigger)
            except RevisionFailed as exc:
                if not is_lock_timeout(exc) or attempt >= retries:
                    raise
                attempt += 1
                pause = backoff(attempt, base=self.settings.apply.lock_timeout_backoff, cap=math.inf)
                log.warning(
                    "revision_lock_timeout_retry",
                    target=self.target,
                    revision=rev,
                    attempt=attempt,
                    retries=retries,
                    retry_in=round(pause, 3),
                )
                time.sleep(pause)

    def _apply_one(
        self, conn: sa.engine.Connection, worker: Worker, rev: str, graph: RevisionGraph, trigger: str
    ) -> float:
        revision = graph.revisions[rev]
        row = journal.record_started(
            conn,
            self.journal,
            target=self.journal_target,
            operation="upgrade",
            revision=rev,
            down_revisions=revision.down_revisions,
            file_hash=revision.file_hash,
            trigger=trigger,
        )
        began = time.monotonic()
        marked: list[str] = []

        def leaving(revision: str, reason: str) -> None:
            # Why here: the worker waits until this is durable; a kill from now on is `dirty`.
            if "dirty" in self.settings.unsafe:
                return
            journal.mark_non_transactional(conn, self.journal, row, revision, reason)
            marked.append(reason)
            log.info("revision_non_transactional", target=self.target, revision=revision, reason=reason)

        try:
            step = worker.upgrade(rev, on_non_transactional=leaving)
        except RevisionFailed as exc:
            self._record_failure(conn, row, rev, exc, int((time.monotonic() - began) * 1000), bool(marked))
            raise
        except Refused as exc:  # the guard's per-operation check: the revision was rolled back
            journal.record_finished(
                conn, self.journal, row, outcome="refused", duration_ms=int((time.monotonic() - began) * 1000)
            )
            log.error("destructive_refused", target=self.target, revisions=[rev], findings=[str(exc)])
            raise
        ms = int(step.seconds * 1000)
        if rev not in step.revisions:
            # Alembic found nothing to run: something without our lock applied it meanwhile.
            journal.record_finished(conn, self.journal, row, outcome="skipped", duration_ms=ms)
            self._foreign.append(rev)
            log.warning(
                "foreign_writer",
                target=self.target,
                revisions=[rev],
                detail="revision already applied when our turn came",
                hint="another process applies migrations without the advisory lock",
            )
            return step.seconds
        journal.record_finished(conn, self.journal, row, outcome="applied", duration_ms=ms)
        if marked:
            journal.unmark(conn, self.journal, [row])
        log.info(
            "revision_applied",
            target=self.target,
            revision=rev,
            message=revision.message,
            duration_ms=ms,
        )
        return step.seconds

    def _record_failure(
        self,
        conn: sa.engine.Connection,
        row: int,
        rev: str,
        exc: RevisionFailed,
        ms: int,
        marked: bool = False,
    ) -> None:
        # A failed revision that had left its transaction (DDL that commits as it goes on MySQL /
        # MariaDB, an autocommit block) may be half-applied: it is `dirty` and is not retried
        # until an operator resolves it (the mark stays for status to say why). A lock timeout
        # is not: its statement never ran, and a retry of statements that did fails in a way
        # that is. One that never left it was rolled back.
        outcome = "dirty" if marked and "dirty" not in self.settings.unsafe else "failed"
        if is_lock_timeout(exc):
            outcome = "lock_timeout"
        if outcome != "dirty":
            journal.unmark(conn, self.journal, [row])
        journal.record_finished(
            conn,
            self.journal,
            row,
            outcome=outcome,
            duration_ms=ms,
            error_class=exc.error_class,
            error=str(exc),
            sqlstate=exc.sqlstate,
        )
        log.error(
            "revision_failed",
            target=self.target,
            revision=rev,
            error_class=exc.error_class,
            sqlstate=exc.sqlstate,
            error=str(exc),
        )

    def _finish(
        self,
        outcome: str,
        applied: tuple[tuple[str, float], ...],
        status: Status,
        waited: float,
        started: float,
    ) -> ApplyResult:
        duration = time.monotonic() - started
        if outcome != "applied":
            return ApplyResult(outcome, applied, status, waited, duration, tuple(self._foreign))
        log.info(
            "reconcile_finished",
            target=self.target,
            outcome=outcome,
            state=status.state,
            applied=[rev for rev, _ in applied],
            foreign=list(self._foreign),
            summary=summary(ApplyResult(outcome, applied, status, foreign=tuple(self._foreign))),
            lock_wait_ms=int(waited * 1000),
            duration_ms=int(duration * 1000),
        )
        return ApplyResult(outcome, applied, status, waited, duration, tuple(self._foreign))

    # --- waiting -----------------------------------------------------------------------------
    def wait(self, timeout: float, exact: bool = False, poll: float = 1.0) -> Status:
        """Block until the database is at (or, unless exact, ahead of) the repo heads."""
        deadline = time.monotonic() + timeout
        wanted = ("in_sync",) if exact else ("in_sync", "ahead")
        last = ""
        said: tuple[object, ...] = ()
        while True:
            status = self.status()
            # Drift is reported, never waited on: a column added by hand must not hold the app back.
            if status.sync_state in wanted and not set(status.conditions) - {"drift"}:
                return status
            if status.state != last:
                log.info("waiting", target=self.target, state=status.state, reason=status.message)
                last = status.state
            said = self._say_progress(status, said)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"gave up after {timeout:g} s: the database of target {self.target} is "
                    f"{status.state} ({status.message}); run `reconciler apply` or raise --timeout"
                )
            time.sleep(min(poll, remaining))

    def _say_progress(self, status: Status, said: tuple[object, ...]) -> tuple[object, ...]:
        """While revisions are pending, one `apply_progress` line each time the applier (any
        replica) moves on to another revision; returns what was said."""
        progress = self.read_progress() if status.pending else None
        if not progress:
            return said
        now = (progress.get("revision"), progress.get("n"), progress.get("started_at"))
        if now != said:
            log.info(
                "apply_progress",
                target=self.target,
                revision=progress.get("revision"),
                n=progress.get("n"),
                total=progress.get("total"),
                started_at=progress.get("started_at"),
                replica=progress.get("replica"),
                pending=len(status.pending),
            )
        return now


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


def summary(result: ApplyResult, ids: bool = False) -> str:
    """One line that says what this run did, as the journal records it: revisions we applied,
    and apart from them the ones another writer applied meanwhile (journaled `skipped`). `ids`:
    every revision id (-v); else a long list is its count, first and last."""
    state = "in sync" if result.status.sync_state == "in_sync" else result.status.state
    foreign = result.foreign
    listed = f" ({', '.join(rev for rev, _ in result.applied)})" if ids and result.applied else ""
    if not foreign:
        if result.outcome == "noop":
            return f"in sync at {_heads_text(result.status)}"
        return f"applied {len(result.applied)} revision(s){listed}; {state}"
    others = (
        f"{len(foreign)} {'was' if len(foreign) == 1 else 'were'} applied by another writer "
        f"{'during' if result.outcome == 'applied' else 'before'} the run "
        f"(foreign_writer: {logs.ids_text(foreign, full=ids)}); an app upgrading itself at "
        "start-up? switch that off or take reconciler.hooks.migration_lock"
    )
    return f"{len(result.applied)} applied by the reconciler{listed}; {others}; {state}"


def _applied(graph: RevisionGraph, status: Status) -> frozenset[str]:
    """The revisions of `graph` the database heads of `status` include."""
    return frozenset(graph.closure(h for h in status.decision.db_heads if h in graph.revisions))


def _heads_text(status: Status) -> str:
    """The database heads; with several chains, each chain's, named."""

    def heads(one: Status) -> str:
        return ", ".join(sorted(one.decision.db_heads)) or "base"

    if not status.chains:
        return heads(status)
    return "; ".join(f"{heads(c)} ({c.chain_name})" for c in status.every_chain)


def refuse_unless_applicable(status: Status) -> None:
    """Raise the error that says why nothing can be applied; return when applying may go on."""
    if "dirty" in status.conditions:
        raise Refused(status.messages["dirty"])
    if "checksum_mismatch" in status.conditions:
        raise Refused(status.messages["checksum_mismatch"])
    if status.sync_state in APPLICABLE:
        if "blocked" in status.conditions:
            raise Blocked(status.messages["blocked"])
        if "suspended" in status.conditions:
            raise Suspended(status.messages["suspended"])
    state = status.sync_state
    if state == "unknown":
        raise UnreachableError(status.message)
    if state in ("in_sync", *APPLICABLE):
        return
    raise StateError(status.message)


def is_lock_timeout(exc: RevisionFailed) -> bool:
    """The revision waited longer than `ddl_lock_timeout` for a table lock (nothing is wrong with it)."""
    return (exc.sqlstate or "") in LOCK_TIMEOUT_CODES


def verify(status: Status) -> None:
    if status.sync_state != "in_sync":
        raise RevisionFailed(
            f"after applying, the database heads are {sorted(status.decision.db_heads)} but the "
            f"repository's heads are {sorted(status.decision.repo_heads)}; check env.py's "
            "version_table and run `reconciler status`"
        )


def still_blocked(blocked: failures.Failure, graph: RevisionGraph) -> bool:
    """A block holds while the revision's file is unchanged."""
    revision = graph.revisions.get(blocked.revision)
    return revision is not None and revision.file_hash == blocked.file_hash


def _blocked_message(blocked: failures.Failure) -> str:
    return (
        f"revision {blocked.revision} failed {blocked.count} times the same way "
        f"({blocked.error_class or 'error'}{' ' + blocked.sqlstate if blocked.sqlstate else ''}): "
        f"{blocked.message} — it is retried when its file changes, or after `reconciler resume`"
    )


def _deferred_message(failure: failures.Failure) -> str:
    when = dt.datetime.fromtimestamp(failure.retry_after, dt.timezone.utc).replace(tzinfo=None)
    at = when.isoformat(timespec="milliseconds")
    return (
        f"revision {failure.revision} failed {failure.count} time(s) the same way "
        f"({failure.error_class or 'error'}): {failure.message} — the fleet retries it no sooner "
        f"than {at}Z (database clock; backoff from the interval), or at once when its file changes"
    )


def _suspended_message(value: str) -> str:
    return f"applying is suspended ({value}); `reconciler resume` lets replicas apply again"


def _mismatch_message(found: tuple[checksums.Mismatch, ...]) -> str:
    return (
        f"applied revision file(s) changed or vanished since they were applied: "
        f"{'; '.join(m.describe() for m in found)}. Applying stops: restore the file(s), or review "
        f"the change and run `reconciler accept {found[0].revision}` (or `--all`)"
    )


def _dirty_message(revisions: tuple[str, ...], reasons: Mapping[str, str], applied: frozenset[str]) -> str:
    """What to check and which `resolve` flag, for each dirty revision."""
    return " ".join(_dirty_one(rev, reasons.get(rev, ""), rev in applied) for rev in revisions)


def _dirty_one(rev: str, reason: str, listed: bool) -> str:
    why = reason or "this database commits DDL as it goes"
    if listed:
        return (
            f"revision {rev} started and did not complete ({why}), yet the version table lists "
            f"{rev}: someone finished or stamped it. Check that everything it does is in the "
            f"schema, then run `reconciler resolve {rev} --applied`."
        )
    return (
        f"revision {rev} started and did not complete after it left its transaction ({why}); "
        f"the version table does not list {rev}, so part of it may have run and it is not run "
        "again. Inspect the schema against the revision: if you finish the rest by hand, run "
        f"`reconciler resolve {rev} --applied`; if you undo what ran, run "
        f"`reconciler resolve {rev} --rolled-back` (the next apply runs it again)."
    )


_ALEMBIC_LINE = re.compile(
    r"^(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s+\[(?P<logger>[^\]]+)\]\s?(?P<msg>.*)$"
)
_LEVEL_NAMES = {"WARN": "warning", "CRITICAL": "error"}


def _log_worker_line(line: str) -> None:
    """Forward one line of the worker's stderr (Alembic's log format when it matches)."""
    match = _ALEMBIC_LINE.match(line)
    if not match:
        log.info("worker_output", line=line)
        return
    message = match["msg"]
    level = logs.alembic_level(
        _LEVEL_NAMES.get(match["level"], match["level"].lower()), match["logger"], message
    )
    getattr(log, level)("alembic", logger=match["logger"], message=message)


__all__ = [
    "ApplyResult",
    "Reconciler",
    "ReconcilerError",
    "Status",
    "refuse_unless_applicable",
    "summary",
    "verify",
]
