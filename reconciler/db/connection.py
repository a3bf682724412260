"""The control plane's own database access: one small engine per URL, bounded in time.

Connections carry our `application_name` (role `ctl`), a connect timeout and TCP keepalives; the
engine is in autocommit mode so that the session advisory lock never leaves a transaction open.
A failure to connect becomes `UnreachableError` with the password masked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from reconciler import logs, sessions
from reconciler.core.state import DbSnapshot
from reconciler.db.journal import SHARED_SESSION
from reconciler.errors import UnreachableError
from reconciler.redact import redact

log = logs.get("reconciler.db")

CTL_STATEMENT_TIMEOUT = 60.0


def _connect_args(backend: str, driver: str, connect_timeout: float) -> dict[str, Any]:
    seconds = max(1, round(connect_timeout))
    if backend == "postgresql":
        args: dict[str, Any] = {
            "connect_timeout": seconds,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": seconds * 3000,  # ms: a black-holed network fails the query
        }
        if driver == "psycopg":
            # psycopg 3 prepares a query run 5 times on one connection; behind a transaction
            # pooler the next run lands on a server session without it ("_pg3_0 does not exist")
            args["prepare_threshold"] = None
        return args
    if backend in ("mysql", "mariadb"):
        return {"connect_timeout": seconds}
    if backend == "sqlite":
        return {"timeout": connect_timeout}
    return {}


def make_engine(
    url: str,
    target: str,
    connect_timeout: float,
    role: str = "ctl",
    pooled: bool = True,
    on_connect: Callable[[Any], object] | None = None,
    shared: bool = False,
) -> sa.engine.Engine:
    """`pooled` False: every connection is new and closed for good afterwards (a probe's).
    `on_connect` runs on each new DBAPI connection (SQLite: attach the journal's side file).
    `shared` (see `shares_sessions`): every connection of the engine, in any thread, is one
    server session, in autocommit: a fleet's tenants take their locks and write their journal
    rows on it, so a fleet of any size costs one control-plane connection."""
    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    connect_args = _connect_args(backend, parsed.get_driver_name(), connect_timeout)
    # One pooled connection, kept between runs: the in-sync run is then a single round trip
    # (no pre-ping; a connection the server dropped is retried once by the caller).
    if shared and shares_sessions(url):
        engine = sa.create_engine(
            parsed,
            future=True,
            isolation_level="AUTOCOMMIT",
            poolclass=sa.pool.StaticPool,
            pool_reset_on_return=None,
            connect_args=connect_args,
        )

        @event.listens_for(engine, "connect")
        def _mark_shared(_dbapi_connection: Any, record: Any) -> None:
            record.info[SHARED_SESSION] = True

    elif not pooled:
        engine = sa.create_engine(
            parsed,
            future=True,
            connect_args=connect_args,
            poolclass=sa.pool.NullPool,
            **({} if backend == "sqlite" else {"isolation_level": "AUTOCOMMIT"}),
        )
    elif backend == "sqlite":
        engine = sa.create_engine(
            parsed,
            future=True,
            connect_args=connect_args,
            poolclass=sa.pool.QueuePool,
            pool_size=1,
            max_overflow=2,
        )
    else:
        engine = sa.create_engine(
            parsed,
            future=True,
            isolation_level="AUTOCOMMIT",
            pool_size=1,
            max_overflow=2,
            connect_args=connect_args,
        )
    # Our own queries are short; bound them so a stuck server cannot stall the loop.
    statements = sessions.session_statements(
        backend, sessions.application_name(target, role), statement_timeout=CTL_STATEMENT_TIMEOUT
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        sessions.run_session_statements(dbapi_connection, statements)
        if on_connect is not None:
            on_connect(dbapi_connection)

    return engine


def backend_of(engine: sa.engine.Engine) -> str:
    name = engine.dialect.name
    return "mysql" if name == "mariadb" else name


_THREAD_SAFE_DRIVERS = ("psycopg2", "psycopg")  # a connection may be used by several threads


def shares_sessions(url: str) -> bool:
    """Whether `make_engine(shared=True)` gives one shared session for `url`: PostgreSQL through
    a driver whose connections are thread-safe (psycopg2, psycopg 3). Else the engine is an
    ordinary pooled one."""
    parsed = sa.engine.make_url(url)
    return parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in _THREAD_SAFE_DRIVERS


@contextmanager
def connect(engine: sa.engine.Engine) -> Iterator[sa.engine.Connection]:
    """A connection, or `UnreachableError` saying which server could not be reached and why."""
    try:
        conn = engine.connect()
    except sa.exc.DBAPIError as exc:
        raise unreachable(engine, exc) from None
    try:
        yield conn
    finally:
        with suppress(sa.exc.DBAPIError):
            conn.close()


def unreachable(engine: sa.engine.Engine, exc: BaseException) -> UnreachableError:
    where = redact(engine.url.render_as_string(hide_password=True))
    reason = redact(str(getattr(exc, "orig", exc))).strip().splitlines()
    detail = reason[0] if reason else exc.__class__.__name__
    return UnreachableError(
        f"database {where} is unreachable: {detail}; check that the server is up and the URL, "
        "user and network are right"
    )


def cancel_statements(engine: sa.engine.Engine, names: Sequence[str], this_database: bool = True) -> bool:
    """PostgreSQL: cancel the statement each session named one of `names` (our appliers'
    `application_name`) is running, on the engine's database only unless `this_database` is
    False (a fleet with a database per tenant). False when the server could not be asked: the
    caller stops its worker another way."""
    where = " AND datname = current_database()" if this_database else ""
    try:
        with connect(engine) as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                    f"WHERE application_name = ANY(:names){where}"
                ),
                {"names": list(names)},
            )
    except (UnreachableError, sa.exc.DBAPIError) as exc:
        log.warning("cancel_failed", error=redact(str(exc)))
        return False
    return True


def is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, sa.exc.DBAPIError) and (
        bool(exc.connection_invalidated) or isinstance(exc, sa.exc.OperationalError)
    )


def read_heads(conn: sa.engine.Connection, table: str, schema: str | None) -> frozenset[str] | None:
    """Rows of the version table, or None when the table does not exist."""
    quoted = conn.dialect.identifier_preparer.quote(table)
    if schema:
        quoted = f"{conn.dialect.identifier_preparer.quote_schema(schema)}.{quoted}"
    try:
        rows = conn.execute(sa.text(f"SELECT version_num FROM {quoted}")).fetchall()
    except (sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
        if conn.in_transaction():
            conn.rollback()
        if _table_missing(conn, table, schema):
            return None
        raise exc
    return frozenset(str(r[0]) for r in rows)


def _table_missing(conn: sa.engine.Connection, table: str, schema: str | None) -> bool:
    try:
        return not sa.inspect(conn).has_table(table, schema=schema)
    except sa.exc.DBAPIError:
        return False


def user_tables(conn: sa.engine.Connection, schema: str | None, ignore: tuple[str, ...]) -> list[str]:
    names = sa.inspect(conn).get_table_names(schema=schema)
    skip = {n.lower() for n in ignore}
    return sorted(n for n in names if n.lower() not in skip and not n.startswith("sqlite_"))


def snapshot(
    conn: sa.engine.Connection, table: str, schema: str | None, ignore: tuple[str, ...]
) -> DbSnapshot:
    """What the state decision needs; one query in the common case (version table present)."""
    heads = read_heads(conn, table, schema)
    if heads:
        return DbSnapshot(reachable=True, version_table_exists=True, db_heads=heads, has_user_tables=True)
    others = user_tables(conn, schema, (table, *ignore))
    return DbSnapshot(
        reachable=True,
        version_table_exists=heads is not None,
        db_heads=heads or frozenset(),
        has_user_tables=bool(others),
    )


def unreachable_snapshot() -> DbSnapshot:
    return DbSnapshot(
        reachable=False, version_table_exists=False, db_heads=frozenset(), has_user_tables=False
    )
