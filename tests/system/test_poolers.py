"""Invariant 5: behind a transaction-pooling PgBouncer, session affinity is proven before the
session advisory lock is trusted; without proof `apply` refuses and asks for a direct lock_url.

A real PgBouncer (tests/pgbouncer.py) sits in front of the PostgreSQL service.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler import sessions
from reconciler.config.load import UNSAFE_ENV, load_settings
from reconciler.control.locking import target_lock
from reconciler.control.target import TargetHandle, open_target, release_target
from reconciler.db import connection, locks
from reconciler.errors import LockTimeout, Refused, UnreachableError
from tests import pgbouncer
from tests.builders import Project, db_heads, flask_project, table_names
from tests.cli import run_cli
from tests.pgcluster import wait_until

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        pgbouncer.binary() is None, reason="pgbouncer is not installed: apt-get install pgbouncer"
    ),
]

StartBouncer = Callable[..., pgbouncer.PgBouncer]
APPLY_PREFIX = sessions.apply_prefix("t")


@pytest.fixture
def bouncer(pg_url: str) -> Iterator[StartBouncer]:
    """Start private PgBouncers in front of pg_url's server; stopped before the database goes."""
    started: list[pgbouncer.PgBouncer] = []

    def start(pool_mode: str = "transaction", pool_size: int = 1) -> pgbouncer.PgBouncer:
        started.append(pgbouncer.PgBouncer(pool_mode, pool_size).start())
        return started[-1]

    yield start
    for one in started:
        one.stop()


def _project(tmp_path: Path, url: str, **target: str) -> Project:
    project = flask_project(tmp_path / "p", url)
    project.write_config(models="myapp.models:db", **target)
    project.chain(2)
    return project


def _apply(project: Project, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


@pytest.mark.parametrize("pool_size", [1, 3])
def test_apply_through_transaction_pooler_is_refused_without_lock_url(
    tmp_path: Path, pg_url: str, bouncer: StartBouncer, pool_size: int
) -> None:
    pooled = bouncer("transaction", pool_size).url(pg_url)
    project = _project(tmp_path, pooled)
    code, err = _apply(project)
    assert code == 6, err
    assert "set [target] lock_url" in err and "PgBouncer" in err
    assert db_heads(pg_url) == set()
    assert not {"t_r0", "t_r1", "reconciler_journal"} & table_names(pg_url)  # nothing written


def test_lock_url_through_the_same_pooler_is_refused(
    tmp_path: Path, pg_url: str, bouncer: StartBouncer
) -> None:
    pooled = bouncer().url(pg_url)
    code, err = _apply(_project(tmp_path, pooled, lock_url=pooled))
    assert code == 6, err
    assert "lock_url goes through a pooler too" in err
    assert db_heads(pg_url) == set()


@pytest.mark.slow  # a full apply (worker start) through the pooler
def test_direct_lock_url_applies_through_the_pooler(
    tmp_path: Path, pg_url: str, bouncer: StartBouncer
) -> None:
    pooled = bouncer().url(pg_url)
    code, err = _apply(_project(tmp_path, pooled, lock_url=pg_url))
    assert code == 0, err
    assert db_heads(pg_url) == {"r0001"}
    assert {"t_r0", "t_r1"} <= table_names(pg_url)


@pytest.mark.slow  # a full apply (worker start) through the pooler
def test_session_pooling_passes_the_proof(tmp_path: Path, pg_url: str, bouncer: StartBouncer) -> None:
    pooled = bouncer("session", 2).url(pg_url)
    code, err = _apply(_project(tmp_path, pooled))
    assert code == 0, err
    assert db_heads(pg_url) == {"r0001"}


def _reconciler(project: Project, env: dict[str, str]) -> TargetHandle:
    settings = load_settings(str(project.config), environ=env, cwd=project.root)
    return open_target(settings)


def _hold_twice(project: Project, env: dict[str, str]) -> int:
    """Replica one takes the lock; replica two, through its own connection, tries to take it too.
    Returns how many replicas were inside the lock at the same time."""
    one, two = _reconciler(project, env), _reconciler(project, env)
    inside = 0
    try:
        with ExitStack() as stack:
            for replica in (one, two):
                conn = stack.enter_context(replica.engine.connect())
                stack.enter_context(target_lock(replica, conn, timeout=0.5))
                inside += 1
            return inside
    finally:
        release_target(one)
        release_target(two)


def test_affinity_safeguard_refuses_before_any_lock_is_taken(
    tmp_path: Path, pg_url: str, bouncer: StartBouncer
) -> None:
    project = _project(tmp_path, bouncer().url(pg_url))
    with pytest.raises(Refused, match="lock_url"):
        _hold_twice(project, {})


def test_negative_control_without_the_proof_two_replicas_hold_the_lock_at_once(
    tmp_path: Path, pg_url: str, bouncer: StartBouncer
) -> None:
    """The bad outcome the proof prevents: through a transaction pooler (one server connection,
    so the same backend pid every time) the second replica "acquires" a lock the first holds,
    because pg_try_advisory_lock is reentrant in the one server session they share."""
    pooled = bouncer("transaction", 1).url(pg_url)
    assert _hold_twice(_project(tmp_path, pooled), {UNSAFE_ENV: "affinity"}) == 2


def test_positive_control_a_direct_lock_url_excludes_the_second_replica(
    tmp_path: Path, pg_url: str, bouncer: StartBouncer
) -> None:
    pooled = bouncer("transaction", 1).url(pg_url)
    with pytest.raises(LockTimeout, match="not acquired"):
        _hold_twice(_project(tmp_path, pooled, lock_url=pg_url), {})


def _sleeping_applier(pooled: str, seconds: float) -> threading.Thread:
    """A session named like a worker's, running pg_sleep through the pooler."""
    engine = connection.make_engine(pooled, "t", 10)

    def run() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text(f"SET application_name = '{APPLY_PREFIX}x'"))
            conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
        engine.dispose()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _running(pg_url: str) -> bool:
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return bool(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE :p"
                        " AND state = 'active' AND datname = current_database()"  # not another test's
                    ),
                    {"p": APPLY_PREFIX + "%"},
                ).scalar()
            )
    finally:
        engine.dispose()


def test_orphan_wait_through_the_pooler_sees_the_workers_session(pg_url: str, bouncer: StartBouncer) -> None:
    """application_name passes through PgBouncer, and the poll (many runs of one query) does not
    trip over server-side prepared statements (psycopg 3 prepares a query run 5 times)."""
    pooled = bouncer("transaction", 2).url(pg_url)
    sleeper = _sleeping_applier(pooled, 3.0)
    wait_until(lambda: _running(pg_url), 10, "the sleeping applier to be active")
    engine = connection.make_engine(pooled, "t", 10)
    try:
        with engine.connect() as conn:
            with pytest.raises(LockTimeout, match="still running"):  # no wait: it sees the session
                locks.wait_for_orphans(conn, APPLY_PREFIX, timeout=0)
            locks.wait_for_orphans(conn, APPLY_PREFIX, timeout=20, poll=0.05)
    finally:
        engine.dispose()
    sleeper.join(10)
    assert not sleeper.is_alive() and not _running(pg_url)


def test_negative_control_auto_prepared_polls_fail_behind_the_pooler(
    pg_url: str, bouncer: StartBouncer
) -> None:
    pooled = bouncer("transaction", 2).url(pg_url)
    engine = sa.create_engine(pooled, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    if engine.dialect.driver != "psycopg":
        pytest.skip(f"the {engine.dialect.driver} driver prepares nothing by itself")
    sleeper = _sleeping_applier(pooled, 1.5)
    wait_until(lambda: _running(pg_url), 10, "the sleeping applier to be active")
    try:
        with engine.connect() as conn, pytest.raises(UnreachableError, match="prepared statement"):
            locks.wait_for_orphans(conn, APPLY_PREFIX, timeout=20, poll=0.05)
    finally:
        engine.dispose()
        sleeper.join(10)
