"""Hooks for a project's own env.py or app factory, for when something else than reconciler runs
`alembic` or `flask db`.

Importing this module needs only the standard library (`migration_lock` imports SQLAlchemy and
our lock code when called).

Leave our bookkeeping tables alone (the worker already excludes them on its own). By default the
journal lives where autogenerate does not look (its own schema or database, an attached file on
SQLite), so an unchanged env.py needs nothing; add the filter when env.py sets
`include_schemas=True` (autogenerate then reflects our `reconciler` schema too), or when the
journal sits beside your tables (`[journal] placement = "default"`, or no CREATE privilege):

    from reconciler.hooks import exclude_reconciler_tables
    context.configure(..., include_object=exclude_reconciler_tables)

Take reconciler's advisory lock around your own upgrade, so it never runs a revision at the same
time as a reconciler sidecar (better still: switch start-up migrations off):

    from reconciler.hooks import migration_lock
    with app.app_context(), migration_lock(db.engine):
        flask_migrate.upgrade()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reconciler.sessions import in_reconciler_worker

RECONCILER_TABLES = frozenset({"reconciler_journal", "reconciler_journal_flags"})
RECONCILER_SCHEMA = "reconciler"  # the journal's side schema; on MySQL / MariaDB `<db>_reconciler`


def exclude_reconciler_tables(
    object: Any,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: Any,
) -> bool:
    """Alembic `include_object` hook: False for our journal tables (in any schema) and anything in
    our side schema, True for everything else."""
    if type_ == "table" and name in RECONCILER_TABLES:
        return False
    return not is_reconciler_schema(getattr(object, "schema", None))


def exclude_reconciler_table_names(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic `include_name` hook: skip reflecting our journal tables and our side schema at all."""
    if type_ == "schema":
        return not is_reconciler_schema(name)
    if type_ == "table" and name in RECONCILER_TABLES:
        return False
    schema = parent_names.get("schema_name") if isinstance(parent_names, dict) else None
    return not is_reconciler_schema(schema)


def is_reconciler_schema(schema: str | None) -> bool:
    """Our side schema: `reconciler` (PostgreSQL), `<database>_reconciler` (MySQL / MariaDB)."""
    return bool(schema) and (schema == RECONCILER_SCHEMA or str(schema).endswith("_" + RECONCILER_SCHEMA))


@contextmanager
def migration_lock(
    bind: Any,
    *,
    version_table: str = "alembic_version",
    version_table_schema: str | None = None,
    lock_key: str = "",
    timeout: float = 300.0,
) -> Iterator[None]:
    """Hold reconciler's advisory lock of this database while the block runs.

    `bind` is a SQLAlchemy Engine or Connection (or a URL string) of the migrated database; the
    other arguments must match the reconciler's `[target]` settings of the same names (the
    defaults match its defaults). The lock is taken by polling on a connection of its own and is
    session level, so it holds across the transactions your upgrade commits. Raises
    `reconciler.errors.LockTimeout` (naming the holder) after `timeout` seconds. Inside
    reconciler's own worker (env.py run by the reconciler) it does nothing: the lock is held.
    """
    if in_reconciler_worker():
        yield
        return
    # deferred: importing hooks (in any app's env.py) costs the standard library only
    import sqlalchemy as sa

    from reconciler.db import locks  # deferred: as above

    engine = sa.create_engine(bind, poolclass=sa.pool.NullPool) if isinstance(bind, str) else bind.engine
    database = engine.url.database or ""
    key = locks.lock_key(database, version_table_schema, version_table, lock_key)
    on_file = engine.dialect.name == "sqlite" and database not in ("", ":memory:")
    sqlite_file = Path(database) if on_file else None
    with engine.connect() as conn:
        lock = locks.AdvisoryLock(conn.execution_options(isolation_level="AUTOCOMMIT"), key, sqlite_file)
        lock.acquire(timeout)
        try:
            yield
        finally:
            lock.release()
    if isinstance(bind, str):
        engine.dispose()
