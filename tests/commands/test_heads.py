"""The HEADS marker: kept by every revision our commands write, checked by `check` before any
database is touched, rewritten by `heads --write`; two branches that each add a revision conflict
on it in git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.builders import FLASK_MODELS, Project, flask_project
from tests.system.test_cli_admin import cli, ok
from tests.system.test_flask_verbs import heads_of
from tests.worker.test_generate import APP, flask_db

pytestmark = pytest.mark.core


def marker(project: Project) -> str:
    return (project.migrations / "HEADS").read_text(encoding="utf-8")


def lines(*revs: str) -> str:
    return "".join(f"{r}\n" for r in sorted(revs))


@pytest.fixture
def project(tmp_path: Path) -> Project:
    made = flask_project(tmp_path / "p", f"sqlite:///{tmp_path / 'app.db'}", FLASK_MODELS)
    (made.root / "myapp" / "app.py").write_text(APP, encoding="utf-8")
    made.write_config(models="myapp.models:db")
    return made


def test_revision_and_merge_keep_the_marker(project: Project) -> None:
    ok(project, "revision", "-m", "first", "--rev-id", "aaa1")
    assert marker(project) == lines("aaa1")
    ok(project, "revision", "-m", "second", "--rev-id", "bbb2")
    assert marker(project) == lines("bbb2")
    project.revision("ccc3", "aaa1", message="a teammate's")  # a second head, written by hand
    ok(project, "merge", "-m", "join", "--rev-id", "ddd4")
    assert marker(project) == lines("ddd4") and heads_of(project) == ("ddd4",)


def test_check_names_the_fix_before_touching_the_database(project: Project, tmp_path: Path) -> None:
    ok(project, "revision", "-m", "first", "--rev-id", "aaa1")
    project.revision("bbb2", "aaa1", message="written by hand")  # as `flask db revision` would
    result = cli(project, "check")
    assert result.returncode == 7, result.stderr
    assert "lists aaa1" in result.stderr and "head is bbb2" in result.stderr
    assert "`reconciler heads --write`" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "app.db").exists()  # refused before any connection
    assert cli(project, "heads").returncode == 7
    written = ok(project, "heads", "--write")
    assert written.stdout.split() == ["bbb2"] and marker(project) == lines("bbb2")
    assert ok(project, "heads").stdout.split() == ["bbb2"]


def test_check_after_flask_db_migrate(project: Project) -> None:
    """The real peer writes a revision and leaves the marker behind: `check` says so."""
    ok(project, "upgrade")
    ok(project, "heads", "--write")  # adopted: the marker lists no head yet
    assert marker(project) == ""
    (project.root / "myapp" / "models.py").write_text(
        FLASK_MODELS + "\n\nclass Tag(db.Model):\n    id = db.Column(db.Integer, primary_key=True)\n",
        encoding="utf-8",
    )
    written = flask_db(project.root, project.url, "migrate", "-m", "tags")
    result = cli(project, "check")
    assert result.returncode == 7 and written.name.split("_")[0] in result.stderr, result.stderr


def test_a_project_without_the_marker_has_not_adopted_it(project: Project) -> None:
    project.revision("aaa1", None, message="by hand")
    result = ok(project, "heads")
    assert result.stdout.split() == ["aaa1"] and "heads --write" in result.stderr
    assert not (project.migrations / "HEADS").exists()


def test_two_branches_conflict_on_the_marker_and_check_says_rebase(project: Project) -> None:
    git = GitRepo(project.root)
    ok(project, "revision", "-m", "base", "--rev-id", "base1")
    git.commit("base")
    git.run("checkout", "-q", "-b", "feature")
    ok(project, "revision", "-m", "feature", "--rev-id", "feat1")
    git.commit("feature")
    git.run("checkout", "-q", "main")
    ok(project, "revision", "-m", "main", "--rev-id", "main1")
    git.commit("main")
    merged = git.run("merge", "feature", check=False)
    assert merged.returncode != 0 and "HEADS" in merged.stdout  # git itself stops the merge
    result = cli(project, "check")
    assert result.returncode == 7 and "merge-conflict markers" in result.stderr, result.stderr
    assert "`reconciler rebase`" in result.stderr


class GitRepo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run("init", "-q", "-b", "main")
        (root / ".gitignore").write_text("*.db\n__pycache__/\n", encoding="utf-8")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env_args = ["-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "commit.gpgsign=false"]
        done = subprocess.run(
            ["git", *env_args, *args], cwd=self.root, capture_output=True, text=True, timeout=60
        )
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def commit(self, message: str) -> None:
        self.run("add", "-A")
        self.run("commit", "-q", "-m", message)
