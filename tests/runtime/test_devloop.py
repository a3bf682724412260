"""`reconciler run --mode dev` end to end: real model files saved, a real dev database."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.project import revisions
from reconciler.runtime.devtarget import is_local
from tests.builders import FLASK_MODELS, Project, db_heads, flask_project, table_names
from tests.cli import cli_command, cli_env, run_cli
from tests.dbs import assert_no_canary
from tests.pgcluster import wait_until

pytestmark = pytest.mark.slow

BASE = FLASK_MODELS  # the tutorial's User model


def columns(url: str, table: str) -> dict[str, str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            if not inspector.has_table(table):
                return {}
            return {c["name"]: str(c["type"]) for c in inspector.get_columns(table)}
    finally:
        engine.dispose()


def indexes(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return {str(i["name"]) for i in sa.inspect(conn).get_indexes(table)}
    finally:
        engine.dispose()


def revision_files(project: Project) -> list[Path]:
    return sorted(project.versions.glob("*.py"))


def save(project: Project, text: str) -> None:
    path = project.root / "myapp" / "models.py"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # editors save by rename; the watcher must see it


class DevLog:
    """The dev process's log (stderr), readable while it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        return self.path.read_text() if self.path.exists() else ""


@contextmanager
def dev(project: Project, extra: str = "", env: dict[str, str] | None = None) -> Iterator[DevLog]:
    project.write_config(extra=f"[dev]\ndebounce = 0.05\n{extra}", models="myapp.models:db")
    log = DevLog(project.root / "dev.log")
    with open(log.path, "w") as stderr:
        proc = subprocess.Popen(
            cli_command(["--config", str(project.config), "run", "--mode", "dev"]),
            cwd=project.root,
            env=cli_env(env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
        try:
            yield log
        except BaseException:
            print(f"the dev process's log, at the failure:\n{log.text()[-20000:]}")  # shown by pytest
            raise
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"dev mode did not stop within 60 s:\n{log.text()[-3000:]}") from None
    assert_no_canary(log.text())


def started(project: Project, url: str) -> None:
    wait_until(lambda: "user" in table_names(url), 60, "the initial revision applied")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def dev_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    from tests import dbs

    with dbs.database(request.param, tmp_path) as url:
        yield url


CREATE_USER = """op.create_table(
    "user",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("username", sa.String(length=80), nullable=False),
    sa.Column("email", sa.String(length=120), nullable=False),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("email"),
    sa.UniqueConstraint("username"),
)"""  # the tutorial's first revision, as `flask db migrate` wrote it


def baseline_project(tmp_path: Path, url: str) -> Project:
    """The tutorial: a User model, and its first revision (as `flask db migrate` made it)."""
    project = flask_project(tmp_path / "p", url, models=BASE)
    project.revision("base0001", None, message="create user table", upgrade=CREATE_USER)
    return project


def test_each_kind_of_change_without_drafts(tmp_path: Path, dev_url: str) -> None:
    project = baseline_project(tmp_path, dev_url)
    with dev(project, "draft = false") as log:
        started(project, dev_url)
        models = BASE + "    password_hash = db.Column(db.String(128))\n"
        save(project, models)
        wait_until(lambda: "password_hash" in columns(dev_url, "user"), 30, "add column")
        assert any("password_hash" in p.name for p in revision_files(project))
        models += "\n\nclass Post(db.Model):\n    id = db.Column(db.Integer, primary_key=True)\n"
        save(project, models)
        wait_until(lambda: "post" in table_names(dev_url), 30, "add table")
        models = models.replace("db.Column(db.String(128))", "db.Column(db.String(128), index=True)")
        save(project, models)
        wait_until(lambda: any("password_hash" in i for i in indexes(dev_url, "user")), 30, "index")
        models = models.replace("db.String(128), index=True", "db.String(255), index=True")
        save(project, models)
        wait_until(lambda: "255" in columns(dev_url, "user")["password_hash"], 30, "type change")
        count = len(revision_files(project))
        save(project, models + "\n# a comment only\n")  # a save with no schema change
        wait_until(lambda: log.text().count("no_changes") >= 1, 30, "the no-change save handled")
    assert count == 5
    assert len(revision_files(project)) == count  # no empty revision
    (head,) = revisions.load_graph([project.versions], False)[0].heads
    assert (project.migrations / "HEADS").read_text() == f"{head}\n"  # dev mode keeps the marker


EMAIL = "    email = db.Column(db.String(120), unique=True, nullable=False)\n"


def test_drop_is_held_back_until_confirmed(tmp_path: Path, dev_url: str) -> None:
    project = baseline_project(tmp_path, dev_url)
    with dev(project, "draft = false") as log:
        started(project, dev_url)
        save(project, BASE.replace(EMAIL, ""))
        # the written file wakes the versions watcher: that run must not apply it
        wait_until(lambda: "waiting_for_confirmation" in log.text(), 30, "the held revision seen")
        assert "email" in columns(dev_url, "user")  # not dropped
        held = next(p for p in revision_files(project) if "base0001" not in p.name)
        revision = held.name.split("_")[0]
        result = run_cli(["--config", str(project.config), "confirm", revision], cwd=project.root)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "email" not in columns(dev_url, "user"), 30, "dropped after confirm")
    assert "allow_destructive = True" in held.read_text()
    assert "destructive_held_back" in log.text() and "email" in log.text()


def test_a_held_revision_stays_held_after_a_restart(tmp_path: Path, sqlite_url: str) -> None:
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, "draft = false") as log:
        started(project, sqlite_url)
        save(project, BASE.replace(EMAIL, ""))
        wait_until(lambda: "waiting_for_confirmation" in log.text(), 30, "held back")
    with dev(project, "draft = false") as log:  # the prod guard refuses it at start
        wait_until(lambda: "destructive_refused" in log.text(), 30, "refused after the restart")
        assert "email" in columns(sqlite_url, "user")
        held = next(p for p in revision_files(project) if "base0001" not in p.name)
        result = run_cli(
            ["--config", str(project.config), "confirm", held.name.split("_")[0]], cwd=project.root
        )
        assert result.returncode == 0, result.stderr
        wait_until(lambda: "email" not in columns(sqlite_url, "user"), 30, "dropped after confirm")


def test_without_the_guard_the_drop_is_applied_at_once(tmp_path: Path, sqlite_url: str) -> None:
    """Negative control: `[dev] allow_destructive = true` switches the hold-back off."""
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, "draft = false\nallow_destructive = true") as log:
        started(project, sqlite_url)
        save(project, BASE.replace(EMAIL, ""))
        wait_until(lambda: "email" not in columns(sqlite_url, "user"), 30, "dropped unasked")
    assert "destructive_held_back" not in log.text()


def test_a_held_revision_is_withdrawn_when_the_model_comes_back(tmp_path: Path, sqlite_url: str) -> None:
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, "draft = false") as log:
        started(project, sqlite_url)
        save(project, BASE.replace(EMAIL, ""))  # e.g. a model edited by mistake
        wait_until(lambda: "waiting_for_confirmation" in log.text(), 30, "held back")
        held = log.text().count("destructive_held_back")
        save(project, BASE)  # put back
        wait_until(
            lambda: later(log.text(), "held_back_withdrawn", "no_changes"),
            30,
            "withdrawn, and the models found equal to the database",
        )
        assert [p.name for p in revision_files(project)] == ["base0001_create_user_table.py"]
        assert "email" in columns(sqlite_url, "user")

        save(project, BASE.replace(EMAIL, "") + "    bio = db.Column(db.Text)\n")  # dropped again
        wait_until(lambda: log.text().count("destructive_held_back") > held, 30, "proposed again")
        assert "email" in columns(sqlite_url, "user")


def later(text: str, first: str, then: str) -> bool:
    """`then` was logged after the last `first`."""
    return first in text and text.rfind(then) > text.rfind(first)


def test_syntax_error_then_fix(tmp_path: Path, dev_url: str) -> None:
    project = baseline_project(tmp_path, dev_url)
    with dev(project, "draft = false") as log:
        started(project, dev_url)
        save(project, BASE + "    broken = db.Column(db.String(10)\n")
        wait_until(lambda: "dev_error" in log.text(), 30, "the syntax error reported")
        assert "models.py" in log.text()
        assert len(revision_files(project)) == 1  # no revision written
        save(project, BASE + "    nickname = db.Column(db.String(40))\n")
        wait_until(lambda: "nickname" in columns(dev_url, "user"), 30, "the fix applied")
        assert "broken" not in columns(dev_url, "user")
    assert len(revision_files(project)) == 2


def test_ten_rapid_saves_and_a_draft_amended_then_sealed(tmp_path: Path, dev_url: str) -> None:
    project = baseline_project(tmp_path, dev_url)
    with dev(project):
        started(project, dev_url)
        models = BASE
        for n in range(10):
            models += f"    c{n} = db.Column(db.Integer)\n"
            save(project, models)
        wait_until(
            lambda: {f"c{n}" for n in range(10)} <= set(columns(dev_url, "user")), 60, "all ten columns"
        )
        drafts = [p for p in revision_files(project) if "base0001" not in p.name]
        assert len(drafts) == 1 and "draft = True" in drafts[0].read_text()
        draft_id = drafts[0].name.split("_")[0]
        for column in ("extra", "extra2"):  # amended twice more, each on its own
            models += f"    {column} = db.Column(db.Integer)\n"
            save(project, models)
            wait_until(lambda c=column: c in columns(dev_url, "user"), 30, f"draft amended ({column})")
        amended = [p for p in revision_files(project) if "base0001" not in p.name]
        assert [p.name.split("_")[0] for p in amended] == [draft_id]  # the same draft, amended
    result = run_cli(
        ["--config", str(project.config), "seal", "-m", "user profile columns"], cwd=project.root
    )
    assert result.returncode == 0, result.stderr
    sealed = [p for p in revision_files(project) if "base0001" not in p.name]
    assert len(sealed) == 1 and "draft = True" not in sealed[0].read_text()
    assert "user profile columns" in sealed[0].read_text()
    assert db_heads(dev_url) == {draft_id}


def test_remote_database_refused(tmp_path: Path) -> None:
    project = baseline_project(tmp_path, "postgresql://app@db.example.com/app")
    project.write_config(models="myapp.models:db")
    result = run_cli(["--config", str(project.config), "run", "--mode", "dev"], cwd=project.root)
    assert result.returncode == 6 and "not a local database" in result.stderr


@pytest.mark.parametrize(
    "url, local",
    [
        ("sqlite:///x.db", True),
        ("postgresql://u@localhost/db", True),
        ("postgresql://u@127.0.0.1/db", True),
        ("postgresql://u@[::1]/db", True),
        ("postgresql://u@/db?host=/var/run/postgresql", True),
        ("postgresql://u@db/db", False),
        ("mysql+pymysql://u@10.0.0.5/db", False),
    ],
)
def test_is_local(url: str, local: bool) -> None:
    assert is_local(url, []) is local
    assert is_local("postgresql://u@db/x", ["db"]) is True


TEAM = "\n\nclass Team(db.Model):\n    id = db.Column(db.Integer, primary_key=True)\n"


def teammates_revision(project: Project) -> Path:
    return project.revision(
        "team0001",
        "base0001",
        message="create team",
        upgrade=(
            'op.create_table("team", sa.Column("id", sa.Integer(), nullable=False), '
            'sa.PrimaryKeyConstraint("id"))'
        ),
    )


def test_branch_switch_and_teammates_revision(tmp_path: Path, dev_url: str) -> None:
    project = baseline_project(tmp_path, dev_url)
    with dev(project, "draft = false") as log:
        started(project, dev_url)
        wait_until(lambda: "no_changes" in log.text(), 30, "the compare at start")
        # A teammate's revision arrives with a pull (their model change included): applied first,
        # and nothing is generated for it.
        teammates_revision(project)
        save(project, BASE + TEAM)
        wait_until(lambda: "team" in table_names(dev_url), 30, "the teammate's revision applied")
        wait_until(lambda: log.text().count('"no_changes"') == 2, 30, "nothing generated for it")
        assert len(revision_files(project)) == 2
        # Switching to a branch without that revision: the database is ahead; dev mode stops
        # generating and says exactly what to run.
        (project.versions / next(p.name for p in revision_files(project) if "team0001" in p.name)).unlink()
        save(project, BASE + "    nickname = db.Column(db.String(40))\n")
        wait_until(lambda: "dev_paused" in log.text(), 30, "the pause")
        assert "reconciler downgrade base0001" in log.text()
        assert "nickname" not in columns(dev_url, "user")
    assert len(revision_files(project)) == 1


def creating_team(project: Project) -> list[Path]:
    return [p for p in revision_files(project) if re.search(r"create_table\(\s*[\"']team", p.read_text())]


def gated_team(hold: Path, entered: Path, where: str) -> str:
    """Team, with a gate that holds the generation while `hold` exists: in the models' import
    (before the worker reads the revision files) or in rendering the revision (after it did)."""
    wait = (
        f"_p.Path({str(entered)!r}).touch()\n"
        f"{{pad}}while _p.Path({str(hold)!r}).exists():\n{{pad}}    _t.sleep(0.01)\n"
    )
    gate_at_import = wait.format(pad="") if where == "import" else ""
    render = "        " + wait.format(pad="        ") if where == "render" else ""
    return f"""

import pathlib as _p, time as _t
{gate_at_import}

class Gated(db.TypeDecorator):
    impl = db.String(20)
    cache_ok = True

    def __repr__(self):
{render}        return "String(length=20)"


class Team(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(Gated())
"""


@pytest.mark.parametrize(
    "where,unsafe",
    [("import", False), ("render", False), ("render", True)],
    ids=["during_import", "during_render", "negative_control"],
)
def test_a_pull_during_a_generation_is_applied_not_duplicated(
    tmp_path: Path, dev_url: str, where: str, unsafe: bool
) -> None:
    """The pull lands while the worker generates from models that already have its Team class.
    What that generation would write duplicates the teammate's revision: it is discarded, theirs
    is applied, and the compare after it finds nothing. Without the recheck (`dev_recheck` off) a
    second `create_table("team")` revision is left beside theirs."""
    project = baseline_project(tmp_path, dev_url)
    hold, entered = tmp_path / "hold", tmp_path / "entered"
    env = {"RECONCILER_UNSAFE_DISABLE": "dev_recheck"} if unsafe else None
    with dev(project, "draft = false", env) as log:
        started(project, dev_url)
        wait_until(lambda: "no_changes" in log.text(), 30, "the compare at start")
        hold.touch()
        save(project, BASE + gated_team(hold, entered, where))
        wait_until(entered.exists, 30, "the generation at the gate")
        project.revision(
            "team0001",
            "base0001",
            message="create team",
            upgrade=(
                'op.create_table("team", sa.Column("id", sa.Integer(), nullable=False), '
                'sa.Column("name", sa.String(length=20), nullable=True), sa.PrimaryKeyConstraint("id"))'
            ),
        )
        hold.unlink()  # the pull has landed: let the generation go on
        wait_until(
            lambda: "team" in table_names(dev_url) or len(revision_files(project)) == 3,
            30,
            "the team table or a duplicate",
        )
        if unsafe:
            wait_until(lambda: len(creating_team(project)) == 2, 30, "the duplicate revision, written")
            assert len(revision_files(project)) == 3
            return
        wait_until(lambda: "generation_discarded" in log.text(), 30, "the generation discarded")
        wait_until(lambda: log.text().count('"no_changes"') == 2, 30, "nothing generated after it")
        assert db_heads(dev_url) == {"team0001"}
    assert [p.name.split("_")[0] for p in revision_files(project)] == ["base0001", "team0001"]


NOTE = "\n\nclass Note(db.Model):\n    id = db.Column(db.Integer, primary_key=True)\n"


def test_a_save_compares_only_the_classes_it_changed(tmp_path: Path, dev_url: str) -> None:
    project = baseline_project(tmp_path, dev_url)
    project.revision(
        "note0002",
        "base0001",
        message="create note table",
        upgrade="""op.create_table(
    "note", sa.Column("id", sa.Integer(), nullable=False), sa.PrimaryKeyConstraint("id"))""",
    )
    with dev(project, "draft = false") as log:
        save(project, BASE + NOTE)
        wait_until(
            lambda: "note" in table_names(dev_url) and "no_changes" in log.text(),
            60,
            "started, with the full compare at start done",
        )
        engine = sa.create_engine(dev_url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:  # a difference in note that no save touches
            conn.execute(sa.text("ALTER TABLE note ADD COLUMN extra INTEGER"))
        engine.dispose()

        save(project, BASE + "    bio = db.Column(db.String(200))\n" + NOTE)  # User changes
        wait_until(lambda: "bio" in columns(dev_url, "user"), 30, "the User change applied")
        assert "extra" in columns(dev_url, "note")
        added = next(p for p in revision_files(project) if "bio" in p.name).read_text()
        assert "extra" not in added  # note was not compared: class Note did not change

        # control: code outside the classes changed, so the whole file is compared again
        save(project, BASE + "    bio = db.Column(db.String(200))\n" + NOTE + "\nLIMIT = 5\n")
        wait_until(lambda: "destructive_held_back" in log.text(), 30, "the note difference found")
    held = [json.loads(line) for line in log.text().splitlines() if "destructive_held_back" in line]
    assert held and any("extra" in drop for drop in held[0]["would_drop"])


NICKNAME = "    nickname = db.Column(db.String(40))\n"


def parent_of(path: Path) -> tuple[str, ...]:
    from reconciler.project.revisions import parse_revision_file

    parsed = parse_revision_file(path)
    return parsed.down_revisions if parsed is not None else ()


def test_a_teammates_revision_re_parents_the_draft(tmp_path: Path, dev_url: str) -> None:
    """The unsealed draft and a teammate's revision on the same parent: the draft is ours to
    rebuild, so it moves onto their revision (no merge revision, no pause), and seals as usual."""
    project = baseline_project(tmp_path, dev_url)
    with dev(project) as log:
        started(project, dev_url)
        save(project, BASE + NICKNAME)
        wait_until(lambda: "nickname" in columns(dev_url, "user"), 30, "the draft applied")
        [draft] = [p for p in revision_files(project) if "base0001" not in p.name]
        draft_id = draft.name.split("_")[0]
        teammates_revision(project)  # a pull: their revision and their model
        save(project, BASE + NICKNAME + TEAM)
        wait_until(
            lambda: "draft_reparented" in log.text() and db_heads(dev_url) == {draft_id},
            60,
            "the draft re-parented and applied again",
        )
        wait_until(lambda: "team" in table_names(dev_url), 30, "their revision applied")
        assert parent_of(draft) == ("team0001",)
        assert "Revises: team0001\n" in draft.read_text() and "draft = True" in draft.read_text()
        assert "nickname" in columns(dev_url, "user")
        assert "create_table" not in draft.read_text()  # their table stays theirs
    assert "merge" not in log.text() and "dev_paused" not in log.text()
    result = run_cli(["--config", str(project.config), "seal", "-m", "add nickname"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    status = run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root)
    data = json.loads(status.stdout)
    assert data["state"] == "in_sync" and data["repo_heads"] == [draft_id]


def test_a_normal_revision_and_a_teammates_still_need_a_merge(tmp_path: Path, sqlite_url: str) -> None:
    """Negative control: a revision that is not a draft (sealed, committed) is never rewritten;
    the fork stops generation and names the merge."""
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, "draft = false") as log:
        started(project, sqlite_url)
        save(project, BASE + NICKNAME)
        wait_until(lambda: "nickname" in columns(sqlite_url, "user"), 30, "our revision applied")
        [ours] = [p for p in revision_files(project) if "base0001" not in p.name]
        before = ours.read_text()
        teammates_revision(project)
        save(project, BASE + NICKNAME + TEAM)
        wait_until(lambda: "dev_paused" in log.text(), 30, "the pause at the fork")
        assert "reconciler merge" in log.text() and "draft_reparented" not in log.text()
    assert ours.read_text() == before and parent_of(ours) == ("base0001",)
    assert "team" not in table_names(sqlite_url)
