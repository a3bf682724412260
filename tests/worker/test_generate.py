"""Autogenerate in the worker (dev mode's generation side) and the pre-warmed worker.

Real projects (tests/builders.py), real databases, real worker processes. Each test builds its
baseline the way dev mode does: generate the first revision from the models, apply it; then the
models change and a fresh worker generates again. The `core` subset also runs with the oldest
supported versions (RECONCILER_TEST_WORKER_PYTHON).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler.control.workerpool import WarmWorker
from reconciler.control.workers import Generated, Worker, WorkerJob
from reconciler.errors import ConfigError, StateError
from reconciler.project import differences, revisions
from tests import builders

WORKER_PYTHON = builders.worker_python() or sys.executable

USER = """\
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()


class User(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    username = db.Column(db.String(80), nullable=False)
    email = db.Column(db.String(120))
    name = db.Column(db.String(50))
"""

POST = """

class Post(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    title = db.Column(db.String(100))
"""

APP = """\
import os

from flask import Flask
from flask_migrate import Migrate

from myapp.models import db

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
db.init_app(app)
migrate = Migrate(app, db)
"""


@dataclass
class Gen:
    """A project with its database at the revision generated from its first models."""

    project: builders.Project
    models: str
    alembic_ini: Path | None = None
    logs: list[str] = field(default_factory=list)

    @property
    def models_file(self) -> Path:
        return self.project.root / "myapp" / "models.py"

    def job(self, **changes: Any) -> WorkerJob:
        fields: dict[str, Any] = {
            "url": self.project.url,
            "migrations_dir": str(self.project.migrations),
            "root": str(self.project.root),
            "alembic_ini": str(self.alembic_ini) if self.alembic_ini else None,
            "models": self.models,
            "connect_timeout": 10.0,
            "timeout": 120.0,
        }
        fields.update(changes)
        return WorkerJob(**fields)

    def start(self, **changes: Any) -> Worker:
        return Worker.start(self.job(**changes), python=WORKER_PYTHON, on_log=self.logs.append)

    def generate(self, **kwargs: Any) -> Generated:
        with self.start() as worker:
            return worker.generate(**kwargs)

    def baseline(self) -> str:
        with self.start() as worker:
            first = worker.generate()
            assert first.revision is not None and first.path is not None
            worker.upgrade(first.revision)
        return first.revision

    def set_models(self, text: str) -> None:
        self.models_file.write_text(text, encoding="utf-8")

    def edit_models(self, old: str, new: str) -> None:
        text = self.models_file.read_text(encoding="utf-8")
        assert old in text
        self.set_models(text.replace(old, new))

    def files(self) -> set[str]:
        return {p.name for p in self.project.versions.glob("*.py")}


def flask_gen(root: Path, url: str, models: str = USER) -> Gen:
    project = builders.flask_project(root, url, models)
    return Gen(project, "myapp.models:db")


def alembic_gen(root: Path, url: str) -> Gen:
    """Plain Alembic: no render_as_batch from the project; compare_type on in env.py."""
    project = builders.alembic_project(root, url)
    env = project.migrations / "env.py"
    env.write_text(
        env.read_text().replace(
            "target_metadata=target_metadata", "target_metadata=target_metadata, compare_type=True"
        )
    )
    return Gen(project, "myapp.models:Base", alembic_ini=root / "alembic.ini")


URL_FIXTURES = {"sqlite": "sqlite_url", "postgresql": "pg_url", "mysql": "mysql_url"}


@pytest.fixture
def gen(tmp_path: Path, sqlite_url: str) -> Gen:
    made = flask_gen(tmp_path / "proj", sqlite_url)
    made.baseline()
    return made


def ops_of(result: Generated) -> list[tuple[str, str, str]]:
    return [(op["kind"], op["table"], op["name"]) for op in result.operations]


def run_sql(url: str, *statements: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


# --- the Flask-Migrate tutorial change, against `flask db migrate` ------------------------------


def upgrade_calls(path: Path) -> list[tuple[str, str, str]]:
    """The op calls of a revision's upgrade(), batch and plain forms made alike."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    upgrade = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "upgrade")
    calls: list[tuple[str, str, str]] = []

    def call(node: ast.Call, table: str | None) -> None:
        assert isinstance(node.func, ast.Attribute)
        args = list(node.args)
        if table is None:  # op.add_column('user', ...): the table is the first argument
            name = node.func.attr
            position = 1 if name.endswith("index") and not name.startswith("drop") else 0
            table = ast.literal_eval(args.pop(position)) if args else ""
        rest = ast.dump(ast.Tuple(elts=args, ctx=ast.Load())) + "".join(
            sorted(ast.dump(k) for k in node.keywords if k.arg != "schema")
        )
        calls.append((node.func.attr, str(table), rest.replace("'batch_op'", "'op'")))

    for statement in upgrade.body:
        if isinstance(statement, ast.With):
            table = ast.literal_eval(statement.items[0].context_expr.args[0])  # type: ignore[attr-defined]
            for inner in statement.body:
                assert isinstance(inner, ast.Expr) and isinstance(inner.value, ast.Call)
                call(inner.value, table)
        elif isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call):
            call(statement.value, None)
    return calls


def flask_tool() -> str:
    for folder in (Path(WORKER_PYTHON).parent, Path(sys.executable).parent):
        if (folder / "flask").exists():
            return str(folder / "flask")
    raise AssertionError(f"no flask next to {WORKER_PYTHON}")


@pytest.mark.core
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_tutorial_change_gives_what_flask_db_migrate_gives(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(URL_FIXTURES[kind])
    ours, theirs = tutorial_pair(tmp_path, url)
    result = ours.generate()
    theirs_file = flask_db(theirs, url, "migrate")

    assert result.path is not None and result.message == "add_column_user_password_hash"
    assert ops_of(result) == [("add_column", "user", "password_hash")]
    assert result.operations[0]["text"] == "add column user.password_hash VARCHAR(128)"
    assert upgrade_calls(Path(result.path)) == upgrade_calls(theirs_file)
    assert [c[0] for c in upgrade_calls(theirs_file)] == ["add_column"]  # the comparison has teeth


def normalised(path: Path) -> tuple[str, str]:
    """A revision's file name and text with its own id and its Create Date replaced."""
    text = path.read_text(encoding="utf-8")
    found = re.search(r"(?m)^revision = '([0-9a-f]+)'$", text)
    assert found, text
    rev = found.group(1)
    text = re.sub(r"(?m)^Create Date: .*$", "Create Date: <date>", text.replace(rev, "<rev>"))
    return path.name.replace(rev, "<rev>"), text


def tutorial_pair(tmp_path: Path, url: str) -> tuple[Gen, Path]:
    """The tutorial's project at its first revision (ours) and an identical copy run by Flask
    (theirs, with the app Flask-Migrate needs), both with the password_hash column added."""
    ours = flask_gen(tmp_path / "ours", url, builders.FLASK_MODELS)
    ours.baseline()
    theirs = tmp_path / "theirs"
    shutil.copytree(ours.project.root, theirs, ignore=shutil.ignore_patterns("__pycache__"))
    (theirs / "myapp" / "app.py").write_text(APP, encoding="utf-8")
    ours.edit_models(
        "    email = db.Column(db.String(120), unique=True, nullable=False)\n",
        "    email = db.Column(db.String(120), unique=True, nullable=False)\n"
        "    password_hash = db.Column(db.String(128))\n",
    )
    (theirs / "myapp" / "models.py").write_text(ours.models_file.read_text(), encoding="utf-8")
    return ours, theirs


def flask_run(project: Path, url: str, *args: str) -> None:
    """Run `flask db ARGS` in `project` (the app of `APP`, on `url`)."""
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [flask_tool(), "--app", "myapp.app", "db", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def flask_migrate_renders_batch() -> bool:
    """Flask-Migrate 3 and later pass render_as_batch=True on every dialect; 2.x passes nothing,
    and the reconciler then renders batch mode on SQLite by itself (so that ALTERs work there):
    on SQLite with 2.x the two files differ by design (docs/commands.md, `revision`)."""
    code = "import importlib.metadata as m; print(m.version('flask-migrate'))"
    done = subprocess.run([WORKER_PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().split(".")[0]) >= 3


def flask_db(project: Path, url: str, *args: str) -> Path:
    """Run `flask db ARGS` in `project`; the revision file it wrote."""
    versions = project / "migrations" / "versions"
    before = set(versions.glob("*.py"))
    flask_run(project, url, *args)
    [written] = set(versions.glob("*.py")) - before
    return written


def pep8_blank_lines(path: Path) -> str:
    """ruff's E302/E303 (blank lines around top-level definitions) on one file: its report."""
    ruff = Path(sys.executable).parent / "ruff"
    done = subprocess.run(
        [
            str(ruff),
            "check",
            "--no-cache",
            "--isolated",
            "--preview",
            "--output-format",
            "concise",
            "--select",
            "E302,E303",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    return "" if done.returncode == 0 else done.stdout + done.stderr


@pytest.mark.core
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_generate_writes_the_file_flask_db_migrate_writes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite" and not flask_migrate_renders_batch():
        pytest.skip("Flask-Migrate 2.x renders no batch mode; on SQLite the reconciler does")
    url = request.getfixturevalue(URL_FIXTURES[kind])
    ours, theirs = tutorial_pair(tmp_path, url)
    result = ours.generate(message="add password")
    theirs_file = flask_db(theirs, url, "migrate", "-m", "add password")
    assert result.path is not None
    assert normalised(Path(result.path)) == normalised(theirs_file)
    text = theirs_file.read_text()
    assert "add_column(" in text and "sa.Column('password_hash'" in text  # it has teeth


@pytest.mark.core
def test_a_sealed_draft_is_the_file_flask_db_migrate_writes(tmp_path: Path, sqlite_url: str) -> None:
    """The draft dev mode writes (derived message, `draft = True`), sealed with the message the
    user gives flask db migrate: the same file apart from id and date, and PEP 8 clean."""
    from reconciler.commands.authoring import seal
    from reconciler.config.load import load_settings

    if not flask_migrate_renders_batch():
        pytest.skip("Flask-Migrate 2.x renders no batch mode; on SQLite the reconciler does")
    ours, theirs = tutorial_pair(tmp_path, sqlite_url)
    draft = ours.generate(draft=True)
    assert draft.path is not None and "draft = True" in Path(draft.path).read_text()
    settings = load_settings(str(ours.project.config), {}, require_url=True, require_migrations=True)
    sealed = seal(settings, "Add password_hash to user table")
    theirs_file = flask_db(theirs, sqlite_url, "migrate", "-m", "Add password_hash to user table")
    assert normalised(sealed) == normalised(theirs_file)
    assert sealed.name.endswith("_add_password_hash_to_user_table.py")
    assert pep8_blank_lines(sealed) == ""


def test_the_blank_line_check_has_teeth(tmp_path: Path) -> None:
    """Negative control: the old seal's output (the blank lines before `def upgrade():` eaten)."""
    path = tmp_path / "r1_x.py"
    path.write_text(
        builders.revision_source("r1", None, "pass", "pass", "x", None, None).replace(
            "depends_on = None\n\n\n", "depends_on = None\n"
        )
    )
    assert "Expected 2 blank lines, found 0" in pep8_blank_lines(path)  # E302


@pytest.mark.parametrize(
    ("message", "slug"),
    [
        ("add password", "add_password"),
        ("Add password_hash to user table", "add_password_hash_to_user_table"),
        ("user's e-mail: unique!", "user_s_e_mail_unique"),
        (
            "a very long message that goes on past the forty characters",
            "a_very_long_message_that_goes_on_past_",
        ),
    ],
)
def test_sealed_names_use_alembic_slugs(message: str, slug: str) -> None:
    from reconciler.project.edits import sealed_name

    assert (
        sealed_name("abc123_add_column_user_x.py", "abc123", "add_column_user_x", message)
        == f"abc123_{slug}.py"
    )
    # alembic.ini's file_template (a date before the id) is kept
    assert (
        sealed_name("2026_12_02_abc123_add_column_user_x.py", "abc123", "add_column_user_x", message)
        == f"2026_12_02_abc123_{slug}.py"
    )


# --- one revision per kind of change ------------------------------------------------------------


COMPARE_TYPES = """
from flask_migrate import Migrate

migrate = Migrate(compare_type=True)  # Flask-Migrate 2.x does not compare types by default
"""
CASES: dict[str, tuple[tuple[str, str], list[tuple[str, str, str]], str]] = {
    "add_column": (
        (
            "    name = db.Column(db.String(50))\n",
            "    name = db.Column(db.String(50))\n    age = db.Column(db.Integer)\n",
        ),
        [("add_column", "user", "age")],
        "add_column_user_age",
    ),
    "add_table": (
        ("    name = db.Column(db.String(50))\n", "    name = db.Column(db.String(50))\n" + POST),
        [("create_table", "post", "post")],
        "create_table_post",
    ),
    "add_index": (
        (
            "username = db.Column(db.String(80), nullable=False)",
            "username = db.Column(db.String(80), nullable=False, index=True)",
        ),
        [("add_index", "user", "ix_user_username")],
        "add_index_ix_user_username",
    ),
    "change_type": (
        ("email = db.Column(db.String(120))", "email = db.Column(db.String(200))"),
        [("alter_column", "user", "email")],
        "alter_column_user_email_type",
    ),
}


DIALECT_CASES = [
    *(("sqlite", case) for case in sorted(CASES)),
    *(pytest.param("postgresql", case, marks=pytest.mark.postgres) for case in sorted(CASES)),
    *(pytest.param("mysql", case, marks=pytest.mark.mysql) for case in ("add_column", "change_type")),
]


@pytest.mark.core
@pytest.mark.parametrize(("kind", "case"), DIALECT_CASES)
def test_one_revision_per_change(
    kind: str, case: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    made = flask_gen(tmp_path / "proj", request.getfixturevalue(URL_FIXTURES[kind]), USER + COMPARE_TYPES)
    base = made.baseline()
    edit, expected, message = CASES[case]
    made.edit_models(*edit)
    with made.start() as worker:
        result = worker.generate()
        assert ops_of(result) == expected
        assert result.message == message and result.destructive == [] and result.renames == []
        assert result.path is not None and Path(result.path).name.endswith(f"_{message}.py")
        parsed = revisions.parse_revision_file(Path(result.path))
        assert parsed is not None and parsed.down_revisions == (base,) and parsed.message == message
        assert parsed.draft is False
        worker.upgrade(str(result.revision))  # it applies, and leaves nothing to generate
        assert worker.generate().path is None


@pytest.mark.core
def test_dropping_a_column_is_listed_as_destructive(gen: Gen) -> None:
    gen.edit_models("    name = db.Column(db.String(50))\n", "")
    result = gen.generate()
    assert ops_of(result) == [("drop_column", "user", "name")]
    assert result.message == "drop_column_user_name"
    assert result.destructive == ["drop column user.name: its values are lost"]
    assert result.renames == []


@pytest.mark.core
def test_a_drop_and_an_add_of_the_same_type_may_be_a_rename(gen: Gen) -> None:
    gen.edit_models(
        "name = db.Column(db.String(50))",
        "full_name = db.Column(db.String(50))\n    nickname = db.Column(db.String(30))",
    )
    result = gen.generate()
    assert sorted(ops_of(result)) == [
        ("add_column", "user", "full_name"),
        ("add_column", "user", "nickname"),
        ("drop_column", "user", "name"),
    ]
    assert result.message.endswith("_and_2_more")
    assert len(result.renames) == 1
    assert result.renames[0].startswith("user.name -> user.full_name? (a column dropped")
    assert result.destructive == ["drop column user.name: its values are lost"]


@pytest.mark.core
def test_a_narrowed_type_is_destructive(tmp_path: Path, sqlite_url: str) -> None:
    made = alembic_gen(tmp_path / "proj", sqlite_url)
    made.baseline()
    made.edit_models("sa.String(120)", "sa.String(60)")
    with made.start() as worker:
        result = worker.generate()
        assert ops_of(result) == [("alter_column", "user", "email")]
        assert result.destructive == [
            "change column user.email type VARCHAR(120) -> VARCHAR(60): values longer than 60 "
            "characters do not fit"
        ]
        text = Path(str(result.path)).read_text(encoding="utf-8")
        assert "with op.batch_alter_table('user'" in text  # plain Alembic on SQLite: batch mode
        worker.upgrade(str(result.revision))
        assert worker.generate().path is None  # no Flask-Migrate hook here: ours drops it


@pytest.mark.core
def test_no_changes_no_file(gen: Gen) -> None:
    before = gen.files()
    result = gen.generate()
    assert (result.path, result.revision, result.operations) == (None, None, [])
    assert gen.files() == before


@pytest.mark.core
def test_known_differences_are_left_out(gen: Gen) -> None:
    gen.edit_models("email = db.Column(db.String(120))", "email = db.Column(db.String(240))")
    gen.set_models(gen.models_file.read_text() + COMPARE_TYPES)
    before = gen.files()
    with gen.start() as worker:
        found = worker.compare()
    keys = [d["key"] for d in found]
    assert keys == ["modify_type user.email"]
    assert gen.generate(known=keys).path is None
    known_file = gen.project.migrations / differences.FILE_NAME
    differences.save(known_file, found, "sqlite")
    with Worker.start(gen.job(known_differences=str(known_file)), python=WORKER_PYTHON) as worker:
        assert worker.generate().path is None  # known=None: the job's file
    assert gen.files() == before
    assert gen.generate(known=[]).path is not None  # the control: it is a real difference


@pytest.mark.core
def test_a_known_difference_leaves_the_others(gen: Gen) -> None:
    gen.edit_models(
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n    age = db.Column(db.Integer)\n"
        "    city = db.Column(db.String(40))\n",
    )
    result = gen.generate(known=["add_column user.age"])
    assert ops_of(result) == [("add_column", "user", "city")]
    text = Path(str(result.path)).read_text(encoding="utf-8")
    assert "'age'" not in text and "drop_column('city')" in text  # the downgrade follows


TABLES = (
    USER
    + """

class Post(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"))


class Note(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    body = db.Column(db.String(40))
"""
)


@pytest.mark.core
def test_tables_restrict_what_is_compared(tmp_path: Path, sqlite_url: str) -> None:
    made = flask_gen(tmp_path / "proj", sqlite_url, TABLES)
    made.baseline()
    run_sql(sqlite_url, "CREATE TABLE legacy (id INTEGER PRIMARY KEY)")
    made.edit_models(
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n    nickname = db.Column(db.String(30))\n",
    )
    made.edit_models(
        "body = db.Column(db.String(40))",
        "body = db.Column(db.String(40))\n    title = db.Column(db.String(40))",
    )
    made.set_models(made.models_file.read_text() + POST.replace("Post", "Tag"))
    result = made.generate(tables=["post"])
    # user: post's foreign-key neighbour; tag: not in the database yet; note and legacy: left out
    assert sorted(ops_of(result)) == [("add_column", "user", "nickname"), ("create_table", "tag", "tag")]
    Path(str(result.path)).unlink()
    everything = made.generate()
    assert sorted(ops_of(everything)) == [
        ("add_column", "note", "title"),
        ("add_column", "user", "nickname"),
        ("create_table", "tag", "tag"),
        ("drop_table", "legacy", "legacy"),
    ]


MODELS_PACKAGE = {
    "__init__.py": """\
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()

from myapp.models import a, b, c  # noqa: E402
""",
    "a.py": """\
from myapp.models import db


class A(db.Model):
    __tablename__ = "a"
    id = db.Column(db.Integer, primary_key=True)
    b_id = db.Column(db.Integer, db.ForeignKey("b.id"))
""",
    "b.py": """\
from myapp.models import db


class B(db.Model):
    __tablename__ = "b"
    id = db.Column(db.Integer, primary_key=True)


class B2(db.Model):
    __tablename__ = "b2"
    id = db.Column(db.Integer, primary_key=True)
""",
    "c.py": """\
from myapp.models import db

c = db.Table("c", db.Column("id", db.Integer, primary_key=True))
""",
}


def package_gen(root: Path, url: str) -> Gen:
    """Models in a package, one module per table or two (`c` an imperative Table), at baseline."""
    made = flask_gen(root, url)
    made.models_file.unlink()
    for name, text in MODELS_PACKAGE.items():
        path = root / "myapp" / "models" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    made.baseline()
    return made


@pytest.mark.core
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_changed_files_restrict_what_is_compared(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(URL_FIXTURES[kind])
    made = package_gen(tmp_path / "proj", url)
    models = made.project.root / "myapp" / "models"
    a_py = models / "a.py"
    a_py.write_text(a_py.read_text() + "    note = db.Column(db.String(30))\n")
    run_sql(url, "ALTER TABLE c ADD COLUMN extra INTEGER")  # a difference only in c

    scoped = made.generate(files=[str(models / ".." / "models" / "a.py")])  # by real path
    assert scoped.compared == ["a", "b"]  # a, and b: its foreign-key neighbour
    assert ops_of(scoped) == [("add_column", "a", "note")]
    Path(str(scoped.path)).unlink()

    both = made.generate(files=[str(a_py), str(models / "c.py")], tables=["b2"])
    assert both.compared == ["a", "b", "b2", "c"]
    assert sorted(ops_of(both)) == [("add_column", "a", "note"), ("drop_column", "c", "extra")]
    Path(str(both.path)).unlink()

    full = made.generate()
    assert full.compared is None
    assert sorted(ops_of(full)) == [("add_column", "a", "note"), ("drop_column", "c", "extra")]
    Path(str(full.path)).unlink()

    (tmp_path / "other.py").write_text("x = 1\n")  # defines no table: compare everything
    for files in ([str(tmp_path / "other.py")], [str(a_py), str(models / "__init__.py")], []):
        fallback = made.generate(files=files)
        assert fallback.compared is None
        assert sorted(ops_of(fallback)) == sorted(ops_of(full))
        Path(str(fallback.path)).unlink()


@pytest.mark.core
def test_a_model_deleted_from_a_changed_file_is_dropped(tmp_path: Path, sqlite_url: str) -> None:
    made = package_gen(tmp_path / "proj", sqlite_url)
    b_py = made.project.root / "myapp" / "models" / "b.py"
    b_py.write_text(b_py.read_text().split("\n\nclass B2")[0])

    result = made.generate(files=[str(b_py)])
    # b and its neighbour a; b2 is in the database but no model defines it any more
    assert result.compared == ["a", "b", "b2"]
    assert ops_of(result) == [("drop_table", "b2", "b2")]
    assert result.destructive


@pytest.mark.core
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_changed_classes_restrict_a_file_to_their_tables(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(URL_FIXTURES[kind])
    made = package_gen(tmp_path / "proj", url)
    b_py = made.project.root / "myapp" / "models" / "b.py"
    b_py.write_text(b_py.read_text() + "    note = db.Column(db.String(30))\n")  # B2 changes
    run_sql(url, "ALTER TABLE b ADD COLUMN extra INTEGER")  # a difference in B's table only

    scoped = made.generate(files=[str(b_py)], classes={str(b_py): ["B2"]})
    assert scoped.compared == ["b2"]  # not b: class B did not change
    assert ops_of(scoped) == [("add_column", "b2", "note")]
    Path(str(scoped.path)).unlink()

    whole = made.generate(files=[str(b_py)])  # control: the whole file sees b's difference too
    assert whole.compared == ["a", "b", "b2"]
    assert sorted(ops_of(whole)) == [("add_column", "b2", "note"), ("drop_column", "b", "extra")]
    Path(str(whole.path)).unlink()


@pytest.mark.core
def test_a_changed_class_without_a_table_compares_everything(tmp_path: Path, sqlite_url: str) -> None:
    made = package_gen(tmp_path / "proj", sqlite_url)
    c_py = made.project.root / "myapp" / "models" / "c.py"
    c_py.write_text(c_py.read_text() + "\n\nclass Helper:\n    size = 3\n")
    run_sql(sqlite_url, "ALTER TABLE a ADD COLUMN extra INTEGER")

    # a type decorator or helper class may change every model that uses it
    result = made.generate(files=[str(c_py)], classes={str(c_py): ["Helper"]})
    assert result.compared is None
    assert ops_of(result) == [("drop_column", "a", "extra")]


@pytest.mark.core
def test_a_deleted_class_leaves_its_table_to_the_orphan_compare(tmp_path: Path, sqlite_url: str) -> None:
    made = package_gen(tmp_path / "proj", sqlite_url)
    b_py = made.project.root / "myapp" / "models" / "b.py"
    b_py.write_text(b_py.read_text().split("\n\nclass B2")[0])

    result = made.generate(files=[str(b_py)], classes={str(b_py): ["B2"]})
    assert result.compared == ["b2"]
    assert ops_of(result) == [("drop_table", "b2", "b2")]


@pytest.mark.core
def test_draft_marker_and_chosen_revision_id(gen: Gen) -> None:
    gen.edit_models(
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n    age = db.Column(db.Integer)\n",
    )
    result = gen.generate(draft=True, rev_id="d1a2f3", message="users get an age")
    assert result.revision == "d1a2f3" and result.message == "users get an age"
    path = Path(str(result.path))
    assert path.name == "d1a2f3_users_get_an_age.py"
    parsed = revisions.parse_revision_file(path)
    assert parsed is not None and parsed.draft is True and parsed.revision == "d1a2f3"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[lines.index("depends_on = None") + 1] == "draft = True"
    with gen.start() as worker:
        assert worker.headers([path])[0]["draft"] is True  # the executed file agrees
        with pytest.raises(ConfigError, match="revision d1a2f3 already exists"):
            worker.generate(rev_id="d1a2f3")


@pytest.mark.core
@pytest.mark.parametrize("template", ["flask", "alembic"])
def test_a_syntax_error_in_the_models_writes_nothing(template: str, tmp_path: Path, sqlite_url: str) -> None:
    made = (flask_gen if template == "flask" else alembic_gen)(tmp_path / "proj", sqlite_url)
    made.baseline()
    before = made.files()
    made.set_models(made.models_file.read_text() + "\nclass Broken(:\n    pass\n")
    line = len(made.models_file.read_text().splitlines()) - 1
    with pytest.raises(ConfigError) as caught:
        made.generate()
    message = str(caught.value)
    assert f"models.py:{line}" in message and "syntax error" in message
    assert "Traceback" not in message
    assert made.files() == before


@pytest.mark.core
def test_our_journal_tables_are_never_proposed(gen: Gen) -> None:
    run_sql(
        gen.project.url,
        "CREATE TABLE reconciler_journal (id INTEGER PRIMARY KEY)",
        "CREATE TABLE reconciler_journal_flags (id INTEGER PRIMARY KEY)",
        "CREATE TABLE legacy (id INTEGER PRIMARY KEY)",
    )
    result = gen.generate()
    assert ops_of(result) == [("drop_table", "legacy", "legacy")]  # the control is proposed
    assert result.destructive == ["drop table legacy: all its rows are lost"]
    assert "reconciler_journal" not in Path(str(result.path)).read_text(encoding="utf-8")


@pytest.mark.core
def test_the_database_must_be_at_the_heads(gen: Gen) -> None:
    before = gen.files()
    gen.edit_models("    name = db.Column(db.String(50))\n", "")
    first = gen.generate()
    with pytest.raises(StateError, match="not at the migrations directory's heads"):
        gen.generate()
    assert gen.files() == before | {Path(str(first.path)).name}


HOOK = """\
import sys
with open(sys.argv[1], "a", encoding="utf-8") as handle:
    handle.write("# formatted by the post-write hook\\n")
"""


def test_post_write_hooks_run(gen: Gen) -> None:
    hook = gen.project.root / "hook.py"
    hook.write_text(HOOK, encoding="utf-8")
    ini = gen.project.migrations / "alembic.ini"
    ini.write_text(
        ini.read_text() + f"\n[post_write_hooks]\nhooks = stamp\nstamp.type = exec\n"
        f"stamp.executable = {WORKER_PYTHON}\nstamp.options = {hook} REVISION_SCRIPT_FILENAME\n"
    )
    gen.edit_models("email = db.Column(db.String(120))", "email = db.Column(db.String(120), index=True)")
    result = gen.generate(draft=True)
    text = Path(str(result.path)).read_text(encoding="utf-8")
    assert text.endswith("# formatted by the post-write hook\n") and "\ndraft = True\n" in text


@pytest.mark.core
def test_a_failure_after_the_file_is_written_removes_it(gen: Gen) -> None:
    ini = gen.project.migrations / "alembic.ini"
    ini.write_text(ini.read_text() + "\n[post_write_hooks]\nhooks = broken\nbroken.type = no_such\n")
    gen.edit_models("email = db.Column(db.String(120))", "email = db.Column(db.String(120), index=True)")
    before = gen.files()
    with pytest.raises(ConfigError, match="no_such"):
        gen.generate()
    assert gen.files() == before


@pytest.mark.core
def test_a_same_size_edit_within_a_second_is_seen(gen: Gen) -> None:
    """Python trusts a .pyc by (whole-second source mtime, size): the worker must not."""
    second = (int(time.time()) - 5) * 10**9

    def stamp(path: Path, tenths: int) -> None:
        os.utime(path, ns=(second, second + tenths * 100_000_000))

    gen.edit_models(
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n    aaa = db.Column(db.Integer)\n",
    )
    stamp(gen.models_file, 1)
    compiled = subprocess.run(  # what importing it did (the app, an earlier worker)
        [
            WORKER_PYTHON,
            "-c",
            "import py_compile, sys; print(py_compile.compile(sys.argv[1]))",
            str(gen.models_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pyc = Path(compiled.stdout.strip())
    gen.edit_models("aaa = db", "bbb = db")  # the same size, saved within the same second
    stamp(pyc, 3)
    stamp(gen.models_file, 5)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import myapp.models as m; "
        "print(sorted(m.User.__table__.c.keys()))"
    )
    plain = subprocess.run(
        [WORKER_PYTHON, "-c", probe, str(gen.project.root)], capture_output=True, text=True, timeout=60
    )
    assert "'aaa'" in plain.stdout, plain.stderr  # the control: plain Python runs stale code
    with gen.start() as worker:
        assert [d["key"] for d in worker.compare()] == ["add_column user.bbb"]


# --- the pre-warmed worker ----------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def warm(gen: Gen) -> Iterator[WarmWorker]:
    pool = WarmWorker(gen.job(), python=WORKER_PYTHON, on_log=gen.logs.append, timeout=60)
    try:
        yield pool
    finally:
        pool.close()


@pytest.mark.core
def test_warm_worker_hands_out_fresh_started_workers(gen: Gen, warm: WarmWorker) -> None:
    assert _wait_for(lambda: warm.spare_pid is not None, 60)
    spare = warm.spare_pid
    assert spare is not None and not _gone(spare)
    pids = []
    for _ in range(2):
        with warm.take() as worker:
            pids.append(worker.pid)
            assert worker.generate().path is None
    assert pids[0] == spare and pids[0] != pids[1]
    assert _wait_for(lambda: warm.spare_pid is not None, 60)
    last_spare = warm.spare_pid
    assert last_spare not in pids
    warm.close()
    assert last_spare is not None and all(_gone(pid) for pid in (*pids, last_spare))


def _workers(warm: WarmWorker) -> set[int]:
    """This process's descendants (the workers, started by the pool's thread or forked by its
    zygote), the zygote left out."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    out, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out - {warm.zygote_pid}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_warm_worker_starts_the_next_spare_after_the_taken_one_is_closed(gen: Gen, warm: WarmWorker) -> None:
    """While a taken worker generates, no spare starts beside it (it would take the CPU the
    generation needs); closing the taken worker starts the next."""
    assert _wait_for(lambda: warm.spare_pid is not None, 60)
    with warm.take() as worker:
        assert worker.generate().path is None  # long enough for a spare's process to exist
        assert _workers(warm) == {worker.pid} and warm.spare_pid is None
    assert _wait_for(lambda: warm.spare_pid is not None, 60)
    assert warm.spare_pid != worker.pid and _workers(warm) == {warm.spare_pid}


@pytest.mark.core
def test_warm_worker_imports_the_models_anew_each_time(gen: Gen, warm: WarmWorker) -> None:
    with warm.take() as worker:
        assert worker.generate().path is None
    gen.edit_models(
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n    age = db.Column(db.Integer)\n",
    )
    with warm.take() as worker:  # the spare was started before the edit
        assert ops_of(worker.generate()) == [("add_column", "user", "age")]


def test_warm_worker_replaces_a_spare_whose_env_py_changed(gen: Gen, warm: WarmWorker) -> None:
    assert _wait_for(lambda: warm.spare_pid is not None, 60)
    spare = warm.spare_pid
    env_py = gen.project.migrations / "env.py"
    env_py.write_text(env_py.read_text() + "\nprint('env.py was edited')\n")
    with warm.take() as worker:
        assert worker.pid != spare
        worker.generate()
    assert spare is not None and _wait_for(lambda: _gone(spare), 10)
    assert any("env.py was edited" in line for line in gen.logs)


def test_warm_worker_start_errors_reach_take(gen: Gen, tmp_path: Path) -> None:
    pool = WarmWorker(gen.job(), python=str(tmp_path / "no-python"))
    try:
        with pytest.raises(ConfigError, match="cannot start the worker"):
            pool.take()
    finally:
        pool.close()


# --- the pure parts ----------------------------------------------------------------------------


def test_derived_messages_are_short_slugs() -> None:
    from reconciler.worker.generated import OpInfo, derive_message

    long_name = "a_really_long_column_name_that_goes_on_and_on_and_on_forever"
    infos = [
        OpInfo("add_column", "User", long_name, "", f"add_column_User_{long_name}"),
        *(OpInfo("add_index", "user", "ix", "", "add_index_ix.user-email") for _ in range(11)),
    ]
    message = derive_message(infos)
    assert len(message) <= 60 and re.fullmatch(r"[a-z0-9_]+", message)
    assert message.startswith("add_column_user_a_really") and message.endswith("_and_11_more")
    assert derive_message(infos[1:2]) == "add_index_ix_user_email"


@pytest.mark.parametrize(
    ("old", "new", "lossy"),
    [
        (sa.String(120), sa.String(60), True),
        (sa.String(60), sa.String(120), False),
        (sa.Text(), sa.String(255), True),
        (sa.String(60), sa.Text(), False),
        (sa.BigInteger(), sa.Integer(), True),
        (sa.Integer(), sa.BigInteger(), False),
        (sa.Numeric(10, 4), sa.Numeric(10, 2), True),
        (sa.Integer(), sa.Numeric(12, 2), False),
        (sa.String(20), sa.Integer(), True),
        (sa.DateTime(), sa.Date(), True),
        (sa.Date(), sa.DateTime(), False),
        (sa.Enum("a", "b", name="e"), sa.Enum("a", name="e"), True),
    ],
)
def test_narrowing(old: Any, new: Any, lossy: bool) -> None:
    from reconciler.worker.generated import narrowing

    assert bool(narrowing(old, new)) is lossy


def test_draft_marker_goes_after_the_headers(tmp_path: Path) -> None:
    from reconciler.worker.autogenerate import mark_draft

    path = tmp_path / "r1_x.py"
    path.write_bytes(
        builders.revision_source("r1", None, "pass", "pass", "x", None, None).replace("\n", "\r\n").encode()
    )
    mark_draft(path)
    text = path.read_bytes().decode()
    assert "depends_on = None\r\ndraft = True\r\n" in text
    parsed = revisions.parse_revision_file(path)
    assert parsed is not None and parsed.draft is True
