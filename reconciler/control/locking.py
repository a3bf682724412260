"""The target's advisory lock: prove session affinity → try-lock (polling) → announce → orphan wait.

Invariants 2, 4 and 5 of docs/architecture.md: the lock is taken by polling, never by blocking;
a session lock is trusted only on a provably private server session; after taking it, no
`apply` session of a killed applier may still be running on the server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import sqlalchemy as sa

from reconciler import logs, sessions
from reconciler.control.target import TargetHandle, journal_seen
from reconciler.db import affinity, connection, flags, locks
from reconciler.errors import LockTimeout
from reconciler.redact import redact

log = logs.get("reconciler.reconcile")

_SESSION_ID_SQL = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


@contextmanager
def target_lock(handle: TargetHandle, conn: sa.engine.Connection, timeout: float) -> Iterator[float]:
    """Hold the target's advisory lock (polling, never blocking); yields seconds waited."""
    unsafe = handle.settings.unsafe
    if unsafe:
        log.warning("safeguards_disabled", target=handle.target_name, disabled=sorted(unsafe))
    with ExitStack() as stack:
        engine = handle.engines.get_lock()
        lock_conn = conn if engine is handle.engine else stack.enter_context(connection.connect(engine))
        lock = locks.AdvisoryLock(lock_conn, handle.lock_key, handle.sqlite_path)
        stack.callback(lock.release)
        stack.callback(_forget_announcement, handle)
        started = time.monotonic()
        if lock.dialect == "postgresql" and "affinity" not in unsafe:
            _prove_affinity(handle, lock_conn, engine)
        if "lock" not in unsafe:
            _acquire(handle, conn, lock, timeout)
            _announce_holder(handle, conn, lock_conn)
        if handle.backend == "postgresql" and "orphan_wait" not in unsafe:
            locks.wait_for_orphans(
                conn,
                sessions.apply_prefix(handle.target_name),
                handle.settings.apply.orphan_wait_timeout,
            )
        yield time.monotonic() - started


def lock_holder(handle: TargetHandle, conn: sa.engine.Connection) -> dict[str, object] | None:
    """Who holds the target's lock now (None: nobody, or the server would not say)."""
    lock = locks.AdvisoryLock(conn, handle.lock_key, handle.sqlite_path)
    try:
        return lock.holder()
    except sa.exc.DBAPIError:
        return None


def ensure_journal(handle: TargetHandle, conn: sa.engine.Connection) -> None:
    """Create the journal tables if missing, and announce the lock holder there (under the
    lock). Called only once what is about to be written was validated: a command that ends
    in a configuration error (exit 2) leaves the database as it found it."""
    handle.place.ensure(conn)
    handle.cache.journal_seen = True
    _announce(handle, conn)


def _acquire(
    handle: TargetHandle, conn: sa.engine.Connection, lock: locks.AdvisoryLock, timeout: float
) -> None:
    """Take the lock; a waiter names the holder's process (host, pid) when it announced itself."""

    def waiting(event: dict[str, Any]) -> None:
        holder = event.get("holder")
        if holder:
            holder.update(_announced(handle, conn, holder))
        log.info("lock_waiting", target=handle.target_name, holder=holder)

    try:
        lock.acquire(timeout, on_wait=waiting)
    except LockTimeout as exc:
        announced = _announced(handle, conn, exc.holder) if exc.holder else {}
        if not announced:
            raise
        holder = {**exc.holder, **announced}
        raise LockTimeout(
            f"{exc} The holder is replica {announced['replica']} (pid {announced['replica_pid']} "
            f"on host {announced['replica_host']}).",
            holder=holder,
        ) from None


def _announce_holder(
    handle: TargetHandle, conn: sa.engine.Connection, lock_conn: sa.engine.Connection
) -> None:
    """Record, under the lock, which process and database session hold it: MariaDB's holder
    report has no pid, and PostgreSQL's names the backend, not our process. Into an existing
    journal at once; else when `ensure_journal` creates it (nothing is created before then)."""
    sql = _SESSION_ID_SQL.get(handle.backend)
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
    handle.cache.announcement = json.dumps(value)
    if journal_seen(handle, conn):
        _announce(handle, conn)


def _announce(handle: TargetHandle, conn: sa.engine.Connection) -> None:
    if handle.cache.announcement is not None:
        flags.put(conn, handle.journal, flags.holder_key(handle.target_name), handle.cache.announcement)
        handle.cache.announcement = None


def _forget_announcement(handle: TargetHandle) -> None:
    handle.cache.announcement = None


def _announced(
    handle: TargetHandle, conn: sa.engine.Connection, holder: dict[str, object]
) -> dict[str, object]:
    """The announcement of the process behind `holder`'s session, if it made one."""
    key = flags.holder_key(handle.target_name)
    try:
        text = flags.read(conn, handle.journal, [key]).get(key)
        value = json.loads(text) if text else {}
    except (ValueError, sa.exc.DBAPIError):
        return {}
    session = holder.get("connection_id", holder.get("pid"))
    if not isinstance(value, dict) or session is None or value.get("session") != session:
        return {}  # stale: another session holds it now
    return {k: value[k] for k in ("replica", "replica_host", "replica_pid") if k in value}


def _prove_affinity(handle: TargetHandle, lock_conn: sa.engine.Connection, engine: sa.engine.Engine) -> None:
    """Invariant 5: a session lock is trusted only on a provably private server session (a
    fleet's shared session once, see `Engines.shared`)."""
    where = redact(engine.url.render_as_string(hide_password=True))
    proof = handle.engines.proof
    with proof.lock:
        if proof.proven:
            return
        affinity.require(
            lock_conn,
            lambda: connection.connect(handle.engines.get_probe(engine)),
            where,
            bool(handle.settings.target.lock_url),
        )
        proof.proven = handle.engines.shared
