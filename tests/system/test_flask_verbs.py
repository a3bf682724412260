"""The verbs a Flask-Migrate user types, end to end on the tutorial project: `revision`
(`--autogenerate`: `flask db migrate`'s file), `merge`, the aliases `upgrade` / `current` /
`migrate`, and `downgrade -N`. Each file we write is compared with the one Flask-Migrate writes
on an identical copy of the project (ids and dates normalised)."""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest

from reconciler.project import revisions
from tests import dbs
from tests.builders import FLASK_MODELS, Project, db_heads, flask_project, table_names
from tests.system.test_cli_admin import cli, ok
from tests.worker.test_generate import APP, URL_FIXTURES, flask_db, flask_run, normalised

EMAIL = "    email = db.Column(db.String(120), unique=True, nullable=False)\n"
PASSWORD = EMAIL + "    password_hash = db.Column(db.String(128))\n"


def assert_same_file(ours: Path, theirs: Path) -> None:
    """The same name and text apart from the revision id and the Create Date (a diff if not)."""
    (our_name, our_text), (their_name, their_text) = normalised(ours), normalised(theirs)
    diff = "".join(
        difflib.unified_diff(their_text.splitlines(True), our_text.splitlines(True), "flask db", "reconciler")
    )
    assert (our_name, diff) == (their_name, "")


def revision_files(project: Project) -> set[Path]:
    return set(project.versions.glob("*.py"))


def written(project: Project, before: set[Path]) -> Path:
    [path] = revision_files(project) - before
    return path


def set_models(project: Project, text: str) -> None:
    (project.root / "myapp" / "models.py").write_text(text, encoding="utf-8")


def tutorial(root: Path, url: str) -> Project:
    """The tutorial's app: `flask db init`'s layout, the User model, an app Flask can run."""
    project = flask_project(root, url, FLASK_MODELS)
    (project.root / "myapp" / "app.py").write_text(APP, encoding="utf-8")
    return project


def twin(project: Project, root: Path) -> Path:
    """An identical copy of the project, for Flask-Migrate to run in."""
    shutil.copytree(project.root, root, ignore=shutil.ignore_patterns("__pycache__", "*.db"))
    return root


def heads_of(project: Project) -> tuple[str, ...]:
    return revisions.load_graph([project.versions], False)[0].heads


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_tutorial_with_our_verbs_gives_flask_db_migrates_files(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """migrate -m, upgrade, change the model, revision --autogenerate -m: each file is the one
    `flask db migrate -m` writes for the same change on a copy of the project (with its own
    database, taken through the same steps by `flask db upgrade`)."""
    url = request.getfixturevalue(URL_FIXTURES[kind])
    project = tutorial(tmp_path / "ours", url)
    theirs = twin(project, tmp_path / "theirs")
    with dbs.database(kind, tmp_path) as their_url:
        ok(project, "migrate", "-m", "Create user table")
        first = written(project, set())
        assert_same_file(first, flask_db(theirs, their_url, "migrate", "-m", "Create user table"))
        for stale in (theirs / "migrations" / "versions").glob("*.py"):
            stale.unlink()
        shutil.copy(first, theirs / "migrations" / "versions" / first.name)  # one history for both

        ok(project, "upgrade")
        flask_run(theirs, their_url, "upgrade")
        assert "user" in table_names(url)
        set_models(project, FLASK_MODELS.replace(EMAIL, PASSWORD))
        set_models_of(theirs, FLASK_MODELS.replace(EMAIL, PASSWORD))
        result = ok(project, "revision", "--autogenerate", "-m", "add password")
        ours = written(project, {first})
        assert "add column user.password_hash VARCHAR(128)" in result.stderr
        theirs_file = flask_db(theirs, their_url, "migrate", "-m", "add password")
    assert_same_file(ours, theirs_file)
    assert "password_hash" in theirs_file.read_text()


def set_models_of(root: Path, text: str) -> None:
    (root / "myapp" / "models.py").write_text(text, encoding="utf-8")


def test_no_change_writes_no_revision(tmp_path: Path, sqlite_url: str) -> None:
    project = tutorial(tmp_path / "p", sqlite_url)
    ok(project, "migrate", "-m", "create user table")
    ok(project, "upgrade")
    before = revision_files(project)
    for args in (("migrate",), ("revision", "--autogenerate", "-m", "nothing")):
        result = ok(project, *args)
        assert "No changes in schema detected." in result.stderr
        assert revision_files(project) == before


def test_autogenerate_refuses_a_database_behind_the_heads(tmp_path: Path, sqlite_url: str) -> None:
    """A revision generated against an older schema would repeat the pending one."""
    project = tutorial(tmp_path / "p", sqlite_url)
    ok(project, "migrate", "-m", "create user table")  # not applied
    before = revision_files(project)
    result = cli(project, "migrate", "-m", "again")
    assert result.returncode == 4, result.stderr
    assert "reconciler upgrade" in result.stderr and "1 revision(s) pending" in result.stderr
    assert revision_files(project) == before


def test_an_empty_revision_is_flask_db_revisions_file(tmp_path: Path, sqlite_url: str) -> None:
    project = tutorial(tmp_path / "p", sqlite_url)
    theirs = twin(project, tmp_path / "theirs")
    result = ok(project, "revision", "-m", "data fix")
    ours = written(project, set())
    assert f"Generating {ours}" in result.stderr
    theirs_file = flask_db(theirs, sqlite_url, "revision", "-m", "data fix")
    assert_same_file(ours, theirs_file)
    assert "def upgrade():\n    pass\n" in ours.read_text()
    assert table_names(sqlite_url) == set()  # no database was touched


def test_merge_of_two_heads_gives_one_head(tmp_path: Path, sqlite_url: str) -> None:
    project = tutorial(tmp_path / "p", sqlite_url)
    project.revision("base0001", None, message="base")
    project.revision("mine0002", "base0001", message="mine")
    project.revision("hers0002", "base0001", message="hers")
    theirs = twin(project, tmp_path / "theirs")
    assert cli(project, "upgrade").returncode == 4  # multiple heads: nothing applied

    before = revision_files(project)
    ok(project, "merge", "-m", "merge heads")
    merged = written(project, before)
    assert heads_of(project) == (merged.name.split("_")[0],)
    parsed = revisions.parse_revision_file(merged)
    assert parsed is not None and set(parsed.down_revisions) == {"mine0002", "hers0002"}
    theirs_file = flask_db(theirs, sqlite_url, "merge", "-m", "merge heads", "heads")
    assert_same_file(merged, theirs_file)
    ok(project, "upgrade")
    assert db_heads(sqlite_url) == {parsed.revision}

    result = ok(project, "merge")  # one head now: nothing to merge, no file
    assert "nothing to merge" in result.stderr
    assert len(revision_files(project)) == 4


def test_upgrade_and_current_are_apply_and_status(tmp_path: Path, sqlite_url: str) -> None:
    project = tutorial(tmp_path / "p", sqlite_url)
    project.revision("base0001", None, message="base")
    assert ok(project, "current").stdout == ok(project, "status").stdout
    assert "uninitialized_empty" in ok(project, "current").stdout
    assert cli(project, "current", "--json").stdout == cli(project, "status", "--json").stdout
    ok(project, "upgrade", "head")
    assert db_heads(sqlite_url) == {"base0001"}
    assert "in_sync" in ok(project, "current").stdout
    refused = cli(project, "upgrade", "base0001")  # apply goes to the heads only
    assert refused.returncode == 2 and "heads only" in refused.stderr
    assert "Did you mean" not in cli(project, "upgrade", "--help").stderr


def test_downgrade_minus_one_steps_down_and_still_asks(tmp_path: Path, sqlite_url: str) -> None:
    project = tutorial(tmp_path / "p", sqlite_url)
    for n, down in enumerate((None, "r1", "r2"), start=1):
        project.revision(
            f"r{n}",
            down,
            message=f"step {n}",
            upgrade=f'op.create_table("t{n}", sa.Column("id", sa.Integer, primary_key=True))',
            downgrade=f'op.drop_table("t{n}")',
        )
    ok(project, "upgrade")
    refused = cli(project, "downgrade")  # `flask db downgrade`: -1, but never without a yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert "r3  step 3" in refused.stderr and db_heads(sqlite_url) == {"r3"}

    result = ok(project, "downgrade", "-1", "--yes")
    assert "downgraded to r2" in result.stderr and db_heads(sqlite_url) == {"r2"}
    assert "t3" not in table_names(sqlite_url)
    ok(project, "downgrade", "--yes", "-2")
    assert db_heads(sqlite_url) == set() and not {"t1", "t2"} & table_names(sqlite_url)
    assert "nothing to undo" in ok(project, "downgrade", "-1", "--yes").stderr

    ok(project, "upgrade")
    bad = cli(project, "downgrade", "-4", "--yes")
    assert bad.returncode == 4 and "below the base" in bad.stderr
    unknown = cli(project, "downgrade", "--yess")
    assert unknown.returncode == 2 and "no such option: --yess" in unknown.stderr
    assert db_heads(sqlite_url) == {"r3"}


def test_downgrade_minus_one_from_a_merge_is_ambiguous(tmp_path: Path, sqlite_url: str) -> None:
    project = tutorial(tmp_path / "p", sqlite_url)
    project.revision("b1", None, message="base")
    project.revision("x2", "b1", message="x")
    project.revision("y2", "b1", message="y")
    project.revision("m3", ["x2", "y2"], message="merge")
    ok(project, "upgrade")
    result = cli(project, "downgrade", "-1", "--yes")
    assert result.returncode == 2 and "m3 merges x2, y2" in result.stderr
    assert db_heads(sqlite_url) == {"m3"}
