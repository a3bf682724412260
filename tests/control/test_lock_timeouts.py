"""Bounded DDL waits (invariant 7): our ALTER gives up after `ddl_lock_timeout`, is retried with
backoff inside the run, and an application's SELECT queued behind it is not held up until the
application lets go of the table.

An application transaction that has read the table holds it (PostgreSQL: ACCESS SHARE; MariaDB: a
shared metadata lock), so ALTER TABLE must wait; a third session's SELECT then queues behind the
waiting ALTER. Real PostgreSQL and MariaDB sessions, the real CLI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import dbs
from tests.builders import Project, db_heads, flask_project, journal_rows
from tests.cli import run_cli
from tests.pgcluster import wait_until
from tests.system.test_cli_admin import background, status

pytestmark = pytest.mark.slow  # three CLI processes each (10-15 s a test)

SERVERS = [
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]
# MariaDB's lock_wait_timeout is whole seconds (at least 1); PostgreSQL's lock_timeout is in ms.
TIMEOUT = {"postgresql": 0.5, "mysql": 1.0}
HOLD = 2.5  # seconds the application holds the table in the negative control
WAITING_ALTER = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND wait_event_type = 'Lock' AND query LIKE 'ALTER TABLE%'",
    "mysql": "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE()"
    " AND STATE LIKE 'Waiting for table metadata lock%' AND INFO LIKE 'ALTER TABLE%'",
}


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    with dbs.database(request.param, tmp_path) as url:
        yield request.param, url


def alter_project(tmp_path: Path, url: str, kind: str, timeout: float, retries: int) -> Project:
    """t_a0 exists (a0000 applied); alter1, pending, adds a column to it."""
    project = flask_project(tmp_path / "p", url)
    project.chain(1, prefix="a")
    project.write_config(
        extra=f"[apply]\nddl_lock_timeout = {timeout}\nlock_timeout_retries = {retries}\n"
        "lock_timeout_backoff = 0.1\n",
        models="myapp.models:db",
    )
    assert run_cli(["--config", str(project.config), "apply"], cwd=project.root).returncode == 0
    project.revision("alter1", "a0000", upgrade='op.add_column("t_a0", sa.Column("x", sa.Integer))')
    return project


@contextmanager
def app_reading(url: str) -> Iterator[sa.engine.Connection]:
    """An application transaction that has read t_a0 and stays open until rolled back."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT count(*) FROM t_a0")).scalar()
            yield conn
    finally:
        engine.dispose()


def alter_waiting(url: str, kind: str) -> bool:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text(WAITING_ALTER[kind])).scalar())
    finally:
        engine.dispose()


def timed_select(url: str) -> float:
    """Seconds an application's SELECT on t_a0 took (connection made before the clock starts)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            started = time.monotonic()
            conn.execute(sa.text("SELECT count(*) FROM t_a0")).scalar()
            return time.monotonic() - started
    finally:
        engine.dispose()


def select_while_held(url: str, deadline: float = 60.0) -> float:
    """The app SELECT's seconds, asserting it finished while the application still holds t_a0."""
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(timed_select(url)), daemon=True)
    thread.start()
    thread.join(deadline)
    assert result, "the app SELECT stayed queued behind our ALTER while the application held the table"
    return result[0]


def alter1_outcomes(url: str) -> list[object]:
    return [r["outcome"] for r in journal_rows(url) if r["revision"] == "alter1"]


def test_lock_timeout_is_retried_then_fails_without_blocking_and_app_reads_wait_little(
    tmp_path: Path, server: tuple[str, str]
) -> None:
    kind, url = server
    timeout = TIMEOUT[kind]
    project = alter_project(tmp_path, url, kind, timeout, retries=2)
    with app_reading(url), background(project, "apply") as apply:
        wait_until(lambda: alter_waiting(url, kind), 30, "our ALTER waiting for the table")
        # The application holds the table until this block ends: without the DDL lock timeout
        # the SELECT queued behind our ALTER could only finish after that (see the control below).
        waited = select_while_held(url)
        code, stderr = apply.finish()
    print(
        f"\n[{kind}] app SELECT queued behind our waiting ALTER waited {waited:.3f} s "
        f"(ddl_lock_timeout {timeout} s)"
    )
    assert code == 1, stderr
    assert "revision_lock_timeout_retry" in stderr and "alter1" in stderr
    assert alter1_outcomes(url) == ["lock_timeout"] * 3  # the first attempt and two retries
    data = status(project)
    assert data["state"] == "behind" and "blocked" not in data["conditions"]
    assert db_heads(url) == {"a0000"}


def test_a_retry_succeeds_once_the_app_lets_go(tmp_path: Path, server: tuple[str, str]) -> None:
    kind, url = server
    project = alter_project(tmp_path, url, kind, TIMEOUT[kind], retries=20)
    with app_reading(url) as app, background(project, "apply") as apply:
        wait_until(lambda: "lock_timeout" in alter1_outcomes(url), 30, "a first lock timeout")
        app.rollback()  # the application's transaction ends
        code, stderr = apply.finish()
    assert code == 0, stderr
    history = alter1_outcomes(url)
    assert history[-1] == "applied" and set(history[:-1]) == {"lock_timeout"}, history
    assert db_heads(url) == {"alter1"}


def test_without_a_ddl_lock_timeout_app_reads_wait_for_the_whole_hold(
    tmp_path: Path, server: tuple[str, str]
) -> None:
    """Negative control: with ddl_lock_timeout = 0 (none) the SELECT waits as long as the holder."""
    kind, url = server
    project = alter_project(tmp_path, url, kind, 0, retries=2)
    with app_reading(url) as app, background(project, "apply") as apply:
        wait_until(lambda: alter_waiting(url, kind), 30, "our ALTER waiting for the table")
        released = threading.Event()

        def let_go() -> None:
            released.set()  # before the rollback: a SELECT that returns earlier finds it unset
            app.connection.dbapi_connection.rollback()  # type: ignore[union-attr]

        release = threading.Timer(HOLD, let_go)
        release.start()
        try:
            waited = timed_select(url)
            returned_after_release = released.is_set()
        finally:
            release.join()
        code, stderr = apply.finish()
    print(
        f"\n[{kind}] without ddl_lock_timeout the app SELECT waited {waited:.3f} s "
        f"(the application held the table {HOLD} s more)"
    )
    # The property, not a duration: the SELECT could only return once the application let go.
    assert returned_after_release, f"the SELECT returned after {waited:.3f} s, while the table was held"
    assert code == 0, stderr
    assert alter1_outcomes(url) == ["applied"]
