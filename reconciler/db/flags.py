"""What a fleet of replicas must decide once, kept in the database (the journal's flags table).

Keys are per target:
- `suspended/<target>`: set by `reconciler suspend`; no replica applies while it is there.
- `failures/<target>`: the last failure signature, how often it repeated in a row, and (the retry
  gate) the database's clock when it was counted and when the fleet may try it again: a daemon
  tick that holds the lock before `retry_after` does not run the revision (`retry_deferred`).
- `blocked/<target>`: the revision (and its file hash) that failed `blocked_after` times the same
  way; applying stops until that file changes or an operator runs `reconciler resume`.
- `lock_holder/<target>`: the replica (host, pid) and database session that took the lock last;
  a waiter names that process when the session still holds the lock (MariaDB shows no pid).
- `progress/<target>`: the plan of the lock holder's run (its pending revisions, when it began,
  which replica), written once before its first revision; with the journal's open step `wait`
  says which revision is applied, n of N, since when.
- `drift/<target>`: the fleet's last drift compare (see drift.py), written by the lock holder.
- `alert/<target>/<event>`: the last alert transition sent for the fleet; `claim` lets exactly
  one replica win each transition (insert-on-conflict, then a conditional update).

Failure counts and blocking are written only by the lock holder, so a read-modify-write is safe.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from reconciler.core.backoff import backoff
from reconciler.core.failures import Failure
from reconciler.db.journal import JournalTables


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)


def _commit(conn: sa.engine.Connection) -> None:
    if conn.in_transaction():
        conn.commit()


def _rollback(conn: sa.engine.Connection) -> None:
    if conn.in_transaction():
        conn.rollback()


def read(conn: sa.engine.Connection, jt: JournalTables, keys: list[str]) -> dict[str, str]:
    """The values of `keys` that are set (empty when the flags table does not exist yet)."""
    try:
        rows = conn.execute(
            sa.select(jt.flags.c.key, jt.flags.c.value).where(jt.flags.c.key.in_(keys))
        ).fetchall()
    except sa.exc.DBAPIError:
        _rollback(conn)
        return {}
    _commit(conn)
    return {str(k): str(v) for k, v in rows}


def put(conn: sa.engine.Connection, jt: JournalTables, key: str, value: str) -> None:
    """Set a flag (insert, or update when it exists): one statement on PostgreSQL."""
    if conn.dialect.name == "postgresql":
        insert = postgresql.insert(jt.flags).values(key=key, value=value, updated_at=_now())
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[jt.flags.c.key],
                set_={"value": insert.excluded.value, "updated_at": insert.excluded.updated_at},
            )
        )
        _commit(conn)
        return
    updated = conn.execute(
        jt.flags.update().where(jt.flags.c.key == key).values(value=value, updated_at=_now())
    ).rowcount
    if not updated:
        try:
            conn.execute(jt.flags.insert().values(key=key, value=value, updated_at=_now()))
        except sa.exc.IntegrityError:  # inserted concurrently: ours is the newer value
            _rollback(conn)
            conn.execute(
                jt.flags.update().where(jt.flags.c.key == key).values(value=value, updated_at=_now())
            )
    _commit(conn)


def delete(conn: sa.engine.Connection, jt: JournalTables, key: str) -> bool:
    removed = conn.execute(jt.flags.delete().where(jt.flags.c.key == key)).rowcount
    _commit(conn)
    return bool(removed)


def claim(conn: sa.engine.Connection, jt: JournalTables, key: str, value: str) -> bool:
    """Record `value` under `key` unless it is already there; True for the one caller that did."""
    try:
        conn.execute(jt.flags.insert().values(key=key, value=value, updated_at=_now()))
        _commit(conn)
        return True
    except sa.exc.IntegrityError:
        _rollback(conn)
    changed = conn.execute(
        jt.flags.update()
        .where(jt.flags.c.key == key, jt.flags.c.value != value)
        .values(value=value, updated_at=_now())
    ).rowcount
    _commit(conn)
    return bool(changed == 1)


# --- keys --------------------------------------------------------------------------------------
def suspended_key(target: str) -> str:
    return f"suspended/{target}"


def blocked_key(target: str) -> str:
    return f"blocked/{target}"


def failures_key(target: str) -> str:
    return f"failures/{target}"


def environment_key(target: str) -> str:
    """`prod` once a prod reconciler applied to the database; dev mode never touches it then."""
    return f"environment/{target}"


def checksums_key(target: str) -> str:
    """Set once hashes of applied revisions were recorded: later unrecorded ones are foreign."""
    return f"checksums/{target}"


def alert_key(target: str, event: str) -> str:
    return f"alert/{target}/{event}"


def holder_key(target: str) -> str:
    """Who took the lock last: process, host and database session (see `reconcile.locked`)."""
    return f"lock_holder/{target}"


def progress_key(target: str) -> str:
    """The plan of the apply in progress: pending revisions, start, replica (`wait` reads it)."""
    return f"progress/{target}"


# --- failures and blocking (the signature: core.failures) ------------------------------


def db_time(conn: sa.engine.Connection) -> float | None:
    """The database server's clock, in epoch seconds: every replica reads the same clock, so a
    replica whose own clock is skewed still agrees with the others on when a retry is due.
    None when it cannot be read: the retry gate then never holds a run back."""
    name = conn.dialect.name
    if name == "postgresql":
        query = "SELECT EXTRACT(EPOCH FROM clock_timestamp())"
    elif name in ("mysql", "mariadb"):
        query = "SELECT UNIX_TIMESTAMP(SYSDATE(6))"
    else:  # SQLite: a local file, so the local clock is everyone's
        query = "SELECT (julianday('now') - 2440587.5) * 86400.0"
    try:
        value: Any = conn.execute(sa.text(query)).scalar_one()
    except sa.exc.DBAPIError:
        _rollback(conn)
        return None
    _commit(conn)
    return float(value)


def record_failure(
    conn: sa.engine.Connection,
    jt: JournalTables,
    target: str,
    failure: Failure,
    blocked_after: int,
    retry_base: float = 0.0,
    retry_cap: float = 0.0,
) -> Failure:
    """Count a failure (under the lock); block the revision when it repeats `blocked_after` times.

    With `retry_base` (the daemon interval; `retry_cap`: backoff_max) the record also says when
    the fleet may try it again: the database's clock now plus the shared backoff for this count
    (1-2 intervals after the first failure, then 2-4, ...). The blocked record keeps the shape
    an older release reads."""
    previous = Failure.loads(read(conn, jt, [failures_key(target)]).get(failures_key(target)))
    count = previous.count + 1 if previous and previous.signature == failure.signature else 1
    counted = dataclasses.replace(failure, count=count)
    now = db_time(conn) if retry_base > 0 else None
    if now is not None:
        counted = dataclasses.replace(
            counted, failed_at=now, retry_after=now + backoff(count, base=retry_base, cap=retry_cap)
        )
    put(conn, jt, failures_key(target), counted.dumps())
    if blocked_after > 0 and count >= blocked_after:
        plain = dataclasses.replace(counted, failed_at=0.0, retry_after=0.0)  # the old shape
        put(conn, jt, blocked_key(target), plain.dumps())
    return counted


def clear_failures(conn: sa.engine.Connection, jt: JournalTables, target: str) -> None:
    delete(conn, jt, failures_key(target))
