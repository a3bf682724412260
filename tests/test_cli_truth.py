"""The tool's word agrees with its journal, and a refused command leaves the database untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import Project, db_heads, flask_project, journal_rows
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
    rows = [r for r in journal_rows(db_url) if r["operation"] == "upgrade"]
    assert [r["outcome"] for r in rows] == ["skipped"] * 13
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
        "r0000": "skipped",
        "r0001": "skipped",
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
