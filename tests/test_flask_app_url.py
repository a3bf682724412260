"""A Flask project's database is its app's: without `[target] url` the reconciler migrates the
database the app's `SQLALCHEMY_DATABASE_URI` names as Flask-SQLAlchemy resolves it (a relative
SQLite path: the instance folder in 3.x, the app's root in 2.5); a `url` naming another database
is refused before anything connects. The README's quickstart, verbatim, on the tutorial's app."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.config import load_settings
from reconciler.errors import ConfigError
from tests import dbs
from tests.builders import flask_project, table_names
from tests.cli import run_cli
from tests.tutorial import app_view, quickstart, tutorial_app, write_quickstart_config

pytestmark = pytest.mark.core


def reconciler(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = run_cli(list(args), cwd=root, env=env)
    return result.returncode, result.stdout + result.stderr


def walk_quickstart(root: Path, env: dict[str, str] | None = None) -> None:
    """Every `reconciler` command of the README's quickstart, in order, each exiting 0."""
    _, commands = quickstart()
    assert [c[0] for c in commands] == ["status", "plan", "apply"], commands
    for command in commands:
        code, output = reconciler(root, *command, env=env)
        assert code == 0, f"reconciler {' '.join(command)}: {output}"


def test_quickstart_on_the_tutorial_app_migrates_the_database_the_app_uses(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "tutorial")
    write_quickstart_config(root)
    before = app_view(root)
    assert before["tables"] == []

    walk_quickstart(root)

    seen = app_view(root)
    assert "user" in seen["tables"], seen
    assert seen["url"] == before["url"]
    if Path(str(seen["url"])) != root / "site.db":  # Flask-SQLAlchemy 3: instance/site.db
        assert not (root / "site.db").exists(), "a second, stray database was written"
    code, output = reconciler(root, "status")
    assert code == 0 and "in_sync" in output and str(seen["url"]) in output, output


def test_a_url_naming_another_file_than_the_apps_is_refused_with_both_named(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "tutorial")
    app_file = Path(str(app_view(root)["url"]))
    # The README's old line; on Flask-SQLAlchemy 2.5 the app's file is ./site.db itself.
    other = "site.db" if app_file != root / "site.db" else "instance/site.db"
    write_quickstart_config(root, f'url = "sqlite:///{other}"\n')

    code, output = reconciler(root, "apply")

    assert code == 2, output
    assert str(root / other) in output and str(app_file) in output, output
    assert "SQLALCHEMY_DATABASE_URI" in output and "app.py" in output, output
    assert not (root / other).exists(), "nothing may connect"
    assert app_view(root)["tables"] == []


def test_a_url_naming_the_apps_own_file_is_accepted(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "tutorial")
    app_file = Path(str(app_view(root)["url"]))
    write_quickstart_config(root, f'url = "sqlite:///{app_file.relative_to(root)}"\n')

    code, output = reconciler(root, "apply")

    assert code == 0, output
    assert "user" in app_view(root)["tables"]


@pytest.mark.postgres
def test_quickstart_on_postgresql_uses_the_url_the_app_reads_from_its_environment(
    tmp_path: Path,
) -> None:
    root = tutorial_app(tmp_path / "tutorial", uri_from_env=True)
    write_quickstart_config(root)
    with dbs.pg_database(canary=True) as url:
        env = {"DATABASE_URL": url}
        walk_quickstart(root, env)
        assert "user" in app_view(root, env)["tables"]
        assert "user" in table_names(url)


@pytest.mark.postgres
def test_a_url_naming_another_postgresql_database_is_refused_without_the_password(
    tmp_path: Path,
) -> None:
    root = tutorial_app(tmp_path / "tutorial", uri_from_env=True)
    with dbs.pg_database(canary=True) as app_url, dbs.pg_database(canary=True) as other:
        write_quickstart_config(root, f'url = "{other}"\n')

        code, output = reconciler(root, "status", env={"DATABASE_URL": app_url})  # run_cli: no canary

        assert code == 2, output
        for url in (app_url, other):
            assert sa.engine.make_url(url).database in output, output
        assert table_names(app_url) == set() and table_names(other) == set()


def test_a_flask_db_without_an_app_to_ask_still_needs_a_url(tmp_path: Path) -> None:
    """An app factory is never called unless `[target] app` names it: no URL to take."""
    project = flask_project(tmp_path / "p", "sqlite:///unused.db")
    project.config.write_text('[target]\nmodels = "myapp.models:db"\n', encoding="utf-8")

    result = run_cli(["status"], cwd=project.root)

    assert result.returncode == 2, result.stderr
    assert "no database URL" in result.stderr and "[target] app" in result.stderr


def test_the_apps_url_is_asked_once_per_process(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "tutorial")
    config = write_quickstart_config(root)
    app_py = root / "app.py"
    source = app_py.read_text(encoding="utf-8")

    first = load_settings(str(config), environ={})
    app_py.write_text('import flask\nraise RuntimeError("imported twice")\n', encoding="utf-8")
    second = load_settings(str(config), environ={})  # a worker would fail now: the cache answers
    app_py.write_text(source, encoding="utf-8")

    assert first.target.url == second.target.url
    assert sa.engine.make_url(first.target.url).database == app_view(root)["url"]
    with pytest.raises(ConfigError, match="no database URL"):
        load_settings(str(config), environ={}, app_url=lambda _settings: None)
