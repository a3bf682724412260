"""Where the journal lives: out of sight of a project's unchanged env.py (`flask db migrate` on the
same database proposes nothing of ours), the previous release's tables moved there with their
rows, and the old placement (`[journal] placement = "default"`) as the negative control.

Real databases, the real CLI, the real `flask db migrate` of Flask-Migrate's own template."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import builders
from tests.builders import Project, db_heads, flask_project, journal_rows, table_names
from tests.cli import run_cli

DIALECTS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]
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
    env = {**os.environ, "DATABASE_URL": project.url}
    env.pop("PYTHONPATH", None)
    env.pop("RECONCILER_UNSAFE_DISABLE", None)
    done = subprocess.run([flask_tool(), "--app", "myapp.app", "db", *args], cwd=project.root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(project.config), *args], cwd=project.root)


def ok(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    result = cli(project, *args)
    assert result.returncode == 0, result.stderr
    return result


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
    project = tutorial(tmp_path, request.getfixturevalue(URL_FIXTURES[kind]),
                       '\n[journal]\nplacement = "default"\n')

    _output, [written] = migrate_after_apply(project)

    text = written.read_text(encoding="utf-8")
    assert "op.drop_table('reconciler_journal')" in text
    assert JOURNAL <= table_names(project.url)
