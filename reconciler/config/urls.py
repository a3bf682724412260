"""Database URLs: check and normalise one (registering its password), name it, compare two."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from reconciler.errors import ConfigError
from reconciler.redact import is_ambiguous, redact, register_url
from reconciler.settings import resolve_path

_LOCAL = {"localhost", "127.0.0.1", "::1", ""}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


def same_database(first: str, second: str) -> bool:
    """Whether two URLs name one database: the same backend, server, user and database (SQLite:
    the same file). Drivers and passwords may differ."""
    a, b = _make_url(first), _make_url(second)
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return _sqlite_file(a.database) == _sqlite_file(b.database)
    host_a, host_b = (a.host or "").lower(), (b.host or "").lower()
    same_host = host_a == host_b or (host_a in _LOCAL and host_b in _LOCAL)
    default = _DEFAULT_PORTS.get(a.get_backend_name())
    same_port = (a.port or default) == (b.port or default)
    return same_host and same_port and a.database == b.database and a.username == b.username


def _sqlite_file(database: str | None) -> str:
    if not database or database == ":memory:" or database.startswith("file:"):
        return database or ":memory:"
    return os.path.realpath(database)


def normalize_url(url: str, base_dir: Path, where: str) -> str:
    """Parse and check a URL; register its password as a secret; make SQLite paths absolute."""
    register_url(url)
    if is_ambiguous(url):
        raise ConfigError(
            f"{where}: the URL '{redact(url)}' has more than one '@' before its host, so its "
            "password cannot be told from its host; URL-encode the password "
            "(an '@' in it is written %40: urllib.parse.quote(password, safe=''))"
        )
    from sqlalchemy.exc import ArgumentError  # deferred: CLI start-up time (SQLAlchemy's import)

    try:
        parsed = _make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"{where}: '{redact(url)}' is not a database URL ({redact(str(exc))}); "
            "expected e.g. postgresql://user:password@host:5432/dbname or sqlite:///app.db"
        ) from None
    if parsed.drivername.split("+")[0] == "postgres":
        raise ConfigError(
            f"{where}: the URL '{redact(url)}' starts with postgres://, a name SQLAlchemy does not "
            "know; write postgresql:// instead (the rest of the URL stays as it is)"
        )
    try:
        dialect = parsed.get_dialect()
    except Exception as exc:  # NoSuchModuleError
        raise ConfigError(
            f"{where}: cannot use the database URL '{redact(url)}': {redact(str(exc))}; "
            "check the dialect name and install its driver (psycopg2-binary, pymysql)"
        ) from None
    _check_driver(dialect, parsed.get_backend_name(), url, where)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            absolute = resolve_path(base_dir, database)
            parsed = parsed.set(database=str(absolute))
        return str(parsed.render_as_string(hide_password=False))
    if not parsed.database:
        raise ConfigError(f"{where}: the URL '{redact(url)}' names no database; add /dbname at its end")
    return url


DRIVER_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def _check_driver(dialect: Any, backend: str, url: str, where: str) -> None:
    """Import the URL's database driver now: a missing one is the user's to install (exit 2)."""
    loader = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
    if loader is None:
        return
    try:
        loader()
    except ImportError as exc:
        module = getattr(exc, "name", None) or "its driver"
        extra = DRIVER_EXTRAS.get(backend)
        install = f"pip install 'schema-reconciler[{extra}]'" if extra else f"install {module}"
        hint = ""
        if extra == "mysql" and module != "pymysql":
            hint = f" and write the URL as {backend}+pymysql://..., the driver that extra installs"
        raise ConfigError(
            f"{where}: the database URL '{redact(url)}' needs the Python module {module}, which "
            f"is not installed here; {install}{hint}"
        ) from None


def default_target_name(url: str) -> str:
    database = _make_url(url).database or "db"
    stem = Path(database).stem if "/" in database or database.endswith(".db") else database
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:24] or "db"


def _make_url(url: str) -> Any:
    """SQLAlchemy's parse of `url` (imported on first use: the CLI, and the worker started early
    for an apply, start without it)."""
    from sqlalchemy.engine import make_url  # deferred: CLI start-up time (SQLAlchemy's import)

    return make_url(url)
