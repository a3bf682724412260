"""Where the journal lives: out of sight of a project's unchanged env.py (`flask db migrate` on the
same database proposes nothing of ours), the previous release's tables moved there with their
rows, and the old placement (`[journal] placement = "default"`) as the negative control.

Real databases, the real CLI, the real `flask db migrate` of Flask-Migrate's own template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests import builders
from tests.builders import Project, db_heads, flask_project, journal_rows, table_names
from tests.system.test_cli_admin import cli, ok

DIALECTS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]
ROOT = Path(__file__).resolve().parents[2]
URL_FIXTURES = {"sqlite": "sqlite_url", "postgresql": "pg_url", "mysql": "mysql_url"}
JOURNAL = {"reconciler_journal", "reconciler_journal_flags"}
APP = """\
import os

from flask import Flask
from flask_migrate import Migrate

from myapp.models import db

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
db.init_app(app)
migrate = Migrate(app, db)
"""


def flask_tool() -> str:
    python = builders.worker_python() or sys.executable
    for folder in (Path(python).parent, Path(sys.executable).parent):
        if (folder / "flask").exists():
            return str(folder / "flask")
    raise AssertionError(f"no flask next to {python}")


def flask_db(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    """`flask db ...` as the user runs it: the project's own app and its unchanged env.py."""
    env = {**os.environ, "DATABASE_URL": project.url, "PYTHONPATH": str(ROOT)}  # reconciler.hooks
    env.pop("RECONCILER_UNSAFE_DISABLE", None)
    done = subprocess.run(
        [flask_tool(), "--app", "myapp.app", "db", *args],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def tutorial(tmp_path: Path, url: str, journal: str = "") -> Project:
    """The tutorial app: a User model, its first revision made by `flask db migrate`."""
    project = flask_project(tmp_path / "proj", url)
    (project.root / "myapp" / "app.py").write_text(APP, encoding="utf-8")
    project.write_config(journal, models="myapp.models:db")
    flask_db(project, "migrate", "-m", "users")
    return project


def migrate_after_apply(project: Project) -> tuple[str, list[Path]]:
    """`reconciler apply`, then `flask db migrate`: its output and the revision files it wrote."""
    ok(project, "apply")
    assert journal_rows(project.url), "the reconciler journaled its step"
    before = set(project.versions.glob("*.py"))
    done = flask_db(project, "migrate", "-m", "after reconciler")
    return done.stdout + done.stderr, sorted(set(project.versions.glob("*.py")) - before)


@pytest.mark.parametrize("kind", DIALECTS)
def test_flask_db_migrate_after_apply_proposes_nothing_of_ours(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    project = tutorial(tmp_path, request.getfixturevalue(URL_FIXTURES[kind]))

    output, written = migrate_after_apply(project)

    assert "No changes in schema detected" in output, output
    assert written == []
    assert not JOURNAL & table_names(project.url)  # nothing of ours beside the app's tables
    assert "user" in table_names(project.url)


@pytest.mark.parametrize("kind", DIALECTS)
def test_journal_in_the_target_schema_is_what_flask_db_migrate_would_drop(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Negative control: the previous placement (beside the app's tables) is seen by autogenerate."""
    project = tutorial(
        tmp_path, request.getfixturevalue(URL_FIXTURES[kind]), '\n[journal]\nplacement = "default"\n'
    )

    _output, [written] = migrate_after_apply(project)

    text = written.read_text(encoding="utf-8")
    assert "op.drop_table('reconciler_journal')" in text
    assert table_names(project.url) >= JOURNAL


# --- where placement cannot hide it: init writes the filter, the refusal names the fix -----------
@pytest.mark.parametrize("placement", ["side", "default"])
def test_init_writes_the_journal_filter_only_where_placement_cannot_hide_the_journal(
    placement: str, tmp_path: Path, sqlite_url: str
) -> None:
    project = flask_project(tmp_path / "proj", sqlite_url)
    template = (project.migrations / "env.py").read_text(encoding="utf-8")  # what `flask db init` writes
    shutil.rmtree(project.migrations)
    (project.root / "myapp" / "app.py").write_text(APP, encoding="utf-8")
    project.write_config(f'\n[journal]\nplacement = "{placement}"\n', models="myapp.models:db")

    ok(project, "init")

    env_py = (project.migrations / "env.py").read_text(encoding="utf-8")
    if placement == "side":
        assert env_py == template  # nothing to hide: the file `flask db init` writes
        return
    assert 'conf_args.setdefault("include_object", exclude_reconciler_tables)' in env_py
    assert "import reconciler" not in env_py and "from reconciler" not in env_py  # no dependency
    flask_db(project, "migrate", "-m", "users")
    output, written = migrate_after_apply(project)
    assert "No changes in schema detected" in output, output
    assert written == []
    assert table_names(project.url) >= JOURNAL  # beside the models, and filtered out


@pytest.mark.parametrize("kind", DIALECTS)
def test_a_revision_dropping_the_journal_is_refused_with_the_real_fix(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """What `flask db migrate` wrote next to the old placement: refused even when marked
    `allow_destructive = True`, and the message names the fix, never allow_destructive."""
    project = tutorial(
        tmp_path, request.getfixturevalue(URL_FIXTURES[kind]), '\n[journal]\nplacement = "default"\n'
    )
    _output, [written] = migrate_after_apply(project)
    text = written.read_text(encoding="utf-8")
    written.write_text(
        text.replace("depends_on = None", "depends_on = None\nallow_destructive = True"), encoding="utf-8"
    )
    applied = db_heads(project.url)

    result = cli(project, "apply")

    assert result.returncode == 6, result.stderr
    assert "reconciler's own journal" in result.stderr
    assert "include_object=exclude_reconciler_tables" in result.stderr
    assert "allow_destructive" not in result.stderr.split("reconciler's own journal", 1)[1]
    assert db_heads(project.url) == applied
    assert journal_rows(project.url), "the journal is still there"
    gate = cli(project, "plan", "--fail-on", "data-loss")  # the CI gate says the same
    assert gate.returncode == 6, gate.stderr
    assert "include_object=exclude_reconciler_tables" in gate.stderr


# --- the previous release's journal, in the target's schema --------------------------------------
@pytest.mark.parametrize("kind", DIALECTS)
def test_upgrading_moves_the_previous_journal_with_its_rows_and_flags(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    project = tutorial(
        tmp_path, request.getfixturevalue(URL_FIXTURES[kind]), '\n[journal]\nplacement = "default"\n'
    )  # journaled as the previous release did
    ok(project, "apply")
    ok(project, "suspend", "--reason", "before the upgrade")
    old = journal_rows(project.url)
    assert old and table_names(project.url) >= JOURNAL
    project.write_config(models="myapp.models:db")  # the new release's default: the side place

    status = json.loads(cli(project, "status", "--json").stdout)
    assert "suspended" in status["conditions"], status  # read where it still is
    assert table_names(project.url) >= JOURNAL  # reading moves nothing
    ok(project, "resume")
    project.revision("r2", _head(project), message="after")
    ok(project, "apply")

    assert not JOURNAL & table_names(project.url)
    new = journal_rows(project.url)
    assert [_step(r) for r in new[: len(old)]] == [_step(r) for r in old]  # ids and rows kept
    assert new[-1]["revision"] == "r2" and new[-1]["id"] > old[-1]["id"]
    flask_output = flask_db(project, "migrate", "-m", "after upgrade")
    assert "No changes in schema detected" in flask_output.stdout + flask_output.stderr


def test_an_interrupted_move_copies_no_step_twice(tmp_path: Path, sqlite_url: str) -> None:
    """Copied, then killed before the old tables were dropped: the next move skips the copied steps
    and keeps a newer row the old release wrote meanwhile."""
    project = tutorial(tmp_path, sqlite_url)
    ok(project, "apply")
    engine, schema = builders.journal_engine(project.url)
    assert isinstance(engine, sa.engine.Engine) and schema == "reconciler"
    legacy, side = jtables(None), jtables(schema)
    with engine.begin() as conn:
        moved = [dict(r) for r in conn.execute(sa.select(side.steps).order_by(side.steps.c.id)).mappings()]
        legacy.metadata.create_all(conn)
        conn.execute(legacy.steps.insert(), moved)  # the copy of an interrupted move
        late = {
            **moved[-1],
            "id": moved[-1]["id"] + 1,
            "operation": "upgrade",
            "outcome": "failed",
            "revision": "late",
            "host": "old-release",
        }
        conn.execute(legacy.steps.insert(), [late])
        conn.execute(
            legacy.flags.insert(),
            [{"key": "suspended/x", "value": "v", "updated_at": moved[0]["started_at"]}],
        )
    engine.dispose()
    project.revision("r2", _head(project), message="after")

    ok(project, "apply")

    rows = journal_rows(project.url)
    assert [r["revision"] for r in rows] == [r["revision"] for r in moved] + ["late", "r2"]
    assert not JOURNAL & table_names(project.url)


# --- MySQL / MariaDB without the right to create a database --------------------------------------
@pytest.mark.parametrize(
    "kind",
    [pytest.param("postgresql", marks=pytest.mark.postgres), pytest.param("mysql", marks=pytest.mark.mysql)],
)
def test_without_create_privilege_the_journal_stays_beside_and_says_how_to_fix_it(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    admin_url = request.getfixturevalue(URL_FIXTURES[kind])
    url = _limited_user(admin_url) if kind == "mysql" else _limited_pg_user(admin_url)
    request.addfinalizer(lambda: _drop_user(admin_url, url))
    project = tutorial(tmp_path, url)

    result = ok(project, "apply")

    assert "journal_in_target_schema" in result.stderr
    assert "include_object=exclude_reconciler_tables" in result.stderr
    assert table_names(admin_url) >= JOURNAL
    assert journal_rows(url)
    assert db_heads(url)


def _limited_pg_user(url: str) -> str:
    """A login user that may create tables in `public` but no schema (no CREATE on the database)."""
    parsed = sa.engine.make_url(url)
    user = f"lim_{parsed.database}"[:63]
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{user}" LOGIN'))
        conn.execute(sa.text(f'GRANT USAGE, CREATE ON SCHEMA public TO "{user}"'))
    admin.dispose()
    return parsed.set(username=user).render_as_string(hide_password=False)


def _drop_user(admin_url: str, url: str) -> None:
    user = sa.engine.make_url(url).username
    admin = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        if admin.dialect.name == "postgresql":
            conn.execute(sa.text(f'DROP OWNED BY "{user}"'))
            conn.execute(sa.text(f'DROP ROLE "{user}"'))
        else:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%', '{user}'@'localhost'"))
    admin.dispose()


def _limited_user(url: str) -> str:
    """A login user with every privilege on the test database only (no CREATE DATABASE)."""
    parsed = sa.engine.make_url(url)
    user = f"lim_{parsed.database}"[:32]
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        for host in ("%", "localhost"):
            conn.execute(sa.text(f"CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY 'pw'"))
            conn.execute(sa.text(f"GRANT ALL PRIVILEGES ON `{parsed.database}`.* TO '{user}'@'{host}'"))
    admin.dispose()
    return parsed.set(username=user, password="pw").render_as_string(hide_password=False)


def _head(project: Project) -> str:
    return next(iter(db_heads(project.url)))


def _step(row: dict[str, object]) -> tuple[object, ...]:
    return tuple(row[k] for k in ("id", "target", "operation", "revision", "outcome", "file_hash"))


def jtables(schema: str | None) -> Any:
    from reconciler.db import journal

    return journal.tables("reconciler_journal", schema)


# --- the hooks, for an env.py with include_schemas=True -----------------------------------------
def test_the_hooks_leave_out_our_tables_and_our_side_schema() -> None:
    from reconciler.hooks import exclude_reconciler_table_names, exclude_reconciler_tables

    side = sa.Table("anything", sa.MetaData(schema="reconciler"))
    mine = sa.Table("user", sa.MetaData(schema="app"))
    assert exclude_reconciler_tables(side, "anything", "table", True, None) is False
    assert exclude_reconciler_tables(mine, "user", "table", True, None) is True
    assert exclude_reconciler_table_names("reconciler", "schema", {}) is False
    assert exclude_reconciler_table_names("shop_reconciler", "schema", {}) is False
    assert exclude_reconciler_table_names("app", "schema", {}) is True
    assert exclude_reconciler_table_names("x", "table", {"schema_name": "reconciler"}) is False


def test_sqlite_side_file_is_made_by_the_first_write_never_by_a_read(tmp_path: Path, sqlite_url: str) -> None:
    project = tutorial(tmp_path, sqlite_url)
    side = Path(sa.engine.make_url(sqlite_url).database + ".reconciler.sqlite")

    assert cli(project, "status").returncode in (0, 4)
    assert not side.exists()
    ok(project, "apply")
    assert side.is_file()


def test_an_unknown_placement_is_a_configuration_error(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "proj", sqlite_url)
    project.write_config('\n[journal]\nplacement = "elsewhere"\n', models="myapp.models:db")

    result = cli(project, "status")

    assert result.returncode == 2, result.stderr
    assert "placement must be one of side, default, got 'elsewhere'" in result.stderr


@pytest.mark.postgres
def test_a_side_schema_that_is_the_targets_own_is_one_place_and_nothing_is_moved(
    tmp_path: Path, pg_url: str
) -> None:
    """`[journal] schema = "public"`: the side and the old placement are the same tables; moving
    them into themselves would copy and then drop them."""
    project = tutorial(tmp_path, pg_url, '\n[journal]\nschema = "public"\n')
    ok(project, "apply")
    first = journal_rows(project.url)
    project.revision("r2", _head(project), message="after")

    ok(project, "apply")

    rows = journal_rows(project.url)
    assert [r["id"] for r in rows[: len(first)]] == [r["id"] for r in first] and len(rows) > len(first)
    assert table_names(project.url) >= JOURNAL


@pytest.mark.postgres
@pytest.mark.parametrize("hook", [True, False])
def test_with_include_schemas_the_hook_keeps_our_schema_out(hook: bool, tmp_path: Path, pg_url: str) -> None:
    """An env.py (here Flask-Migrate's configure args) with include_schemas=True reflects every
    schema, ours too: `exclude_reconciler_tables` leaves it out; without it (the negative control)
    `flask db migrate` would drop the side schema's tables."""
    project = tutorial(tmp_path, pg_url)
    extra = ", include_object=exclude_reconciler_tables" if hook else ""
    app = APP.replace(
        "migrate = Migrate(app, db)", f"migrate = Migrate(app, db, include_schemas=True{extra})"
    )
    app = "from reconciler.hooks import exclude_reconciler_tables\n" + app
    (project.root / "myapp" / "app.py").write_text(app, encoding="utf-8")

    output, written = migrate_after_apply(project)

    if hook:
        assert "No changes in schema detected" in output, output
        assert written == []
    else:
        assert "op.drop_table('reconciler_journal', schema='reconciler')" in written[0].read_text()
