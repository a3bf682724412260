"""The worker subprocess and its client, against real projects, databases and processes.

Projects are made the way their tools make them: `flask db init` and `alembic init`, run for real
with the worker interpreter's own tools. The `core` subset also runs with an oldest-versions
interpreter: set RECONCILER_TEST_WORKER_PYTHON to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler import sessions
from reconciler.control.workers import Worker, WorkerJob
from reconciler.errors import (
    ConfigError,
    RevisionFailed,
    StateError,
    UnreachableError,
    WorkerError,
)
from tests import dbs
from tests.builders import revision_source

WORKER_PYTHON = os.environ.get("RECONCILER_TEST_WORKER_PYTHON") or sys.executable
REPO = Path(__file__).resolve().parents[2]

FLASK_MODELS = """\
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()


class User(db.Model):
    __tablename__ = "users"
    id = db.Column(db.Integer, primary_key=True)
    username = db.Column(db.String(80), nullable=False)
    email = db.Column(db.String(120))
{extra}
"""

FLASK_APP = """\
from flask import Flask
from flask_migrate import Migrate

from shop.models import db


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///never-used.db"
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
    db.init_app(app)
    Migrate(app, db)
    return app
"""

PLAIN_MODELS = """\
import sqlalchemy as sa

try:
    from sqlalchemy.orm import declarative_base
except ImportError:  # SQLAlchemy 1.3
    from sqlalchemy.ext.declarative import declarative_base

Base = declarative_base()


class User(Base):
    __tablename__ = "users"
    id = sa.Column(sa.Integer, primary_key=True)
    username = sa.Column(sa.String(80), nullable=False)
    email = sa.Column(sa.String(120))
{extra}
"""

CREATE_USERS = """\
op.create_table(
    "users",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(80), nullable=False),
)"""
ADD_EMAIL = """\
with op.batch_alter_table("users") as batch:
    batch.add_column(sa.Column("email", sa.String(120)))"""
DROP_EMAIL = """\
with op.batch_alter_table("users") as batch:
    batch.drop_column("email")"""


def tool(name: str) -> str:
    """A console script of the worker's interpreter (its `flask`, its `alembic`)."""
    for folder in (Path(WORKER_PYTHON).parent, Path(sys.executable).parent):
        if (folder / name).exists():
            return str(folder / name)
    raise AssertionError(f"no {name} next to {WORKER_PYTHON}")


def run_tool(args: list[str], cwd: Path, **env: str) -> None:
    result = subprocess.run(
        args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    for cache in path.parent.glob("__pycache__"):
        shutil.rmtree(cache)  # a rewrite of the same size within a second must not reuse the pyc
    return path


@dataclass
class Proj:
    root: Path
    migrations: Path
    models: str
    models_file: Path
    template: str
    alembic_ini: Path | None = None
    logs: list[str] = field(default_factory=list)

    def revision(
        self, rev: str, down: str | None, upgrade: str, downgrade: str = "pass", extra: str = ""
    ) -> Path:
        return write(
            self.migrations / "versions" / f"{rev}.py",
            revision_source(rev, down, upgrade, downgrade, f"rev {rev}", None, None, extra),
        )

    def base_revisions(self) -> None:
        self.revision("a1", None, CREATE_USERS, 'op.drop_table("users")')
        self.revision("b2", "a1", ADD_EMAIL, DROP_EMAIL)

    def set_models(self, extra: str = "", text: str | None = None) -> None:
        template = FLASK_MODELS if self.template == "flask" else PLAIN_MODELS
        write(self.models_file, text if text is not None else template.format(extra=extra))

    def job(self, url: str, **changes: Any) -> WorkerJob:
        fields: dict[str, Any] = {
            "url": url,
            "migrations_dir": str(self.migrations),
            "root": str(self.root),
            "alembic_ini": str(self.alembic_ini) if self.alembic_ini else None,
            "models": self.models,
            "app_name": sessions.application_name("test", "apply"),
            "ddl_lock_timeout": 5.0,
            "connect_timeout": 10.0,
            "timeout": 120.0,
        }
        fields.update(changes)
        return WorkerJob(**fields)

    def start(self, url: str, **changes: Any) -> Worker:
        return Worker.start(self.job(url, **changes), python=WORKER_PYTHON, on_log=self.logs.append)


@pytest.fixture(scope="session")
def flask_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project made by a real `flask db init`."""
    root = tmp_path_factory.mktemp("flask-template")
    write(root / "shop" / "__init__.py", "")
    write(root / "shop" / "models.py", FLASK_MODELS.format(extra=""))
    write(root / "wsgi.py", FLASK_APP)
    run_tool([tool("flask"), "db", "init"], root, FLASK_APP="wsgi:create_app")
    assert (root / "migrations" / "env.py").is_file()
    return root


@pytest.fixture(scope="session")
def alembic_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project made by a real `alembic init migrations`, env.py edited to set target_metadata."""
    root = tmp_path_factory.mktemp("alembic-template")
    write(root / "blog" / "__init__.py", "")
    write(root / "blog" / "models.py", PLAIN_MODELS.format(extra=""))
    run_tool([tool("alembic"), "init", "migrations"], root)
    set_target_metadata(root / "migrations" / "env.py", "blog.models", "Base")
    return root


def set_target_metadata(env_py: Path, module: str, attr: str) -> None:
    text = env_py.read_text(encoding="utf-8")
    assert "target_metadata = None" in text
    env_py.write_text(
        text.replace(
            "target_metadata = None", f"from {module} import {attr}\ntarget_metadata = {attr}.metadata"
        ),
        encoding="utf-8",
    )


@pytest.fixture
def flask_proj(flask_template: Path, tmp_path: Path) -> Proj:
    root = tmp_path / "flaskproj"
    shutil.copytree(flask_template, root, ignore=shutil.ignore_patterns("__pycache__"))
    proj = Proj(root, root / "migrations", "shop.models:db", root / "shop" / "models.py", "flask")
    proj.base_revisions()
    return proj


@pytest.fixture
def alembic_proj(alembic_template: Path, tmp_path: Path) -> Proj:
    root = tmp_path / "alembicproj"
    shutil.copytree(alembic_template, root, ignore=shutil.ignore_patterns("__pycache__"))
    proj = Proj(
        root,
        root / "migrations",
        "blog.models:Base",
        root / "blog" / "models.py",
        "alembic",
        alembic_ini=root / "alembic.ini",
    )
    proj.base_revisions()
    return proj


@pytest.fixture(params=["flask", "alembic"])
def proj(request: pytest.FixtureRequest) -> Proj:
    return request.getfixturevalue(f"{request.param}_proj")  # type: ignore[no-any-return]


# --- reading the database from the test side ---------------------------------------------------


@pytest.fixture
def inspect_db() -> Iterator[Callable[[str], tuple[set[str], set[str]]]]:
    """(version table rows, table names) of a database, read directly."""
    engines: list[sa.engine.Engine] = []

    def read(url: str) -> tuple[set[str], set[str]]:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        engines.append(engine)
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            heads: set[str] = set()
            if "alembic_version" in tables:
                heads = {r[0] for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))}
        return heads, tables

    yield read
    for engine in engines:
        engine.dispose()


def columns(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return {c["name"] for c in sa.inspect(conn).get_columns(table)}
    finally:
        engine.dispose()


def kind_of(url: str) -> str:
    return sessions.backend_name(url)


# --- the core subset ---------------------------------------------------------------------------


@pytest.mark.core
def test_upgrade_step_by_step_to_head(proj: Proj, db_url: str, inspect_db: Any) -> None:
    with proj.start(db_url) as worker:
        assert worker.info["ok"] is True
        assert worker.upgrade("a1").revisions == ("a1",)
        assert inspect_db(db_url)[0] == {"a1"}
        assert worker.upgrade("b2").revisions == ("b2",)
        assert worker.upgrade("b2").revisions == ()  # already there: nothing ran
        assert worker.compare() == []
    heads, tables = inspect_db(db_url)
    assert heads == {"b2"}
    assert {"users", "alembic_version"} <= tables
    assert "email" in columns(db_url, "users")


@pytest.mark.core
def test_more_than_one_step_is_refused(proj: Proj, sqlite_url: str, inspect_db: Any) -> None:
    with proj.start(sqlite_url) as worker, pytest.raises(StateError, match="one revision per"):
        worker.upgrade("b2")
    assert inspect_db(sqlite_url)[0] == set()


@pytest.mark.core
def test_offline_sql_does_not_touch_the_database(proj: Proj, db_url: str, inspect_db: Any) -> None:
    with proj.start(db_url) as worker:
        full = worker.sql(None, "b2")
        second = worker.sql("a1", "b2")
    assert "CREATE TABLE users" in full and "alembic_version" in full
    assert "CREATE TABLE users" not in second and "email" in second
    assert inspect_db(db_url) == (set(), set())


@pytest.mark.core
def test_compare_reports_a_new_model_column_with_a_stable_key(proj: Proj, db_url: str) -> None:
    with proj.start(db_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
    column = "db.Column(db.String(30))" if proj.template == "flask" else "sa.Column(sa.String(30))"
    proj.set_models(extra=f"    nickname = {column}\n")
    found = []
    for _ in range(2):  # two workers, two runs: the same key
        with proj.start(db_url) as worker:
            found.append(worker.compare())
    assert found[0] == found[1]
    assert [(d["kind"], d["key"]) for d in found[0]] == [("add_column", "add_column users.nickname")]
    assert "nickname" in found[0][0]["text"]


@pytest.mark.core
def test_stamp_and_downgrade(proj: Proj, db_url: str, inspect_db: Any) -> None:
    with proj.start(db_url) as worker:
        worker.stamp("b2")
        assert inspect_db(db_url) == ({"b2"}, {"alembic_version"})
        worker.stamp("base", purge=True)
        assert inspect_db(db_url)[0] == set()
        worker.upgrade("a1")
        worker.upgrade("b2")
        worker.downgrade("a1")
    assert inspect_db(db_url)[0] == {"a1"}
    assert "email" not in columns(db_url, "users")


@pytest.mark.core
def test_headers_fallback_executes_non_literal_files(proj: Proj, sqlite_url: str) -> None:
    path = write(
        proj.migrations / "versions" / "c3.py",
        '''\
        """computed identifiers"""
        PREFIX = "c"
        revision = PREFIX + "3"
        down_revision = "b" + "2"
        branch_labels = ("side",)
        depends_on = None


        def upgrade():
            pass


        def downgrade():
            pass
        ''',
    )
    with proj.start(sqlite_url) as worker:
        found = worker.headers([path])
    assert found == [
        {
            "path": str(path),
            "doc": "computed identifiers",
            "revision": "c3",
            "down_revision": ["b2"],
            "branch_labels": ["side"],
            "depends_on": None,
        }
    ]


@pytest.mark.core
def test_headers_of_a_broken_file_name_it(proj: Proj, sqlite_url: str) -> None:
    path = write(proj.migrations / "versions" / "c3.py", "revision = 'c3'\ndown_revision = (\n")
    with proj.start(sqlite_url) as worker, pytest.raises(ConfigError) as caught:
        worker.headers([path])
    assert f"{path}:" in str(caught.value)
    assert "Traceback" not in str(caught.value)


@pytest.mark.core
def test_failing_revision_leaves_the_database_at_the_previous_one(
    proj: Proj, db_url: str, inspect_db: Any
) -> None:
    proj.revision(
        "c3",
        "b2",
        """\
op.create_table("audit", sa.Column("id", sa.Integer, primary_key=True))
raise RuntimeError("boom in c3")""",
    )
    with proj.start(db_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
        with pytest.raises(RevisionFailed) as caught:
            worker.upgrade("c3")
        leftovers = [d["key"] for d in worker.compare()]  # the worker is still usable
    transactional = kind_of(db_url) in ("postgresql", "sqlite")
    assert leftovers == ([] if transactional else ["remove_table audit"])
    err = caught.value
    assert err.revision == "c3" and err.error_class == "RuntimeError"
    assert "boom in c3" in str(err) and "Traceback" not in str(err)
    heads, tables = inspect_db(db_url)
    assert heads == {"b2"}
    assert ("audit" in tables) is not transactional  # MySQL's DDL commits on its own


@pytest.mark.core
def test_failing_statement_reports_its_sqlstate(proj: Proj, db_url: str) -> None:
    proj.revision("c3", "b2", 'op.execute("INSERT INTO no_such_table VALUES (1)")')
    with proj.start(db_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
        with pytest.raises(RevisionFailed) as caught:
            worker.upgrade("c3")
    expected = {"postgresql": "42P01", "mysql": "1146", "sqlite": None}[kind_of(db_url)]
    assert caught.value.sqlstate == expected
    assert caught.value.revision == "c3"
    assert "no_such_table" in str(caught.value)


@pytest.mark.core
def test_models_with_a_syntax_error(flask_proj: Proj, sqlite_url: str) -> None:
    flask_proj.set_models(text="from flask_sqlalchemy import SQLAlchemy\ndb = SQLAlchemy(\n\nx = 1\n")
    with flask_proj.start(sqlite_url) as worker, pytest.raises(ConfigError) as caught:
        worker.compare()
    message = str(caught.value)
    assert f"{flask_proj.models_file}:" in message
    assert "syntax error" in message and "Traceback" not in message


@pytest.mark.core
def test_models_raising_on_import_name_file_and_line(alembic_proj: Proj, sqlite_url: str) -> None:
    alembic_proj.set_models(text="import sqlalchemy as sa\n\n\nundefined_name + 1\n")
    with alembic_proj.start(sqlite_url) as worker, pytest.raises(ConfigError) as caught:
        worker.compare()
    message = str(caught.value)
    assert f"{alembic_proj.models_file}:4" in message and "NameError" in message
    assert "Traceback" not in message


@pytest.mark.core
def test_env_py_importing_broken_models_is_a_configuration_error(alembic_proj: Proj, sqlite_url: str) -> None:
    alembic_proj.set_models(text="import sqlalchemy as sa\n\nBase = missing_name\n")
    with alembic_proj.start(sqlite_url, models="") as worker, pytest.raises(ConfigError) as caught:
        worker.upgrade("a1")
    message = str(caught.value)
    assert f"{alembic_proj.models_file}:3" in message and "NameError" in message
    assert "Traceback" not in message


@pytest.mark.core
def test_missing_models_attribute_and_module(flask_proj: Proj, sqlite_url: str) -> None:
    with (
        flask_proj.start(sqlite_url, models="shop.models:nope") as worker,
        pytest.raises(ConfigError, match="has no attribute 'nope'"),
    ):
        worker.compare()
    with (
        flask_proj.start(sqlite_url, models="shop.nothing:db") as worker,
        pytest.raises(ConfigError, match=r"cannot import module 'shop\.nothing'"),
    ):
        worker.compare()


@pytest.mark.core
def test_print_in_models_does_not_break_the_protocol(flask_proj: Proj, sqlite_url: str) -> None:
    noisy = 'print(\'{"ok": false, "error": "fake"}\')\nprint("hello from the models")\n'
    flask_proj.set_models(text=noisy + FLASK_MODELS.format(extra=""))
    env_py = flask_proj.migrations / "env.py"
    write(env_py, env_py.read_text(encoding="utf-8") + "\nprint('env.py talks')\n")
    with flask_proj.start(sqlite_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
        assert worker.compare() == []
    assert any("hello from the models" in line for line in flask_proj.logs)
    assert any("env.py talks" in line for line in flask_proj.logs)


MIGRATE_MODELS = """\
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
db = SQLAlchemy(app)
migrate = Migrate(app, db, compare_type={compare_type}, render_as_batch=True)


@migrate.configure
def configure_alembic(config):
    print("configure callback ran")
    return config


class User(db.Model):
    __tablename__ = "users"
    id = db.Column(db.Integer, primary_key=True)
    username = db.Column(db.String(200), nullable=False)
    email = db.Column(db.String(120))
"""


@pytest.mark.core
@pytest.mark.parametrize("compare_type", [False, True])
def test_projects_own_migrate_arguments_are_honoured(
    flask_proj: Proj, db_url: str, compare_type: bool
) -> None:
    with flask_proj.start(db_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
    flask_proj.set_models(text=MIGRATE_MODELS.format(compare_type=compare_type))
    with flask_proj.start(db_url) as worker:
        found = worker.compare()
    assert any("configure callback ran" in line for line in flask_proj.logs)
    if compare_type:  # the negative control: the type change is there to be found
        assert [d["key"] for d in found] == ["modify_type users.username"]
    else:
        assert found == []


@pytest.mark.core
def test_explicit_migrate_setting(flask_proj: Proj, sqlite_url: str) -> None:
    with flask_proj.start(sqlite_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
    text = MIGRATE_MODELS.format(compare_type=True)
    text += "\nother = Migrate(compare_type=False)\n"  # two Migrate objects: name the one
    flask_proj.set_models(text=text)
    with flask_proj.start(sqlite_url) as worker, pytest.raises(ConfigError, match="several"):
        worker.compare()
    with flask_proj.start(sqlite_url, migrate="shop.models:other") as worker:
        assert worker.compare() == []
    with flask_proj.start(sqlite_url, migrate="shop.models:migrate") as worker:
        assert [d["key"] for d in worker.compare()] == ["modify_type users.username"]


FACTORY = """\
import os

from flask import Flask
from flask_migrate import Migrate

from shop.models import db


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["WORKER_TEST_APP_URL"]
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
    db.init_app(app)
    Migrate(app, db)
    return app
"""


@pytest.mark.core
def test_app_factory_is_used_only_when_configured(
    flask_proj: Proj,
    sqlite_url: str,
    tmp_path: Path,
    inspect_db: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(flask_proj.root / "wsgi.py", FACTORY)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("WORKER_TEST_APP_URL", other)
    with flask_proj.start(sqlite_url) as worker:  # no `app` setting: the factory is not called
        worker.upgrade("a1")
    assert inspect_db(sqlite_url)[0] == {"a1"}
    with (
        flask_proj.start(sqlite_url, app="wsgi:create_app") as worker,
        pytest.raises(ConfigError, match="somewhere else"),
    ):
        worker.upgrade("b2")  # the factory's app points elsewhere: refused
    monkeypatch.setenv("WORKER_TEST_APP_URL", sqlite_url)
    with flask_proj.start(sqlite_url, app="wsgi:create_app") as worker:
        worker.upgrade("b2")
        assert worker.compare() == []
    assert inspect_db(sqlite_url)[0] == {"b2"}
    assert not (tmp_path / "other.db").exists() or inspect_db(other) == (set(), set())


@pytest.mark.core
def test_alembic_ini_elsewhere_with_script_location_and_prepend_sys_path(
    tmp_path: Path, sqlite_url: str, inspect_db: Any
) -> None:
    root = tmp_path / "proj"
    write(root / "src" / "blog" / "__init__.py", "")
    models = write(root / "src" / "blog" / "models.py", PLAIN_MODELS.format(extra=""))
    run_tool([tool("alembic"), "init", "db/migrations"], root)
    set_target_metadata(root / "db" / "migrations" / "env.py", "blog.models", "Base")
    ini = root / "config" / "alembic.ini"
    ini.parent.mkdir()
    text = (root / "alembic.ini").read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines():
        if line.startswith("script_location"):
            line = "script_location = %(here)s/../db/migrations"
        elif line.startswith("prepend_sys_path"):
            line = "prepend_sys_path = ../src"
        lines.append(line)
    ini.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "alembic.ini").unlink()
    proj = Proj(root, root / "db" / "migrations", "blog.models:Base", models, "alembic", alembic_ini=ini)
    proj.base_revisions()
    with proj.start(sqlite_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
        assert worker.compare() == []
    assert inspect_db(sqlite_url)[0] == {"b2"}
    assert not any("script_location" in line for line in proj.logs)


@pytest.mark.core
def test_migrations_inside_the_package(tmp_path: Path, sqlite_url: str, inspect_db: Any) -> None:
    root = tmp_path / "proj"
    write(root / "blog" / "__init__.py", "")
    models = write(root / "blog" / "models.py", PLAIN_MODELS.format(extra=""))
    write(root / "blog" / "views.py", "import blog.models\n")
    run_tool([tool("alembic"), "init", "blog/migrations"], root)
    set_target_metadata(root / "blog" / "migrations" / "env.py", "blog.models", "Base")
    proj = Proj(
        root,
        root / "blog" / "migrations",
        "blog.models:Base",
        models,
        "alembic",
        alembic_ini=root / "alembic.ini",
    )
    proj.base_revisions()
    with proj.start(sqlite_url, imports=("blog",)) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
        assert worker.compare() == []
    assert inspect_db(sqlite_url)[0] == {"b2"}


@pytest.mark.core
def test_env_py_connecting_to_another_database_is_refused(
    alembic_proj: Proj,
    db_url: str,
    tmp_path: Path,
    inspect_db: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env_py = alembic_proj.migrations / "env.py"
    text = env_py.read_text(encoding="utf-8")
    write(
        env_py,
        text.replace(
            "config = context.config",
            "config = context.config\nimport os\n"
            "config.set_main_option('sqlalchemy.url', os.environ['WORKER_TEST_OTHER_URL'])",
        ),
    )
    with dbs.database(kind_of(db_url), tmp_path) as other:
        monkeypatch.setenv("WORKER_TEST_OTHER_URL", other)
        with alembic_proj.start(db_url) as worker, pytest.raises(ConfigError) as caught:
            worker.upgrade("a1")
        assert "somewhere else than the target" in str(caught.value)
        assert inspect_db(other) == (set(), set())
        # the negative control: pointed at the target's own database, the same env.py works
        monkeypatch.setenv("WORKER_TEST_OTHER_URL", db_url)
        with alembic_proj.start(db_url) as worker:
            worker.upgrade("a1")
        assert inspect_db(db_url)[0] == {"a1"}


@pytest.mark.postgres
def test_identity_from_the_control_plane_is_enforced(
    alembic_proj: Proj, pg_url: str, inspect_db: Any
) -> None:
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        identity = sessions.identity_from_dbapi(conn.connection, "postgresql")
    engine.dispose()
    wrong = {**identity, "database": "some_other_database"}
    with (
        alembic_proj.start(pg_url, expected_identity=wrong) as worker,
        pytest.raises(ConfigError, match="somewhere else"),
    ):
        worker.upgrade("a1")
    with alembic_proj.start(pg_url, expected_identity=identity) as worker:
        worker.upgrade("a1")
    assert inspect_db(pg_url)[0] == {"a1"}


@pytest.mark.postgres
def test_session_settings_reach_the_migrating_connection(proj: Proj, pg_url: str) -> None:
    proj.revision(
        "c3",
        "b2",
        """\
row = op.get_bind().execute(sa.text(
    "SELECT current_setting('application_name'), current_setting('lock_timeout')"
)).fetchone()
op.execute("CREATE TABLE seen (app text, lock_timeout text)")
op.get_bind().execute(sa.text("INSERT INTO seen VALUES (:a, :b)"), {"a": row[0], "b": row[1]})""",
    )
    job = proj.job(pg_url)
    with Worker.start(job, python=WORKER_PYTHON) as worker:
        for rev in ("a1", "b2", "c3"):
            worker.upgrade(rev)
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        app, lock_timeout = conn.execute(sa.text("SELECT app, lock_timeout FROM seen")).one()
    engine.dispose()
    assert (app, lock_timeout) == (job.app_name, "5s")


@pytest.mark.core
def test_our_journal_tables_are_never_proposed_for_dropping(proj: Proj, db_url: str) -> None:
    with proj.start(db_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for table in ("reconciler_journal", "reconciler_journal_flags", "legacy"):
            conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with proj.start(db_url) as worker:
        found = worker.compare()
    assert [d["key"] for d in found] == ["remove_table legacy"]  # the control is reported


@pytest.mark.core
def test_x_args_reach_env_py(alembic_proj: Proj, sqlite_url: str) -> None:
    env_py = alembic_proj.migrations / "env.py"
    write(
        env_py,
        env_py.read_text(encoding="utf-8")
        + "\nprint('tenant is', context.get_x_argument(as_dictionary=True).get('tenant'))\n",
    )
    with alembic_proj.start(sqlite_url, x_args={"tenant": "acme"}) as worker:
        worker.upgrade("a1")
    assert any("tenant is acme" in line for line in alembic_proj.logs)


@pytest.mark.core
def test_version_table_must_match_env_py(proj: Proj, sqlite_url: str) -> None:
    with (
        proj.start(sqlite_url, version_table="other_version") as worker,
        pytest.raises(ConfigError, match="version table alembic_version"),
    ):
        worker.upgrade("a1")


@pytest.mark.core
def test_unreachable_database(alembic_proj: Proj) -> None:
    url = "postgresql://nobody@127.0.0.1:1/nothing"
    with (
        alembic_proj.start(url, connect_timeout=3.0) as worker,
        pytest.raises(UnreachableError, match="cannot reach the database"),
    ):
        worker.upgrade("a1")


@pytest.mark.core
def test_init_dir_uses_flask_migrate_template_for_a_flask_db(
    tmp_path: Path, sqlite_url: str, inspect_db: Any
) -> None:
    root = tmp_path / "proj"
    write(root / "shop" / "__init__.py", "")
    models = write(root / "shop" / "models.py", FLASK_MODELS.format(extra=""))
    proj = Proj(root, root / "migrations", "shop.models:db", models, "flask")
    with proj.start(sqlite_url) as worker:
        worker.init_dir()
        assert "current_app" in (proj.migrations / "env.py").read_text(encoding="utf-8")
        assert (proj.migrations / "alembic.ini").is_file()
    proj.base_revisions()
    with proj.start(sqlite_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
        assert worker.compare() == []
    assert inspect_db(sqlite_url)[0] == {"b2"}


@pytest.mark.core
def test_init_dir_uses_alembic_generic_template_for_plain_models(tmp_path: Path, sqlite_url: str) -> None:
    root = tmp_path / "proj"
    write(root / "blog" / "__init__.py", "")
    models = write(root / "blog" / "models.py", PLAIN_MODELS.format(extra=""))
    proj = Proj(root, root / "migrations", "blog.models:Base", models, "alembic")
    with proj.start(sqlite_url) as worker:
        worker.init_dir()
    assert "from blog.models import Base" in (proj.migrations / "env.py").read_text()
    proj.alembic_ini = root / "alembic.ini"
    assert proj.alembic_ini.is_file()
    with proj.start(sqlite_url) as worker:
        assert [d["key"] for d in worker.compare()] == ["add_table users"]


@pytest.mark.core
def test_job_from_settings(flask_proj: Proj, sqlite_url: str, inspect_db: Any) -> None:
    from reconciler.config.load import load_settings

    config = flask_proj.root / "reconciler.toml"
    config.write_text(
        f'[target]\nurl = "{sqlite_url}"\nmodels = "shop.models:db"\nname = "shop"\n'
        f'python = "{WORKER_PYTHON}"\n[journal]\ntable = "rj"\n',
        encoding="utf-8",
    )
    settings = load_settings(str(config), environ={}, cwd=flask_proj.root)
    job = WorkerJob.from_settings(settings)
    assert job.alembic_ini == str(flask_proj.migrations / "alembic.ini")
    assert list(job.exclude_tables) == ["rj", "rj_flags"]
    assert job.app_name.startswith("reconciler/shop/apply/")
    assert job.python == WORKER_PYTHON and job.url == sqlite_url
    assert sqlite_url not in repr(job)
    with Worker.start(job) as worker:
        worker.upgrade("a1")
    assert inspect_db(sqlite_url)[0] == {"a1"}


def test_a_missing_interpreter_is_a_configuration_error(flask_proj: Proj, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot start the worker"):
        Worker.start(flask_proj.job("sqlite:///x.db"), python=str(tmp_path / "no-python"))


def test_tracebacks_only_at_debug_level(alembic_proj: Proj, sqlite_url: str) -> None:
    alembic_proj.revision("c3", "b2", 'secret_local = "hidden-value"\nraise ValueError("c3 broke")')
    for level in ("info", "debug"):
        alembic_proj.logs.clear()
        with alembic_proj.start(sqlite_url, log_level=level) as worker:
            worker.upgrade("a1")
            worker.upgrade("b2")
            with pytest.raises(RevisionFailed, match="c3 broke"):
                worker.upgrade("c3")
        tracebacks = [line for line in alembic_proj.logs if "Traceback" in line]
        assert bool(tracebacks) is (level == "debug")
        assert not any("'hidden-value'" in line for line in alembic_proj.logs)  # no locals


def test_hooks_exclude_our_tables() -> None:
    from reconciler.hooks import exclude_reconciler_table_names, exclude_reconciler_tables

    assert exclude_reconciler_tables(None, "reconciler_journal", "table", True, None) is False
    assert exclude_reconciler_tables(None, "reconciler_journal_flags", "table", True, None) is False
    assert exclude_reconciler_tables(None, "users", "table", True, None) is True
    assert exclude_reconciler_tables(None, "reconciler_journal", "column", True, None) is True
    assert exclude_reconciler_table_names("reconciler_journal", "table", {}) is False
    assert exclude_reconciler_table_names("users", "table", {}) is True


# --- process behaviour -------------------------------------------------------------------------


def test_a_worker_that_dies_reports_its_last_log_lines(proj: Proj, sqlite_url: str) -> None:
    proj.revision("c3", "b2", 'import os\nprint("about to vanish")\nos._exit(3)')
    with proj.start(sqlite_url) as worker:
        worker.upgrade("a1")
        worker.upgrade("b2")
        with pytest.raises(WorkerError) as caught:
            worker.upgrade("c3")
    assert "exited with code 3" in str(caught.value)
    assert "about to vanish" in str(caught.value)


@pytest.mark.slow
def test_a_request_past_its_deadline_kills_the_worker(alembic_proj: Proj, sqlite_url: str) -> None:
    # The deadline covers the worker's start-up too: generous for a loaded machine, and far below
    # the revision's ten minutes, so only the deadline can end the request.
    alembic_proj.revision("a1", None, "import time\ntime.sleep(600)")
    worker = alembic_proj.start(sqlite_url, timeout=15.0)
    try:
        with pytest.raises(WorkerError, match="did not finish upgrade within 15s"):
            worker.upgrade("a1")
        assert worker._process.poll() is not None
    finally:
        worker.close()


PARENT = """\
import sys, time
from reconciler.control.workers import Worker, WorkerJob
job = WorkerJob(url=sys.argv[1], migrations_dir=sys.argv[2], root=sys.argv[3], timeout=600)
worker = Worker.start(job, python=sys.argv[4], on_log=lambda line: print(line, flush=True))
print("worker pid", worker.pid, flush=True)
worker.upgrade("a1")
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.core
def test_worker_dies_when_its_parent_is_killed(alembic_proj: Proj, sqlite_url: str) -> None:
    alembic_proj.revision(
        "a1", None, 'print("slow revision started", flush=True)\nimport time\ntime.sleep(120)'
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PARENT,
            sqlite_url,
            str(alembic_proj.migrations),
            str(alembic_proj.root),
            WORKER_PYTHON,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker_pid = None
    try:
        assert parent.stdout is not None
        deadline = time.monotonic() + 60
        for line in parent.stdout:  # the parent exits (and the loop ends) if anything fails
            if line.startswith("worker pid"):
                worker_pid = int(line.split()[-1])
            if "slow revision started" in line:
                break
            assert time.monotonic() < deadline
        assert worker_pid is not None and not _gone(worker_pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_for(lambda: _gone(worker_pid), 10), "the worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if worker_pid is not None and not _gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


# --- secrets -----------------------------------------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def canary_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{'pg' if request.param == 'postgresql' else 'mysql'}_canary_url"))


LEAKY = """\
import logging
bound = op.get_bind().engine.url
url = bound.render_as_string(hide_password=False) if hasattr(bound, "set") else str(bound)
print("stdout:", url)
logging.getLogger("alembic").warning("log: %s", url)
raise RuntimeError("cannot go on with " + url + " password " + op.get_bind().engine.url.password)"""


@pytest.mark.core
def test_canary_password_appears_in_no_reply_or_log(proj: Proj, canary_url: str) -> None:
    proj.revision("c3", "b2", LEAKY)
    texts: list[str] = []
    with proj.start(canary_url, secrets=()) as worker:
        texts.append(repr(worker.info))
        worker.upgrade("a1")
        worker.upgrade("b2")
        texts.append(worker.sql(None, "b2"))
        texts.append(repr(worker.compare()))
        with pytest.raises(RevisionFailed) as caught:
            worker.upgrade("c3")
        texts.append(str(caught.value))
    assert "cannot go on with" in str(caught.value)
    assert any("stdout:" in line for line in proj.logs)
    assert any("log:" in line for line in proj.logs)
    texts.append(repr(proj.job(canary_url)))
    dbs.assert_no_canary(*texts, *proj.logs)


# --- errors name the right place ---------------------------------------------------------------

RAISES_IN_UPGRADE = 'raise RuntimeError("c3 broke in upgrade")'
RAISES_AT_IMPORT = 'raise RuntimeError("c3 broke at import")'


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.core
def test_a_revision_failing_in_offline_sql_names_its_file_and_line(proj: Proj, sqlite_url: str) -> None:
    """`plan --sql` runs the revisions' upgrade() offline: a raise there is the revision's, not
    'outside any revision (env.py?)'."""
    path = proj.revision("c3", "b2", RAISES_IN_UPGRADE)
    with proj.start(sqlite_url) as worker, pytest.raises(RevisionFailed) as caught:
        worker.sql(None, "c3")
    err = caught.value
    assert err.revision == "c3" and err.exit_code == 1
    assert f"{path}:{_line_of(path, 'c3 broke')}" in str(err)
    assert "outside any revision" not in str(err) and "c3 broke in upgrade" in str(err)


@pytest.mark.core
@pytest.mark.parametrize("op", ["sql", "upgrade", "generate", "stamp"])
def test_a_revision_raising_at_import_is_exit_1_naming_its_line_in_every_request(
    proj: Proj, sqlite_url: str, op: str
) -> None:
    """The same failure (a revision module that raises when Alembic loads it) is one kind in every
    request: exit 1, the revision, its file and line."""
    path = proj.revision("c3", "b2", "pass", extra=RAISES_AT_IMPORT)
    with proj.start(sqlite_url) as worker, pytest.raises(RevisionFailed) as caught:
        if op == "sql":
            worker.sql(None, "c3")
        elif op == "upgrade":
            worker.upgrade("a1")
        elif op == "generate":
            worker.generate(message="next")
        else:
            worker.stamp("b2")
    err = caught.value
    assert err.revision == "c3" and err.exit_code == 1
    assert f"{path}:{_line_of(path, 'c3 broke')}" in str(err)
    assert "c3 broke at import" in str(err)
    assert not list((proj.migrations / "versions").glob("*next*")), "a generation wrote a file"


@pytest.mark.core
def test_a_revision_whose_headers_the_worker_reads_names_its_line_too(proj: Proj, sqlite_url: str) -> None:
    path = proj.revision("c3", "b2", "pass", extra=RAISES_AT_IMPORT)
    with proj.start(sqlite_url) as worker, pytest.raises(RevisionFailed) as caught:
        worker.headers([path])
    assert caught.value.exit_code == 1 and caught.value.revision == "c3"
    assert f"{path}:{_line_of(path, 'c3 broke')}" in str(caught.value)


@pytest.mark.core
def test_no_message_names_the_workers_private_package_link(proj: Proj, sqlite_url: str) -> None:
    """The worker imports our package through a link in a temporary folder; an error mentioning
    one of our files names the installed package instead."""
    import reconciler

    path = proj.revision("c3", "b2", "pass", extra="from reconciler.hooks import no_such_helper")
    with proj.start(sqlite_url) as worker, pytest.raises(RevisionFailed) as caught:
        worker.sql(None, "c3")
    message = str(caught.value)
    assert "no_such_helper" in message and f"{path}:" in message
    assert "reconciler-worker-" not in message
    assert str(Path(reconciler.__file__).resolve().parent / "hooks.py") in message


def test_an_sqlalchemy_older_than_supported_is_refused_naming_both_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from reconciler.worker import runner as worker_module

    monkeypatch.setattr(sa, "__version__", "1.2.19")
    with pytest.raises(ConfigError) as caught:
        worker_module.require_supported_sqlalchemy()
    assert "SQLAlchemy 1.2.19" in str(caught.value) and "(1.3)" in str(caught.value)
    monkeypatch.setattr(sa, "__version__", "1.3.24")
    worker_module.require_supported_sqlalchemy()  # the oldest supported passes


# --- one worker for headers, guard and apply ---------------------------------------------------


@pytest.mark.core
@pytest.mark.postgres
def test_a_headers_worker_bound_to_the_identity_enforces_it(
    alembic_proj: Proj, pg_url: str, inspect_db: Any
) -> None:
    """A worker started to read headers takes on the control plane's identity before it applies:
    a wrong one is still refused after binding (the safeguard moves with the worker)."""
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        identity = sessions.identity_from_dbapi(conn.connection, "postgresql")
    engine.dispose()
    path = alembic_proj.migrations / "versions" / "a1.py"
    wrong = {**identity, "database": "some_other_database"}
    with alembic_proj.start(pg_url) as worker:
        assert worker.headers([path])[0]["revision"] == "a1"
        assert worker.bind(wrong, ["reconciler_journal"], None, 60.0)
        with pytest.raises(ConfigError, match="somewhere else"):
            worker.upgrade("a1")
    with alembic_proj.start(pg_url) as worker:
        worker.headers([path])
        assert worker.bind(identity, ["reconciler_journal"], None, 60.0)
        worker.upgrade("a1")
    assert inspect_db(pg_url)[0] == {"a1"}


@pytest.mark.core
def test_a_worker_that_connected_refuses_to_be_bound(alembic_proj: Proj, sqlite_url: str) -> None:
    """Connections opened before a bind were checked against the URL's identity only: such a
    worker is not reused (the caller starts a fresh one)."""
    with alembic_proj.start(sqlite_url) as worker:
        worker.upgrade("a1")
        assert not worker.bind(None, ["reconciler_journal"], None, 60.0)
