"""`reconciler rebase`: one linear head instead of a merge revision, never moving a revision a
database has applied (version table, journal, a fleet's tenants)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.project import edits
from tests.builders import Project, create_table, flask_project
from tests.commands.test_heads import GitRepo, lines, marker
from tests.system.test_cli_admin import cli, ok, status
from tests.system.test_flask_verbs import heads_of

pytestmark = pytest.mark.core


def table_rev(project: Project, rev: str, down: str | None) -> Path:
    return project.revision(
        rev, down, upgrade=create_table(f"t_{rev}"), downgrade=f'op.drop_table("t_{rev}")', message=rev
    )


def forked(tmp_path: Path, name: str = "p") -> Project:
    """base0 → a1 → a2 (one branch) and base0 → b1 → b2 → b3 (the other)."""
    project = flask_project(tmp_path / name, f"sqlite:///{tmp_path / (name + '.db')}")
    project.write_config()
    table_rev(project, "base0", None)
    table_rev(project, "a1", "base0")
    table_rev(project, "a2", "a1")
    for rev, down in (("b1", "base0"), ("b2", "b1"), ("b3", "b2")):
        table_rev(project, rev, down)
    return project


def schema(url: str) -> dict[str, list[tuple[str, str]]]:
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        return {
            t: [(c["name"], str(c["type"])) for c in inspector.get_columns(t)]
            for t in sorted(inspector.get_table_names())
            if t != "alembic_version" and not t.startswith("reconciler")
        }
    finally:
        engine.dispose()


def test_a_branch_of_several_revisions_moves_by_its_first_one(tmp_path: Path) -> None:
    project = forked(tmp_path)
    before = {p.name: p.read_text() for p in project.versions.glob("*.py")}
    result = ok(project, "rebase", "--onto", "a2")
    assert "b1 now revises a2 (was base0)" in result.stderr, result.stderr
    assert heads_of(project) == ("b3",) and marker(project) == lines("b3")
    changed = {p.name: p.read_text() for p in project.versions.glob("*.py")}
    assert [n for n in before if before[n] != changed[n]] == ["b1_b1.py"]
    diff = [
        line
        for line in difflib.ndiff(before["b1_b1.py"].splitlines(), changed["b1_b1.py"].splitlines())
        if line[:1] in "+-"
    ]
    assert diff == [
        "- Revises: 'base0'",
        "+ Revises: a2",
        "- down_revision = 'base0'",
        "+ down_revision = 'a2'",
    ]
    ok(project, "apply")
    assert set(schema(project.url)) == {f"t_{r}" for r in ("base0", "a1", "a2", "b1", "b2", "b3")}


def test_the_applied_branch_stays_and_cannot_be_moved(tmp_path: Path) -> None:
    project = forked(tmp_path)
    for rev in ("b1", "b2", "b3"):
        (project.versions / f"{rev}_{rev}.py").rename(tmp_path / f"{rev}.py")
    ok(project, "apply")  # the database has base0, a1, a2
    for rev in ("b1", "b2", "b3"):
        (tmp_path / f"{rev}.py").rename(project.versions / f"{rev}_{rev}.py")
    refused = cli(project, "rebase", "--onto", "b3")
    assert refused.returncode == 6, refused.stderr
    assert "a1, a2 are applied" in refused.stderr and "Traceback" not in refused.stderr
    assert heads_of(project) == ("a2", "b3")  # nothing written
    result = ok(project, "rebase")  # the default keeps the branch the database has
    assert "b1 now revises a2" in result.stderr and heads_of(project) == ("b3",)


def test_the_journal_remembers_what_a_downgrade_took_away(tmp_path: Path) -> None:
    """Applied, then downgraded: the version table no longer names a1, the journal does."""
    project = forked(tmp_path)
    for rev in ("b1", "b2", "b3"):
        (project.versions / f"{rev}_{rev}.py").rename(tmp_path / f"{rev}.py")
    ok(project, "apply")
    ok(project, "downgrade", "base0", "--yes")
    for rev in ("b1", "b2", "b3"):
        (tmp_path / f"{rev}.py").rename(project.versions / f"{rev}_{rev}.py")
    refused = cli(project, "rebase", "--onto", "b3")
    assert refused.returncode == 6 and "a1, a2 are applied" in refused.stderr, refused.stderr


def test_a_branch_starting_with_a_merge_is_refused(tmp_path: Path) -> None:
    project = forked(tmp_path)
    table_rev(project, "c1", "base0")
    project.revision("m1", ("b3", "c1"), message="merge")
    refused = cli(project, "rebase", "--onto", "a2")
    assert refused.returncode == 6 and "reconciler merge" in refused.stderr, refused.stderr


def test_two_git_branches_merged_then_rebased(tmp_path: Path) -> None:
    """Each branch adds revisions (and the marker, as our writers keep it); the merge conflicts
    on HEADS; `rebase` leaves one head, and the schema built from empty equals the one built by
    applying each branch in turn."""
    project = flask_project(tmp_path / "p", f"sqlite:///{tmp_path / 'turns.db'}")
    project.write_config()
    git = GitRepo(project.root)
    table_rev(project, "base0", None)
    ok(project, "heads", "--write")
    git.commit("base")
    git.run("checkout", "-q", "-b", "feature")
    table_rev(project, "f1", "base0")
    table_rev(project, "f2", "f1")
    ok(project, "heads", "--write")
    git.commit("feature: two revisions")
    git.run("checkout", "-q", "main")
    table_rev(project, "m1", "base0")
    ok(project, "heads", "--write")
    git.commit("main: one revision")
    ok(project, "apply")  # main's database: base0, m1
    merged = git.run("merge", "feature", check=False)
    assert merged.returncode != 0 and "HEADS" in merged.stdout
    assert cli(project, "check").returncode == 7
    result = ok(project, "rebase")
    assert "f1 now revises m1" in result.stderr, result.stderr
    assert heads_of(project) == ("f2",) and marker(project) == lines("f2")
    ok(project, "apply")  # each branch in turn: main's, then the feature's on top
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    ok(project, "--url", fresh, "apply")
    assert schema(fresh) == schema(project.url) and "t_f2" in schema(fresh)
    git.run("add", "-A")
    git.run("commit", "-q", "-m", "merge feature, rebased")


def test_without_the_refusal_the_database_holds_a_history_the_files_lack(tmp_path: Path) -> None:
    """The bad outcome the refusal prevents: a1 moved by hand onto b3 while the database has a1
    and a2. Its version row now claims b1..b3 too, which it never ran: their tables are missing."""
    project = forked(tmp_path)
    for rev in ("b1", "b2", "b3"):
        (project.versions / f"{rev}_{rev}.py").rename(tmp_path / f"{rev}.py")
    ok(project, "apply")
    for rev in ("b1", "b2", "b3"):
        (tmp_path / f"{rev}.py").rename(project.versions / f"{rev}_{rev}.py")
    a1 = project.versions / "a1_a1.py"
    a1.write_text(edits.reparented(a1.read_text(), "b3"))
    state = status(project)
    assert state["sync_state"] == "in_sync"  # the version table says a2, the head: nothing to do
    assert "t_b1" not in schema(project.url)  # though b1 never ran
