"""Where the journal lives: the side place (schema, database or attached file) or the target's schema.

Where it lives (`[journal] placement`, see `Place`): by default where Alembic's autogenerate does
not look, so a project's unchanged env.py (`flask db migrate`) never proposes to drop it: a schema
of its own on PostgreSQL (`reconciler`), a database of its own on MySQL / MariaDB
(`<database>_reconciler`), an attached side file on SQLite (`<db file>.reconciler.sqlite`, schema
`reconciler`). Autogenerate reflects only the default schema unless env.py sets
`include_schemas=True` (then `hooks.exclude_reconciler_tables` keeps it out). Where the side place
cannot be created (no CREATE privilege), the journal stays in the target's schema, as before, and
a warning says so. Tables the previous release left in the target's schema are moved into the side
place, under the lock, rows and ids kept.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from reconciler import logs
from reconciler.db.journal import JournalTables, ensure, exists, tables
from reconciler.redact import redact

log = logs.get("reconciler.journal")

SIDE_SCHEMA = "reconciler"  # PostgreSQL's schema and SQLite's attached name; MySQL: <db>_reconciler
RELOCATE_AFTER = 60.0  # seconds: how long a replica reads the previous release's tables unchecked
SIDE_FILE_SUFFIX = ".reconciler.sqlite"  # beside the lock's `<db file>.reconciler.lock"


def side_schema(backend: str, database: str, configured: str = "") -> str:
    """The side schema's name: `configured`, else `reconciler` (MySQL / MariaDB, where a schema is
    a database of the server: `<database>_reconciler`, at most 64 characters)."""
    if configured:
        return configured
    if backend in ("mysql", "mariadb"):
        return f"{database[: 64 - len(SIDE_SCHEMA) - 1]}_{SIDE_SCHEMA}"
    return SIDE_SCHEMA


def side_file(database: str) -> Path:
    """SQLite: the attached journal file, beside the database file (and its lock file)."""
    return Path(database + SIDE_FILE_SUFFIX)


@dataclass(frozen=True)
class Attachment:
    """SQLite: the side file every control-plane connection attaches, under `schema`."""

    schema: str
    path: Path

    def attach(self, dbapi_connection: Any, create: bool = False) -> bool:
        """ATTACH the side file (a no-op when attached; when it does not exist, only with `create`,
        so that reading a database never creates a file). True when attached. With `create` (a
        writer, under the lock) the side file is put in WAL mode (it is ours, not the user's; a
        reader open elsewhere leaves it as it is for now), written with `synchronous = NORMAL`:
        a step's row then costs no sync of its own. A killed process loses nothing; a power cut
        may lose the last rows, which the next run treats as an interrupted step or a first
        sight (see docs/architecture.md)."""
        attached = {row[1] for row in dbapi_connection.execute("PRAGMA database_list").fetchall()}
        if self.schema not in attached:
            if not create and not self.path.exists():
                return False
            dbapi_connection.execute("ATTACH DATABASE ? AS " + _quote_plain(self.schema), (str(self.path),))
        if create:
            _write_ahead(dbapi_connection, self.schema)
        return True


def _write_ahead(dbapi_connection: Any, schema: str) -> None:
    """The attached side file in WAL mode (persistent: once per file; busy: left as it is), and
    this connection's writes to it synced at checkpoints only (per connection)."""
    quoted = _quote_plain(schema)
    mode = dbapi_connection.execute(f"PRAGMA {quoted}.journal_mode").fetchone()
    if not (mode and str(mode[0]).lower() == "wal"):
        with contextlib.suppress(Exception):  # a reader holds it, or the folder is read-only
            mode = dbapi_connection.execute(f"PRAGMA {quoted}.journal_mode=WAL").fetchone()
    if mode and str(mode[0]).lower() == "wal":
        dbapi_connection.execute(f"PRAGMA {quoted}.synchronous=NORMAL")


def _quote_plain(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Place:
    """Where this target's journal lives: the side place (`side`; None with `placement =
    "default"`), or the target's schema (`default`: the previous release's placement). `tables` is
    where reads and writes go; `locate` decides it once per process, `ensure` (under the lock)
    creates the side place and moves the previous release's tables into it."""

    def __init__(
        self,
        table: str,
        url: str,
        placement: str = "side",
        schema: str = "",
        target_schema: str | None = None,
    ):
        parsed = sa.engine.make_url(url)
        self.backend = parsed.get_backend_name()
        database = parsed.database or ""
        self.default = tables(table, target_schema)
        self.attachment: Attachment | None = None
        self.side: JournalTables | None = None
        if placement == "side" and _has_side_place(self.backend, database):
            self.side = tables(table, side_schema(self.backend, database, schema))
            if self.backend == "sqlite":
                self.attachment = Attachment(str(self.side.steps.schema), side_file(database))
        self.tables = self.side or self.default
        self.located = self.side is None
        self._located_at = 0.0
        self.fallback_reason = ""  # why the side place could not be created (then: no more looks)
        self.ready = False  # the side place's tables are known to exist (see `assume_ready`)

    def locate(self, conn: sa.engine.Connection) -> JournalTables:
        """Once: the side place when its tables exist or nothing exists yet; the target's schema
        while only the previous release's tables are there (until `ensure`, here or in another
        replica, moves them: looked at again every RELOCATE_AFTER seconds while they are)."""
        if self.side is not None and self.side.steps.schema == (
            self.default.steps.schema or conn.dialect.default_schema_name
        ):  # [journal] schema names the target's own schema: one place, nothing to move
            self.side, self.attachment, self.tables = None, None, self.default
        if self.side is None or self.fallback_reason:
            return self.tables
        stale = self.tables is self.default and time.monotonic() - self._located_at > RELOCATE_AFTER
        if not self.located or stale:
            attachment = self.attachment
            if attachment is not None:
                _with_dbapi(conn, attachment.attach)
            legacy_only = not _exists_quietly(conn, self.side) and _exists_quietly(conn, self.default)
            self.tables = self.default if legacy_only else self.side
            self.located, self._located_at = True, time.monotonic()
        return self.tables

    def assume_ready(self) -> None:
        """The side place's tables exist (another target's `ensure` made them in this process:
        a schema fleet's shared journal) and no previous release's tables are in the target's
        schema: `locate` and `ensure` need no look at the database."""
        if self.side is not None and not self.fallback_reason:
            self.tables, self.located, self.ready = self.side, True, True

    def ensure(self, conn: sa.engine.Connection) -> JournalTables:
        """Create the journal (call under the lock): in the side place, with the previous release's
        rows moved there; in the target's schema when the side place cannot be created."""
        if self.ready:
            return self.tables
        self.locate(conn)
        if self.side is None:  # `placement = "default"`, or [journal] schema is the target's
            ensure(conn, self.default)
            return self.default
        try:
            self._create_side(conn)
            ensure(conn, self.side)
        except sa.exc.DBAPIError as exc:
            _rollback(conn)
            if not _denied(exc):
                raise  # a lost connection or a timeout is no reason to move the journal
            self._fall_back(conn, exc)
            return self.tables
        if _exists_quietly(conn, self.default):
            moved = adopt(conn, self.default, self.side)
            log.info(
                "journal_moved",
                source=_qualified(self.default),
                destination=_qualified(self.side),
                steps=moved[0],
                flags=moved[1],
            )
        self.tables = self.side
        return self.side

    def _create_side(self, conn: sa.engine.Connection) -> None:
        assert self.side is not None
        attachment = self.attachment
        if attachment is not None:
            _with_dbapi(conn, lambda raw: attachment.attach(raw, create=True))
            return
        schema = conn.dialect.identifier_preparer.quote_schema(str(self.side.steps.schema))
        noun = "SCHEMA" if self.backend == "postgresql" else "DATABASE"
        _commit(conn)
        conn.execute(sa.text(f"CREATE {noun} IF NOT EXISTS {schema}"))
        _commit(conn)

    def _fall_back(self, conn: sa.engine.Connection, exc: sa.exc.DBAPIError) -> None:
        assert self.side is not None
        reason = redact(str(exc.orig)).strip().splitlines()
        self.fallback_reason = reason[0] if reason else exc.__class__.__name__
        ensure(conn, self.default)
        self.tables = self.default
        noun, grant = _FIX.get(self.backend, _FIX["sqlite"])
        log.warning(
            "journal_in_target_schema",
            side=str(self.side.steps.schema),
            error=self.fallback_reason,
            hint=f"the journal could not get its own {noun} {self.side.steps.schema}, so it is kept "
            f"beside your tables, where `flask db migrate` sees it: {grant}, or set [journal] "
            "schema to an existing one; until then add include_object=exclude_reconciler_tables "
            "(reconciler.hooks) to env.py's context.configure",
        )


_FIX = {  # backend → (what the side place is, how to let the login user make it)
    "postgresql": (
        "schema",
        "GRANT CREATE ON DATABASE to the login user (or create the schema and GRANT USAGE, CREATE on it)",
    ),
    "mysql": (
        "database",
        "GRANT CREATE ON *.* to the login user (or create the database and GRANT ALL on it)",
    ),
    "mariadb": (
        "database",
        "GRANT CREATE ON *.* to the login user (or create the database and GRANT ALL on it)",
    ),
    "sqlite": ("file", "let the login user write in the database's folder"),
}
_DENIED_MYSQL = frozenset({1044, 1142, 1227})  # access denied to a database, a table, an operation


def _denied(exc: sa.exc.DBAPIError) -> bool:
    """A missing privilege (or, on SQLite, a side file that cannot be opened), not a failure."""
    orig = exc.orig
    if exc.connection_invalidated:
        return False
    module = type(orig).__module__
    if module.startswith("sqlite3"):
        return any(text in str(orig) for text in ("unable to open", "readonly"))
    if module.startswith(("pymysql", "MySQLdb", "mysql", "mariadb")):
        args = getattr(orig, "args", None) or (None,)
        return args[0] in _DENIED_MYSQL
    state = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)
    return str(state) == "42501"  # PostgreSQL: insufficient_privilege


def _has_side_place(backend: str, database: str) -> bool:
    """In-memory and URI-named SQLite databases, and unknown dialects, keep the journal beside."""
    if backend == "sqlite":
        return database not in ("", ":memory:") and not database.startswith("file:")
    return backend in ("postgresql", "mysql", "mariadb")


def _with_dbapi(conn: sa.engine.Connection, call: Any) -> Any:
    """Run `call` on the DBAPI connection under `conn` (SQLite's ATTACH)."""
    _commit(conn)
    return call(conn.connection.dbapi_connection)


def _exists_quietly(conn: sa.engine.Connection, jt: JournalTables) -> bool:
    try:
        return exists(conn, jt)
    except sa.exc.DBAPIError:
        _rollback(conn)
        return False


def _qualified(jt: JournalTables) -> str:
    return f"{jt.steps.schema}.{jt.steps.name}" if jt.steps.schema else jt.steps.name


STEP_KEY = ("target", "operation", "revision", "started_at", "host")  # one step, wherever it was copied


def adopt(conn: sa.engine.Connection, legacy: JournalTables, side: JournalTables) -> tuple[int, int]:
    """Move the previous release's journal rows into the side tables, then drop the old tables
    (under the lock: nothing else writes either). Steps keep their ids when the side table is
    empty; a step already copied (an interrupted move) is not copied twice; a flag set in both
    keeps the side table's value."""
    copied = _copy_steps(conn, legacy, side)
    flags = _copy_flags(conn, legacy, side)
    _commit(conn)  # the copy is durable before anything is dropped (a crash in between: see above)
    legacy.flags.drop(conn)
    legacy.steps.drop(conn)
    _commit(conn)
    return copied, flags


def _copy_steps(conn: sa.engine.Connection, legacy: JournalTables, side: JournalTables) -> int:
    rows = [dict(r) for r in conn.execute(sa.select(legacy.steps).order_by(legacy.steps.c.id)).mappings()]
    if not rows:
        return 0
    empty = not conn.execute(sa.select(sa.func.count()).select_from(side.steps)).scalar()
    if empty:
        conn.execute(side.steps.insert(), rows)
        if conn.dialect.name == "postgresql":  # explicit ids leave the sequence behind
            conn.execute(
                sa.text(
                    "SELECT setval(pg_get_serial_sequence(:t, 'id'), (SELECT max(id) FROM "
                    f"{conn.dialect.identifier_preparer.format_table(side.steps)}))"
                ),
                {"t": f"{conn.dialect.identifier_preparer.format_table(side.steps)}"},
            )
        return len(rows)
    have = {tuple(r) for r in conn.execute(sa.select(*(side.steps.c[k] for k in STEP_KEY)))}
    fresh = [
        {k: v for k, v in r.items() if k != "id"} for r in rows if tuple(r[k] for k in STEP_KEY) not in have
    ]
    if fresh:
        conn.execute(side.steps.insert(), fresh)
    return len(fresh)


def _copy_flags(conn: sa.engine.Connection, legacy: JournalTables, side: JournalTables) -> int:
    have = {str(k) for (k,) in conn.execute(sa.select(side.flags.c.key))}
    rows = [dict(r) for r in conn.execute(sa.select(legacy.flags)).mappings() if str(r["key"]) not in have]
    if rows:
        conn.execute(side.flags.insert(), rows)
    return len(rows)


def _commit(conn: sa.engine.Connection) -> None:
    if conn.in_transaction():
        conn.commit()


def _rollback(conn: sa.engine.Connection) -> None:
    if conn.in_transaction():
        conn.rollback()
