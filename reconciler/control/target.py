"""One target, opened: a frozen `TargetHandle` (settings, engines, journal place, project, lock key).

The handle is what every control function takes first. It holds no per-run state: what a run is
doing lives in `progress.LiveRun`, passed to the run; what reads may reuse lives in one named
struct, `TargetCache`. The daemon opens one handle per target and keeps it across runs, so a run
that finds the database in sync costs one query on a pooled connection.

The other chains of the database ([[target.chains]]) are handles too (`chains`), sharing the
main handle's engines, journal place and lock key: one database, one connection, one lock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from reconciler import logs
from reconciler.config.load import chain_settings
from reconciler.control.workers import Worker, start_headers_worker
from reconciler.core import checksums
from reconciler.core.state import Decision
from reconciler.core.status import Conditions
from reconciler.db import connection, journal, locks, placement
from reconciler.db.journal import JournalTables
from reconciler.errors import UnreachableError
from reconciler.project.repository import Project
from reconciler.redact import redact
from reconciler.settings import Settings

log = logs.get("reconciler.reconcile")

T = TypeVar("T")


@dataclass
class AffinityProof:
    """Whether the lock's session was proven private: kept only for a shared session."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    proven: bool = False


class Engines:
    """The target's engines, made on first use and kept: the main one (one pooled connection),
    the lock's (`[target] lock_url`), and the affinity proof's unpooled second client.

    `shared` engines serve many tenants of a fleet over one server session (control.fleet): its
    affinity is proven once (`proof`, shared by the tenants), since concurrent proofs on one
    session would read each other's marker."""

    shared = False

    def __init__(
        self, settings: Settings, place: placement.Place, proof: AffinityProof | None = None
    ) -> None:
        self._settings = settings
        self._place = place
        self.main: sa.engine.Engine | None = None
        self.lock: sa.engine.Engine | None = None
        self.probe: sa.engine.Engine | None = None
        self.proof = proof or AffinityProof()

    def get_main(self) -> sa.engine.Engine:
        if self.main is None:
            attachment = self._place.attachment
            self.main = connection.make_engine(
                self._settings.target.url,
                self._settings.target.name,
                self._settings.apply.connect_timeout,
                on_connect=attachment.attach if attachment else None,
            )
        return self.main

    def get_lock(self) -> sa.engine.Engine:
        """The engine the advisory lock is taken on: the main one unless `lock_url` is set."""
        if not self._settings.target.lock_url:
            return self.get_main()
        if self.lock is None:
            self.lock = connection.make_engine(
                self._settings.target.lock_url,
                self._settings.target.name,
                self._settings.apply.connect_timeout,
                role="lock",
            )
        return self.lock

    def get_probe(self, engine: sa.engine.Engine) -> sa.engine.Engine:
        """An unpooled engine to `engine`'s URL: each probe is a new client and is closed after.
        (A pooled one would keep a session-mode pooler's server connection that the worker then
        lacks; an invalidated pooled one takes the pool's slot, so the next run reconnects.)"""
        if self.probe is None:
            self.probe = connection.make_engine(
                engine.url.render_as_string(hide_password=False),
                self._settings.target.name,
                self._settings.apply.connect_timeout,
                pooled=False,
            )
        return self.probe

    def dispose(self) -> None:
        for engine in (self.main, self.lock, self.probe):
            if engine is not None:
                engine.dispose()


@dataclass
class TargetCache:
    """What reads of one chain may reuse between runs, and the lock holder's pending note."""

    conditions: Conditions | None = None  # the journal's flags, last read (see CONDITIONS_TTL)
    decided: tuple[object, Decision] | None = None  # the last decision, by its inputs
    journal_seen: bool = False
    guard_info: tuple[tuple[str, tuple[str, ...]], dict[str, Any]] | None = None  # (graph, pending), summary
    refusal: tuple[tuple[str, tuple[str, ...]], str] | None = None  # (graph, pending), message
    mismatch_logged: tuple[checksums.Mismatch, ...] = ()
    announcement: str | None = None  # the lock holder's note, until the journal exists


@dataclass(frozen=True)
class TargetHandle:
    """The control plane's view of one chain of one target (see the module docstring)."""

    settings: Settings
    project: Project[Worker]
    place: placement.Place
    engines: Engines
    lock_key: locks.LockKey
    on_worker_log: Callable[[str], None]
    chain: str = ""  # "" for [target]'s own directory; else a [[target.chains]] name
    other_version_tables: tuple[str, ...] = ()
    chains: tuple[TargetHandle, ...] = ()  # the other chains, reconciled under our lock after us
    cache: TargetCache = field(default_factory=TargetCache)
    own_rows: bool = False  # its journal is shared with other targets (a schema fleet's tenants)

    @property
    def target_name(self) -> str:
        return self.settings.target.name

    @property
    def journal_target(self) -> str:
        """The journal's `target` for this chain's rows and flags: the target's name, and for
        another chain `<target>/<chain>` (so its hashes, failures and blocks are its own)."""
        return f"{self.target_name}/{self.chain}"[:64] if self.chain else self.target_name

    @property
    def journal_targets(self) -> tuple[str, ...]:
        """Every chain's journal target, [target]'s first."""
        return (self.journal_target, *(c.journal_target for c in self.chains))

    @property
    def row_target(self) -> str | None:
        """Which journal rows are this chain's: all of them with a single chain (as always),
        unless the journal is shared with other targets (`own_rows`)."""
        return self.journal_target if self.chain or self.chains or self.own_rows else None

    @property
    def engine(self) -> sa.engine.Engine:
        return self.engines.get_main()

    @property
    def journal(self) -> JournalTables:
        """The journal's tables, where `locate_journal` found them (before that: the side place)."""
        return self.place.tables

    @property
    def backend(self) -> str:
        return connection.backend_of(self.engine)

    @property
    def redacted_url(self) -> str:
        return redact(self.engine.url.render_as_string(hide_password=True))

    @property
    def every_chain(self) -> tuple[TargetHandle, ...]:
        return (self, *self.chains)

    @property
    def sqlite_path(self) -> Path | None:
        database = self.engine.url.database
        if self.backend == "sqlite" and database and database != ":memory:":
            return Path(database)
        return None


EnginesFactory = Callable[[Settings, placement.Place], Engines]


def open_target(
    settings: Settings,
    on_worker_log: Callable[[str], None] | None = None,
    *,
    engines_of: EnginesFactory = Engines,
    project: Project[Worker] | None = None,
) -> TargetHandle:
    """The handle of `settings`' target and its chains. Connects to nothing; `release_target`
    closes what it opened. A fleet passes its tenants the engines (`engines_of`) and the
    project (one revision graph for all of them) they share."""
    place = placement.Place(
        settings.journal.table,
        settings.target.url,
        settings.journal.placement,
        settings.journal.schema,
        settings.target.version_table_schema or None,
    )
    engines = engines_of(settings, place)
    key = locks.lock_key(
        sa.engine.make_url(settings.target.url).database or "",
        settings.target.version_table_schema or None,
        settings.target.version_table,
        settings.target.lock_key,
    )
    forward = on_worker_log or log_worker_line
    tables = (settings.target.version_table, *(c.version_table for c in settings.chains))

    def handle(chain_of: Settings, chain: str, chains: tuple[TargetHandle, ...]) -> TargetHandle:
        return TargetHandle(
            chain_of,
            project
            if project is not None and not chain
            else Project(chain_of, start_worker=start_headers_worker),
            place,
            engines,
            key,
            forward,
            chain,
            tuple(t for t in tables if t != chain_of.target.version_table),
            chains,
        )

    others = tuple(handle(chain_settings(settings, c), c.name, ()) for c in settings.chains)
    return handle(settings, "", others)


def release_target(handle: TargetHandle) -> None:
    """Stop the kept worker and close every pooled connection (between runs, and at the end),
    keeping the engines: the next run connects anew but, its dialect already initialised,
    sends none of SQLAlchemy's first-connect queries."""
    for chain in handle.every_chain:
        chain.project.close_worker()
    handle.engines.dispose()


def locate_journal(handle: TargetHandle, conn: sa.engine.Connection) -> JournalTables:
    """Find the journal (once per process): its side place, or the target's schema while the
    previous release's tables are still there."""
    return handle.place.locate(conn)


def journal_exists(handle: TargetHandle, conn: sa.engine.Connection) -> bool:
    """Whether the journal's tables exist (finding where they live first)."""
    locate_journal(handle, conn)
    return journal_seen(handle, conn)


def journal_seen(handle: TargetHandle, conn: sa.engine.Connection) -> bool:
    """`journal_exists` for the control path: once seen, never asked again; False when the
    database would not say."""
    if not handle.cache.journal_seen:
        try:
            locate_journal(handle, conn)
            handle.cache.journal_seen = journal.exists(conn, handle.journal)
        except sa.exc.DBAPIError:
            return False
    return handle.cache.journal_seen


def missing_database_file(handle: TargetHandle) -> Path | None:
    """A SQLite target whose file does not exist yet, in a folder that does. Reading must not
    connect to it: sqlite3 creates a missing file on connect, and a `status` would leave an
    empty database behind (in the wrong folder, if the path was wrong). `apply` creates it.
    A missing folder is no such case: connecting fails there (`unknown`), creating nothing."""
    path = handle.sqlite_path
    if path is None or path.exists() or not path.parent.is_dir():
        return None
    return path


def retrying(handle: TargetHandle, read: Callable[[], T]) -> T:
    """Run `read`; once more if the pooled connection turned out dead (server restart, idle
    timeout): a stale connection is not an unreachable database."""
    try:
        return read()
    except UnreachableError:
        if handle.engines.main is None:
            raise
        handle.engines.main.dispose()
        return read()


_ALEMBIC_LINE = re.compile(
    r"^(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\s+\[(?P<logger>[^\]]+)\]\s?(?P<msg>.*)$"
)
_LEVEL_NAMES = {"WARN": "warning", "CRITICAL": "error"}


def log_worker_line(line: str) -> None:
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
