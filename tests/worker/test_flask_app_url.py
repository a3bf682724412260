"""A Flask project's database is its app's: without `[target] url` the reconciler migrates the
database the app's `SQLALCHEMY_DATABASE_URI` names as Flask-SQLAlchemy resolves it (a relative
SQLite path: the instance folder in 3.x, the app's root in 2.5); a `url` naming another database
is refused before anything connects. The README's quickstart, verbatim, on the tutorial's app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.config import appsource
from reconciler.config.load import load_settings
from reconciler.control import appurl
from reconciler.errors import ConfigError
from reconciler.settings import AppUrl
from tests import dbs
from tests.builders import flask_project, table_names, worker_python
from tests.cli import run_cli
from tests.tutorial import APP as APP_SOURCE
from tests.tutorial import app_view, quickstart, tutorial_app, write_quickstart_config

pytestmark = pytest.mark.core


def reconciler(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """The CLI as a person runs it: the default output, not the JSON log lines."""
    result = run_cli(list(args), cwd=root, env=env, log_format=None)
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

    first = load_settings(str(config), environ={}, app_url=appurl.resolve_app_url)
    app_py.write_text('import flask\nraise RuntimeError("imported twice")\ndb = None\n', encoding="utf-8")
    second = load_settings(
        str(config), environ={}, app_url=appurl.resolve_app_url
    )  # a worker would fail now: the cache answers
    app_py.write_text(source, encoding="utf-8")

    assert first.target.url == second.target.url
    assert sa.engine.make_url(first.target.url).database == app_view(root)["url"]
    with pytest.raises(ConfigError, match="no database URL"):
        load_settings(str(config), environ={}, app_url=lambda _settings, _environ: None)


FACTORY = "from flask import Flask\n\n\ndef create_app():\n    return Flask(__name__)\n"
AT_IMPORT = "from flask import Flask\n\napp = Flask(__name__)\n"


@pytest.mark.parametrize(
    "files, module, expected",
    [
        ({"app.py": APP_SOURCE}, "app", True),  # the tutorial
        ({"shop/__init__.py": FACTORY, "shop/models.py": "db = 1\n"}, "shop.models", False),
        ({"shop/__init__.py": AT_IMPORT, "shop/models.py": "db = 1\n"}, "shop.models", True),
        (
            {"shop/__init__.py": "", "shop/app.py": AT_IMPORT, "shop/models.py": "from .app import x\n"},
            "shop.models",
            True,
        ),
    ],
)
def test_whether_importing_the_models_creates_a_flask_app_is_read_from_source(
    tmp_path: Path, files: dict[str, str], module: str, expected: bool
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert appsource.creates_app_at_import(tmp_path, module) is expected


def test_a_given_url_with_an_app_factory_asks_no_worker(tmp_path: Path) -> None:
    """The factory pattern (the builders' projects): no app exists at import, nothing to compare."""
    project = flask_project(tmp_path / "p", "sqlite:///given.db")

    def no_worker(_settings: object, _environ: object) -> None:
        raise AssertionError("a worker was asked for the app's URL")

    settings = load_settings(str(project.config), environ={}, app_url=no_worker)
    assert settings.target.url.endswith("given.db")


FACTORY_APP = """\
from flask import Flask

from myapp.models import db


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///factory.db"
    db.init_app(app)
    return app
"""


def test_a_factory_named_by_target_app_gives_its_url(tmp_path: Path) -> None:
    """`[target] app` names the factory: it is called, and its relative SQLite path resolved
    the way the app resolves it (instance folder in Flask-SQLAlchemy 3, app root in 2.5)."""
    project = flask_project(tmp_path / "p", "sqlite:///unused.db")
    (project.root / "myapp" / "factory.py").write_text(FACTORY_APP, encoding="utf-8")
    python = f'python = "{worker_python()}"\n' if worker_python() else ""
    project.config.write_text(
        f'[target]\nmodels = "myapp.models:db"\napp = "myapp.factory:create_app"\n{python}',
        encoding="utf-8",
    )

    settings = load_settings(str(project.config), environ={}, app_url=appurl.resolve_app_url)

    database = sa.engine.make_url(settings.target.url).database
    assert database == factory_database(project.root) and Path(str(database)).name == "factory.db"


def factory_database(root: Path) -> str:
    """The database file the factory's app itself uses (asked in the project's interpreter)."""
    code = (
        "from myapp.factory import create_app\nfrom myapp.models import db\napp = create_app()\n"
        "with app.app_context():\n    print(db.engine.url.database)\n"
    )
    result = subprocess.run(
        [worker_python() or sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_without_a_config_the_error_names_the_models_setting_that_gives_the_apps_url(
    tmp_path: Path,
) -> None:
    root = tutorial_app(tmp_path / "tutorial")
    python = ["--config", str(write_python_only(root))] if worker_python() else []

    code, output = reconciler(root, *python, "status")
    assert code == 2 and '[target] models = "app:db"' in output and "--models app:db" in output, output

    code, output = reconciler(root, *python, "--models", "app:db", "status")
    assert code == 0 and str(app_view(root)["url"]) in output, output


def write_python_only(root: Path) -> Path:
    """CI's oldest-versions run: only the worker's interpreter is configured."""
    config = root.parent / "python-only.toml"
    config.write_text(
        f'[target]\nroot = "{root}"\nmigrations = "{root / "migrations"}"\npython = "{worker_python()}"\n',
        encoding="utf-8",
    )
    return config


def test_the_apps_url_keeps_the_configured_lock_url(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "tutorial", revision=False)
    (root / "migrations").mkdir()
    config = write_quickstart_config(root, 'lock_url = "postgresql://app@db-direct:5432/app"\n')
    app_db = f"postgresql://app@db:6432/app?from={root.name}"

    settings = load_settings(str(config), environ={}, app_url=lambda _s, _e: AppUrl(app_db, "app:app"))

    assert settings.target.url == app_db and settings.target.name == "app"
    assert settings.target.lock_url == "postgresql://app@db-direct:5432/app"


def test_the_app_is_asked_in_the_environment_the_settings_came_from(tmp_path: Path) -> None:
    """The app reads DATABASE_URL: the worker that asks it gets the settings' environment."""
    root = tutorial_app(tmp_path / "tutorial", uri_from_env=True)
    config = write_quickstart_config(root)
    wanted = f"sqlite:///{tmp_path / 'from-env.db'}"

    settings = load_settings(str(config), environ={"DATABASE_URL": wanted}, app_url=appurl.resolve_app_url)

    assert settings.target.url == wanted
