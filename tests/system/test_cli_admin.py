"""The commands a person runs (plan, history, wait, check, baseline, stamp, downgrade, init,
resolve), end to end: the real CLI in its own process, real databases, real projects."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests import dbs
from tests.builders import (
    FLASK_MODELS,
    Project,
    db_heads,
    flask_project,
    journal_rows,
    table_names,
)
from tests.cli import run_cli, start_cli

USER_TABLE = """\
op.create_table(
    "user",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(80), nullable=False, unique=True),
    sa.Column("email", sa.String(120), nullable=False, unique=True),
)"""
NICKNAME = "    nickname = db.Column(db.String(40))\n"
DEADLINE = 60.0


def cli(project: Project, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(project.config), *args], cwd=project.root, **kwargs)


def ok(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    result = cli(project, *args)
    assert result.returncode == 0, result.stderr
    return result


def status(project: Project) -> dict[str, Any]:
    return dict(json.loads(ok(project, "status", "--json").stdout))


def user_project(root: Path, url: str, models: str = FLASK_MODELS) -> Project:
    """A Flask-Migrate project whose one revision creates exactly what its models declare."""
    project = flask_project(root, url, models)
    project.revision("u1", None, upgrade=USER_TABLE, downgrade='op.drop_table("user")', message="create user")
    return project


def user_table(metadata: sa.MetaData, with_email: bool = True) -> sa.Table:
    columns = [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(80), nullable=False, unique=True),
    ]
    if with_email:
        columns.append(sa.Column("email", sa.String(120), nullable=False, unique=True))
    return sa.Table("user", metadata, *columns)


def execute(url: str, *statements: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


class Background:
    """A CLI process running in the background; its stderr collected line by line."""

    def __init__(self, project: Project, *args: str) -> None:
        self.proc = start_cli(["--config", str(project.config), *args], cwd=project.root)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float = DEADLINE) -> None:
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                timeout,
            )
        assert found and any(text in line for line in self.lines), "".join(self.lines)

    def finish(self, timeout: float = DEADLINE) -> tuple[int, str]:
        """Exit code and all stderr; the process is killed when it outlives `timeout`."""
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(DEADLINE)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.stdout.close()
        dbs.assert_no_canary(out, *self.lines)
        return code, "".join(self.lines)


@contextmanager
def background(project: Project, *args: str) -> Iterator[Background]:
    running = Background(project, *args)
    try:
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()


# --- plan ---------------------------------------------------------------------------------------
def test_plan_lists_pending_in_order_and_ahead_exits_4(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    ok(project, "apply")
    assert ok(project, "plan").stdout.strip() == "nothing to apply: the database is in_sync"
    project.chain(2, prefix="s", start_down="r0001")
    before = (table_names(sqlite_url), db_heads(sqlite_url), len(journal_rows(sqlite_url)))

    lines = ok(project, "plan").stdout.splitlines()
    assert [line.split() for line in lines] == [
        ["1.", "s0000", "create", "t_s0"],
        ["2.", "s0001", "create", "t_s1"],
    ]
    data = json.loads(ok(project, "plan", "--json").stdout)
    assert (data["state"], data["db_heads"], data["pending"]) == ("behind", ["r0001"], ["s0000", "s0001"])
    assert [(s["revision"], s["message"]) for s in data["steps"]] == [
        ("s0000", "create t_s0"),
        ("s0001", "create t_s1"),
    ]

    sql = ok(project, "plan", "--sql").stdout
    assert sql.index("CREATE TABLE t_s0") < sql.index("CREATE TABLE t_s1")
    assert "t_r0" not in sql and "t_r1" not in sql, "applied revisions are not in the plan"
    assert (table_names(sqlite_url), db_heads(sqlite_url), len(journal_rows(sqlite_url))) == before

    # The app was rolled back to r0000 while the database is at r0001: ahead.
    for rev in ("s0001", "s0000", "r0001"):
        next(project.versions.glob(f"{rev}_*.py")).unlink()
    result = cli(project, "plan")
    assert result.returncode == 4, result.stderr
    assert "r0001" in result.stderr
    assert db_heads(sqlite_url) == {"r0001"}


def test_plan_sql_is_offline(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    sql = ok(project, "plan", "--sql").stdout
    assert sql.index("CREATE TABLE t_r0") < sql.index("CREATE TABLE t_r1")
    assert "alembic_version" in sql
    assert table_names(db_url) == set(), "nothing was applied, not even the journal"


# --- history ------------------------------------------------------------------------------------
def test_history_newest_first_with_applied_marked(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    ok(project, "apply")
    project.chain(1, prefix="s", start_down="r0001")

    lines = ok(project, "history").stdout.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "r0001 -> s0000 (head)",
        "r0000 -> r0001 (current)",
        "<base> -> r0000",
    ]
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["[pending]", "[applied]", "[applied]"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_history_works_when_the_database_is_unreachable(tmp_path: Path) -> None:
    url = f"postgresql://{dbs.CANARY_USER}:{dbs.CANARY_ENCODED}@127.0.0.1:{free_port()}/nowhere"
    project = flask_project(tmp_path / "p", url)
    project.chain(2)
    result = ok(project, "history")
    assert result.stdout.splitlines() == [
        "r0000 -> r0001 (head), create t_r1",
        "<base> -> r0000, create t_r0",
    ]
    assert "database unreachable" in result.stderr


# --- wait ---------------------------------------------------------------------------------------
def test_wait_times_out_with_exit_8_when_behind(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    result = cli(project, "wait", "--timeout", "1", "--interval", "0.2")
    assert result.returncode == 8, result.stderr
    assert "gave up after 1 s" in result.stderr  # at its timeout, not for another reason
    assert "uninitialized_empty" in result.stderr and "reconciler apply" in result.stderr


def test_wait_returns_once_another_process_applies(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    with background(project, "wait", "--timeout", str(DEADLINE), "--interval", "0.2") as waiter:
        waiter.wait_for('"waiting"')
        assert waiter.proc.poll() is None
        ok(project, "apply")
        code, err = waiter.finish()
    assert code == 0, err
    assert "database is in_sync" in err


def test_wait_accepts_ahead_unless_exact(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    ok(project, "apply")
    next(project.versions.glob("r0001_*.py")).unlink()
    assert "database is ahead" in ok(project, "wait", "--timeout", "5").stderr
    result = cli(project, "wait", "--exact", "--timeout", "0.5", "--interval", "0.1")
    assert result.returncode == 8, result.stderr
    assert "ahead" in result.stderr


def test_wait_keeps_trying_until_the_sqlite_folder_appears(tmp_path: Path) -> None:
    folder = tmp_path / "later"
    project = flask_project(tmp_path / "p", f"sqlite:///{folder / 'app.db'}")
    project.chain(1)
    with background(project, "wait", "--timeout", str(DEADLINE), "--interval", "0.2") as waiter:
        waiter.wait_for('"unknown"')
        assert waiter.proc.poll() is None
        folder.mkdir()
        ok(project, "apply")
        code, err = waiter.finish()
    assert code == 0, err


@pytest.mark.postgres
def test_wait_keeps_trying_until_the_postgresql_database_exists(tmp_path: Path, pg_canary_url: str) -> None:
    name = dbs.new_name()
    url = sa.engine.make_url(pg_canary_url).set(database=name).render_as_string(False)
    project = flask_project(tmp_path / "p", url)
    project.chain(1)
    admin = sa.create_engine(dbs.PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with background(project, "wait", "--timeout", str(DEADLINE), "--interval", "0.2") as w:
            w.wait_for('"unknown"')
            assert w.proc.poll() is None
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            ok(project, "apply")
            code, err = w.finish()
        assert code == 0, err
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# --- check and baseline -------------------------------------------------------------------------
@pytest.mark.slow
def test_check_then_baseline_accepts_the_difference(tmp_path: Path, sqlite_url: str) -> None:
    project = user_project(tmp_path / "p", sqlite_url)
    result = ok(project, "check")
    assert "agree" in result.stderr
    assert db_heads(sqlite_url) == {"u1"}, "check upgrades the database it is given to the heads"

    (project.root / "myapp" / "models.py").write_text(FLASK_MODELS + NICKNAME)
    result = cli(project, "check")
    assert result.returncode == 7, result.stderr
    assert "nickname" in result.stderr
    assert "baseline" in result.stderr

    ok(project, "baseline")
    known = json.loads((project.migrations / "known_differences.json").read_text())
    assert len(known["dialects"]["sqlite"]) == 1
    assert "nickname" in known["dialects"]["sqlite"][0]["key"]
    ok(project, "check")


def server_databases(kind: str) -> set[str]:
    url = dbs.PG_ADMIN_URL if kind == "postgresql" else dbs.MYSQL_ADMIN_URL
    query = (
        "SELECT datname FROM pg_database"
        if kind == "postgresql"
        else "SELECT schema_name FROM information_schema.schemata"
    )
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return {str(r[0]) for r in conn.execute(sa.text(query))}
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [pytest.param("postgresql", marks=pytest.mark.postgres), pytest.param("mysql", marks=pytest.mark.mysql)],
)
def test_check_scratch_leaves_no_database_and_the_target_untouched(tmp_path: Path, kind: str) -> None:
    with dbs.database(kind, tmp_path, canary=True) as url:
        project = user_project(tmp_path / "p", url)
        scratch_before = {n for n in server_databases(kind) if n.startswith("reconciler_check_")}

        ok(project, "check", "--scratch")
        (project.root / "myapp" / "models.py").write_text(FLASK_MODELS + NICKNAME)
        result = cli(project, "check", "--scratch")
        assert result.returncode == 7, result.stderr
        assert "nickname" in result.stderr

        assert table_names(url) == set(), "the target database is not touched"
        scratch_after = {n for n in server_databases(kind) if n.startswith("reconciler_check_")}
        assert scratch_after <= scratch_before, "every scratch database was dropped"


# --- stamp --------------------------------------------------------------------------------------
def test_stamp_adopts_tables_made_by_hand_without_replaying(tmp_path: Path, db_url: str) -> None:
    project = user_project(tmp_path / "p", db_url)
    metadata = sa.MetaData()
    table = user_table(metadata)
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        metadata.create_all(conn)
        conn.execute(table.insert().values(id=1, username="ann", email="ann@example.org"))

    assert status(project)["state"] == "uninitialized_with_tables"
    result = cli(project, "apply")
    assert result.returncode == 4, result.stderr
    assert "reconciler stamp u1" in result.stderr

    assert "stamped u1" in ok(project, "stamp").stderr
    assert status(project)["state"] == "in_sync"
    assert db_heads(db_url) == {"u1"}
    assert [(r["operation"], r["revision"], r["outcome"]) for r in journal_rows(db_url)] == [
        ("stamp", "u1", "stamped")
    ]
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.username)).scalars().all() == ["ann"]
    engine.dispose()

    result = cli(project, "stamp")
    assert result.returncode == 4, "a database with a version table is not adopted again"
    assert "--force" in result.stderr


def test_stamp_refuses_tables_that_differ_unless_forced(tmp_path: Path, sqlite_url: str) -> None:
    project = user_project(tmp_path / "p", sqlite_url)
    engine = sa.create_engine(sqlite_url, poolclass=sa.pool.NullPool)
    metadata = sa.MetaData()
    user_table(metadata, with_email=False)
    with engine.begin() as conn:
        metadata.create_all(conn)
    engine.dispose()

    result = cli(project, "stamp", "u1")
    assert result.returncode == 6, result.stderr
    assert "email" in result.stderr and "--force" in result.stderr
    assert db_heads(sqlite_url) == set()

    ok(project, "stamp", "u1", "--force")
    assert db_heads(sqlite_url) == {"u1"}
    assert table_names(sqlite_url) >= {"user"}


# --- downgrade ----------------------------------------------------------------------------------
def test_downgrade_needs_yes_off_a_terminal_then_undoes_newest_first(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(3)
    ok(project, "apply")
    journal_before = journal_rows(db_url)

    result = cli(project, "downgrade", "r0000")
    assert result.returncode == 2, result.stderr
    assert "--yes" in result.stderr
    assert db_heads(db_url) == {"r0002"}
    assert {"t_r0", "t_r1", "t_r2"} <= table_names(db_url)
    assert journal_rows(db_url) == journal_before

    result = ok(project, "downgrade", "r0000", "--yes")
    listed = result.stderr.index("r0002  create t_r2"), result.stderr.index("r0001  create t_r1")
    assert listed[0] < listed[1], result.stderr
    assert db_heads(db_url) == {"r0000"}
    tables = table_names(db_url)
    assert "t_r0" in tables and not {"t_r1", "t_r2"} & tables
    downgrades = [r for r in journal_rows(db_url) if r["operation"] == "downgrade"]
    assert [(r["revision"], r["outcome"]) for r in downgrades] == [
        ("r0002", "downgraded"),
        ("r0001", "downgraded"),
    ]
    assert status(project)["state"] == "behind"


def test_downgrade_one_labelled_branch_leaves_the_other(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    for rev in ("a1", "b1"):
        project.revision(
            rev,
            "r0000",
            branch_labels=rev[0],
            message=f"create t_{rev}",
            upgrade=f'op.create_table("t_{rev}", sa.Column("id", sa.Integer, primary_key=True))',
            downgrade=f'op.drop_table("t_{rev}")',
        )
    ok(project, "apply")
    assert db_heads(sqlite_url) == {"a1", "b1"}

    result = ok(project, "downgrade", "b1", "--yes")
    assert "a1  create t_a1" in result.stderr and "b1  create" not in result.stderr
    assert db_heads(sqlite_url) == {"b1"}
    assert "t_b1" in table_names(sqlite_url) and "t_a1" not in table_names(sqlite_url)


# --- init ---------------------------------------------------------------------------------------
def test_init_creates_the_flask_migrate_layout_then_apply_works(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    shutil.rmtree(project.migrations)

    ok(project, "init")
    for name in ("alembic.ini", "env.py", "script.py.mako"):
        assert (project.migrations / name).is_file(), name
    assert project.versions.is_dir()
    assert "current_app" in (project.migrations / "env.py").read_text(), "Flask-Migrate's env.py"

    result = cli(project, "init")
    assert result.returncode == 2, result.stderr
    assert "not empty" in result.stderr

    project.revision("u1", None, upgrade=USER_TABLE, message="create user")
    ok(project, "apply")
    assert db_heads(sqlite_url) == {"u1"}
    ok(project, "check")


def test_init_needs_no_database_url(tmp_path: Path) -> None:
    project = flask_project(tmp_path / "p", "sqlite:///unused.db")
    shutil.rmtree(project.migrations)
    project.config.write_text('[target]\nmodels = "myapp.models:db"\n', encoding="utf-8")
    ok(project, "init")
    assert (project.migrations / "env.py").is_file()
    assert not (project.root / "unused.db").exists()


# --- resolve (MySQL / MariaDB: DDL commits as it goes) ------------------------------------------
HALF_APPLIED = """\
op.create_table("half", sa.Column("id", sa.Integer, primary_key=True))
op.create_index("ix_half_code", "half", ["code"])"""


def half_applied(tmp_path: Path, url: str) -> Project:
    """b1 creates a table, then fails: MariaDB has already committed the table."""
    project = flask_project(tmp_path / "p", url)
    project.chain(1)
    project.revision("b1", "r0000", upgrade=HALF_APPLIED, message="half applied")
    result = cli(project, "apply")
    assert result.returncode == 1, result.stderr
    assert "b1" in result.stderr
    assert "half" in table_names(url)
    assert db_heads(url) == {"r0000"}
    rows = [r for r in journal_rows(url) if r["revision"] == "b1"]
    assert [r["outcome"] for r in rows] == ["dirty"]

    result = cli(project, "apply")
    assert result.returncode == 6, result.stderr
    assert "b1" in result.stderr and "resolve" in result.stderr
    assert status(project)["conditions"] == ["dirty"]
    return project


@pytest.mark.mysql
def test_resolve_rolled_back_after_undoing_by_hand(tmp_path: Path, mysql_url: str) -> None:
    project = half_applied(tmp_path, mysql_url)
    execute(mysql_url, "DROP TABLE half")
    assert "resolved as rolled_back" in ok(project, "resolve", "b1", "--rolled-back").stderr
    path = next(project.versions.glob("b1_*.py"))
    path.write_text(path.read_text().replace('op.create_index("ix_half_code", "half", ["code"])', ""))
    ok(project, "apply")
    assert db_heads(mysql_url) == {"b1"}
    outcomes = [r["outcome"] for r in journal_rows(mysql_url) if r["revision"] == "b1"]
    assert outcomes == ["resolved_rolled_back", "applied"]


@pytest.mark.mysql
def test_resolve_applied_after_completing_by_hand_stamps_it(tmp_path: Path, mysql_url: str) -> None:
    project = half_applied(tmp_path, mysql_url)
    execute(mysql_url, "ALTER TABLE half ADD COLUMN code INTEGER", "CREATE INDEX ix_half_code ON half (code)")
    ok(project, "resolve", "b1", "--applied")
    assert db_heads(mysql_url) == {"b1"}
    data = status(project)
    assert (data["state"], data["conditions"]) == ("in_sync", [])
    outcomes = [r["outcome"] for r in journal_rows(mysql_url) if r["revision"] == "b1"]
    assert outcomes == ["resolved_applied"]

    result = cli(project, "resolve", "b1", "--applied")
    assert result.returncode == 4, "nothing left to resolve"
    assert "not dirty" in result.stderr
