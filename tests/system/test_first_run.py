"""A new user's first minutes: the example config, the first commands on a database not made yet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.db.locks import AdvisoryLock, lock_key
from reconciler.errors import ConfigError
from tests.builders import Project, db_heads, flask_project
from tests.cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


# --------------------------------------------------------------------------- reconciler config --example
def test_config_example_prints_the_repositorys_example_byte_for_byte(tmp_path: Path) -> None:
    result = run_cli(["config", "--example"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXAMPLE.read_text(encoding="utf-8")


def test_config_without_an_option_says_what_it_does(tmp_path: Path) -> None:
    result = run_cli(["config"], cwd=tmp_path)
    assert result.returncode == 2
    assert "--example" in result.stderr and "Traceback" not in result.stderr


def test_the_example_is_a_valid_config_once_a_url_is_given(tmp_path: Path) -> None:
    """A pip user saves the example as reconciler.toml: it loads as it is, with a URL added."""
    from reconciler.config.load import load_settings

    text = run_cli(["config", "--example"], cwd=tmp_path).stdout
    (tmp_path / "reconciler.toml").write_text(text.replace('url = ""', 'url = "sqlite:///app.db"', 1))
    (tmp_path / "migrations").mkdir()
    settings = load_settings(None, environ={}, cwd=tmp_path)
    assert settings.target.url == f"sqlite:///{tmp_path / 'app.db'}"


# --------------------------------------------------------------------------- a missing SQLite file
def _project(tmp_path: Path) -> tuple[Path, Project]:
    project = flask_project(tmp_path / "p", "sqlite:///site.db")  # relative: next to the config
    project.chain(2)
    return project.root / "site.db", project


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["plan"],
        ["plan", "--fail-on", "data-loss"],
        ["history"],
        ["journal"],
        ["wait", "--timeout", "0.2"],
    ],
    ids=lambda c: " ".join(c),
)
def test_reading_commands_leave_a_missing_sqlite_file_missing(tmp_path: Path, command: list[str]) -> None:
    database, project = _project(tmp_path)
    result = run_cli(["--config", str(project.config), *command], cwd=project.root)
    assert not database.exists(), f"{command} created {database}"
    assert not database.with_name("site.db.reconciler.lock").exists()
    assert "Traceback" not in result.stderr
    assert result.returncode == (8 if command[0] == "wait" else 0), result.stderr


def test_status_says_the_file_does_not_exist_and_apply_creates_it(tmp_path: Path) -> None:
    database, project = _project(tmp_path)
    config = str(project.config)
    result = run_cli(["--config", config, "status", "--json"], cwd=database.parent)
    data = json.loads(result.stdout)
    assert (data["state"], data["pending"]) == ("uninitialized_empty", ["r0000", "r0001"])
    assert f"the database file {database} does not exist yet" in data["message"]
    assert "reconciler apply" in data["message"]

    applied = run_cli(["--config", config, "apply"], cwd=database.parent)
    assert applied.returncode == 0, applied.stderr
    assert database.is_file() and db_heads(f"sqlite:///{database}") == {"r0001"}
    after = json.loads(run_cli(["--config", config, "status", "--json"], cwd=database.parent).stdout)
    assert after["state"] == "in_sync" and "does not exist" not in after["message"]


def test_an_existing_empty_file_is_read_not_taken_for_missing(tmp_path: Path) -> None:
    """Negative control: only a file that is not there is reported so; an empty one is a database."""
    database, project = _project(tmp_path)
    sa.create_engine(f"sqlite:///{database}").connect().close()
    assert database.is_file()
    config = str(project.config)
    data = json.loads(run_cli(["--config", config, "status", "--json"], cwd=database.parent).stdout)
    assert data["state"] == "uninitialized_empty" and "does not exist" not in data["message"]


def test_an_observing_daemon_leaves_a_missing_sqlite_file_missing(tmp_path: Path) -> None:
    """`run` with `[daemon] apply = false` (set by its variable, as a sidecar would) reads only."""
    from tests.runtime.test_daemon import config, daemon

    database, project = _project(tmp_path)
    config(project, interval=0.3)
    with daemon(project, env={"RECONCILER_DAEMON_APPLY": "false"}) as running:
        status = running.wait_status(lambda s: s.get("runs", 0) >= 3, 60, "three observing runs")
        assert status["state"] == "uninitialized_empty"
    assert not database.exists()


# --------------------------------------------------------------------------- the SQLite lock file
def test_the_lock_file_error_explains_where_it_lives_and_why(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "plain_file"
    not_a_folder.write_text("")
    engine = sa.create_engine("sqlite://", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        lock = AdvisoryLock(conn, lock_key("app.db", None, "alembic_version"), not_a_folder / "app.db")
        with pytest.raises(ConfigError) as err:
            lock.try_acquire()
    message = str(err.value)
    assert str(not_a_folder / "app.db.reconciler.lock") in message
    assert "beside the database file" in message and str(not_a_folder) in message


def test_lock_files_are_git_ignored_where_the_example_keeps_its_database() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "*.reconciler.lock" in ignored or "*.db.reconciler.lock" in ignored
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ".reconciler.lock" in readme


# --------------------------------------------------------------------------- the example's README
def test_example_readme_describes_demo_sh_as_it_is() -> None:
    demo = (ROOT / "scripts" / "demo.sh").read_text(encoding="utf-8")
    readme = (ROOT / "examples" / "flask_app" / "README.md").read_text(encoding="utf-8")
    for step in ("run --http", "wait --exact", "/status", "SIGTERM", "DEMO_KEEP_RUNNING"):
        assert step in demo, step  # what the script does...
        assert step in readme, step  # ...is what its README says
