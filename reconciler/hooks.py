"""Hooks for a project's own env.py or app factory, for when something else than reconciler runs
`alembic` or `flask db`.

Importing this module needs only the standard library (`migration_lock` imports SQLAlchemy and
our lock code when called).

Leave our bookkeeping tables alone (the worker already excludes them on its own):

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

RECONCILER_TABLES = frozenset({"reconciler_journal", "reconciler_journal_flags"})
_IN_WORKER = [False]  # set in reconciler's worker: its control plane already holds the lock


def inside_reconciler_worker() -> None:
    """Called by reconciler's worker at start: `migration_lock` in env.py then takes no lock (the
    reconciler that runs env.py holds it already, on another connection)."""
    _IN_WORKER[0] = True


def exclude_reconciler_tables(
    object: Any,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: Any,
) -> bool:
    """Alembic `include_object` hook: False for our journal tables, True for everything else."""
    return not (type_ == "table" and name in RECONCILER_TABLES)


def exclude_reconciler_table_names(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic `include_name` hook: skip reflecting our journal tables at all."""
    return not (type_ == "table" and name in RECONCILER_TABLES)


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
    if _IN_WORKER[0]:
        yield
        return
    import sqlalchemy as sa

    from reconciler import locks

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
