"""The tool's word agrees with its journal, and a refused command leaves the database untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import Project, alembic_project, db_heads, flask_project, journal_rows, table_names
from tests.cli import run_cli

pytestmark = pytest.mark.core

SELF_MIGRATING_APP = '''\
from flask import Flask
from flask_migrate import Migrate, upgrade

from myapp.models import db


def create_app():
    """What many projects do: the factory brings its own database to the heads at start."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = {url!r}
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
    db.init_app(app)
    Migrate(app, db, directory={migrations!r})
    with app.app_context():
        upgrade(revision={upto!r})
    return app
'''


def self_migrating_project(root: Path, url: str, count: int, upto: str = "heads") -> Project:
    """A Flask app whose factory runs `flask_migrate.upgrade()` at creation, configured as
    `[target] app`: building it inside the worker migrates the database without our journal."""
    project = flask_project(root, url)
    project.chain(count)
    (project.root / "myapp" / "factory.py").write_text(
        SELF_MIGRATING_APP.format(url=url, migrations=str(project.migrations), upto=upto)
    )
    project.write_config(models="myapp.models:db", app="myapp.factory:create_app")
    return project


def finished_event(stderr: str) -> dict[str, object]:
    for line in stderr.splitlines():
        if '"reconcile_finished"' in line:
            return dict(json.loads(line))
    raise AssertionError(f"no reconcile_finished event in {stderr}")


def test_an_app_factory_that_migrates_itself_is_not_counted_as_applied(tmp_path: Path, db_url: str) -> None:
    project = self_migrating_project(tmp_path / "p", db_url, 13)
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert db_heads(db_url) == {"r0012"}
    # The factory ran when the worker first ran env.py, before any step: each revision is
    # journaled as found applied by another writer, none as applied by us.
    rows = journal_rows(db_url)
    assert [(r["operation"], r["outcome"], r["trigger"]) for r in rows] == [
        ("record", "recorded", "foreign")
    ] * 13
    assert "applied 13 revision(s)" not in result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(
        "0 applied by the reconciler; 13 were applied by another writer "
        "during the run (foreign_writer: r0000, "
    )
    assert summary.endswith("; in sync")
    event = finished_event(result.stderr)
    assert event["applied"] == [] and len(event["foreign"]) == 13  # type: ignore[arg-type]
    assert event["summary"] == summary


def test_a_factory_that_migrates_part_of_the_way_splits_the_count(tmp_path: Path, sqlite_url: str) -> None:
    project = self_migrating_project(tmp_path / "p", sqlite_url, 6, upto="r0001")
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    outcomes = {r["revision"]: r["outcome"] for r in journal_rows(sqlite_url)}
    assert outcomes == {
        "r0000": "recorded",
        "r0001": "recorded",
        "r0002": "applied",
        "r0003": "applied",
        "r0004": "applied",
        "r0005": "applied",
    }
    assert "4 applied by the reconciler; 2 were applied by another writer" in result.stderr
    assert finished_event(result.stderr)["applied"] == ["r0002", "r0003", "r0004", "r0005"]


def test_negative_control_an_apply_without_another_writer_says_applied(
    tmp_path: Path, sqlite_url: str
) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(3)
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "applied 3 revision(s); in sync"
    assert "foreign_writer" not in result.stderr
    again = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert again.stderr.strip().splitlines()[-1] == "in sync at r0002"


# --------------------------------------------------------------------------- nothing touched


def _elsewhere(project: Project, tmp_path: Path) -> None:
    """env.py connects to a database of its own choosing, not the target's."""
    env = project.migrations / "env.py"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    env.write_text(
        env.read_text().replace(
            "config = context.config\n",
            f"config = context.config\nconfig.set_main_option('sqlalchemy.url', {other!r})\n",
        )
    )


def _other_version_table(project: Project, _tmp_path: Path) -> None:
    """env.py passes its own version table; the config says alembic_version."""
    env = project.migrations / "env.py"
    env.write_text(
        env.read_text().replace(
            "connection=connection, target_metadata=target_metadata",
            'connection=connection, target_metadata=target_metadata, version_table="app_version"',
        )
    )


def _missing_role(project: Project, _tmp_path: Path) -> None:
    project.write_config('[apply]\nrole = "no_such_role_here"\n', models="myapp.models:Base")


BAD_SETUPS = {"env_py_elsewhere": _elsewhere, "version_table": _other_version_table}


def _assert_untouched(project: Project, url: str, expected: str) -> None:
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert table_names(url) == set(), "an exit 2 leaves the database as it was: no table at all"
    status = run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["sync_state"] == "uninitialized_empty"
    assert table_names(url) == set()


@pytest.mark.parametrize("setup", sorted(BAD_SETUPS))
def test_a_configuration_error_found_after_connecting_writes_nothing(
    tmp_path: Path, db_url: str, setup: str
) -> None:
    project = alembic_project(tmp_path / "p", db_url)
    project.chain(2)
    BAD_SETUPS[setup](project, tmp_path)
    expected = {"env_py_elsewhere": "connects somewhere else", "version_table": "version_table"}
    _assert_untouched(project, db_url, expected[setup])


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_a_role_the_login_cannot_use_writes_nothing(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("pg_url" if kind == "postgresql" else "mysql_url")
    project = alembic_project(tmp_path / "p", url)
    project.chain(2)
    _missing_role(project, tmp_path)
    _assert_untouched(project, url, "[apply] role 'no_such_role_here'")


def test_models_that_do_not_load_write_nothing(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    # The module binds `db` (so the configuration's own check passes) but fails when imported: the
    # worker finds out. An attribute it does not bind is refused before that (test_refused_values).
    models = project.root / "myapp" / "models.py"
    models.write_text(models.read_text() + "\nraise ImportError('models_do_not_load_here')\n")
    _assert_untouched(project, db_url, "models_do_not_load_here")


def test_negative_control_a_good_configuration_creates_the_journal(tmp_path: Path, db_url: str) -> None:
    project = alembic_project(tmp_path / "p", db_url)
    project.chain(2)
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert "alembic_version" in table_names(db_url)
    assert journal_rows(db_url)  # in its own place (tests/test_journal_placement.py)
