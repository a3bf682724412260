"""The worker's checks on every connection and configure call: IdentityCheck (session
settings and the wrong-database refusal) and ConfigureWrapper (what `context.configure` may do).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alembic.runtime.environment import EnvironmentContext

from reconciler import sessions
from reconciler.errors import ConfigError
from reconciler.protocol import DEFAULT_VERSION_TABLE, Job
from reconciler.redact import redact
from reconciler.worker import handover
from reconciler.worker.autogenerate import SCOPE
from reconciler.worker.describe import qualified
from reconciler.worker.upgrading import PER_MIGRATION

_DRIVER_MODULES = {
    "psycopg2": "postgresql",
    "psycopg": "postgresql",
    "pg8000": "postgresql",
    "pymysql": "mysql",
    "MySQLdb": "mysql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite3": "sqlite",
    "pysqlite2": "sqlite",
}


_SQLITE_BEGIN = "reconciler_sqlite_begin"


# --- connections -------------------------------------------------------------------------------


def _normal_dialect(name: str) -> str:
    return "mysql" if name == "mariadb" else name


def expected_identity(job: Job) -> dict[str, str]:
    """The identity to insist on: the control plane's, else what the URL itself says."""
    if job.expected_identity is not None:
        return dict(job.expected_identity)
    from sqlalchemy.engine.url import make_url  # deferred: worker start-up time: imported when a job needs it

    url = make_url(job.url)
    dialect = _normal_dialect(url.get_backend_name())
    database = url.database or ""
    if dialect == "sqlite":
        memory = not database or database == ":memory:" or database.startswith("file:")
        return {"dialect": "sqlite", "database": ":memory:" if memory else os.path.realpath(database)}
    return {"dialect": dialect, "database": database}


class IdentityCheck:
    """Process-wide SQLAlchemy listeners: session settings and the wrong-database refusal."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.expected = expected_identity(job)
        self.refusal: str | None = None
        self.connecting = False
        self.connections = 0  # opened so far (a worker that connected cannot be re-bound)

    def install(self) -> None:
        from sqlalchemy import event  # deferred: worker start-up time: imported when a job needs it
        from sqlalchemy.engine import (  # deferred: worker start-up time: imported when a job needs it
            Dialect,
            Engine,
        )
        from sqlalchemy.pool import Pool  # deferred: worker start-up time: imported when a job needs it

        event.listen(Dialect, "do_connect", self._do_connect)
        event.listen(Pool, "connect", self._on_connect)
        event.listen(Engine, "begin", self._on_begin)

    def reset(self) -> None:
        self.refusal = None
        self.connecting = False

    def _do_connect(self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        """Our connect arguments; the recording's session when it was made with the same ones
        (`handover`), else None: the driver connects."""
        self.connecting = True
        timeout = self.job.connect_timeout
        driver = getattr(dialect, "driver", "")
        if driver in ("psycopg2", "psycopg", "psycopg2cffi"):
            if timeout > 0:
                cparams.setdefault("connect_timeout", max(1, math.ceil(timeout)))
            for key, value in (
                ("keepalives", 1),
                ("keepalives_idle", 30),
                ("keepalives_interval", 10),
                ("keepalives_count", 3),
            ):
                cparams.setdefault(key, value)
            if driver == "psycopg":  # no server-side prepared statements behind a pooler
                cparams.setdefault("prepare_threshold", None)
        elif driver in ("pymysql", "mysqldb") and timeout > 0:
            cparams.setdefault("connect_timeout", max(1, math.ceil(timeout)))
        made_with = handover.connect_key(str(driver), cargs, cparams)
        record.info[handover.CONNECT_KEY] = made_with
        return handover.take(made_with, cparams)

    def _dialect_of(self, dbapi_connection: Any, record: Any) -> str:
        pool = getattr(record, "_ConnectionRecord__pool", None)
        name = getattr(getattr(pool, "_dialect", None), "name", None)
        if isinstance(name, str) and name:
            return _normal_dialect(name)
        module = type(dbapi_connection).__module__.split(".")[0]
        return _DRIVER_MODULES.get(module, sessions.backend_name(self.job.url))

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.connecting = False
        self.connections += 1
        dialect = self._dialect_of(dbapi_connection, record)
        self._check_identity(dbapi_connection, dialect)
        if dialect == "sqlite" and type(dbapi_connection).__module__.startswith("sqlite3"):
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves: transactional DDL
            record.info[_SQLITE_BEGIN] = True
        statements = sessions.session_statements(
            dialect,
            self.job.app_name,
            self.job.ddl_lock_timeout,
            self.job.statement_timeout,
            self.job.set_role,
            self.job.search_path,
        )
        sessions.run_session_statements(dbapi_connection, statements)

    def _check_identity(self, dbapi_connection: Any, dialect: str) -> None:
        actual = sessions.identity_from_dbapi(dbapi_connection, dialect)
        actual["dialect"] = _normal_dialect(actual.get("dialect", dialect))
        rollback = getattr(dbapi_connection, "rollback", None)
        if rollback is not None:  # end the transaction the identity query may have opened
            rollback()
        expected = {k: _normal_dialect(v) if k == "dialect" else v for k, v in self.expected.items()}
        if all(actual.get(key) == value for key, value in expected.items()):
            return
        self.refusal = redact(
            f"env.py connected to the {actual.get('dialect')} database "
            f"{sessions.describe_identity(actual)}, but the target is the "
            f"{expected.get('dialect')} database {sessions.describe_identity(expected)}: env.py "
            "connects somewhere else than the target; make env.py use the URL it is given "
            "(config.get_main_option('sqlalchemy.url') or Flask-Migrate's db) or fix [target] url"
        )
        raise ConfigError(self.refusal)

    def _on_begin(self, connection: Any) -> None:
        info = getattr(connection.connection, "info", {})
        if info.get(_SQLITE_BEGIN):
            # foreign keys off before BEGIN: the pragma is a no-op inside a transaction, and
            # batch-mode table copies would cascade-delete
            run = sessions.driver_sql(connection)
            run("PRAGMA foreign_keys=OFF")
            run("BEGIN")


def lossless_url_rendering() -> None:
    """SQLAlchemy 1.3 and 1.4 render a password containing '%' so that parsing it back changes it.

    Flask-Migrate 2.x's env.py does exactly that round trip (`str(db.engine.url)` into
    `sqlalchemy.url`); escape '%' too, as SQLAlchemy 2 does, so such env.py files connect. The
    quoting function is `_sqla_url_quote` in 1.4, `_rfc_1738_quote` in 1.3.
    """

    import sqlalchemy  # deferred: worker start-up time: imported when a job needs it
    from sqlalchemy.engine import (
        url as url_module,  # deferred: worker start-up time: imported when a job needs it
    )

    if not sqlalchemy.__version__.startswith("1."):
        return

    def quote(text: str) -> str:
        return re.sub(r"[:@/%]", lambda m: f"%{ord(m.group(0)):X}", text)

    for name in ("_sqla_url_quote", "_rfc_1738_quote"):
        if hasattr(url_module, name):
            setattr(url_module, name, quote)
            return


@dataclass(frozen=True)
class ConfigureWrapper:
    """What the configure wrapper enforces on every `context.configure(...)` call."""

    exclude_tables: frozenset[str]
    version_table: str = DEFAULT_VERSION_TABLE
    version_table_schema: str = ""
    search_path: str = ""  # a tenant's schema: env.py that names no version schema gets this one


def install_configure_wrapper(wrapper: ConfigureWrapper) -> None:
    """Wrap `EnvironmentContext.configure` (in this process only) to apply `wrapper`.

    - our journal tables are excluded from autogenerate (chained with env.py's own hooks);
    - env.py's version table must be the target's;
    - online SQLite gets `transactional_ddl=True` unless env.py chose, so one revision is one
      transaction (the worker makes pysqlite emit BEGIN), and `render_as_batch=True` unless env.py
      chose, so autogenerated ALTERs work there;
    - while an upgrade plan runs, `transaction_per_migration=True`: one transaction per revision,
      as when each revision was its own run of env.py (`upgrading`);
    - while `generate` runs with a table scope, reflection is limited to it.
    """
    original = getattr(EnvironmentContext.configure, "_reconciler_original", None)
    original = original or EnvironmentContext.configure

    def configure(self: EnvironmentContext, *args: Any, **kwargs: Any) -> None:
        _check_version_table(kwargs, wrapper)
        kwargs["include_object"] = _chain_include_object(kwargs.get("include_object"), wrapper)
        kwargs["include_name"] = _chain_include_name(kwargs.get("include_name"), wrapper)
        connection = kwargs.get("connection", args[0] if args else None)
        dialect = getattr(getattr(connection, "dialect", None), "name", "")
        if dialect == "sqlite" and kwargs.get("transactional_ddl") is None:
            kwargs["transactional_ddl"] = True
        if dialect == "sqlite" and kwargs.get("render_as_batch") is None:
            kwargs["render_as_batch"] = True
        if PER_MIGRATION:
            kwargs["transaction_per_migration"] = True
        original(self, *args, **kwargs)

    configure._reconciler_original = original  # type: ignore[attr-defined]
    EnvironmentContext.configure = configure  # type: ignore[method-assign]


def _check_version_table(kwargs: dict[str, Any], wrapper: ConfigureWrapper) -> None:
    table = kwargs.get("version_table") or DEFAULT_VERSION_TABLE
    if wrapper.search_path and not kwargs.get("version_table_schema"):
        # a tenant's schema: an unchanged env.py names none, and its version table is the tenant's
        kwargs["version_table_schema"] = wrapper.search_path
    schema = kwargs.get("version_table_schema") or ""
    if (table, schema) != (wrapper.version_table, wrapper.version_table_schema or ""):
        ours = qualified(wrapper.version_table, wrapper.version_table_schema)
        raise ConfigError(
            f"env.py uses the version table {qualified(table, schema)} but the target's "
            f"version_table is {ours}; make [target] version_table / version_table_schema match "
            "what env.py passes to context.configure"
        )


def _chain_include_object(user_hook: Any, wrapper: ConfigureWrapper) -> Callable[..., bool]:
    def include_object(obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "table" and name in wrapper.exclude_tables:
            return False
        if SCOPE and not SCOPE[0].include_object(obj, name, type_, reflected, compare_to):
            return False
        return bool(user_hook(obj, name, type_, reflected, compare_to)) if user_hook else True

    return include_object


def _chain_include_name(user_hook: Any, wrapper: ConfigureWrapper) -> Callable[..., bool]:
    def include_name(name: Any, type_: str, parent_names: Any) -> bool:
        if type_ == "table" and name in wrapper.exclude_tables:
            return False
        if SCOPE and not SCOPE[0].include_name(name, type_, parent_names):
            return False
        return bool(user_hook(name, type_, parent_names)) if user_hook else True

    return include_name
