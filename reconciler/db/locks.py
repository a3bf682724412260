"""Advisory locks per dialect (the backends: `db.lockbackends`), who-holds-it reporting, and the
orphan wait.

Invariant 2: we lock by polling, never by blocking. PostgreSQL uses `pg_try_advisory_lock`,
MySQL / MariaDB `GET_LOCK(name, 0)`, SQLite an exclusive non-blocking `flock` on a side file next
to the database (`<db file>.reconciler.lock`); all in a jittered loop with a deadline. A blocked
waiter could deadlock against `CREATE INDEX CONCURRENTLY`; a polling one cannot.

The SQLite side file sits beside the database file because every process that migrates that file
(another replica, a `reconciler apply` in a second terminal, an app using `hooks.migration_lock`)
must find the same one, and only the database's own folder is certain to be shared by all of
them. It is not the database file itself: SQLite's own locks use it, and the holder's pid, host
and since are written into the side file. It stays between runs (empty while free, so safe to
leave or to delete when nothing runs) and is git-ignored by the pattern `*.reconciler.lock`.

The lock is session level: it is held by the control-plane connection given to `AdvisoryLock`
and survives the per-revision commits done by other connections (the worker's). That connection
should come from an engine made with `isolation_level="AUTOCOMMIT"` (SQLAlchemy 1.4 with
`future=True`, or 2.x), so no lock call leaves a transaction open; when it is not autocommit, each
call here commits the transaction it began itself and never one the caller began.

`wait_for_orphans` closes the orphan window (invariant 4): a killed applier's lock goes at once,
but the statement it had sent keeps running on the server until it ends.

Imports only the standard library, SQLAlchemy and reconciler modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from reconciler.db.lockbackends import FileLock, Holder, MySqlLock, PgLock, iso, query, sqlite_file
from reconciler.errors import ConfigError, LockTimeout, UnreachableError
from reconciler.redact import redact

MYSQL_MAX_NAME = 64
_NAME_PREFIX = "reconciler/"
_HASH_CHARS = 12
_REPORT_EVERY = 5.0  # seconds between `on_wait` reports while waiting
_PG_DIALECTS = ("postgresql",)
_MYSQL_DIALECTS = ("mysql", "mariadb")
_LOCK_FILE_SUFFIX = ".reconciler.lock"


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class LockKey:
    """One lock: `name` for humans and MySQL (<= 64 chars), `pg_key` a signed 64-bit integer."""

    name: str
    pg_key: int


def lock_key(database: str, schema: str | None, version_table: str, override: str = "") -> LockKey:
    """The lock of one target, from its database name, version table schema and name.

    `override` (`[target] lock_key`) replaces the derived name; an integer override is used as the
    PostgreSQL key as it is (to share a key other tools already use).
    """
    if override:
        digest = hashlib.sha256(override.encode("utf-8")).digest()
        name = override if len(override) <= MYSQL_MAX_NAME else _shorten(override, digest)
        return LockKey(name=name, pg_key=_int_override(override) or _signed64(digest))
    ident = "\x1f".join((database, schema or "", version_table))
    digest = hashlib.sha256(ident.encode("utf-8")).digest()
    readable = ".".join(p for p in (database, schema, version_table) if p)
    return LockKey(name=_shorten(_NAME_PREFIX + readable, digest), pg_key=_signed64(digest))


def _shorten(readable: str, digest: bytes) -> str:
    room = MYSQL_MAX_NAME - 1 - _HASH_CHARS
    return f"{readable[:room]}#{digest.hex()[:_HASH_CHARS]}"


def _signed64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big", signed=True)


def _int_override(text: str) -> int | None:
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if -(2**63) <= value < 2**63 else None


# --------------------------------------------------------------------------- the lock


class AdvisoryLock:
    """The advisory lock of one target, held by one control-plane connection.

    `conn` must stay open while the lock is held (the lock is session level) and should come from
    an engine made with `isolation_level="AUTOCOMMIT"`. For SQLite, `sqlite_path` is the database
    file (default: read from `conn`); the lock is the side file `<db file>.reconciler.lock`.
    """

    def __init__(self, conn: sa.engine.Connection, key: LockKey, sqlite_path: Path | None = None) -> None:
        self.key = key
        self.dialect = conn.dialect.name
        self._held = False
        self._backend: PgLock | MySqlLock | FileLock
        if self.dialect in _PG_DIALECTS:
            self._backend = PgLock(conn, key)
        elif self.dialect in _MYSQL_DIALECTS:
            self._backend = MySqlLock(conn, key)
        elif self.dialect == "sqlite":
            db_file = sqlite_path if sqlite_path is not None else sqlite_file(conn)
            self._backend = FileLock(Path(str(db_file) + _LOCK_FILE_SUFFIX), key)
        else:
            raise ConfigError(
                f"no advisory lock for the {self.dialect!r} dialect; supported: PostgreSQL, "
                "MySQL / MariaDB and SQLite (set [target] lock_url to one of those)"
            )

    @property
    def held(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        """One non-blocking attempt; True when this connection holds the lock afterwards."""
        if not self._held:
            self._held = self._backend.try_lock()
        return self._held

    def acquire(
        self,
        timeout: float,
        poll: float = 0.2,
        on_wait: Callable[[dict[str, Any]], None] | None = None,
    ) -> float:
        """Poll (with jitter) until the lock is ours; return the seconds waited.

        `on_wait` gets `{"lock", "waited", "timeout", "holder"}` on the first failed attempt and
        every few seconds after. Raises `LockTimeout` naming the holder when `timeout` passes.
        """
        start = time.monotonic()
        deadline = start + max(0.0, timeout)
        next_report = start
        while not self.try_acquire():
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout(now - start, timeout)
            if on_wait is not None and now >= next_report:
                on_wait(self._wait_event(now - start, timeout))
                next_report = now + _REPORT_EVERY
            time.sleep(min(deadline - now, poll * random.uniform(0.5, 1.5)))
        return time.monotonic() - start

    def release(self) -> None:
        """Let go of the lock; idempotent, and quiet when the connection is already gone."""
        if not self._held:
            return
        self._held = False
        # a dead session's lock died with it: nothing to report
        with contextlib.suppress(sa.exc.SQLAlchemyError, UnreachableError, OSError):
            self._backend.unlock()

    def holder(self) -> Holder | None:
        """Who holds the lock now, or None when nobody does. Keys per dialect:

        PostgreSQL: pid, application_name, client_addr, user_name, state, backend_start, since.
        MySQL / MariaDB: connection_id, and when visible user_name, host, db, command, seconds,
        since. SQLite: pid, host, since, lock_file. Timestamps are ISO 8601 strings.
        """
        return self._backend.holder()

    def _wait_event(self, waited: float, timeout: float) -> dict[str, Any]:
        return {
            "lock": self.key.name,
            "waited": round(waited, 3),
            "timeout": timeout,
            "holder": self._safe_holder(),
        }

    def _safe_holder(self) -> Holder | None:
        try:
            return self.holder()
        except (UnreachableError, ConfigError, OSError):
            return None

    def _timeout(self, waited: float, timeout: float) -> LockTimeout:
        found = self._safe_holder()
        message = (
            f"advisory lock {self.key.name!r} not acquired within {timeout:g} s "
            f"(waited {waited:.1f} s): held by {_describe(self.dialect, found)}. "
            f"{_next_step(self.dialect, found)}"
        )
        return LockTimeout(redact(message), holder=found)


def _describe(dialect: str, found: Holder | None) -> str:
    if not found:
        return "a session whose details are not visible (or that released it just now)"
    if dialect in _PG_DIALECTS:
        return (
            f"pid {found.get('pid')} (application_name {found.get('application_name')!r}, "
            f"user {found.get('user_name')}, client {found.get('client_addr') or 'local socket'}, "
            f"state {found.get('state')} since {found.get('since')}, "
            f"connected since {found.get('backend_start')})"
        )
    if dialect in _MYSQL_DIALECTS:
        return (
            f"connection {found.get('connection_id')} (user {found.get('user_name')}, "
            f"host {found.get('host')}, command {found.get('command')} "
            f"for {found.get('seconds')} s, since {found.get('since')})"
        )
    return (
        f"pid {found.get('pid')} on host {found.get('host')} since {found.get('since')} "
        f"(lock file {found.get('lock_file')}, beside the database file)"
    )


def _next_step(dialect: str, found: Holder | None) -> str:
    start = "Another replica is probably applying revisions: wait and retry"
    if not found:
        return start + "."
    if dialect in _PG_DIALECTS:
        stop = f"SELECT pg_terminate_backend({found.get('pid')})"
        return f"{start}, or if that session is stuck end it with {stop}."
    if dialect in _MYSQL_DIALECTS:
        stop = f"KILL {found.get('connection_id')}"
        return f"{start}, or if that connection is stuck end it with {stop}."
    return (
        f"{start}, or if that process is stuck stop it: its lock goes with it (the lock file "
        "itself may stay; it is free when no process holds it)."
    )


# --------------------------------------------------------------------------- orphan wait

_ORPHANS_SQL = (
    "SELECT pid, application_name, state, query_start, state_change"
    " FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND left(application_name, :n) = :prefix"
    " AND state IS NOT NULL AND state <> 'idle'"
    " ORDER BY query_start NULLS LAST, pid"
)


def wait_for_orphans(conn: sa.engine.Connection, app_prefix: str, timeout: float, poll: float = 0.1) -> float:
    """After taking the lock, wait until no other session of ours is still running a statement.

    PostgreSQL only (elsewhere returns 0.0 at once). "Ours" is every other backend in the current
    database whose application_name starts with `app_prefix` (see `dbsession.apply_prefix`); it
    is running unless its state is `idle`. Returns the seconds waited; raises `LockTimeout`
    naming the still-running session when `timeout` passes.
    """
    if conn.dialect.name not in _PG_DIALECTS:
        return 0.0
    start = time.monotonic()
    deadline = start + max(0.0, timeout)
    while True:
        running = _running_orphans(conn, app_prefix)
        now = time.monotonic()
        if not running:
            return now - start
        if now >= deadline:
            raise _orphan_timeout(running[0], len(running), timeout)
        time.sleep(min(deadline - now, poll * random.uniform(0.5, 1.5)))


def _running_orphans(conn: sa.engine.Connection, app_prefix: str) -> list[dict[str, Any]]:
    what = f"looking for running sessions named {app_prefix!r}*"
    if conn.in_transaction():  # pg_stat_activity is a per-transaction snapshot
        query(conn, "SELECT pg_stat_clear_snapshot()", {}, what)
    return query(conn, _ORPHANS_SQL, {"n": len(app_prefix), "prefix": app_prefix}, what)


def _orphan_timeout(first: Mapping[str, Any], count: int, timeout: float) -> LockTimeout:
    found: Holder = {k: iso(v) for k, v in first.items()}
    pid = found.get("pid")
    others = f" (and {count - 1} more)" if count > 1 else ""
    message = (
        f"a previous applier's statement is still running after {timeout:g} s: pid {pid} "
        f"(application_name {found.get('application_name')!r}, state {found.get('state')} "
        f"since {found.get('query_start')}){others}. Starting the next revision now could apply "
        f"it twice: wait for it to finish, or stop it with SELECT pg_cancel_backend({pid}) "
        f"(pg_terminate_backend({pid}) if that does not end it)."
    )
    return LockTimeout(redact(message), holder=found)


__all__ = [
    "MYSQL_MAX_NAME",
    "AdvisoryLock",
    "Holder",
    "LockKey",
    "lock_key",
    "wait_for_orphans",
]
