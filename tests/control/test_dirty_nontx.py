"""Interrupted revisions are judged from what the worker reported and what the version table says.

Part 1: a PostgreSQL revision that entered `autocommit_block()` and was then killed is `dirty`
(the block committed what ran before it): never re-run, resolved by an operator. Part 2: a
MariaDB revision whose worker committed (the version table lists it) before the control plane
recorded completion is not dirty: the next apply or daemon tick records it `applied`.

The kill lands at a deterministic point: the revision waits while a hold file exists (after
its autocommit block); for part 2 the applier is frozen (SIGSTOP) before the revision is let go,
and killed once the version table shows the revision. Real processes, signals and servers.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.db import journal
from reconciler.worker import sections
from tests.builders import Project, db_heads, flask_project, journal_rows, table_names
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import config, daemon
from tests.system.test_cli_admin import Background, cli, execute, ok, status

SLOW = pytest.mark.slow  # several CLI processes each

UNSAFE = {"RECONCILER_UNSAFE_DISABLE": "dirty"}
DEADLINE = 60

SETUP = """\
op.create_table("t", sa.Column("v", sa.Integer, nullable=False))
op.create_table("w", sa.Column("rev", sa.String(32), nullable=False))
op.execute("INSERT INTO t (v) VALUES (1000)")"""

HOLD = """\
import pathlib, time
hold = pathlib.Path(HOLD)
recording = type(op._proxy).__name__ == "_RecordingOperations"  # the guard's dry look
if hold.exists() and not recording:  # the test kills the applier here
    pathlib.Path(REACHED).touch()
    while hold.exists():
        time.sleep(0.02)"""

NON_TRANSACTIONAL = (
    """\
op.execute("UPDATE t SET v = v + 1000")
with op.get_context().autocommit_block():
    op.execute("INSERT INTO w (rev) VALUES ('b1')")  # a witness no rollback can undo
"""
    + HOLD
    + """
op.create_table("after_block", sa.Column("id", sa.Integer, primary_key=True))"""
)

COMPLETES = (
    """\
op.create_table("done", sa.Column("id", sa.Integer, primary_key=True))
"""
    + HOLD
)


def held_project(tmp_path: Path, url: str, body: str) -> tuple[Project, Path, Path]:
    """s0 (applied) sets up t (v = 1000) and w; b1 runs `body`, holding while the hold file
    exists."""
    hold, reached = tmp_path / "hold", tmp_path / "reached"
    project = flask_project(tmp_path / "p", url)
    project.revision("s0", None, upgrade=SETUP, message="setup")
    ok(project, "apply")
    project.revision(
        "b1", "s0", upgrade=body, message="held", extra=f"HOLD = {str(hold)!r}\nREACHED = {str(reached)!r}\n"
    )
    return project, hold, reached


def scalar(url: str, sql: str) -> object:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()
    finally:
        engine.dispose()


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def kill_applier(running: Background, freeze_first: Path | None = None, until: object = None) -> None:
    """SIGKILL the apply process (its worker dies with it) and wait until both are gone.
    `freeze_first`: SIGSTOP the applier, remove that hold file (the revision finishes in the
    worker), wait for `until`, then kill."""
    pid = running.proc.pid
    workers = children(pid)
    assert workers, "the apply process has a worker"
    if freeze_first is not None:
        os.kill(pid, signal.SIGSTOP)
        freeze_first.unlink()
        wait_until(until, DEADLINE, "the worker's commit")  # type: ignore[arg-type]
    os.kill(pid, signal.SIGKILL)
    running.proc.wait(DEADLINE)
    for worker in workers:
        wait_until(lambda w=worker: gone(w), DEADLINE, f"worker {worker} gone")


def interrupt(project: Project, hold: Path, reached: Path, **freeze: object) -> None:
    hold.touch()
    running = Background(project, "apply")
    try:
        wait_until(reached.exists, DEADLINE, "the revision held")
        kill_applier(running, **freeze)  # type: ignore[arg-type]
    finally:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()
    hold.unlink(missing_ok=True)


def outcomes(url: str, revision: str = "b1") -> list[object]:
    return [r["outcome"] for r in journal_rows(url) if r["revision"] == revision]


@SLOW
@pytest.mark.postgres
def test_postgresql_revision_killed_after_its_autocommit_block_is_dirty_not_rerun(
    tmp_path: Path, pg_url: str
) -> None:
    project, hold, reached = held_project(tmp_path, pg_url, NON_TRANSACTIONAL)
    interrupt(project, hold, reached)
    assert (scalar(pg_url, "SELECT max(v) FROM t"), scalar(pg_url, "SELECT count(*) FROM w")) == (2000, 1)

    again = cli(project, "apply")
    assert again.returncode == 6, again.stderr
    assert "resolve b1" in again.stderr and "autocommit" in again.stderr
    assert scalar(pg_url, "SELECT max(v) FROM t") == 2000  # not run twice
    assert scalar(pg_url, "SELECT count(*) FROM w") == 1
    data = status(project)
    assert (data["state"], data["dirty"]) == ("dirty", ["b1"])
    assert "not list" in data["message"] and "--applied" in data["message"]
    assert outcomes(pg_url) == ["started"]  # judged dirty from the mark; left for the operator

    execute(pg_url, "CREATE TABLE after_block (id INTEGER PRIMARY KEY)")  # finished by hand
    assert "resolved as applied" in ok(project, "resolve", "b1", "--applied").stderr
    ok(project, "apply")
    assert db_heads(pg_url) == {"b1"} and status(project)["state"] == "in_sync"
    assert (scalar(pg_url, "SELECT max(v) FROM t"), scalar(pg_url, "SELECT count(*) FROM w")) == (2000, 1)
    assert outcomes(pg_url) == ["resolved_applied"]


@SLOW
@pytest.mark.postgres
def test_without_the_dirty_safeguard_the_autocommit_revision_runs_twice(tmp_path: Path, pg_url: str) -> None:
    """Negative control: the interrupted step is judged rolled back and the UPDATE runs again."""
    project, hold, reached = held_project(tmp_path, pg_url, NON_TRANSACTIONAL)
    interrupt(project, hold, reached)
    again = cli(project, "apply", env=UNSAFE)
    assert again.returncode == 0, again.stderr
    assert scalar(pg_url, "SELECT max(v) FROM t") == 3000  # the double run
    assert scalar(pg_url, "SELECT count(*) FROM w") == 2
    assert outcomes(pg_url) == ["rolled_back", "applied"]


@SLOW
@pytest.mark.postgres
def test_postgresql_revision_killed_before_any_autocommit_block_is_rolled_back(
    tmp_path: Path, pg_url: str
) -> None:
    """No false dirty: a kill inside the revision's transaction leaves nothing behind."""
    body = HOLD + "\n" + NON_TRANSACTIONAL.replace(HOLD, "")
    project, hold, reached = held_project(tmp_path, pg_url, body)
    interrupt(project, hold, reached)
    assert "dirty" not in status(project)["conditions"]
    ok(project, "apply")
    assert (scalar(pg_url, "SELECT max(v) FROM t"), scalar(pg_url, "SELECT count(*) FROM w")) == (2000, 1)
    assert outcomes(pg_url) == ["rolled_back", "applied"]


@SLOW
@pytest.mark.mysql
def test_mariadb_revision_committed_before_the_journal_is_settled_by_the_daemon(
    tmp_path: Path, mysql_url: str
) -> None:
    project, hold, reached = held_project(tmp_path, mysql_url, COMPLETES)
    interrupt(project, hold, reached, freeze_first=hold, until=lambda: db_heads(mysql_url) == {"b1"})
    assert outcomes(mysql_url) == ["started"]  # the worker committed; nobody recorded it

    data = status(project)
    assert (data["state"], data["conditions"]) == ("in_sync", [])  # not "may be half-applied"

    config(project, interval=0.2)
    with daemon(project) as d:
        wait_until(lambda: outcomes(mysql_url) == ["applied"], DEADLINE, "the step settled")
        assert d.status()["state"] == "in_sync"
    assert "interrupted_step_settled" in d.stderr
    refused = cli(project, "resolve", "b1", "--rolled-back")  # consistent with status
    assert refused.returncode == 4 and "not dirty" in refused.stderr
    assert "version table lists b1" in refused.stderr and outcomes(mysql_url) == ["applied"]
    assert "done" in table_names(mysql_url) and db_heads(mysql_url) == {"b1"}


@SLOW
@pytest.mark.mysql
def test_mariadb_revision_killed_after_ddl_is_dirty_and_says_the_version_table_lacks_it(
    tmp_path: Path, mysql_url: str
) -> None:
    project, hold, reached = held_project(tmp_path, mysql_url, COMPLETES)
    interrupt(project, hold, reached)
    assert "done" in table_names(mysql_url) and db_heads(mysql_url) == {"s0"}
    again = cli(project, "apply")
    assert again.returncode == 6, again.stderr
    data = status(project)
    assert (data["state"], data["dirty"]) == ("dirty", ["b1"])
    message = data["message"]
    assert "does not list b1" in message and "--rolled-back" in message and "--applied" in message
    execute(mysql_url, "DROP TABLE done")  # undone by hand, as the message says
    ok(project, "resolve", "b1", "--rolled-back")
    ok(project, "apply")
    assert db_heads(mysql_url) == {"b1"} and outcomes(mysql_url) == ["resolved_rolled_back", "applied"]


@SLOW
@pytest.mark.mysql
def test_mariadb_revision_killed_before_its_first_ddl_is_not_dirty(tmp_path: Path, mysql_url: str) -> None:
    """No false dirty: nothing had committed, so the step is rolled back and applied again."""
    project, hold, reached = held_project(tmp_path, mysql_url, HOLD + "\n" + COMPLETES.replace(HOLD, ""))
    interrupt(project, hold, reached)
    assert "dirty" not in status(project)["conditions"]
    ok(project, "apply")
    assert db_heads(mysql_url) == {"b1"} and outcomes(mysql_url) == ["rolled_back", "applied"]


WATCHED_ROW = {"operation": "upgrade", "revision": "b1", "sqlstate": journal.WATCHED}


@pytest.mark.parametrize(
    ("row", "applied", "marked", "dialect", "expected"),
    [
        (WATCHED_ROW, frozenset({"b1"}), True, "mysql", "applied"),  # the version table wins
        (WATCHED_ROW, frozenset(), True, "postgresql", "dirty"),  # left its transaction
        (WATCHED_ROW, frozenset(), False, "mysql", "rolled_back"),  # never did
        ({**WATCHED_ROW, "sqlstate": None}, frozenset(), False, "mysql", "dirty"),  # older release
        ({**WATCHED_ROW, "sqlstate": None}, frozenset(), False, "postgresql", "rolled_back"),
        ({**WATCHED_ROW, "operation": "downgrade"}, frozenset(), False, "mysql", "dirty"),  # unwatched
    ],
)
def test_an_interrupted_step_is_judged_from_its_mark_and_the_version_table(
    row: dict[str, object], applied: frozenset[str], marked: bool, dialect: str, expected: str
) -> None:
    assert journal.judge(row, applied, marked, dialect) == expected
    assert journal.judge(row, frozenset(), marked, dialect, unsafe=True) == "rolled_back"


class _Dialect:
    def __init__(self, name: str) -> None:
        self.name = name


class _Conn:
    def __init__(self, dialect: str, autocommit: bool = False) -> None:
        self.dialect = _Dialect(dialect)
        self.connection = type(
            "Fairy", (), {"dbapi_connection": type("Raw", (), {"autocommit": autocommit})()}
        )()


@pytest.mark.parametrize(
    ("dialect", "statement", "leaves"),
    [
        ("mysql", "INSERT INTO w VALUES ('x')", False),
        ("mysql", "UPDATE alembic_version SET version_num='b1'", False),
        ("mysql", "SET FOREIGN_KEY_CHECKS=0", False),
        ("mysql", "SET autocommit=1", True),
        ("mysql", "CREATE TABLE a (id INT)", True),
        ("mysql", "  ALTER TABLE a ADD COLUMN b INT", True),
        ("mariadb", "LOCK TABLES a WRITE", True),
        ("postgresql", "CREATE TABLE a (id INT)", False),
        ("postgresql", "COMMIT", True),
        ("sqlite", "end", True),
    ],
)
def test_statements_that_leave_the_transaction_are_named(dialect: str, statement: str, leaves: bool) -> None:
    assert bool(sections.non_transactional_reason(_Conn(dialect), statement)) is leaves


def test_a_postgresql_statement_in_autocommit_mode_leaves_the_transaction() -> None:
    assert sections.non_transactional_reason(_Conn("postgresql", autocommit=True), "UPDATE t SET v = 1")
