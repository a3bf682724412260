"""Throwaway databases on the machine's PostgreSQL and MariaDB services, and SQLite files.

Every test gets its own database, created here and dropped afterwards. The `canary` user has a
password that needs URL escaping; tests that use it check the password appears in no output.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get("RECONCILER_TEST_PG", "postgresql://root@127.0.0.1:5432/postgres")
MYSQL_ADMIN_URL = os.environ.get("RECONCILER_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")

CANARY_USER = "canary"
CANARY_PASSWORD = "p%40ss/w@rd:x"
CANARY_ENCODED = quote(CANARY_PASSWORD, safe="")
CANARY_FORMS = (CANARY_PASSWORD, CANARY_ENCODED, quote(CANARY_ENCODED, safe=""))


def _admin(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def new_name(prefix: str = "rt") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _ensure_pg_canary(conn: sa.engine.Connection) -> None:
    exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": CANARY_USER}).scalar()
    if not exists:
        with suppress(sa.exc.ProgrammingError):  # created concurrently
            conn.execute(
                sa.text(
                    f"CREATE ROLE {CANARY_USER} LOGIN SUPERUSER PASSWORD "
                    f"'{CANARY_PASSWORD.replace(chr(39), chr(39) * 2)}'"
                )
            )


def _ensure_mysql_canary(conn: sa.engine.Connection) -> None:
    pw = CANARY_PASSWORD.replace("'", "''")
    conn.execute(sa.text(f"CREATE USER IF NOT EXISTS '{CANARY_USER}'@'%' IDENTIFIED BY '{pw}'"))
    conn.execute(sa.text(f"CREATE USER IF NOT EXISTS '{CANARY_USER}'@'localhost' IDENTIFIED BY '{pw}'"))
    conn.execute(sa.text(f"GRANT ALL PRIVILEGES ON *.* TO '{CANARY_USER}'@'%'"))
    conn.execute(sa.text(f"GRANT ALL PRIVILEGES ON *.* TO '{CANARY_USER}'@'localhost'"))


@contextmanager
def pg_database(canary: bool = False) -> Iterator[str]:
    """A fresh PostgreSQL database; yields its URL (as the canary user when asked)."""
    name = new_name()
    admin = _admin(PG_ADMIN_URL)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        if canary:
            _ensure_pg_canary(conn)
    base = sa.engine.make_url(PG_ADMIN_URL)
    if canary:
        url = f"postgresql://{CANARY_USER}:{CANARY_ENCODED}@{base.host}:{base.port or 5432}/{name}"
    else:
        url = base.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@contextmanager
def mysql_database(canary: bool = False) -> Iterator[str]:
    """A fresh MariaDB database; yields its URL (as the canary user when asked)."""
    name = new_name()
    admin = _admin(MYSQL_ADMIN_URL)
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}`"))
        if canary:
            _ensure_mysql_canary(conn)
    base = sa.engine.make_url(MYSQL_ADMIN_URL)
    if canary:
        url = f"mysql+pymysql://{CANARY_USER}:{CANARY_ENCODED}@{base.host}:{base.port or 3306}/{name}"
    else:
        url = base.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            for (pid,) in conn.execute(
                sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :n"), {"n": name}
            ).fetchall():
                with suppress(sa.exc.DBAPIError):
                    conn.execute(sa.text(f"KILL {int(pid)}"))
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}_reconciler`"))  # the journal's own
        admin.dispose()


@contextmanager
def sqlite_database(folder: Path) -> Iterator[str]:
    path = folder / f"{new_name()}.db"
    yield f"sqlite:///{path}"


@contextmanager
def database(kind: str, folder: Path, canary: bool = False) -> Iterator[str]:
    if kind == "postgresql":
        with pg_database(canary) as url:
            yield url
    elif kind == "mysql":
        with mysql_database(canary) as url:
            yield url
    elif kind == "sqlite":
        with sqlite_database(folder) as url:
            yield url
    else:  # pragma: no cover
        raise ValueError(kind)


def assert_no_canary(*texts: str | bytes | None) -> None:
    for text in texts:
        if text is None:
            continue
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        for form in CANARY_FORMS:
            assert form not in text, f"the canary password leaked ({form!r}) in:\n{text[-2000:]}"


def canary_hits(*texts: str | bytes | None) -> list[str]:
    """Every form of the canary password found in the texts: raw, URL-decoded, URL-encoded (once
    and twice) and any piece of at least 4 characters of the raw or the decoded password (what an
    unescaped `@` lets a parser print as a host or port)."""
    from urllib.parse import quote_plus, unquote

    forms = {*CANARY_FORMS, quote(CANARY_PASSWORD), quote_plus(CANARY_PASSWORD)}
    for secret in (CANARY_PASSWORD, unquote(CANARY_PASSWORD)):
        forms |= {secret[i:j] for i in range(len(secret)) for j in range(i + 4, len(secret) + 1)}
    hits: set[str] = set()
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        hits |= {form for form in forms if text and form in text}
    return sorted(hits)


def unescaped_canary_url(url: str) -> str:
    """The canary URL of `pg_database(canary=True)` / `mysql_database(canary=True)` with the password
    written as it is, unescaped: several `@` before the host."""
    parsed = sa.engine.make_url(url)
    return (
        f"{parsed.drivername}://{CANARY_USER}:{CANARY_PASSWORD}@{parsed.host}:{parsed.port}/{parsed.database}"
    )
