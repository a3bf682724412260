"""Per-connection session settings and database identity, shared by the control plane and the worker.

Imports nothing but the standard library, so the worker can use it inside the project's own
interpreter (SQLAlchemy 1.3 to 2.x). It reads no environment: `config.load` hands it the replica's
host (`set_replica_host`) when the settings are resolved.

- `application_name(target, role, replica)`: how our sessions show up in `pg_stat_activity`;
  `role` is `ctl` for the control plane, `apply` for a worker that runs revisions and `read` for
  one that only reads (the guard's analysis for `status` and `plan`, compares). The orphan wait
  looks for `apply` sessions of one target, so a status read never holds it up.
- `session_statements(...)`: the SQL run on every new DBAPI connection (application name, DDL lock
  timeout, statement timeout).
- `driver_sql(conn)`: run a plain SQL string on a SQLAlchemy connection, on 1.3 to 2.x.
- `identity(conn)`: what makes "the same database" (server + database), so a worker can refuse when
  env.py connected somewhere else than the target.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from typing import Any

APP_PREFIX = "reconciler"
_MAX_APP_NAME = 63  # PostgreSQL's NAMEDATALEN - 1


_replica_host = {"name": ""}  # HOSTNAME of the environment the settings came from (set_replica_host)


def set_replica_host(host: str) -> None:
    """The host part of replica ids: the `HOSTNAME` that `config.load` reads at start-up (a pod's
    name); empty: the machine's host name."""
    _replica_host["name"] = host


def replica_id() -> str:
    """host:pid of this process, short enough for an application name."""
    host = _replica_host["name"] or socket.gethostname()
    return f"{host[:24]}:{os.getpid()}"


def application_name(target: str, role: str, replica: str | None = None) -> str:
    name = f"{APP_PREFIX}/{target}/{role}/{replica or replica_id()}"
    return name[:_MAX_APP_NAME]


def apply_prefix(target: str) -> str:
    """The prefix of every applying session of this target (used by the orphan wait)."""
    return f"{APP_PREFIX}/{target}/apply/"


def _seconds_ms(value: float) -> int:
    return max(0, round(value * 1000))


def set_role_statement(dialect: str, role: str) -> str | None:
    """`SET ROLE` for `role` as a quoted identifier (config.py allows no quote characters in it)."""
    if not role:
        return None
    if dialect == "postgresql":
        return 'SET ROLE "' + role.replace('"', '""') + '"'
    if dialect in ("mysql", "mariadb"):
        return "SET ROLE `" + role.replace("`", "``") + "`"
    return None


def session_statements(
    dialect: str,
    app_name: str,
    ddl_lock_timeout: float = 0.0,
    statement_timeout: float = 0.0,
    set_role: str = "",
    search_path: str = "",
) -> list[str]:
    """SQL statements that configure one new connection for `dialect` (a backend name);
    `search_path` (a PostgreSQL schema: a tenant's) becomes the only schema searched."""
    out: list[str] = []
    if dialect == "postgresql":
        safe = app_name.replace("'", "''")
        out.append(f"SET application_name = '{safe}'")
        out.append(f"SET lock_timeout = {_seconds_ms(ddl_lock_timeout)}")
        out.append(f"SET statement_timeout = {_seconds_ms(statement_timeout)}")
        if search_path:
            quoted = search_path.replace('"', '""')
            out.append(f'SET search_path TO "{quoted}"')
    elif dialect in ("mysql", "mariadb") and ddl_lock_timeout > 0:
        out.append(f"SET SESSION lock_wait_timeout = {max(1, round(ddl_lock_timeout))}")
    role = set_role_statement(dialect, set_role)
    return [*out, role] if role else out


def run_session_statements(dbapi_connection: Any, statements: list[str]) -> None:
    """Execute `statements` on a raw DBAPI connection (from a `connect` event)."""
    if not statements:
        return
    cursor = dbapi_connection.cursor()
    try:
        for statement in statements:
            cursor.execute(statement)
    finally:
        cursor.close()
    commit = getattr(dbapi_connection, "commit", None)
    if commit is not None:  # SET opened a transaction on non-autocommit drivers: end it
        commit()


def identity_sql(dialect: str) -> str | None:
    if dialect == "postgresql":
        return (
            "SELECT current_database(), "
            "CAST(pg_postmaster_start_time() AS text), "
            "CAST(inet_server_port() AS text)"
        )
    if dialect in ("mysql", "mariadb"):
        return "SELECT DATABASE(), CAST(@@hostname AS CHAR), CAST(@@port AS CHAR)"
    return None


def identity_from_dbapi(dbapi_connection: Any, dialect: str) -> dict[str, str]:
    """The identity of the database a raw DBAPI connection is connected to."""
    if dialect == "sqlite":
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA database_list")
            rows = cursor.fetchall()
        finally:
            cursor.close()
        main = next((r for r in rows if r[1] == "main"), None)
        path = main[2] if main else ""
        return {"dialect": "sqlite", "database": os.path.realpath(path) if path else ":memory:"}
    sql = identity_sql(dialect)
    if sql is None:
        return {"dialect": dialect}
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    finally:
        cursor.close()
    database, server, port = (str(v) if v is not None else "" for v in row)
    return {"dialect": dialect, "database": database, "server": server, "port": port}


def describe_identity(ident: dict[str, str]) -> str:
    parts = [ident.get("database", "?")]
    if ident.get("port"):
        parts.append(f"port {ident['port']}")
    return " ".join(parts)


def backend_name(url: str) -> str:
    """'postgresql', 'mysql', 'mariadb', 'sqlite'... from a URL, without parsing credentials."""
    scheme = re.split(r"[+:]", url, maxsplit=1)[0].lower()
    return {"postgres": "postgresql", "mariadb": "mysql"}.get(scheme, scheme)


def driver_sql(connection: Any) -> Callable[[str], Any]:
    """`exec_driver_sql` (SQLAlchemy 1.4+), else 1.3's `execute` of a plain string (no parsing)."""
    method = getattr(connection, "exec_driver_sql", None)
    return method if callable(method) else connection.execute  # type: ignore[no-any-return]


# Whether this process is reconciler's worker: set at the worker's start, read by
# `reconciler.hooks.migration_lock` (an env.py run by the worker must not wait for the lock its
# control plane already holds).
_IN_WORKER = [False]


def inside_reconciler_worker() -> None:
    """Called by reconciler's worker at start: `migration_lock` in env.py then takes no lock (the
    reconciler that runs env.py holds it already, on another connection)."""
    _IN_WORKER[0] = True


def in_reconciler_worker() -> bool:
    """True in reconciler's worker process (after its start)."""
    return _IN_WORKER[0]
