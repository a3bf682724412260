"""Tenant fleets: every tenant's version rows, read cheaply (one statement for all PostgreSQL
schemas, two round trips for all MariaDB databases, read-only opens of SQLite files).

Databases are server-wide: each test names its own with a unique prefix and drops them after.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.db import tenants
from reconciler.db.tenants import TenantVersions, like_pattern, verbatim
from reconciler.errors import ConfigError
from tests import dbs

VT = "alembic_version"


def _engine(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def _admin(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def _run(url: str, *statements: str) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(verbatim(statement))
    finally:
        engine.dispose()


@contextmanager
def _statements(engine: sa.engine.Engine) -> Iterator[list[str]]:
    """Every statement the engine's connections send while inside."""
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def _pg_table(schema: str, *versions: str) -> list[str]:
    quoted = '"' + schema.replace('"', '""') + '"'
    rows = ", ".join("('" + version.replace("'", "''") + "')" for version in versions)
    return [f"CREATE TABLE {quoted}.{VT} (version_num varchar(32) PRIMARY KEY)"] + (
        [f"INSERT INTO {quoted}.{VT} VALUES {rows}"] if versions else []
    )


def _pg_schema(schema: str) -> str:
    return 'CREATE SCHEMA "' + schema.replace('"', '""') + '"'


# --------------------------------------------------------------------------- globs


def test_like_pattern_preselects_every_name_the_glob_matches_and_escapes_like_characters() -> None:
    assert like_pattern("tenant_*") == "tenant!_%"
    assert like_pattern("t?%!") == "t_!%!!"
    assert like_pattern("t[abc]x") == "t_x"
    assert like_pattern("t[!a]") == "t_"
    assert like_pattern("t[]x]") == "t_"
    assert like_pattern("t[x") == "t[x"  # no closing bracket: a literal `[`, as fnmatch reads it


# --------------------------------------------------------------------------- PostgreSQL schemas

FLEET = {
    "tenant_a": ("a1",),
    "Tenant-B": ("b2", "b1"),  # uppercase, a hyphen, two heads (sorted on reading)
    'tenant_"q"': ("q1",),  # quotes in the name
    "tenant_empty": (),
}


@pytest.fixture
def pg_fleet(pg_url: str) -> str:
    statements = []
    for schema, versions in FLEET.items():
        statements += [_pg_schema(schema), *_pg_table(schema, *versions)]
    statements += [
        _pg_schema("tenant_new"),  # never migrated: no version table
        _pg_schema("tenantZx"),  # `tenant_x` must not match it (`_` is no wildcard)
        _pg_schema("other_a"),
        *_pg_table("other_a", "o1"),
        _pg_schema("reconciler"),  # the journal's side schema
        "CREATE VIEW tenant_a.v AS SELECT 1 AS x",
        "CREATE TABLE tenant_new.other_table (version_num varchar(32))",
    ]
    _run(pg_url, *statements)
    return pg_url


@pytest.mark.postgres
def test_discover_schemas_reads_every_matching_schemas_version_rows_in_one_statement(pg_fleet: str) -> None:
    engine = _engine(pg_fleet)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))  # the dialect's first-connect queries are done
            with _statements(engine) as sent:
                found = tenants.discover_schemas(conn, "[tT]enant[-_]*", VT)
        assert len(sent) == 1, sent
    finally:
        engine.dispose()
    assert found == [
        TenantVersions("Tenant-B", ("b1", "b2")),
        TenantVersions('tenant_"q"', ("q1",)),
        TenantVersions("tenant_a", ("a1",)),
        TenantVersions("tenant_empty", ()),
        TenantVersions("tenant_new", None),
    ]


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("match", "names"),
    [
        ("tenant_?", ["tenant_a"]),
        ("tenant_x", []),
        ("*-B", ["Tenant-B"]),
        ("tenant_[!a]*", ['tenant_"q"', "tenant_empty", "tenant_new"]),
        ("TENANT*", []),  # case-sensitive, as PostgreSQL's names are
        ("other_*", ["other_a"]),
    ],
)
def test_discover_schemas_keeps_exactly_the_names_the_glob_matches(
    pg_fleet: str, match: str, names: list[str]
) -> None:
    engine = _engine(pg_fleet)
    try:
        with engine.connect() as conn:
            assert [tenant.name for tenant in tenants.discover_schemas(conn, match, VT)] == names
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_discover_schemas_leaves_out_system_schemas_and_the_journal_schema(pg_fleet: str) -> None:
    engine = _engine(pg_fleet)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("CREATE TEMPORARY TABLE scratch (x int)"))  # a pg_temp_N schema
            names = [tenant.name for tenant in tenants.discover_schemas(conn, "*", VT)]
    finally:
        engine.dispose()
    assert "public" in names and "tenant_a" in names
    assert not [name for name in names if name.startswith("pg_") or name == "information_schema"]
    assert "reconciler" not in names


@pytest.mark.postgres
def test_discover_schemas_reads_200_schemas_in_one_statement(pg_url: str) -> None:
    _run(
        pg_url,
        """DO $$ BEGIN FOR i IN 0..199 LOOP
            EXECUTE format('CREATE SCHEMA %I', 'fleet_' || lpad(i::text, 3, '0'));
            IF i % 3 <> 0 THEN
                EXECUTE format('CREATE TABLE %I.alembic_version (version_num varchar(32) PRIMARY KEY)',
                               'fleet_' || lpad(i::text, 3, '0'));
                EXECUTE format('INSERT INTO %I.alembic_version VALUES (%L)',
                               'fleet_' || lpad(i::text, 3, '0'), 'rev' || i);
            END IF;
        END LOOP; END $$""",
    )
    engine = _engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            with _statements(engine) as sent:
                found = tenants.discover_schemas(conn, "fleet_*", VT)
        assert len(sent) == 1
    finally:
        engine.dispose()
    assert found == [
        TenantVersions(f"fleet_{i:03d}", None if i % 3 == 0 else (f"rev{i}",)) for i in range(200)
    ]


@pytest.mark.postgres
def test_discover_schemas_reports_a_version_table_the_login_may_not_read_and_reads_the_others(
    pg_fleet: str,
) -> None:
    role = dbs.new_name("fleet_reader")
    _run(pg_fleet, f"CREATE ROLE {role} NOLOGIN", f"GRANT USAGE ON SCHEMA tenant_a, tenant_empty TO {role}")
    _run(pg_fleet, f"GRANT SELECT ON tenant_a.{VT} TO {role}")
    engine = _engine(pg_fleet)
    try:
        with engine.connect() as conn:
            conn.execute(verbatim(f"SET ROLE {role}"))
            found = tenants.discover_schemas(conn, "tenant_[ae]*", VT)
            conn.rollback()
    finally:
        engine.dispose()
        _run(pg_fleet, f"DROP OWNED BY {role}", f"DROP ROLE {role}")
    assert found == [
        TenantVersions("tenant_a", ("a1",)),
        TenantVersions(
            "tenant_empty",
            None,
            f"the login may not read {VT} in schema 'tenant_empty': grant it SELECT on the table "
            "and USAGE on the schema",
        ),
    ]


@pytest.mark.postgres
def test_read_versions_of_named_schemas_is_one_statement_and_names_a_missing_schema(pg_fleet: str) -> None:
    engine = _engine(pg_fleet)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            with _statements(engine) as sent:
                found = tenants.read_versions(
                    conn, ["tenant_a", "Tenant-B", "gone", "tenant_a"], VT, "schemas"
                )
            assert tenants.read_versions(conn, [], VT, "schemas") == []
        assert len(sent) == 1
    finally:
        engine.dispose()
    assert found == [
        TenantVersions("Tenant-B", ("b1", "b2")),
        TenantVersions("gone", None, "schema 'gone' does not exist"),
        TenantVersions("tenant_a", ("a1",)),
    ]


@pytest.mark.mysql
def test_discover_schemas_on_mariadb_is_a_config_error_pointing_to_databases(mysql_url: str) -> None:
    engine = _engine(mysql_url)
    try:
        with engine.connect() as conn, pytest.raises(ConfigError, match="databases"):
            tenants.discover_schemas(conn, "*", VT)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- MariaDB databases


def _quote_mysql(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


@pytest.fixture
def mysql_fleet() -> Iterator[str]:
    """Throwaway databases `<prefix>_...` on MariaDB; yields the prefix."""
    prefix = dbs.new_name("fleet")
    databases = {
        f"{prefix}_a": ("a1",),
        f"{prefix}_B-x": ("b2", "b1"),
        f"{prefix}_q`t": ("q1",),  # a backtick in the name
        f"{prefix}_empty": (),
        f"{prefix}_new": None,
        f"{prefix}_a_reconciler": None,  # the journal's side database of `<prefix>_a`
    }
    admin = _admin(dbs.MYSQL_ADMIN_URL)
    try:
        with admin.connect() as conn:
            for name, versions in databases.items():
                conn.execute(verbatim(f"CREATE DATABASE {_quote_mysql(name)}"))
                if versions is None:
                    continue
                table = f"{_quote_mysql(name)}.{VT}"
                conn.execute(verbatim(f"CREATE TABLE {table} (version_num varchar(32) PRIMARY KEY)"))
                for version in versions:
                    conn.execute(sa.text(f"INSERT INTO {table} VALUES (:v)"), {"v": version})
        yield prefix
    finally:
        with admin.connect() as conn:
            for name in databases:
                conn.execute(verbatim(f"DROP DATABASE IF EXISTS {_quote_mysql(name)}"))
        admin.dispose()


@pytest.mark.mysql
def test_discover_databases_on_mariadb_reads_every_matching_database_in_two_round_trips(
    mysql_fleet: str,
) -> None:
    engine = _engine(dbs.MYSQL_ADMIN_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            with _statements(engine) as sent:
                found = tenants.discover_databases(conn, f"{mysql_fleet}_*", VT)
        assert len(sent) == 2, sent  # information_schema, then one UNION ALL: none per database
    finally:
        engine.dispose()
    assert found == [
        TenantVersions(f"{mysql_fleet}_B-x", ("b1", "b2")),
        TenantVersions(f"{mysql_fleet}_a", ("a1",)),
        TenantVersions(f"{mysql_fleet}_empty", ()),
        TenantVersions(f"{mysql_fleet}_new", None),
        TenantVersions(f"{mysql_fleet}_q`t", ("q1",)),
    ]


@pytest.mark.mysql
def test_discover_databases_on_mariadb_keeps_exactly_the_names_the_glob_matches(mysql_fleet: str) -> None:
    engine = _engine(dbs.MYSQL_ADMIN_URL)
    try:
        with engine.connect() as conn:
            assert [t.name for t in tenants.discover_databases(conn, f"{mysql_fleet}_?", VT)] == [
                f"{mysql_fleet}_a"
            ]
            assert tenants.discover_databases(conn, f"{mysql_fleet}_b-x", VT) == []  # case-sensitive
            assert tenants.discover_databases(conn, "mysql", VT) == []  # a system database
    finally:
        engine.dispose()


@pytest.mark.mysql
def test_read_versions_of_named_mariadb_databases_names_a_missing_one(mysql_fleet: str) -> None:
    engine = _engine(dbs.MYSQL_ADMIN_URL)
    try:
        with engine.connect() as conn:
            names = [f"{mysql_fleet}_a", f"{mysql_fleet}_new", f"{mysql_fleet}_gone"]
            found = tenants.read_versions(conn, names, VT, "databases")
    finally:
        engine.dispose()
    assert found == [
        TenantVersions(f"{mysql_fleet}_a", ("a1",)),
        TenantVersions(f"{mysql_fleet}_gone", None, f"database '{mysql_fleet}_gone' does not exist"),
        TenantVersions(f"{mysql_fleet}_new", None),
    ]


# --------------------------------------------------------------------------- PostgreSQL databases


@pytest.fixture
def pg_fleet_databases() -> Iterator[str]:
    """Throwaway databases `<prefix>_a` (a head), `<prefix>_b` (empty table), `<prefix>_c` (none)."""
    prefix = dbs.new_name("fleet")
    base = sa.engine.make_url(dbs.PG_ADMIN_URL)
    admin = _admin(dbs.PG_ADMIN_URL)
    names = [f"{prefix}_a", f"{prefix}_b", f"{prefix}_c"]
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(verbatim(f'CREATE DATABASE "{name}"'))
        url = base.set(database=names[0]).render_as_string(hide_password=False)
        _run(url, *_pg_table("public", "a1"))
        _run(base.set(database=names[1]).render_as_string(hide_password=False), *_pg_table("public"))
        yield prefix
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                )
                conn.execute(verbatim(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.mark.postgres
def test_discover_databases_on_postgresql_reads_each_database_on_the_callers_connection(
    pg_fleet_databases: str,
) -> None:
    base = sa.engine.make_url(dbs.PG_ADMIN_URL)
    opened: list[str] = []

    @contextmanager
    def connect(name: str) -> Iterator[sa.engine.Connection]:
        opened.append(name)
        engine = _engine(base.set(database=name).render_as_string(hide_password=False))
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()

    engine = _engine(dbs.PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            found = tenants.discover_databases(conn, f"{pg_fleet_databases}_*", VT, connect)
            by_default = tenants.discover_databases(conn, f"{pg_fleet_databases}_[ab]", VT)
    finally:
        engine.dispose()
    assert found == [
        TenantVersions(f"{pg_fleet_databases}_a", ("a1",)),
        TenantVersions(f"{pg_fleet_databases}_b", ()),
        TenantVersions(f"{pg_fleet_databases}_c", None),
    ]
    assert opened == [tenant.name for tenant in found]
    assert by_default == found[:2]


@pytest.mark.postgres
def test_read_versions_of_named_postgresql_databases_reports_one_that_cannot_be_read(
    pg_fleet_databases: str,
) -> None:
    engine = _engine(dbs.PG_ADMIN_URL)
    try:
        with engine.connect() as conn:
            names = [f"{pg_fleet_databases}_gone", f"{pg_fleet_databases}_a"]
            found = tenants.read_versions(conn, names, VT, "databases")
    finally:
        engine.dispose()
    assert found[0] == TenantVersions(f"{pg_fleet_databases}_a", ("a1",))
    gone = found[1]
    assert gone.name == f"{pg_fleet_databases}_gone" and gone.heads is None
    assert gone.error.startswith(f"database '{pg_fleet_databases}_gone' could not be read: ")


# --------------------------------------------------------------------------- SQLite files


def _sqlite(path: Path, *versions: str, table: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = _engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE other (x int)"))
            if table:
                conn.execute(sa.text(f"CREATE TABLE {VT} (version_num varchar(32) PRIMARY KEY)"))
            for version in versions:
                conn.execute(sa.text(f"INSERT INTO {VT} VALUES (:v)"), {"v": version})
    finally:
        engine.dispose()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def file_fleet(tmp_path: Path) -> Path:
    base = tmp_path / "tenants"
    _sqlite(base / "a.db", "a1")
    _sqlite(base / "sub" / "b.db", "b2", "b1")
    _sqlite(base / "empty.db")
    _sqlite(base / "new.db", table=False)
    (base / "junk.db").write_text("not a database, just text\n" * 10)
    for side in ("a.db.reconciler.sqlite", "a.db.reconciler.lock", "a.db-wal", "a.db-shm", "a.db-journal"):
        (base / side).write_bytes(b"")
    (base / "dir.db").mkdir()
    return base


def test_discover_files_reads_each_file_read_only_and_skips_side_files(file_fleet: Path) -> None:
    before = _snapshot(file_fleet.parent)
    found = tenants.discover_files(file_fleet, "**/*", VT)
    assert _snapshot(file_fleet.parent) == before  # nothing created, nothing written
    junk = next(tenant for tenant in found if tenant.name == "junk.db")
    assert junk.heads is None and "junk.db" in junk.error and "not a database" in junk.error
    assert [tenant for tenant in found if tenant.name != "junk.db"] == [
        TenantVersions("a.db", ("a1",)),
        TenantVersions("empty.db", ()),
        TenantVersions("new.db", None),
        TenantVersions("sub/b.db", ("b1", "b2")),
    ]


def test_discover_files_matches_the_glob_relative_to_the_base_directory(file_fleet: Path) -> None:
    assert [t.name for t in tenants.discover_files(file_fleet, "*.db", VT)] == [
        "a.db",
        "empty.db",
        "junk.db",
        "new.db",
    ]
    assert [t.name for t in tenants.discover_files(file_fleet, "sub/*.db", VT)] == ["sub/b.db"]
    assert tenants.discover_files(file_fleet, "[ab].db", VT) == [TenantVersions("a.db", ("a1",))]
    assert tenants.discover_files(file_fleet, "nothing/*.db", VT) == []


def test_discover_files_takes_an_absolute_glob_and_names_outside_files_absolutely(
    file_fleet: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    _sqlite(elsewhere / "x.db", "x1")
    found = tenants.discover_files(file_fleet, str(elsewhere / "*.db"), VT)
    assert found == [TenantVersions(str(elsewhere / "x.db"), ("x1",))]
    inside = tenants.discover_files(file_fleet, str(file_fleet / "a.*"), VT)
    assert inside == [TenantVersions("a.db", ("a1",))]


def test_discover_files_leaves_no_file_behind_for_a_database_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    _sqlite(path, "w1")
    engine = _engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    finally:
        engine.dispose()
    before = _snapshot(tmp_path)
    assert tenants.discover_files(tmp_path, "*.db", VT) == [TenantVersions("w.db", ("w1",))]
    assert sorted(os.listdir(tmp_path)) == sorted(Path(p).name for p in before)


# --------------------------------------------------------------------------- query_names


@pytest.mark.postgres
def test_query_names_returns_the_first_column_stripped_unique_and_sorted(pg_url: str) -> None:
    sql = (
        "SELECT name, 'ignored' FROM (VALUES (' b '), ('a'), ('b'), (NULL), (''), ('c%')) AS t(name) "
        "WHERE name LIKE '%' OR name IS NULL UNION ALL SELECT 7::text, 'x'"
    )
    engine = _engine(pg_url)
    try:
        with engine.connect() as conn:
            assert tenants.query_names(conn, sql) == ["7", "a", "b", "c%"]
    finally:
        engine.dispose()


def test_query_names_on_sqlite_takes_a_non_text_first_column(tmp_path: Path) -> None:
    engine = _engine(f"sqlite:///{tmp_path / 'q.db'}")
    try:
        with engine.connect() as conn:
            assert tenants.query_names(conn, "SELECT 2 UNION SELECT 10 UNION SELECT ':x'") == [
                "10",
                "2",
                ":x",
            ]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_query_names_failing_is_a_config_error_naming_the_query_without_the_password(
    pg_canary_url: str,
) -> None:
    engine = _engine(pg_canary_url)
    try:
        with engine.connect() as conn, pytest.raises(ConfigError) as caught:
            tenants.query_names(conn, "SELECT name FROM no_such_tenants")
    finally:
        engine.dispose()
    message = str(caught.value)
    assert "SELECT name FROM no_such_tenants" in message and "no_such_tenants" in message
    assert "does not exist" in message and "Fix the query" in message
    dbs.assert_no_canary(message, repr(caught.value))
    assert "127.0.0.1" not in message


def test_query_names_of_a_statement_without_rows_is_a_config_error(tmp_path: Path) -> None:
    engine = _engine(f"sqlite:///{tmp_path / 'q.db'}")
    try:
        with engine.connect() as conn, pytest.raises(ConfigError, match="returns no rows"):
            tenants.query_names(conn, "CREATE TABLE t (x int)")
    finally:
        engine.dispose()


def test_discover_files_reads_rows_still_in_the_write_ahead_log_of_an_open_writer(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    _sqlite(path, "w1")
    writer = sqlite3.connect(path)
    try:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        with writer:
            writer.execute(f"INSERT INTO {VT} VALUES ('w2')")
        before = _snapshot(tmp_path)
        assert {Path(name).name for name in before} == {"w.db", "w.db-wal", "w.db-shm"}
        assert tenants.discover_files(tmp_path, "*.db", VT) == [TenantVersions("w.db", ("w1", "w2"))]
        assert set(_snapshot(tmp_path)) == set(before)
    finally:
        writer.close()


def test_read_versions_of_an_unknown_kind_is_a_value_error(tmp_path: Path) -> None:
    engine = _engine(f"sqlite:///{tmp_path / 'q.db'}")
    try:
        with engine.connect() as conn, pytest.raises(ValueError, match="'files'"):
            tenants.read_versions(conn, ["a"], VT, "files")
    finally:
        engine.dispose()
