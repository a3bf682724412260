"""`[apply] role`: the worker's connections `SET ROLE`, so PostgreSQL objects get the role as owner
and MariaDB revisions get the role's privileges; a role the login cannot use is exit 2.

Roles are server-wide: each test creates a uniquely named one and drops it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.config.load import load_settings
from reconciler.errors import ConfigError
from tests import dbs
from tests.builders import Project, db_heads, flask_project, table_names
from tests.cli import run_cli

ROLE_EXTRA = '[apply]\nrole = "{role}"\n'


def _admin(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def _execute(url: str, *statements: str) -> None:
    engine = _admin(url)
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _project(tmp_path: Path, url: str, role: str = "") -> Project:
    project = flask_project(tmp_path / "p", url)
    project.write_config(ROLE_EXTRA.format(role=role) if role else "", models="myapp.models:db")
    project.chain(2)
    return project


def _apply(project: Project) -> tuple[int, str]:
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


def _error(stderr: str) -> str:
    """The message of the command_failed log line (stderr is JSON lines when not a TTY)."""
    for line in stderr.splitlines():
        if '"command_failed"' in line:
            return str(json.loads(line)["error"])
    raise AssertionError(f"no command_failed line in:\n{stderr}")


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_role(pg_url: str) -> Iterator[str]:
    """A NOLOGIN role that may create in the test database's public schema."""
    name = dbs.new_name("app_owner")
    _execute(pg_url, f"CREATE ROLE {name} NOLOGIN", f"GRANT USAGE, CREATE ON SCHEMA public TO {name}")
    yield name
    with suppress(sa.exc.DBAPIError):  # the database may already be gone
        _execute(pg_url, f"REASSIGN OWNED BY {name} TO CURRENT_USER", f"DROP OWNED BY {name}")
    _execute(dbs.PG_ADMIN_URL, f"DROP ROLE IF EXISTS {name}")


def _owners(url: str) -> dict[str, str]:
    engine = _admin(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT tablename, tableowner FROM pg_tables WHERE schemaname IN ('public', 'reconciler')"
                )  # the journal's own schema
            )
            return {str(r[0]): str(r[1]) for r in rows}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_role_owns_the_tables_revisions_create(tmp_path: Path, pg_url: str, pg_role: str) -> None:
    code, err = _apply(_project(tmp_path, pg_url, role=pg_role))
    assert code == 0, err
    owners = _owners(pg_url)
    assert owners["t_r0"] == owners["t_r1"] == owners["alembic_version"] == pg_role
    assert owners["reconciler_journal"] == "root"  # the control plane keeps the login user


@pytest.mark.postgres
def test_negative_control_without_role_the_login_user_owns_them(
    tmp_path: Path, pg_url: str, pg_role: str
) -> None:
    code, err = _apply(_project(tmp_path, pg_url))
    assert code == 0, err
    owners = _owners(pg_url)
    assert owners["t_r0"] == owners["t_r1"] == "root"
    assert pg_role not in owners.values()


@pytest.mark.postgres
def test_missing_role_is_a_configuration_error_before_any_revision(tmp_path: Path, pg_url: str) -> None:
    missing = dbs.new_name("no_such_role")
    code, err = _apply(_project(tmp_path, pg_url, role=missing))
    assert code == 2, err
    message = _error(err)
    assert f"[apply] role '{missing}'" in message and f'GRANT "{missing}" TO "root"' in message
    assert "does not exist" in message
    assert db_heads(pg_url) == set() and not {"t_r0", "t_r1"} & table_names(pg_url)


def test_role_name_is_validated(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    config = tmp_path / "reconciler.toml"
    config.write_text('[target]\nurl = "sqlite:///x.db"\n[apply]\nrole = "owner\\"; DROP"\n')
    with pytest.raises(ConfigError, match=r"role must be a role name .* got 'owner\"; DROP'"):
        load_settings(str(config), environ={}, cwd=tmp_path)


# --------------------------------------------------------------------------- MariaDB

# The login user may read and write and create tables (the journal), but not ALTER; the role
# may. A revision that adds a column needs the role's privilege: MariaDB's SET ROLE changes
# privileges, not ownership (its tables have no owner).
ADD_COLUMN = 'op.add_column("t_r0", sa.Column("extra", sa.Integer))'


@pytest.fixture
def mysql_login_and_role(mysql_url: str) -> Iterator[tuple[str, str]]:
    """(URL of a login user without ALTER, name of a role with ALTER) on mysql_url's database."""
    database = sa.engine.make_url(mysql_url).database
    user, role = dbs.new_name("rl_user"), dbs.new_name("rl_role")
    hosts = ("%", "localhost")
    _execute(
        dbs.MYSQL_ADMIN_URL,
        *(f"CREATE USER '{user}'@'{h}'" for h in hosts),
        *(
            f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP ON `{database}`.* TO '{user}'@'{h}'"
            for h in hosts
        ),
        f"CREATE ROLE `{role}`",
        f"GRANT ALTER ON `{database}`.* TO `{role}`",
        *(f"GRANT `{role}` TO '{user}'@'{h}'" for h in hosts),
    )
    url = sa.engine.make_url(mysql_url).set(username=user, password=None)
    yield url.render_as_string(hide_password=False), role
    _execute(
        dbs.MYSQL_ADMIN_URL,
        *(f"DROP USER IF EXISTS '{user}'@'{h}'" for h in hosts),
        f"DROP ROLE IF EXISTS `{role}`",
    )


def _mysql_project(tmp_path: Path, url: str, role: str = "") -> Project:
    project = flask_project(tmp_path / "p", url)
    project.write_config(ROLE_EXTRA.format(role=role) if role else "", models="myapp.models:db")
    project.chain(1)
    project.revision("alter1", "r0000", upgrade=ADD_COLUMN, message="add extra")
    return project


@pytest.mark.mysql
def test_mariadb_role_grants_the_privileges_a_revision_needs(
    tmp_path: Path, mysql_url: str, mysql_login_and_role: tuple[str, str]
) -> None:
    url, role = mysql_login_and_role
    code, err = _apply(_mysql_project(tmp_path, url, role=role))
    assert code == 0, err
    assert db_heads(mysql_url) == {"alter1"}


@pytest.mark.mysql
def test_negative_control_mariadb_without_role_the_revision_is_denied(
    tmp_path: Path, mysql_url: str, mysql_login_and_role: tuple[str, str]
) -> None:
    url, _ = mysql_login_and_role
    code, err = _apply(_mysql_project(tmp_path, url))
    assert code == 1, err
    assert "alter1" in err and "ALTER command denied" in err
    assert db_heads(mysql_url) == {"r0000"}


@pytest.mark.mysql
def test_mariadb_missing_role_is_a_configuration_error(tmp_path: Path, mysql_url: str) -> None:
    missing = dbs.new_name("no_such_role")
    code, err = _apply(_mysql_project(tmp_path, mysql_url, role=missing))
    assert code == 2, err
    message = _error(err)
    assert f"[apply] role '{missing}'" in message and f"GRANT `{missing}` TO 'root'@" in message
    assert db_heads(mysql_url) == set()
