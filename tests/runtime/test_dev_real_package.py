"""Dev mode on a models package laid out as real projects lay it out.

Two patterns from real projects: tables that appear only at mapper configuration (a versioning
extension's `<table>_version` and `transaction` tables, built here by a `__declare_last__` hook of
our own, as SQLAlchemy-Continuum builds them), and a migrations directory inside the watched
package (the revisions dev mode writes land under the package it watches).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.builders import Project, _alembic_init, _template_dir, flask_project, journal_rows, table_names
from tests.pgcluster import wait_until
from tests.runtime.test_devloop import CREATE_USER, columns, dev, later, save

pytestmark = pytest.mark.slow

VERSIONED = '''\
import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()


class Versioned:
    """As SQLAlchemy-Continuum does it: at mapper configuration, a <table>_version table with the
    source table's columns, and one transaction table for all of them."""

    @classmethod
    def __declare_last__(cls):
        table = cls.__table__
        metadata = table.metadata
        if "transaction" not in metadata.tables:
            sa.Table("transaction", metadata, sa.Column("id", sa.Integer, primary_key=True))
        if table.name + "_version" not in metadata.tables:
            sa.Table(
                table.name + "_version", metadata,
                *(sa.Column(c.name, c.type, primary_key=c.primary_key, autoincrement=False,
                            nullable=c.primary_key is False) for c in table.columns),
                sa.Column("transaction_id", sa.Integer, primary_key=True, autoincrement=False),
            )


class Project(Versioned, db.Model):
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(80), nullable=False)
{project_extra}

class Note(db.Model):
    id = db.Column(db.Integer, primary_key=True)


sa.orm.configure_mappers()  # what Continuum asks for after the models; builds the version tables
'''

VERSIONED_BASE = """op.create_table("transaction", sa.Column("id", sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint("id"))
op.create_table("project", sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("name", sa.String(length=80), nullable=False), sa.PrimaryKeyConstraint("id"))
op.create_table("project_version", sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
    sa.Column("name", sa.String(length=80), nullable=True),
    sa.Column("transaction_id", sa.Integer(), autoincrement=False, nullable=False),
    sa.PrimaryKeyConstraint("id", "transaction_id"))
op.create_table("note", sa.Column("id", sa.Integer(), nullable=False), sa.PrimaryKeyConstraint("id"))"""


def versioned_models(project_extra: str = "") -> str:
    return VERSIONED.format(project_extra=project_extra)


def events(log_text: str, name: str) -> list[dict[str, object]]:
    out = []
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            out.append(record)
    return out


def test_a_save_adds_the_column_to_the_version_table_too(tmp_path: Path, sqlite_url: str) -> None:
    """Project changes; project_version (made at mapper configuration, no foreign key to it)
    gets the column in the same draft. Note, untouched, is still not compared."""
    project = flask_project(tmp_path / "p", sqlite_url, models=versioned_models())
    project.revision("base0001", None, message="versioned project", upgrade=VERSIONED_BASE)
    with dev(project) as log:
        wait_until(
            lambda: "project_version" in table_names(sqlite_url) and "no_changes" in log.text(),
            60,
            "started, the full compare at start done",
        )
        engine = sa.create_engine(sqlite_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:  # a difference in note that no save touches
            conn.execute(sa.text("ALTER TABLE note ADD COLUMN extra INTEGER"))
        engine.dispose()
        save(project, versioned_models("    description = db.Column(db.String(200))\n"))
        wait_until(lambda: "description" in columns(sqlite_url, "project"), 30, "the Project change")
        wait_until(
            lambda: "description" in columns(sqlite_url, "project_version"),
            30,
            "the same column on project_version",
        )
    generated = events(log.text(), "revision_generated")
    assert len(generated) == 1, generated
    assert sorted(generated[0]["operations"]) == [  # type: ignore[arg-type]
        "add column project.description VARCHAR(200)",
        "add column project_version.description VARCHAR(200)",
    ]
    assert "extra" in columns(sqlite_url, "note")  # Note did not change: not compared
    drafts = [p for p in project.versions.glob("*.py") if "base0001" not in p.name]
    assert len(drafts) == 1


# --- a migrations directory inside the models package -------------------------------------------
class NestedProject(Project):
    """The migrations directory lives at myapp/migrations (inside the watched package)."""

    def write_config(self, extra: str = "", **target: str) -> Path:
        path = super().write_config(extra, **target)
        text = path.read_text(encoding="utf-8")
        relative = self.migrations.relative_to(self.root).as_posix()
        path.write_text(
            text.replace(f'migrations = "{self.migrations.name}"', f'migrations = "{relative}"'),
            encoding="utf-8",
        )
        return path


def nested_project(root: Path, url: str) -> NestedProject:
    base = flask_project(root, url)  # the package, and a root migrations dir we do not use
    migrations = root / "myapp" / "migrations"
    _alembic_init(migrations / "alembic.ini", migrations, _template_dir("flask_migrate"), "flask")
    project = NestedProject(root, migrations, url)
    project.write_config(models="myapp.models:db")
    project.revision(
        "base0001",
        None,
        message="create user table",
        upgrade=CREATE_USER,
    )
    assert base.versions != project.versions
    return project


@pytest.mark.parametrize("extra", ["", 'ignore = ["*/migrations/*"]'], ids=["default", "ignore_glob"])
def test_one_save_is_one_generation_with_migrations_inside_the_package(
    tmp_path: Path, sqlite_url: str, extra: str
) -> None:
    """The draft written into myapp/migrations/versions never wakes the model watcher: one save,
    one generation, no draft rebuilt (a rebuild downgrades and loses the draft's data)."""
    from tests.builders import FLASK_MODELS

    project = nested_project(tmp_path / "p", sqlite_url)
    with dev(project, extra) as log:
        wait_until(
            lambda: "user" in table_names(sqlite_url) and "no_changes" in log.text(),
            60,
            "started, the full compare at start done",
        )
        save(project, FLASK_MODELS + "    bio = db.Column(db.String(200))\n")
        wait_until(lambda: "bio" in columns(sqlite_url, "user"), 30, "the save applied")
        # A comment-only save, after the draft was written and applied: the loop is serial, so
        # once it is handled, every run the draft's write could have caused has run too.
        save(project, FLASK_MODELS + "    bio = db.Column(db.String(200))\n# done\n")
        wait_until(lambda: later(log.text(), "dev_applied", "no_changes"), 30, "the marker save")
    generated = events(log.text(), "revision_generated")
    assert len(generated) == 1, [g.get("rebuilt") for g in generated]
    assert [r for r in journal_rows(sqlite_url) if r["outcome"] == "draft_rebuilt"] == []
    assert len(list(project.versions.glob("*.py"))) == 2


# --- post-write hooks from alembic.ini, with the [target] python virtualenv ---------------------
class VenvProject(Project):
    """`[target] python` is a virtualenv's interpreter: `<venv>/bin/python`."""

    python: str = ""

    def write_config(self, extra: str = "", **target: str) -> Path:
        path = super().write_config(extra, **target)
        lines = [
            line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("python =")
        ]
        lines.insert(lines.index("[target]") + 1, f'python = "{self.python}"')
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def fake_venv(root: Path, tools: dict[str, str]) -> Path:
    """A virtualenv-like folder: bin/python runs the test interpreter; each of `tools` is a
    console script in bin/ (a shell script body; "$last" is the revision file it was given)."""
    import sys

    from tests.builders import worker_python

    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    scripts = {"python": f'exec {worker_python() or sys.executable} "$@"'}
    scripts.update({name: f"for last; do :; done\n{body}" for name, body in tools.items()})
    for name, body in scripts.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return bin_dir / "python"


HOOKS = """
[post_write_hooks]
hooks = {name}
{name}.type = exec
{name}.executable = {name}
{name}.options = format REVISION_SCRIPT_FILENAME
"""


def hooked_project(tmp_path: Path, url: str, hook: str, tools: dict[str, str]) -> VenvProject:
    base = flask_project(tmp_path / "p", url)
    project = VenvProject(base.root, base.migrations, url)
    project.python = str(fake_venv(tmp_path / "venv", tools))
    ini = project.migrations / "alembic.ini"
    ini.write_text(ini.read_text() + HOOKS.format(name=hook))
    return project


def test_a_post_write_hook_runs_from_the_target_virtualenv(tmp_path: Path, sqlite_url: str) -> None:
    """`ruff` is only in the [target] python virtualenv's bin/ (not on our PATH): it is found
    there, as with the virtualenv activated, and formats the revision dev mode wrote."""
    from tests.builders import FLASK_MODELS

    project = hooked_project(
        tmp_path, sqlite_url, "ruff", {"ruff": 'echo "# formatted by the venv ruff" >> "$last"'}
    )
    with dev(project, "draft = false"):
        wait_until(lambda: "user" in table_names(sqlite_url), 60, "the first revision applied")
        save(project, FLASK_MODELS + "    bio = db.Column(db.String(200))\n")
        wait_until(lambda: "bio" in columns(sqlite_url, "user"), 30, "the save applied")
    written = [p.read_text() for p in project.versions.glob("*.py")]
    assert len(written) == 2 and all("# formatted by the venv ruff" in text for text in written)


def test_a_missing_hook_is_reported_as_the_hook(tmp_path: Path, sqlite_url: str) -> None:
    """`black` is configured but installed nowhere: the error names the hook and what it could
    not run, not env.py; no revision file is left; the next generation works once it exists."""
    from tests.builders import FLASK_MODELS

    project = hooked_project(tmp_path, sqlite_url, "black", {})
    with dev(project, "draft = false") as log:
        wait_until(lambda: "dev_error" in log.text(), 60, "the generation at start failing")
        errors = events(log.text(), "dev_error")
        assert "post-write hook 'black'" in str(errors[0]["error"]), errors
        assert "could not run 'black'" in str(errors[0]["error"])
        assert "env.py" not in str(errors[0]["error"])
        assert errors[0]["kind"] == "ConfigError"
        assert list(project.versions.glob("*.py")) == []
        fake_venv_bin = Path(project.python).parent
        (fake_venv_bin / "black").write_text("#!/bin/sh\nexit 0\n")
        (fake_venv_bin / "black").chmod(0o755)
        save(project, FLASK_MODELS + "    bio = db.Column(db.String(200))\n")
        wait_until(lambda: "bio" in columns(sqlite_url, "user"), 30, "generated once black exists")


def test_a_hook_that_exits_non_zero_is_named_and_the_revision_kept(tmp_path: Path, sqlite_url: str) -> None:
    """As Alembic does, the revision stays; the warning names the hook, its exit code, its output."""
    project = hooked_project(
        tmp_path, sqlite_url, "ruff", {"ruff": 'echo "error: cannot format $last"\nexit 2'}
    )
    with dev(project, "draft = false") as log:
        wait_until(lambda: "user" in table_names(sqlite_url), 60, "the first revision applied")
        wait_until(lambda: "post_write_hook_failed" in log.text(), 30, "the hook failure reported")
    failures = events(log.text(), "post_write_hook_failed")
    assert failures[0]["hook"] == "ruff" and failures[0]["exit_code"] == "2"
    assert "error: cannot format" in str(failures[0]["output"])
