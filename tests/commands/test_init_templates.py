"""`reconciler init` picks the template a person expects: in a Flask project (its app creates a
`Migrate(...)`, or `models` is a Flask-SQLAlchemy db) exactly what `flask db init` writes, byte for
byte; elsewhere Alembic's generic layout, saying how to get the Flask one. The message names the
template and why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.builders import worker_python
from tests.cli import run_cli
from tests.tutorial import APP, flask, tutorial_app

pytestmark = pytest.mark.core


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (caches and the app's instance folder aside) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and "instance" not in p.parts
    }


def flask_db_init_copy(project: Path, tmp_path: Path) -> dict[str, bytes]:
    """What a real `flask db init` writes in a copy of `project` (before any init)."""
    copy = tmp_path / "by-flask-db-init"
    shutil.copytree(project, copy)
    flask(copy, "db", "init")
    return tree(copy)


def init(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    extra = ["--config", str(write_python_only(root))] if worker_python() else []
    result = run_cli([*extra, "init", *args], cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    return result.stderr


def write_python_only(root: Path) -> Path:
    """CI's oldest-versions run: the worker in the project's interpreter (nothing else is set)."""
    config = root.parent / f"{root.name}-python.toml"
    config.write_text(
        f'[target]\nroot = "{root}"\nmigrations = "{root / "migrations"}"\npython = "{worker_python()}"\n',
        encoding="utf-8",
    )
    return config


def test_init_on_the_tutorial_app_without_a_config_is_flask_db_init(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "tutorial", revision=False)
    expected = flask_db_init_copy(root, tmp_path)

    message = init(root)

    assert tree(root) == expected
    assert "migrations/alembic.ini" in expected and not (root / "alembic.ini").exists()
    assert "flask template" in message and "app.py:9 creates Migrate(" in message, message


def test_init_with_models_naming_the_flask_db_is_flask_db_init(tmp_path: Path) -> None:
    root = tutorial_app(tmp_path / "tutorial", revision=False)
    (root / "app.py").write_text(APP.replace("migrate = Migrate(app, db)\n", ""), encoding="utf-8")
    # `flask db init` needs a Migrate object: compare with what it writes for the tutorial's app.
    reference = tutorial_app(tmp_path / "reference", revision=False)
    wanted = flask_db_init_copy(reference, tmp_path)

    message = init(root, "--models", "app:db")

    made = tree(root)
    assert {k: v for k, v in made.items() if k != "app.py"} == {
        k: v for k, v in wanted.items() if k != "app.py"
    }
    assert "flask template" in message and "'app:db' is a Flask-SQLAlchemy db" in message, message


def test_init_follows_flask_app_to_a_factory_and_its_extensions_module(tmp_path: Path) -> None:
    root = tmp_path / "factory"
    (root / "shop").mkdir(parents=True)
    (root / "shop" / "extensions.py").write_text(
        "from flask_migrate import Migrate\nfrom flask_sqlalchemy import SQLAlchemy\n\n"
        "db = SQLAlchemy()\nmigrate = Migrate()\n",
        encoding="utf-8",
    )
    (root / "shop" / "__init__.py").write_text(
        "from flask import Flask\n\nfrom .extensions import db, migrate\n\n\ndef create_app():\n"
        "    app = Flask(__name__)\n    app.config['SQLALCHEMY_DATABASE_URI'] = 'sqlite://'\n"
        "    db.init_app(app)\n    migrate.init_app(app, db)\n    return app\n",
        encoding="utf-8",
    )

    message = init(root, env={"FLASK_APP": "shop:create_app"})

    assert "current_app" in (root / "migrations" / "env.py").read_text(encoding="utf-8")
    assert "shop/extensions.py:5 creates Migrate(" in message and "FLASK_APP=shop:create_app" in message


def test_init_in_a_plain_project_uses_alembics_generic_layout_and_says_how_to_get_flasks(
    tmp_path: Path,
) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    (root / "models.py").write_text("import sqlalchemy as sa\n\nmetadata = sa.MetaData()\n", encoding="utf-8")

    message = init(root)

    ini = (root / "alembic.ini").read_text(encoding="utf-8")
    assert "sqlalchemy.url = driver://user:pass@localhost/dbname" in ini
    assert "target_metadata = None" in (root / "migrations" / "env.py").read_text(encoding="utf-8")
    assert not (root / "migrations" / "alembic.ini").exists()
    assert "generic template" in message and "--models" in message and "FLASK_APP" in message, message


def test_an_app_without_flask_migrate_gets_the_generic_layout(tmp_path: Path) -> None:
    """Negative control: an app.py with Flask-SQLAlchemy but no Migrate is not taken for one."""
    root = tmp_path / "nomigrate"
    root.mkdir()
    (root / "app.py").write_text(APP.replace("migrate = Migrate(app, db)\n", ""), encoding="utf-8")

    message = init(root)

    assert (root / "alembic.ini").is_file() and "generic template" in message, message
