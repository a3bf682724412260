"""The advisory lock's three backends (PostgreSQL, MySQL / MariaDB, a side file for SQLite) and
the one SQL helper they and `locks` share; `db.locks` (the only importer) chooses one per dialect.

Each backend tries once and never blocks: the polling loop with its deadline is `locks.AdvisoryLock`.
Imports only the standard library, SQLAlchemy and reconciler modules.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from reconciler.errors import ConfigError, UnreachableError
from reconciler.redact import redact

if sys.platform == "win32":  # pragma: no cover - POSIX is what the tests run
    import msvcrt
else:
    import fcntl

Holder = dict[str, object]


class LockName(Protocol):
    """What a backend reads of `locks.LockKey`."""

    @property
    def name(self) -> str: ...

    @property
    def pg_key(self) -> int: ...


def pg_halves(key: int) -> tuple[int, int]:
    """(classid, objid) as pg_locks shows a bigint advisory key (objsubid = 1)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


# --------------------------------------------------------------------------- SQL helper


def query(conn: sa.engine.Connection, sql: str, params: Mapping[str, Any], what: str) -> list[dict[str, Any]]:
    """Run one statement; commit the transaction only if this call began it."""
    began = not conn.in_transaction()
    try:
        result = conn.execute(sa.text(sql), dict(params))
        rows = _mappings(result) if result.returns_rows else []
    except sa.exc.DBAPIError as err:
        if began:
            _quietly_rollback(conn)
        detail = redact(str(err.orig).strip().splitlines()[0] if str(err.orig).strip() else "")
        raise UnreachableError(
            f"{what} failed: {detail or type(err.orig).__name__}; "
            "the database may be unreachable, the next attempt retries"
        ) from err
    if began and conn.in_transaction():
        commit = getattr(conn, "commit", None)
        if commit is not None:
            commit()
    return rows


def _mappings(result: Any) -> list[dict[str, Any]]:
    """The rows as dicts; SQLAlchemy 1.3 (an app's env.py calling `hooks.migration_lock`) has no
    `mappings()`, and its rows are mappings themselves."""
    if hasattr(result, "mappings"):
        return [dict(r) for r in result.mappings().all()]
    return [dict(r) for r in result.fetchall()]


def _quietly_rollback(conn: sa.engine.Connection) -> None:
    try:
        if conn.in_transaction():
            rollback = getattr(conn, "rollback", None)
            if rollback is not None:
                rollback()
    except sa.exc.SQLAlchemyError:
        pass


def iso(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- backends


class PgLock:
    def __init__(self, conn: sa.engine.Connection, key: LockName) -> None:
        self.conn = conn
        self.key = key

    def try_lock(self) -> bool:
        rows = query(
            self.conn,
            "SELECT pg_try_advisory_lock(CAST(:k AS bigint)) AS ok",
            {"k": self.key.pg_key},
            f"pg_try_advisory_lock for lock {self.key.name!r}",
        )
        return bool(rows[0]["ok"])

    def unlock(self) -> None:
        query(
            self.conn,
            "SELECT pg_advisory_unlock(CAST(:k AS bigint)) AS ok",
            {"k": self.key.pg_key},
            f"pg_advisory_unlock for lock {self.key.name!r}",
        )

    def holder(self) -> Holder | None:
        hi, lo = pg_halves(self.key.pg_key)
        rows = query(
            self.conn,
            "SELECT a.pid, a.application_name, host(a.client_addr) AS client_addr,"
            " a.usename AS user_name, a.state, a.backend_start,"
            " CASE WHEN a.state = 'active' THEN a.query_start ELSE a.state_change END AS since"
            " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND CAST(l.classid AS bigint) = CAST(:hi AS bigint)"
            " AND CAST(l.objid AS bigint) = CAST(:lo AS bigint)"
            " LIMIT 1",
            {"hi": hi, "lo": lo},
            f"reading the holder of lock {self.key.name!r}",
        )
        if not rows:
            return None
        return {k: iso(v) for k, v in rows[0].items()}


class MySqlLock:
    def __init__(self, conn: sa.engine.Connection, key: LockName) -> None:
        self.conn = conn
        self.key = key

    def try_lock(self) -> bool:
        rows = query(
            self.conn,
            "SELECT GET_LOCK(:n, 0) AS ok",
            {"n": self.key.name},
            f"GET_LOCK for lock {self.key.name!r}",
        )
        return bool(rows[0]["ok"] == 1)  # 0: held elsewhere, NULL: error (treated as not acquired)

    def unlock(self) -> None:
        query(
            self.conn,
            "SELECT RELEASE_LOCK(:n) AS ok",
            {"n": self.key.name},
            f"RELEASE_LOCK for lock {self.key.name!r}",
        )

    def holder(self) -> Holder | None:
        what = f"reading the holder of lock {self.key.name!r}"
        rows = query(self.conn, "SELECT IS_USED_LOCK(:n) AS id", {"n": self.key.name}, what)
        conn_id = rows[0]["id"]
        if conn_id is None:
            return None
        found: Holder = {"connection_id": int(conn_id)}
        details = query(
            self.conn,
            "SELECT p.USER AS user_name, p.HOST AS host, p.DB AS db, p.COMMAND AS command,"
            " p.TIME AS seconds, NOW() - INTERVAL p.TIME SECOND AS since"
            " FROM information_schema.PROCESSLIST p WHERE p.ID = :id",
            {"id": int(conn_id)},
            what,
        )
        if details:  # without the PROCESS privilege other users' threads are invisible
            found.update({k: iso(v) for k, v in details[0].items()})
        return found


class FileLock:
    """An exclusive, non-blocking lock on a side file; the holder's pid/host/since are its text."""

    _WIN_OFFSET = 1 << 16  # Windows locks a byte range: lock one far past the holder text

    def __init__(self, path: Path, key: LockName) -> None:
        self.path = path
        self.key = key
        self._fd: int | None = None
        self._info: Holder | None = None

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as err:
            raise ConfigError(
                f"cannot open the SQLite lock file {str(self.path)!r}: {err.strerror}; the "
                "reconciler's advisory lock is this side file beside the database file (every "
                "process that migrates the database must share it): make the folder "
                f"{str(self.path.parent)!r} writable by the reconciler"
            ) from err

    def try_lock(self) -> bool:
        fd = self._open(os.O_RDWR | os.O_CREAT)
        if not _try_lock_fd(fd, exclusive=True, path=self.path):
            os.close(fd)
            return False
        info: Holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
        data = json.dumps(info).encode("utf-8")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.ftruncate(fd, len(data))
        self._fd, self._info = fd, {**info, "lock_file": str(self.path)}
        return True

    def unlock(self) -> None:
        fd, self._fd, self._info = self._fd, None, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            _unlock_fd(fd)
        finally:
            os.close(fd)

    def holder(self) -> Holder | None:
        if self._info is not None:
            return dict(self._info)
        if not self.path.exists():
            return None
        fd = self._open(os.O_RDWR)
        try:
            if _try_lock_fd(fd, exclusive=False, path=self.path):
                _unlock_fd(fd)  # nobody holds it; the text is a stale leftover
                return None
            text = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            info = json.loads(text.decode("utf-8")) if text else {}
        except ValueError:
            info = {}  # being rewritten by the holder right now
        return {**(info if isinstance(info, dict) else {}), "lock_file": str(self.path)}


def _try_lock_fd(fd: int, exclusive: bool, path: Path) -> bool:
    try:
        if sys.platform == "win32":  # pragma: no cover
            os.lseek(fd, FileLock._WIN_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if sys.platform == "win32":  # pragma: no cover - msvcrt reports "busy" as EACCES
            return False
        raise ConfigError(
            f"cannot lock the SQLite lock file {str(path)!r}: {err.strerror}; "
            "keep the database on a local filesystem that supports flock"
        ) from err
    return True


def _unlock_fd(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        os.lseek(fd, FileLock._WIN_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def sqlite_file(conn: sa.engine.Connection) -> Path:
    rows = query(conn, "PRAGMA database_list", {}, "finding the SQLite database file")
    main = next((r for r in rows if r.get("name") == "main"), None)
    path = str(main.get("file") or "") if main else ""
    if not path:
        raise ConfigError(
            "the SQLite database has no file (in-memory or temporary), so no other process can "
            "share it; give the target a file URL such as sqlite:///app.db"
        )
    return Path(path)
