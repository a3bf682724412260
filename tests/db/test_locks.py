"""Advisory locks on real PostgreSQL, MariaDB and SQLite, with real holder processes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler import sessions
from reconciler.db.locks import MYSQL_MAX_NAME, AdvisoryLock, LockKey, lock_key, wait_for_orphans
from reconciler.errors import LockTimeout
from tests import dbs

ROOT = Path(__file__).resolve().parents[2]
VERSION_TABLE = "alembic_version"
HOLDER_APP = "reconciler/t1/ctl/holder:1"

Connect = Callable[..., sa.engine.Connection]

# A holder in its own process: prints its identity, then obeys "acquire" / "release" on stdin.
HOLDER_SCRIPT = r"""
import json, os, sys
import sqlalchemy as sa
from reconciler.db import locks
url, app = sys.argv[1], sys.argv[2]
engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
conn = engine.connect()
ident = {"pid": os.getpid()}
if conn.dialect.name == "postgresql":
    conn.execute(sa.text("SET application_name = '%s'" % app))
    ident["backend_pid"] = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
elif conn.dialect.name in ("mysql", "mariadb"):
    ident["connection_id"] = conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar()
lock = locks.AdvisoryLock(conn, locks.lock_key(sa.engine.make_url(url).database, None, sys.argv[3]))
print(json.dumps(ident), flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "acquire":
        lock.acquire(timeout=10, poll=0.05)
    elif command == "release":
        lock.release()
    print(json.dumps({"done": command, "held": lock.held}), flush=True)
"""

# An applier's migration connection that runs one long statement.
SLEEPER_SCRIPT = r"""
import sys
import sqlalchemy as sa
url, app, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
with engine.connect() as conn:
    conn.execute(sa.text("SELECT set_config('application_name', :a, false)"), {"a": app})
    print("ready", flush=True)
    conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
"""


# --------------------------------------------------------------------------- helpers


class Child:
    """A python subprocess we talk to in JSON lines, every read bounded by a deadline."""

    def __init__(self, script: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(ROOT),
        )
        self._buffer = b""

    def line(self, timeout: float = 15.0) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                err = self.proc.stderr.read() if self.proc.poll() is not None else b""  # type: ignore[union-attr]
                raise AssertionError(f"child gave no line in {timeout} s: {err.decode()[-2000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def json(self) -> dict[str, Any]:
        value = json.loads(self.line())
        assert isinstance(value, dict)
        return value

    def send(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.json()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Open connections (AUTOCOMMIT unless asked) and close them all after the test."""
    engines: list[sa.engine.Engine] = []
    conns: list[sa.engine.Connection] = []

    def _connect(url: str, autocommit: bool = True) -> sa.engine.Connection:
        options: dict[str, Any] = {"poolclass": sa.pool.NullPool}
        if autocommit:
            options["isolation_level"] = "AUTOCOMMIT"
        engine = sa.create_engine(url, **options)
        engines.append(engine)
        conns.append(engine.connect())
        return conns[-1]

    yield _connect
    for conn in conns:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            conn.close()
    for engine in engines:
        engine.dispose()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.close()


def _key(url: str) -> LockKey:
    return lock_key(sa.engine.make_url(url).database or "", None, VERSION_TABLE)


def _kind(url: str) -> str:
    return sessions.backend_name(url)


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _backend_pid(conn: sa.engine.Connection) -> int:
    if conn.dialect.name == "postgresql":
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    return int(conn.execute(sa.text("SELECT CONNECTION_ID()")).scalar_one())


# --------------------------------------------------------------------------- keys


def test_lock_key_is_deterministic_short_and_names_the_database() -> None:
    first = lock_key("shop", None, VERSION_TABLE)
    assert first == lock_key("shop", None, VERSION_TABLE)
    assert len(first.name) <= MYSQL_MAX_NAME
    assert "shop" in first.name
    assert -(2**63) <= first.pg_key < 2**63


def test_lock_key_of_a_long_database_name_fits_mysql() -> None:
    long_db = "d" * 64  # MySQL's longest database name
    key = lock_key(long_db, "some_rather_long_schema_name", "a_long_version_table_name_too")
    assert len(key.name) <= MYSQL_MAX_NAME
    assert "ddddddddddddddd" in key.name  # a shortened form of the database name
    other = lock_key(long_db, "some_rather_long_schema_name", "a_long_version_table_name_twoo")
    assert other.name != key.name and other.pg_key != key.pg_key  # the hash tells them apart


def test_lock_key_differs_per_database_schema_and_version_table() -> None:
    keys = {
        lock_key("shop", None, "alembic_version"),
        lock_key("shop", None, "alembic_version_billing"),
        lock_key("shop", "tenant", "alembic_version"),
        lock_key("shop2", None, "alembic_version"),
        lock_key("shop", "", "alembic_version"),
    }
    assert len(keys) == 4  # schema None and "" are the same default schema
    assert len({k.name for k in keys}) == 4 and len({k.pg_key for k in keys}) == 4


def test_lock_key_override() -> None:
    plain = lock_key("shop", None, VERSION_TABLE, override="my-app-migrations")
    assert plain.name == "my-app-migrations"
    assert plain == lock_key("other", "s", "t", override="my-app-migrations")
    assert lock_key("shop", None, VERSION_TABLE, override="7242").pg_key == 7242
    assert len(lock_key("shop", None, VERSION_TABLE, override="x" * 100).name) <= MYSQL_MAX_NAME


# --------------------------------------------------------------------------- every dialect


@pytest.mark.core
def test_acquire_release_and_a_second_connection_times_out(db_url: str, connect: Connect) -> None:
    first = AdvisoryLock(connect(db_url), _key(db_url))
    second = AdvisoryLock(connect(db_url), _key(db_url))
    assert first.holder() is None
    first.acquire(timeout=0)  # a free lock is taken on the first try (else LockTimeout)
    assert first.held
    assert first.try_acquire()  # already ours: no second, nested acquisition
    assert not second.try_acquire()

    events: list[dict[str, Any]] = []
    with pytest.raises(LockTimeout) as caught:
        second.acquire(timeout=0.3, poll=0.05, on_wait=events.append)
    assert caught.value.exit_code == 3 and caught.value.holder
    assert _key(db_url).name in str(caught.value)
    assert events and events[0]["lock"] == _key(db_url).name and events[0]["holder"]
    assert not second.held

    first.release()
    first.release()  # idempotent
    assert not first.held
    assert second.try_acquire()
    assert first.holder() is not None
    second.release()
    assert first.holder() is None


def test_holder_in_another_process_is_named_then_released_then_killed(
    db_url: str, connect: Connect, children: list[Child]
) -> None:
    kind = _kind(db_url)
    child = Child(HOLDER_SCRIPT, db_url, HOLDER_APP, VERSION_TABLE)
    children.append(child)
    ident = child.json()
    assert child.send("acquire") == {"done": "acquire", "held": True}

    lock = AdvisoryLock(connect(db_url), _key(db_url))
    tries = _count_tries(lock)
    with pytest.raises(LockTimeout) as caught:
        lock.acquire(timeout=1.0, poll=0.01)
    assert len(tries) > 1 and not any(tries)  # it polled, never blocked on one attempt
    message, holder = str(caught.value), caught.value.holder
    if kind == "postgresql":
        assert holder["pid"] == ident["backend_pid"] and holder["application_name"] == HOLDER_APP
        assert f"pid {ident['backend_pid']}" in message and HOLDER_APP in message
        assert "pg_terminate_backend" in message
    elif kind == "mysql":
        assert holder["connection_id"] == ident["connection_id"] and holder["host"]
        assert f"connection {ident['connection_id']}" in message and str(holder["host"]) in message
    else:
        assert holder["pid"] == ident["pid"] == child.proc.pid
        assert f"pid {ident['pid']}" in message
        lock_file = Path(str(sa.engine.make_url(db_url).database) + ".reconciler.lock")
        assert holder["lock_file"] == str(lock_file) and lock_file.exists()

    # released by its holder: the waiter gets it on its next poll
    assert child.send("release") == {"done": "release", "held": False}
    lock.acquire(timeout=30, poll=0.05)
    lock.release()

    # its holder process is SIGKILLed: the lock goes with the session / open file
    assert child.send("acquire")["held"] is True
    assert not lock.try_acquire()
    child.kill()
    lock.acquire(timeout=30, poll=0.05)
    assert lock.held


@pytest.mark.core
def test_lock_survives_commits_on_other_connections(db_url: str, connect: Connect) -> None:
    holder_conn = connect(db_url)
    lock = AdvisoryLock(holder_conn, _key(db_url))
    assert lock.try_acquire()
    other = connect(db_url, autocommit=False)
    for n in range(3):  # per-revision commits, as the worker does them
        other.execute(sa.text(f"CREATE TABLE t{n} (id INTEGER PRIMARY KEY)"))
        other.execute(sa.text(f"INSERT INTO t{n} (id) VALUES (1)"))
        other.commit()
    if holder_conn.dialect.name != "sqlite":  # a transaction on the holding session ends too
        with holder_conn.begin():
            holder_conn.execute(sa.text("SELECT 1"))
    rival = AdvisoryLock(connect(db_url), _key(db_url))
    assert not rival.try_acquire()
    assert lock.held and rival.holder() is not None
    lock.release()
    assert rival.try_acquire()
    rival.release()


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def test_release_is_quiet_on_a_dead_connection(kind: str, tmp_path: Path, connect: Connect) -> None:
    with dbs.database(kind, tmp_path) as url:
        conn = connect(url)
        lock = AdvisoryLock(conn, _key(url))
        assert lock.try_acquire()
        killer = connect(url)
        if kind == "postgresql":
            killer.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": _backend_pid(conn)})
        else:
            killer.execute(sa.text(f"KILL {_backend_pid(conn)}"))
        lock.release()
        lock.release()
        assert not lock.held
        rival = AdvisoryLock(killer, _key(url))
        _wait_until(rival.try_acquire, 10, "the dead session's lock to go")
        rival.release()

        closed = AdvisoryLock(connect(url), _key(url))
        assert closed.try_acquire()
        closed._backend.conn.close()  # type: ignore[union-attr]
        closed.release()
        assert not closed.held


def test_sqlite_lock_file_sits_next_to_the_database(sqlite_url: str, connect: Connect) -> None:
    conn = connect(sqlite_url)
    conn.execute(sa.text("CREATE TABLE t (id INTEGER)"))
    db_file = Path(str(sa.engine.make_url(sqlite_url).database))
    lock = AdvisoryLock(conn, _key(sqlite_url))
    assert lock.try_acquire()
    lock_file = db_file.with_name(db_file.name + ".reconciler.lock")
    written = json.loads(lock_file.read_text())
    assert written["pid"] == os.getpid() and written["host"] and written["since"]
    explicit = AdvisoryLock(connect("sqlite://"), _key(sqlite_url), sqlite_path=db_file)
    assert not explicit.try_acquire()  # same side file, found from the explicit path
    lock.release()
    assert lock.holder() is None  # the file stays, but nobody holds it
    assert explicit.try_acquire()
    explicit.release()


# --------------------------------------------------------------------------- PostgreSQL


_UNGRANTED_ADVISORY = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def _watch_while(thread: threading.Thread, observer: sa.engine.Connection, pid: int) -> list[Any]:
    """Sample the server's view of `pid` until `thread` ends: (ungranted advisory, wait type)."""
    samples = []
    deadline = time.monotonic() + 8.0
    while thread.is_alive() and time.monotonic() < deadline:
        ungranted = observer.execute(sa.text(_UNGRANTED_ADVISORY)).scalar_one()
        wait_type = observer.execute(
            sa.text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
        ).scalar()
        samples.append((ungranted, wait_type))
        time.sleep(0.03)
    return samples


def _count_tries(lock: AdvisoryLock) -> list[bool]:
    """Each `try_acquire()` answer `lock` gets from now on: a poll, not a duration, says it waited."""
    tries: list[bool] = []
    real = lock.try_acquire

    def counted() -> bool:
        tries.append(real())
        return tries[-1]

    lock.try_acquire = counted  # type: ignore[method-assign]
    return tries


@pytest.mark.postgres
def test_waiter_polls_and_never_waits_on_the_server(pg_url: str, connect: Connect) -> None:
    holder = AdvisoryLock(connect(pg_url), _key(pg_url))
    assert holder.try_acquire()
    waiter_conn, observer = connect(pg_url), connect(pg_url)
    waiter = AdvisoryLock(waiter_conn, _key(pg_url))
    waiter_pid = _backend_pid(waiter_conn)  # before the waiter thread owns the connection
    outcome: dict[str, Any] = {}

    tries = _count_tries(waiter)

    def wait() -> None:
        try:
            waiter.acquire(timeout=2.0, poll=0.05)
        except LockTimeout as err:
            outcome["error"] = err

    thread = threading.Thread(target=wait)
    thread.start()
    samples = _watch_while(thread, observer, waiter_pid)
    assert len(samples) > 10
    assert all(ungranted == 0 and wait_type != "Lock" for ungranted, wait_type in samples)
    assert isinstance(outcome.get("error"), LockTimeout)
    assert len(tries) > 1 and not any(tries)  # many short attempts, each answered at once


@pytest.mark.postgres
def test_negative_control_a_blocking_waiter_is_seen_waiting(pg_url: str, connect: Connect) -> None:
    holder = AdvisoryLock(connect(pg_url), _key(pg_url))
    assert holder.try_acquire()
    blocker, observer = connect(pg_url), connect(pg_url)
    blocker.execute(sa.text("SET lock_timeout = '10s'"))
    blocker_pid = _backend_pid(blocker)

    def block() -> None:  # what the lock must never do: pg_advisory_lock waits on the server
        with contextlib.suppress(sa.exc.DBAPIError):
            blocker.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _key(pg_url).pg_key})

    thread = threading.Thread(target=block)
    thread.start()
    seen: list[Any] = []

    def blocked() -> bool:
        seen[:] = _watch_once(observer, blocker_pid)
        return seen == [1, "Lock"]

    _wait_until(blocked, 10, "the blocking waiter to show in pg_locks")
    observer.execute(sa.text("SELECT pg_cancel_backend(:p)"), {"p": blocker_pid})
    thread.join(timeout=10)
    assert not thread.is_alive()


def _watch_once(observer: sa.engine.Connection, pid: int) -> list[Any]:
    ungranted = observer.execute(sa.text(_UNGRANTED_ADVISORY)).scalar_one()
    wait_type = observer.execute(
        sa.text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
    ).scalar()
    return [ungranted, wait_type]


@pytest.mark.postgres
def test_holder_query_matches_pg_locks_halves(pg_url: str, connect: Connect) -> None:
    conn = connect(pg_url)
    for key in (LockKey("neg", -(2**62) - 12345), LockKey("pos", 2**40 + 7), _key(pg_url)):
        lock = AdvisoryLock(conn, key)
        assert lock.try_acquire()
        found = lock.holder()
        assert found is not None and found["pid"] == _backend_pid(conn)
        lock.release()
        assert lock.holder() is None


@pytest.mark.postgres
def test_non_autocommit_connection_is_left_idle(pg_url: str, connect: Connect) -> None:
    conn, observer = connect(pg_url, autocommit=False), connect(pg_url)
    pid = _backend_pid(conn)
    conn.commit()
    lock = AdvisoryLock(conn, _key(pg_url))
    assert lock.try_acquire() and lock.holder() is not None
    assert not conn.in_transaction()
    state = observer.execute(
        sa.text("SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
    ).scalar()
    assert state == "idle"  # never "idle in transaction" because of a lock call
    assert not AdvisoryLock(observer, _key(pg_url)).try_acquire()
    lock.release()
    assert not conn.in_transaction()


def _start_orphan(url: str, app: str, seconds: float, children: list[Child]) -> Child:
    child = Child(SLEEPER_SCRIPT, url, app, str(seconds))
    children.append(child)
    assert child.line() == "ready"
    return child


def _active_pid(conn: sa.engine.Connection, app: str) -> int | None:
    value = conn.execute(
        sa.text(
            "SELECT pid FROM pg_stat_activity WHERE application_name = :a AND state = 'active'"
            " AND query LIKE '%pg_sleep%'"
        ),
        {"a": app},
    ).scalar()
    return int(value) if value is not None else None


def _kill_while_running(
    url: str, conn: sa.engine.Connection, app: str, seconds: float, children: list[Child]
) -> int:
    child = _start_orphan(url, app, seconds, children)
    _wait_until(lambda: _active_pid(conn, app) is not None, 10, "the applier's statement")
    pid = _active_pid(conn, app)
    assert pid is not None
    child.kill()
    return pid


@pytest.mark.postgres
def test_orphan_wait_outlasts_a_killed_appliers_statement(
    pg_url: str, connect: Connect, children: list[Child]
) -> None:
    conn = connect(pg_url)
    app = sessions.application_name("t1", "apply", "x:1")
    orphan = _kill_while_running(pg_url, conn, app, 3.0, children)

    # negative control: without the wait, the killed applier's statement is still running
    assert _active_pid(conn, app) == orphan
    wait_for_orphans(conn, sessions.apply_prefix("t2"), timeout=0)  # no wait: raises if any

    wait_for_orphans(conn, sessions.apply_prefix("t1"), timeout=30, poll=0.05)
    assert _active_pid(conn, app) is None  # it returned only once the orphan had finished
    state = conn.execute(sa.text("SELECT state FROM pg_stat_activity WHERE pid = :p"), {"p": orphan}).scalar()
    assert state in (None, "idle")


@pytest.mark.postgres
def test_orphan_wait_times_out_naming_the_statement(
    pg_url: str, connect: Connect, children: list[Child]
) -> None:
    conn = connect(pg_url)
    app = sessions.application_name("t1", "apply", "x:2")
    orphan = _kill_while_running(pg_url, conn, app, 30.0, children)
    with pytest.raises(LockTimeout) as caught:
        wait_for_orphans(conn, sessions.apply_prefix("t1"), timeout=0.5)
    message = str(caught.value)
    assert f"pid {orphan}" in message and app in message
    assert f"pg_cancel_backend({orphan})" in message and caught.value.holder["pid"] == orphan
    conn.execute(sa.text("SELECT pg_cancel_backend(:p)"), {"p": orphan})  # the advice works
    wait_for_orphans(conn, sessions.apply_prefix("t1"), timeout=30)  # raises if it still runs


@pytest.mark.postgres
def test_orphan_wait_ignores_idle_sessions_and_its_own(pg_url: str, connect: Connect) -> None:
    prefix = sessions.apply_prefix("t3")
    conn, idle = connect(pg_url), connect(pg_url)
    conn.execute(sa.text("SELECT set_config('application_name', :a, false)"), {"a": prefix + "me"})
    idle.execute(sa.text("SELECT set_config('application_name', :a, false)"), {"a": prefix + "ok"})
    wait_for_orphans(conn, prefix, timeout=0)  # nothing to wait for: raises if it sees any


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def test_orphan_wait_is_a_no_op_off_postgresql(kind: str, tmp_path: Path, connect: Connect) -> None:
    with dbs.database(kind, tmp_path) as url:
        conn = connect(url)
        assert wait_for_orphans(conn, sessions.apply_prefix("t1"), timeout=5) == 0.0
