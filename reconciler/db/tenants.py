"""Tenant fleets: find the tenants and read every tenant's Alembic version rows, cheaply.

One migrations directory applied to many tenants: a schema per tenant (PostgreSQL), a database per
tenant (PostgreSQL, MySQL / MariaDB), a SQLite file per tenant, or names a query or a list gives.
Reading the fleet never opens an Alembic environment and never costs a query per tenant where the
server can do better:

- PostgreSQL schemas: one statement. pg_namespace LEFT JOIN pg_class finds each schema's version
  table; `query_to_xml(format('SELECT version_num FROM %I.%I', ...))` read through XMLTABLE gives
  the rows of every one that exists, in the same statement (the server needs XML support, as
  Debian's, Red Hat's and the official images' builds have).
- MySQL / MariaDB databases: information_schema (names and which have the version table), then one
  UNION ALL over those tables: two round trips, on the one connection.
- PostgreSQL databases: a database is only readable from a connection to it; the caller's
  `connect(dbname)` gives one, read one after another, one statement each.
- SQLite files: each opened read-only (`mode=ro`), read and closed; nothing is created (a file in
  WAL mode without a -wal file is read as `immutable`, else SQLite would create -wal and -shm).

`heads` is None where the version table does not exist (never migrated), `()` where it is empty.
`error` says why a tenant could not be read (heads None then): a file that is no database, a
PostgreSQL version table the login may not SELECT from (checked in the statement, which would fail
whole otherwise), a database that cannot be connected to or does not exist; the others are read.
Globs are fnmatch globs (case-sensitive); on a server, a LIKE pattern preselects (a superset) and
fnmatch decides. The journal's side places (`db.placement`) are never tenants.
"""

from __future__ import annotations

import glob
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from reconciler.db.placement import SIDE_FILE_SUFFIX, SIDE_SCHEMA
from reconciler.errors import ConfigError
from reconciler.redact import redact

Connect = Callable[[str], "AbstractContextManager[sa.engine.Connection]"]

MYSQL_SYSTEM = ("mysql", "information_schema", "performance_schema", "sys")
SIDE_SUFFIXES = (SIDE_FILE_SUFFIX, ".reconciler.lock", "-wal", "-shm", "-journal")
SQLITE_TIMEOUT = 1.0  # seconds a read waits for a writer's lock before the tenant reports an error
_LIKE_ESCAPE = "!"  # not a backslash: MySQL's string literals treat it differently by sql_mode


@dataclass(frozen=True)
class TenantVersions:
    name: str
    heads: tuple[str, ...] | None  # sorted version_num rows; None: no version table; (): empty table
    error: str = ""  # why the tenant could not be read (heads is None then)


# --------------------------------------------------------------------------- globs


def like_pattern(match: str) -> str:
    """A LIKE pattern (escape character `!`) matching at least every name the glob matches:
    `*` → `%`, `?` and a `[...]` class → `_`; fnmatchcase then decides exactly."""
    out: list[str] = []
    i, n = 0, len(match)
    while i < n:
        char = match[i]
        i += 1
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char == "[" and (end := _class_end(match, i)) is not None:
            out.append("_")
            i = end
        elif char in ("%", "_", _LIKE_ESCAPE):
            out.append(_LIKE_ESCAPE + char)
        else:
            out.append(char)
    return "".join(out)


def _class_end(match: str, i: int) -> int | None:
    """Where the `[...]` class opened before index i ends (as fnmatch reads it); None: a literal `[`."""
    j = i
    if j < len(match) and match[j] == "!":
        j += 1
    if j < len(match) and match[j] == "]":
        j += 1
    while j < len(match) and match[j] != "]":
        j += 1
    return j + 1 if j < len(match) else None


# --------------------------------------------------------------------------- PostgreSQL schemas

# The rows of the version table named by the schema and table expressions, as text[] (NULL when
# the table is empty; `present` tells an empty table from a missing one).
_PG_ROWS = """(
    SELECT array_agg(v.version_num ORDER BY v.version_num)
    FROM XMLTABLE('/table/row' PASSING query_to_xml({query}, true, false, '')
                  COLUMNS version_num text PATH 'version_num') AS v
    WHERE v.version_num IS NOT NULL)"""

_PG_SCHEMA_ROWS = _PG_ROWS.format(query="format('SELECT version_num FROM %I.%I', n.nspname, c.relname)")
# A table the login may not read would fail the whole statement: it is left unread, and said so.
_PG_READABLE = "has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT')"
_PG_SCHEMA_COLUMNS = f"""c.oid IS NOT NULL AS present, coalesce({_PG_READABLE}, false) AS readable,
       CASE WHEN {_PG_READABLE} THEN {_PG_SCHEMA_ROWS} END AS heads"""

_PG_SCHEMAS = f"""
SELECT n.nspname, true AS found, {_PG_SCHEMA_COLUMNS}
FROM pg_namespace AS n
LEFT JOIN pg_class AS c
       ON c.relnamespace = n.oid AND c.relname = :table AND c.relkind IN ('r', 'p')
WHERE n.nspname <> 'information_schema' AND left(n.nspname, 3) <> 'pg_'
  AND n.nspname <> :side AND n.nspname LIKE :like ESCAPE '{_LIKE_ESCAPE}'
ORDER BY n.nspname"""

_PG_NAMED_SCHEMAS = f"""
SELECT t.name, n.oid IS NOT NULL AS found, {_PG_SCHEMA_COLUMNS}
FROM unnest(CAST(:names AS text[])) AS t(name)
LEFT JOIN pg_namespace AS n ON n.nspname = t.name
LEFT JOIN pg_class AS c
       ON c.relnamespace = n.oid AND c.relname = :table AND c.relkind IN ('r', 'p')"""

# In a connection to one database: the version table as Alembic finds it (the search path).
_PG_DATABASE_ROWS = _PG_ROWS.format(query="'SELECT version_num FROM ' || r.oid::regclass::text")

_PG_ONE_DATABASE = f"""
SELECT r.oid IS NOT NULL AS present, coalesce(has_table_privilege(r.oid, 'SELECT'), false),
       CASE WHEN has_table_privilege(r.oid, 'SELECT') THEN {_PG_DATABASE_ROWS} END
FROM (SELECT to_regclass(quote_ident(:table))::oid AS oid) AS r"""

_PG_DATABASES = f"""
SELECT datname FROM pg_database
WHERE NOT datistemplate AND datallowconn AND datname LIKE :like ESCAPE '{_LIKE_ESCAPE}'"""


def discover_schemas(conn: sa.engine.Connection, match: str, version_table: str) -> list[TenantVersions]:
    """PostgreSQL: every schema whose name matches the glob (not the system schemas, not the
    journal's side schema), with the rows of its `version_table`: one statement."""
    _require_postgresql(conn, "schemas")
    rows = conn.execute(
        sa.text(_PG_SCHEMAS), {"table": version_table, "side": SIDE_SCHEMA, "like": like_pattern(match)}
    ).fetchall()
    found = [_pg_tenant(row, version_table) for row in rows if fnmatchcase(str(row[0]), match)]
    return sorted(found, key=lambda tenant: tenant.name)


def _read_named_schemas(
    conn: sa.engine.Connection, names: Sequence[str], version_table: str
) -> list[TenantVersions]:
    statement = sa.text(_PG_NAMED_SCHEMAS).bindparams(sa.bindparam("names", type_=postgresql.ARRAY(sa.Text)))
    rows = conn.execute(statement, {"names": list(names), "table": version_table}).fetchall()
    return [_pg_tenant(row, version_table) for row in rows]


def _pg_tenant(row: Sequence[object], version_table: str, what: str = "schema") -> TenantVersions:
    """A tenant from (name, found, present, readable, heads)."""
    name, found, present, readable, heads = row
    if not found:
        return TenantVersions(str(name), None, f"{what} {name!r} does not exist")
    if present and not readable:
        return TenantVersions(
            str(name),
            None,
            f"the login may not read {version_table} in {what} {str(name)!r}: grant it SELECT on "
            f"the table{' and USAGE on the schema' if what == 'schema' else ''}",
        )
    return TenantVersions(str(name), _heads(heads) if present else None)


def _heads(values: object) -> tuple[str, ...]:
    """The rows as sorted text (a text[] arrives as a list; NULL, for no rows, as None)."""
    if not isinstance(values, (list, tuple)):
        return ()
    return tuple(sorted(str(value) for value in values if value is not None))


def _require_postgresql(conn: sa.engine.Connection, what: str) -> None:
    if _backend(conn) != "postgresql":
        raise ConfigError(
            f"tenants as {what} need PostgreSQL; this database is {conn.dialect.name}: "
            "on MySQL / MariaDB a schema is a database, use tenants as databases"
        )


def _backend(conn: sa.engine.Connection) -> str:
    name = conn.dialect.name
    return "mysql" if name in ("mysql", "mariadb") else name


# --------------------------------------------------------------------------- databases


def discover_databases(
    conn: sa.engine.Connection, match: str, version_table: str, connect: Connect | None = None
) -> list[TenantVersions]:
    """Every database of the server whose name matches the glob, with its version rows.

    MySQL / MariaDB: the system databases and the journal's side databases (`<db>_reconciler`)
    are left out; two round trips on `conn`, `connect` is not used. PostgreSQL: templates and
    databases that refuse connections are left out; each database is read on `connect(dbname)`
    (by default a connection like `conn`'s, to that database), one after another."""
    backend = _backend(conn)
    if backend == "mysql":
        return _mysql_versions(conn, version_table, match=match)
    _require_postgresql(conn, "databases")
    rows = conn.execute(sa.text(_PG_DATABASES), {"like": like_pattern(match)}).fetchall()
    names = [str(name) for (name,) in rows if fnmatchcase(str(name), match)]
    return _pg_databases(conn, sorted(names), version_table, connect)


def _pg_databases(
    conn: sa.engine.Connection, names: Sequence[str], version_table: str, connect: Connect | None
) -> list[TenantVersions]:
    opener = connect or _connect_like(conn)
    out = []
    for name in names:
        try:
            with opener(name) as tenant:
                row = tenant.execute(sa.text(_PG_ONE_DATABASE), {"table": version_table}).one()
        except sa.exc.DBAPIError as exc:
            out.append(TenantVersions(name, None, f"database {name!r} could not be read: {_detail(exc)}"))
            continue
        out.append(_pg_tenant((name, True, *row), version_table, "database"))
    return out


def _connect_like(conn: sa.engine.Connection) -> Connect:
    """`connect` by default: a connection with `conn`'s URL, to another database, closed after."""
    url = conn.engine.url

    @contextmanager
    def connect(database: str) -> Iterator[sa.engine.Connection]:
        engine = sa.create_engine(url.set(database=database), poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as tenant:
                yield tenant
        finally:
            engine.dispose()

    return connect


def verbatim(sql: str) -> sa.TextClause:
    """SQL run as written, with any driver: no `:name` binds, `%` doubled where the driver's
    paramstyle needs it (psycopg and PyMySQL read `%` even without parameters)."""
    return sa.text(sql.replace(":", "\\:"))


def _quote_mysql(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _mysql_versions(
    conn: sa.engine.Connection,
    version_table: str,
    match: str | None = None,
    names: Sequence[str] | None = None,
) -> list[TenantVersions]:
    """MySQL / MariaDB: the databases (matching the glob, or the named ones) with the version rows.
    One query over information_schema, then one UNION ALL over the version tables that exist."""
    select = (
        "SELECT s.schema_name, t.table_name FROM information_schema.schemata AS s "
        "LEFT JOIN information_schema.tables AS t "
        "ON t.table_schema = s.schema_name AND t.table_name = :table "
        "WHERE s.schema_name NOT IN :system"
    )
    params: dict[str, object] = {"table": version_table, "system": list(MYSQL_SYSTEM)}
    binds: list[sa.BindParameter[object]] = [sa.bindparam("system", expanding=True)]
    if names is not None:
        if not names:
            return []
        select += " AND s.schema_name IN :names"
        params["names"] = list(names)
        binds.append(sa.bindparam("names", expanding=True))
    else:
        select += f" AND s.schema_name LIKE :like ESCAPE '{_LIKE_ESCAPE}'"
        params["like"] = like_pattern(match or "*")
    tables: dict[str, str | None] = {}
    for schema, table in conn.execute(sa.text(select).bindparams(*binds), params).fetchall():
        schema = str(schema)
        if names is None and (not fnmatchcase(schema, match or "*") or schema.endswith("_" + SIDE_SCHEMA)):
            continue
        tables[schema] = str(table) if table is not None else tables.get(schema)
    present = sorted(schema for schema, table in tables.items() if table is not None)
    rows: dict[str, list[str]] = {schema: [] for schema in present}
    if present:
        union = " UNION ALL ".join(
            f"SELECT {index}, CONVERT(version_num USING utf8mb4) "
            f"FROM {_quote_mysql(schema)}.{_quote_mysql(tables[schema] or version_table)}"
            for index, schema in enumerate(present)
        )
        for index, version in conn.execute(verbatim(union)).fetchall():
            if version is not None:
                rows[present[int(str(index))]].append(str(version))
    out = [
        TenantVersions(schema, tuple(sorted(rows[schema])) if schema in rows else None) for schema in tables
    ]
    out += [
        TenantVersions(name, None, f"database {name!r} does not exist")
        for name in sorted(set(names or ()) - set(tables))
    ]
    return sorted(out, key=lambda tenant: tenant.name)


# --------------------------------------------------------------------------- names given


def read_versions(
    conn: sa.engine.Connection,
    names: Sequence[str],
    version_table: str,
    kind: str,
    connect: Connect | None = None,
) -> list[TenantVersions]:
    """The version rows of the named tenants (a [fleet] query's or list's): `kind` "schemas"
    (PostgreSQL, one statement) or "databases" (MySQL / MariaDB: two round trips; PostgreSQL: one
    statement per database on `connect(dbname)`, as in `discover_databases`). A name that does not
    exist is a tenant with heads None and an error saying so."""
    unique = sorted(set(names))
    if kind == "schemas":
        _require_postgresql(conn, "schemas")
        found = _read_named_schemas(conn, unique, version_table) if unique else []
    elif kind == "databases":
        if _backend(conn) == "mysql":
            return _mysql_versions(conn, version_table, names=unique)
        _require_postgresql(conn, "databases")
        found = _pg_databases(conn, unique, version_table, connect)
    else:
        raise ValueError(f"kind {kind!r}: 'schemas' or 'databases'")
    return sorted(found, key=lambda tenant: tenant.name)


def query_names(conn: sa.engine.Connection, sql: str) -> list[str]:
    """The tenant names the [fleet] query returns: its first column, as text, stripped, without
    empty values and duplicates, sorted. A failing query is a ConfigError naming it."""
    try:
        result = conn.execute(verbatim(sql))
        if not result.returns_rows:
            result.close()
            raise ConfigError(
                redact(
                    f"[fleet] query {sql!r} returns no rows: make it a SELECT returning one tenant "
                    "name per row (the first column)"
                )
            )
        values = [row[0] for row in result.fetchall() if len(row)]
    except sa.exc.SQLAlchemyError as exc:
        raise ConfigError(
            redact(
                f"[fleet] query {sql!r} failed: {_detail(exc)}. Fix the query: a SELECT returning "
                "one tenant name per row (the first column), which the reconciler's login may run"
            )
        ) from None
    return sorted({str(value).strip() for value in values if value is not None} - {""})


def _detail(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's first line, without the statement and parameters SQLAlchemy appends."""
    source = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    lines = str(source).strip().splitlines()
    return redact(lines[0] if lines else type(source).__name__)


# --------------------------------------------------------------------------- SQLite files


def discover_files(base_dir: Path, match: str, version_table: str) -> list[TenantVersions]:
    """SQLite: the regular files matching the glob (relative to base_dir, or absolute; `**`
    spans directories), not our side files (`*.reconciler.sqlite`, `*.reconciler.lock`) nor
    SQLite's (`-wal`, `-shm`, `-journal`). The name is the path relative to base_dir (posix) when
    inside it, else the absolute path. Each file is opened read-only, read and closed."""
    base = Path(os.path.abspath(base_dir))
    pattern = match if os.path.isabs(match) else os.path.join(glob.escape(str(base)), match)
    tenants: dict[str, Path] = {}
    for found in glob.glob(pattern, recursive=True):
        path = Path(os.path.normpath(os.path.abspath(found)))
        if path.name.endswith(SIDE_SUFFIXES) or not path.is_file():
            continue
        try:
            name = path.relative_to(base).as_posix()
        except ValueError:
            name = str(path)
        tenants[name] = path
    return [_read_file(name, tenants[name], version_table) for name in sorted(tenants)]


def _read_file(name: str, path: Path, version_table: str) -> TenantVersions:
    quoted = '"' + version_table.replace('"', '""') + '"'
    uri = path.as_uri() + "?mode=ro"
    if _wal_without_log(path):
        uri += "&immutable=1"  # else a read-only open creates the -wal and -shm files and leaves them
    try:
        db = sqlite3.connect(uri, uri=True, timeout=SQLITE_TIMEOUT)
    except sqlite3.Error as exc:
        return TenantVersions(name, None, f"{name}: cannot be opened as a SQLite database: {exc}")
    try:
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE", (version_table,)
        ).fetchone()
        if exists is None:
            return TenantVersions(name, None)
        rows = db.execute(f"SELECT version_num FROM {quoted}").fetchall()
    except sqlite3.Error as exc:
        return TenantVersions(name, None, f"{name}: not readable as a SQLite database: {exc}")
    finally:
        db.close()
    return TenantVersions(name, _heads([row[0] for row in rows]))


def _wal_without_log(path: Path) -> bool:
    """A database in WAL mode whose -wal file does not exist: every row is in the main file, so it
    is read as immutable (no -shm to create). A writer starting meanwhile puts its rows in a new
    -wal the read does not see: the next read does."""
    try:
        with path.open("rb") as file:
            header = file.read(20)
    except OSError:
        return False
    wal = header.startswith(b"SQLite format 3\x00") and len(header) == 20 and header[18] == 2
    return wal and not Path(f"{path}-wal").exists()


__all__ = [
    "TenantVersions",
    "discover_databases",
    "discover_files",
    "discover_schemas",
    "like_pattern",
    "query_names",
    "read_versions",
]
