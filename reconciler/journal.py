"""Our side table: one row per revision step, plus a small key/value table for flags.

`alembic_version` is never changed in shape; everything we remember lives here. The tables are
created under the advisory lock, carry their own schema version (row `schema_version` in the
flags table), and are written with the control plane's autocommit connection, so a `started` row
exists before the worker begins a revision and survives that revision's rollback.

A `started` row without `completed_at` means the step was interrupted. Under the lock, before
applying anything, `settle_interrupted` decides what happened: the version table says the revision
is applied → `applied`; DDL is transactional (PostgreSQL, SQLite) → `rolled_back`; otherwise
(MySQL / MariaDB commit DDL as they go) the revision may be half-applied → `dirty`, and applying
stops until an operator says what is true.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from reconciler import __version__
from reconciler.dbsession import replica_id
from reconciler.redact import redact

SCHEMA_VERSION = "1"
TRANSACTIONAL_DDL = ("postgresql", "sqlite")
MAX_ERROR = 2000


@dataclass(frozen=True)
class JournalTables:
    metadata: sa.MetaData
    steps: sa.Table
    flags: sa.Table

    @property
    def names(self) -> tuple[str, str]:
        return (self.steps.name, self.flags.name)


def tables(name: str, schema: str | None = None) -> JournalTables:
    metadata = sa.MetaData(schema=schema or None)
    steps = sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("target", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(16), nullable=False),
        sa.Column("revision", sa.String(64), nullable=False),
        sa.Column("down_revisions", sa.String(512), nullable=False, default=""),
        sa.Column("file_hash", sa.String(64), nullable=False, default=""),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("completed_at", sa.DateTime, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("error_class", sa.String(128), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("sqlstate", sa.String(16), nullable=True),
        sa.Column("host", sa.String(128), nullable=False),
        sa.Column("tool_version", sa.String(32), nullable=False),
        sa.Column("trigger", sa.String(64), nullable=False, default=""),
    )
    flags = sa.Table(
        f"{name}_flags",
        metadata,
        sa.Column("key", sa.String(190), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    return JournalTables(metadata, steps, flags)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None, microsecond=0)


def now_iso() -> str:
    return _now().strftime("%Y-%m-%dT%H:%M:%SZ")


def ensure(conn: sa.engine.Connection, jt: JournalTables) -> None:
    """Create the journal tables if missing and record their schema version (call under the lock)."""
    jt.metadata.create_all(conn, checkfirst=True)
    _commit(conn)
    current = conn.execute(
        sa.select(jt.flags.c.value).where(jt.flags.c.key == "schema_version")
    ).scalar()
    if current is None:
        conn.execute(
            jt.flags.insert().values(key="schema_version", value=SCHEMA_VERSION, updated_at=_now())
        )
        _commit(conn)


def _commit(conn: sa.engine.Connection) -> None:
    if conn.in_transaction():
        conn.commit()


def exists(conn: sa.engine.Connection, jt: JournalTables) -> bool:
    return bool(sa.inspect(conn).has_table(jt.steps.name, schema=jt.steps.schema))


def record_started(
    conn: sa.engine.Connection,
    jt: JournalTables,
    *,
    target: str,
    operation: str,
    revision: str,
    down_revisions: Iterable[str] = (),
    file_hash: str = "",
    trigger: str = "",
) -> int:
    result = conn.execute(
        jt.steps.insert().values(
            target=target[:64],
            operation=operation,
            revision=revision,
            down_revisions=",".join(down_revisions),
            file_hash=file_hash,
            started_at=_now(),
            outcome="started",
            host=replica_id()[:128],
            tool_version=__version__,
            trigger=trigger[:64],
        )
    )
    _commit(conn)
    key = result.inserted_primary_key
    return int(key[0]) if key and key[0] is not None else _last_id(conn, jt)


def _last_id(conn: sa.engine.Connection, jt: JournalTables) -> int:
    return int(conn.execute(sa.select(sa.func.max(jt.steps.c.id))).scalar() or 0)


def record_finished(
    conn: sa.engine.Connection,
    jt: JournalTables,
    row_id: int,
    *,
    outcome: str,
    duration_ms: int | None = None,
    error_class: str | None = None,
    error: str | None = None,
    sqlstate: str | None = None,
) -> None:
    conn.execute(
        jt.steps.update()
        .where(jt.steps.c.id == row_id)
        .values(
            completed_at=_now(),
            outcome=outcome,
            duration_ms=duration_ms,
            error_class=error_class,
            error=redact(error)[:MAX_ERROR] if error else None,
            sqlstate=sqlstate,
        )
    )
    _commit(conn)


def ancestry(conn: sa.engine.Connection, jt: JournalTables) -> dict[str, tuple[str, ...]]:
    """revision → its down_revisions, for every revision we ever applied or recorded on first sight
    (empty without a journal). The newest row of a revision wins."""
    try:
        rows = conn.execute(
            sa.select(jt.steps.c.revision, jt.steps.c.down_revisions)
            .where(jt.steps.c.operation.in_(("upgrade", RECORD)))
            .order_by(jt.steps.c.id)
        ).fetchall()
    except sa.exc.DBAPIError:
        _rollback(conn)
        return {}
    return {rev: tuple(d for d in downs.split(",") if d) for rev, downs in rows}


# --- checksums ----------------------------------------------------------------------------------
# A revision's recorded hash is the file_hash of its newest row that says it is applied; a newer
# row that says it was undone (or forgotten by `accept`) means we hold no hash for it.
RECORD = "record"  # operation: a hash recorded without applying (first sight, after a seal)
ACCEPT = "accept"  # operation: an operator accepted a changed (or vanished) revision
APPLYING = frozenset({
    ("upgrade", "applied"), ("upgrade", "resolved_applied"), ("upgrade", "skipped"),
    ("stamp", "stamped"), (RECORD, "recorded"), (ACCEPT, "accepted"),
})
UNDOING = frozenset({("downgrade", "downgraded"), ("downgrade", "draft_rebuilt"), (ACCEPT, "forgotten")})


@dataclass(frozen=True)
class HashRecord:
    revision: str
    file_hash: str
    operation: str
    trigger: str


def recorded_hashes(conn: sa.engine.Connection, jt: JournalTables, target: str) -> dict[str, HashRecord]:
    """revision → the hash we hold for it as applied (empty without a journal)."""
    ops = sorted({op for op, _ in APPLYING | UNDOING})
    try:
        rows = conn.execute(
            sa.select(jt.steps.c.revision, jt.steps.c.file_hash, jt.steps.c.operation,
                      jt.steps.c.outcome, jt.steps.c.trigger)
            .where(jt.steps.c.target == target[:64], jt.steps.c.operation.in_(ops))
            .order_by(jt.steps.c.id)
        ).fetchall()
    except sa.exc.DBAPIError:
        _rollback(conn)
        return {}
    _commit(conn)
    held: dict[str, HashRecord] = {}
    for rev, file_hash, operation, outcome, trigger in rows:
        if (operation, outcome) in APPLYING:
            held[rev] = HashRecord(rev, file_hash or "", operation, trigger or "")
        elif (operation, outcome) in UNDOING:
            held.pop(rev, None)
    return held


def record_hash(
    conn: sa.engine.Connection,
    jt: JournalTables,
    *,
    target: str,
    operation: str,
    revision: str,
    file_hash: str,
    down_revisions: Iterable[str] = (),
    outcome: str = "recorded",
    trigger: str = "",
) -> int:
    """One completed row that records (or, with outcome `forgotten`, drops) a revision's hash."""
    row = record_started(conn, jt, target=target, operation=operation, revision=revision,
                         down_revisions=down_revisions, file_hash=file_hash, trigger=trigger)
    record_finished(conn, jt, row, outcome=outcome, duration_ms=0)
    return row


def steps(
    conn: sa.engine.Connection,
    jt: JournalTables,
    *,
    target: str | Iterable[str] | None = None,
    revision: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """The newest `limit` steps, oldest first (none when there is no journal yet); of `target`
    (a name, or several: every chain's) when given."""
    query = sa.select(jt.steps).order_by(jt.steps.c.id.desc()).limit(max(1, limit))
    if isinstance(target, str):
        query = query.where(jt.steps.c.target == target[:64])
    elif target is not None:
        query = query.where(jt.steps.c.target.in_([t[:64] for t in target]))
    if revision is not None:
        query = query.where(jt.steps.c.revision == revision)
    try:
        rows = conn.execute(query).mappings().fetchall()
    except sa.exc.DBAPIError:
        _rollback(conn)
        return []
    _commit(conn)
    return [dict(r) for r in reversed(rows)]


def _rollback(conn: sa.engine.Connection) -> None:
    if conn.in_transaction():
        conn.rollback()


def rows_with_outcome(
    conn: sa.engine.Connection, jt: JournalTables, outcome: str, target: str | None = None
) -> list[Mapping[str, Any]]:
    """Steps whose outcome is `outcome`, oldest first (none when there is no journal yet); only
    those of `target` (a chain's journal target) when given."""
    query = sa.select(jt.steps).where(jt.steps.c.outcome == outcome).order_by(jt.steps.c.id)
    if target is not None:
        query = query.where(jt.steps.c.target == target[:64])
    try:
        rows = conn.execute(query).mappings().fetchall()
    except sa.exc.DBAPIError:
        _rollback(conn)
        return []
    return [dict(r) for r in rows]


def open_rows(
    conn: sa.engine.Connection, jt: JournalTables, target: str | None = None
) -> list[Mapping[str, Any]]:
    """Steps that started and never completed."""
    return rows_with_outcome(conn, jt, "started", target)


def dirty_rows(
    conn: sa.engine.Connection, jt: JournalTables, target: str | None = None
) -> list[Mapping[str, Any]]:
    """Steps already judged `dirty`: possibly half-applied, waiting for an operator."""
    return rows_with_outcome(conn, jt, "dirty", target)


def settle_interrupted(
    conn: sa.engine.Connection,
    jt: JournalTables,
    applied: frozenset[str],
    dialect: str,
    target: str | None = None,
) -> list[Mapping[str, Any]]:
    """Judge interrupted steps (under the lock); return the ones that are now `dirty`. With
    `target`, only that chain's steps: `applied` is what its own version table says."""
    for row in open_rows(conn, jt, target):
        if row["operation"] == "upgrade" and row["revision"] in applied:
            outcome = "applied"
        elif dialect in TRANSACTIONAL_DDL:
            outcome = "rolled_back"
        else:
            outcome = "dirty"
        conn.execute(jt.steps.update().where(jt.steps.c.id == row["id"]).values(outcome=outcome))
        _commit(conn)
    return dirty_rows(conn, jt, target)


def resolve_dirty(conn: sa.engine.Connection, jt: JournalTables, revision: str, outcome: str) -> int:
    """An operator says what became of a dirty step: `applied` or `rolled_back`."""
    result = conn.execute(
        jt.steps.update()
        .where(jt.steps.c.revision == revision, jt.steps.c.outcome == "dirty")
        .values(outcome=f"resolved_{outcome}", completed_at=_now())
    )
    _commit(conn)
    return int(result.rowcount or 0)
