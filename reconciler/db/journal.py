"""Our side table: one row per revision step, plus a small key/value table for flags.

`alembic_version` is never changed in shape; everything we remember lives here. The tables are
created under the advisory lock, carry their own schema version (row `schema_version` in the
flags table), and are written with the control plane's autocommit connection, so a `started` row
exists before the worker begins a revision and survives that revision's rollback.
Where the tables live (a side place or the target's schema) is `db.placement`'s job.

A `started` row without `completed_at` means the step was interrupted. When the worker is about
to leave the revision's transaction (an autocommit block, DDL that commits implicitly on MySQL /
MariaDB, a COMMIT of its own) the step is marked first (flag `non_transactional/<step id>`, see
`mark_non_transactional`), and only then does the worker go on. `judge` decides what an
interrupted step became, from the journal and the version table together: the version table
lists the revision → `applied`; the step was marked → `dirty` (part of it may have run: applying
stops until an operator says what is true); else → `rolled_back` (nothing left its transaction).
A downgrade, and a step a release without marks started (its open row's `sqlstate` is NULL; ours
write "" until the step ends), keep the old rule (`dirty` where DDL commits as it goes).
`settle_interrupted` writes those judgements under the lock; status reads `judge` without it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa

from reconciler import logs
from reconciler.redact import redact
from reconciler.sessions import replica_id
from reconciler.version import __version__

log = logs.get("reconciler.journal")

SCHEMA_VERSION = "1"
TRANSACTIONAL_DDL = ("postgresql", "sqlite")
MAX_ERROR = 2000
WATCHED = ""  # an open step's sqlstate: its worker reports non-transactional sections (see judge)


@dataclass(frozen=True)
class JournalTables:
    metadata: sa.MetaData
    steps: sa.Table
    flags: sa.Table

    @property
    def names(self) -> tuple[str, str]:
        return (self.steps.name, self.flags.name)


@functools.lru_cache(maxsize=128)
def tables(name: str, schema: str | None = None) -> JournalTables:
    """The journal's table definitions in `schema`, made once per (name, schema) and shared by
    every handle placed there (a fleet's tenants: one set, not one per tenant, and SQLAlchemy's
    compiled statements are reused across them). Read-only once made."""
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
    current = conn.execute(sa.select(jt.flags.c.value).where(jt.flags.c.key == "schema_version")).scalar()
    if current is None:
        conn.execute(jt.flags.insert().values(key="schema_version", value=SCHEMA_VERSION, updated_at=_now()))
        _commit(conn)


def _commit(conn: sa.engine.Connection) -> None:
    if conn.in_transaction():
        conn.commit()


def exists(conn: sa.engine.Connection, jt: JournalTables) -> bool:
    schema = jt.steps.schema
    if schema is None and conn.dialect.name == "sqlite":
        schema = "main"  # unqualified, SQLite's PRAGMA also finds the attached side file's table
    return bool(sa.inspect(conn).has_table(jt.steps.name, schema=schema))


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
            sqlstate=WATCHED,
            host=replica_id()[:128],
            tool_version=__version__,
            trigger=trigger[:64],
        )
    )
    _commit(conn)
    key = result.inserted_primary_key
    return int(key[0]) if key and key[0] is not None else _last_id(conn, jt)


SHARED_SESSION = "reconciler_shared_session"  # a connection's info key: see db.connection.make_engine


@contextmanager
def flushed_by_the_worker(conn: sa.engine.Connection) -> Iterator[None]:
    """While a plan runs on PostgreSQL, its commits (ours and the worker's, see
    worker.upgrading) are not flushed one by one; the end flushes them all.

    WAL is one ordered log: a crash can only lose a suffix of it, so what survives is always
    consistent: a revision's commit and the step rows and dirty marks written before it, and
    never a step row without the commits that came before it. `synchronous_commit` is off on
    our connection while the plan runs; at the end it is reset and one synchronous commit (of a
    transaction id) flushes the log up to it, every revision of the plan included, before the
    run reports them applied: as durable as `flask db upgrade`'s one commit at the end. Other
    dialects: nothing changes (SQLite's side file is its own file)."""
    # A fleet's shared session (control.fleet) serves other tenants' runs at the same time: one
    # of them resetting the setting would leave another's end unflushed. It keeps it on.
    postgres = conn.dialect.name == "postgresql" and not conn.info.get(SHARED_SESSION)
    if postgres:
        conn.exec_driver_sql("SET synchronous_commit TO off")
        _commit(conn)
    try:
        yield
    finally:
        if postgres:
            with contextlib.suppress(sa.exc.DBAPIError):  # a broken connection: nothing to flush
                conn.exec_driver_sql("RESET synchronous_commit")
                conn.exec_driver_sql("SELECT txid_current()")  # a commit record, flushed
                _commit(conn)


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
        rows = cast(
            "list[tuple[str, str]]",
            conn.execute(
                sa.select(jt.steps.c.revision, jt.steps.c.down_revisions)
                .where(jt.steps.c.operation.in_(("upgrade", RECORD)))
                .order_by(jt.steps.c.id)
            ).fetchall(),
        )
    except sa.exc.DBAPIError:
        _rollback(conn)
        return {}
    return {rev: tuple(d for d in downs.split(",") if d) for rev, downs in rows}


# --- checksums ----------------------------------------------------------------------------------
RECORD = "record"  # operation: a hash recorded without applying (first sight, after a seal)


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
    conn: sa.engine.Connection, jt: JournalTables, outcome: str | tuple[str, ...], target: str | None = None
) -> list[Mapping[str, Any]]:
    """Steps whose outcome is `outcome` (or one of several, in one query), oldest first (none
    when there is no journal yet); only those of `target` (a chain's journal target) when given."""
    outcomes = (outcome,) if isinstance(outcome, str) else outcome
    query = sa.select(jt.steps).where(jt.steps.c.outcome.in_(outcomes)).order_by(jt.steps.c.id)
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


NON_TRANSACTIONAL = "non_transactional/"  # flags key prefix + step id: the step left its transaction


def mark_non_transactional(
    conn: sa.engine.Connection, jt: JournalTables, row_id: int, revision: str, reason: str
) -> None:
    """The step `row_id` is about to leave its transaction (committed before the worker goes on)."""
    value = f"{revision}: {reason}"[:MAX_ERROR]
    conn.execute(jt.flags.insert().values(key=f"{NON_TRANSACTIONAL}{row_id}", value=value, updated_at=_now()))
    _commit(conn)


def marks(conn: sa.engine.Connection, jt: JournalTables, row_ids: Iterable[int]) -> dict[int, str]:
    """step id → why it left its transaction, for the marked ones of `row_ids`."""
    keys = {f"{NON_TRANSACTIONAL}{int(i)}": int(i) for i in row_ids}
    if not keys:
        return {}
    try:
        rows = conn.execute(
            sa.select(jt.flags.c.key, jt.flags.c.value).where(jt.flags.c.key.in_(list(keys)))
        ).fetchall()
    except sa.exc.DBAPIError:
        _rollback(conn)
        return {}
    _commit(conn)
    return {keys[str(k)]: str(v).split(": ", 1)[-1] for k, v in rows}


def unmark(conn: sa.engine.Connection, jt: JournalTables, row_ids: Iterable[int]) -> None:
    keys = [f"{NON_TRANSACTIONAL}{int(i)}" for i in row_ids]
    if keys:
        conn.execute(jt.flags.delete().where(jt.flags.c.key.in_(keys)))
        _commit(conn)


def judge(
    row: Mapping[str, Any], applied: frozenset[str], marked: bool, dialect: str, unsafe: bool = False
) -> str:
    """What an interrupted step became: `applied`, `dirty` or `rolled_back` (module docstring).
    `unsafe`: RECONCILER_UNSAFE_DISABLE=dirty, a negative control that judges nothing dirty."""
    if row["operation"] == "upgrade" and row["revision"] in applied:
        return "applied"
    if unsafe:
        return "rolled_back"
    # Only upgrades are watched; a step a release without marks started has a NULL sqlstate.
    legacy = row["operation"] != "upgrade" or row.get("sqlstate") is None
    if marked or (legacy and dialect not in TRANSACTIONAL_DDL):
        return "dirty"
    return "rolled_back"


def settle_interrupted(
    conn: sa.engine.Connection,
    jt: JournalTables,
    applied: frozenset[str],
    dialect: str,
    target: str | None = None,
    unsafe: bool = False,
) -> list[Mapping[str, Any]]:
    """Judge interrupted steps (under the lock); return the ones that are now `dirty`. With
    `target`, only that chain's steps: `applied` is what its own version table says."""
    rows = open_rows(conn, jt, target)
    marked = marks(conn, jt, [r["id"] for r in rows])
    for row in rows:
        outcome = judge(row, applied, row["id"] in marked, dialect, unsafe)
        conn.execute(jt.steps.update().where(jt.steps.c.id == row["id"]).values(outcome=outcome))
        _commit(conn)
        if outcome != "dirty":
            unmark(conn, jt, [row["id"]])
        log.info(
            "interrupted_step_settled",
            target=row["target"],
            revision=row["revision"],
            outcome=outcome,
            non_transactional=marked.get(row["id"], ""),
            detail=_SETTLED[outcome],
        )
    return dirty_rows(conn, jt, target)


_SETTLED = {
    "applied": "the version table lists the revision: it completed before its step was recorded",
    "rolled_back": "it never left its transaction: nothing of it remains, it is applied again",
    "dirty": "it left its transaction and the version table does not list it: part of it may "
    "have run; `reconciler status` says what to check",
}


def resolve_dirty(conn: sa.engine.Connection, jt: JournalTables, revision: str, outcome: str) -> int:
    """An operator says what became of a dirty step: `applied` or `rolled_back`."""
    ids = [int(r["id"]) for r in dirty_rows(conn, jt) if r["revision"] == revision]
    unmark(conn, jt, ids)
    result = conn.execute(
        jt.steps.update()
        .where(jt.steps.c.revision == revision, jt.steps.c.outcome == "dirty")
        .values(outcome=f"resolved_{outcome}", completed_at=_now())
    )
    _commit(conn)
    return int(result.rowcount or 0)
