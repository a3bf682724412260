"""One server session handed from the guard's recording to env.py's first connection (PostgreSQL).

A tenant's worker records the pending revisions through a connection of its own, then runs
env.py, which opens another: two server sessions a job, each a backend to start and a catalog
cache to warm. When the recording ends, its DBAPI connection is reset (`DISCARD ALL`: settings,
temporary tables, prepared statements, advisory locks all gone, as a new session has them) and
kept; the next connection the worker's `do_connect` listener (`connguard.IdentityCheck`) sees
with exactly the same connect arguments (driver, host, database, user, password, options) gets
it instead of a new one, and the pool's `connect` listeners then run on it as on any new
session (identity check, session settings). Arguments that differ (env.py connects as another
role, or elsewhere) get a new connection, and the kept one is closed then: it never waits idle
beside env.py's. Only PostgreSQL: MySQL has no statement that resets a session that completely.
"""

from __future__ import annotations

import contextlib
from typing import Any

CONNECT_KEY = "reconciler_connect_key"  # in a pool record's info: the arguments it connected with
_RESETTABLE = frozenset({"psycopg", "psycopg2"})
_kept: list[tuple[tuple[str, ...], Any]] = []


def connect_key(driver: str, cargs: Any, cparams: dict[str, Any]) -> tuple[str, ...]:
    """What a connection's identity is made of: the driver and every argument it connects with
    but psycopg's `context` (the engine's adapters: `take` gives the connection the new one's)."""
    named = sorted((k, v) for k, v in cparams.items() if k != "context")
    return (driver, repr(tuple(cargs)), repr(named))


def offer(key: tuple[str, ...] | None, dbapi_connection: Any) -> bool:
    """Keep `dbapi_connection` (no transaction open) for the next connection made with `key`
    (`connect_key`: its driver first), once it is reset to a new session's state. False: it was
    not kept (close it)."""
    if key is None or key[0] not in _RESETTABLE:
        return False
    try:
        dbapi_connection.autocommit = True  # DISCARD ALL cannot run inside a transaction
        cursor = dbapi_connection.cursor()
        cursor.execute("DISCARD ALL")
        cursor.close()
        dbapi_connection.autocommit = False
    except Exception:  # a connection the server dropped, or any driver error: not handed over
        return False
    discard()
    _kept.append((key, dbapi_connection))
    return True


def take(key: tuple[str, ...], cparams: dict[str, Any]) -> Any | None:
    """The kept connection when it was made with `key`, with the adapters of the engine now
    connecting (`cparams`' psycopg `context`, as psycopg's connect sets them); None else (and a
    kept one is closed)."""
    if not _kept:
        return None
    kept_key, dbapi_connection = _kept.pop()
    if kept_key != key:
        _close(dbapi_connection)
        return None
    context = cparams.get("context")
    if context is not None:
        from psycopg.adapt import AdaptersMap  # deferred: only a psycopg 3 connection has them

        dbapi_connection._adapters = AdaptersMap(context.adapters)
    return dbapi_connection


def discard() -> None:
    """Close the kept connection, if any."""
    while _kept:
        _close(_kept.pop()[1])


def _close(dbapi_connection: Any) -> None:
    with contextlib.suppress(Exception):  # closing a broken connection may raise: it is gone
        dbapi_connection.close()
