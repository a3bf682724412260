"""Many replicas at once, and a killed applier: each revision runs exactly once.

Witnesses of "a revision was entered" must survive that revision's rollback, so they are
non-transactional: PostgreSQL sequences (nextval is never rolled back) and a MyISAM table on
MariaDB. Every test with a safeguard has a negative control that switches it off and shows the
bad outcome.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests import dbs
from tests.builders import Project, create_table, db_heads, flask_project, journal_rows, table_names
from tests.cli import run_cli, start_cli

pytestmark = pytest.mark.slow

UNSAFE = "RECONCILER_UNSAFE_DISABLE"


def engine(url: str) -> sa.engine.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def witnessed_chain(project: Project, count: int, dialect: str, where: str = "") -> list[str]:
    revs = []
    down = None
    for n in range(count):
        rev = f"w{n:04d}"
        # Entering leaves a non-transactional mark; then the revision takes a little server time,
        # as real ones do, which is the window a race needs.
        if dialect == "postgresql":
            enter = f'op.execute("SELECT nextval(\'witness_{rev}\')")\nop.execute("SELECT pg_sleep(0.05)")'
        else:
            enter = (
                f"op.execute(\"INSERT INTO {where}.witness (rev) VALUES ('{rev}')\")\n"
                'op.execute("SELECT SLEEP(0.05)")'
            )
        project.revision(
            rev,
            down,
            upgrade=f"{enter}\n{create_table(f't_{rev}')}",
            message=f"create t_{rev}",
        )
        revs.append(rev)
        down = rev
    return revs


def prepare_witness(url: str, revs: list[str], dialect: str) -> None:
    eng = engine(url)
    with eng.connect() as conn:
        if dialect == "postgresql":
            for rev in revs:
                conn.execute(sa.text(f"CREATE SEQUENCE witness_{rev}"))
        else:
            conn.execute(sa.text("CREATE TABLE witness (rev VARCHAR(64)) ENGINE=MyISAM"))
    eng.dispose()


def entries(url: str, revs: list[str], dialect: str) -> dict[str, int]:
    eng = engine(url)
    out = {}
    with eng.connect() as conn:
        for rev in revs:
            if dialect == "postgresql":
                row = conn.execute(sa.text(f"SELECT last_value, is_called FROM witness_{rev}")).one()
                out[rev] = int(row[0]) if row[1] else 0
            else:
                out[rev] = int(
                    conn.execute(sa.text("SELECT COUNT(*) FROM witness WHERE rev = :r"), {"r": rev}).scalar()
                    or 0
                )
    eng.dispose()
    return out


def run_many(project: Project, count: int, env: dict[str, str] | None = None) -> list[int]:
    procs = [
        start_cli(["--config", str(project.config), "apply"], cwd=project.root, env=env) for _ in range(count)
    ]
    codes = []
    for proc in procs:
        proc.communicate(timeout=300)
        codes.append(proc.returncode)
    return codes


def race(
    tmp_path: Path, url: str, dialect: str, processes: int, revisions: int, env: dict[str, str] | None = None
) -> tuple[list[int], dict[str, int], list[str]]:
    with ExitStack() as stack:
        # MariaDB: the MyISAM witness lives in a database of its own, so the target stays empty.
        witness_url = stack.enter_context(dbs.mysql_database()) if dialect == "mysql" else url
        project = flask_project(tmp_path / "p", url)
        where = sa.engine.make_url(witness_url).database or ""
        revs = witnessed_chain(project, revisions, dialect, where)
        prepare_witness(witness_url, revs, dialect)
        codes = run_many(project, processes, env)
        return codes, entries(witness_url, revs, dialect), revs


@pytest.mark.postgres
def test_20_replicas_postgresql_apply_each_revision_once(tmp_path: Path, pg_url: str) -> None:
    started = time.monotonic()
    codes, counts, revs = race(tmp_path, pg_url, "postgresql", 20, 30)
    elapsed = time.monotonic() - started
    assert codes == [0] * 20
    assert counts == dict.fromkeys(revs, 1)
    assert db_heads(pg_url) == {revs[-1]}
    applied = [r["revision"] for r in journal_rows(pg_url) if r["outcome"] == "applied"]
    assert applied == revs
    print(f"20 replicas converged on 30 revisions in {elapsed:.1f} s")


@pytest.mark.postgres
def test_without_lock_the_race_shows_postgresql(tmp_path: Path, pg_url: str) -> None:
    codes, counts, _ = race(tmp_path, pg_url, "postgresql", 20, 30, env={UNSAFE: "lock,orphan_wait"})
    assert max(counts.values()) > 1 or any(codes), (codes, counts)


@pytest.mark.mysql
def test_10_replicas_mariadb_apply_each_revision_once(tmp_path: Path, mysql_url: str) -> None:
    codes, counts, revs = race(tmp_path, mysql_url, "mysql", 10, 30)
    assert codes == [0] * 10
    assert counts == dict.fromkeys(revs, 1)
    assert db_heads(mysql_url) == {revs[-1]}


@pytest.mark.mysql
def test_without_lock_the_race_shows_mariadb(tmp_path: Path, mysql_url: str) -> None:
    codes, counts, _ = race(tmp_path, mysql_url, "mysql", 10, 30, env={UNSAFE: "lock,orphan_wait"})
    assert max(counts.values()) > 1 or any(codes), (codes, counts)


# --- SIGKILL during a revision that sleeps on the server (PostgreSQL) ------------------------
SLEEP = 4


def sleeper_project(tmp_path: Path, url: str, sleep: float = SLEEP) -> Project:
    project = flask_project(tmp_path / "p", url)
    project.revision("k0", None, upgrade=create_table("t_k0"))
    project.revision(
        "k1",
        "k0",
        upgrade=(
            "op.execute(\"SELECT nextval('entered_k1')\")\n"
            f'op.execute("SELECT pg_sleep({sleep}) /* sleeper */")\n' + create_table("t_k1")
        ),
    )
    project.revision("k2", "k1", upgrade=create_table("t_k2"))
    eng = engine(url)
    with eng.connect() as conn:
        conn.execute(sa.text("CREATE SEQUENCE entered_k1"))
    eng.dispose()
    return project


SLEEPERS = sa.text(
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' "
    "AND query LIKE '%/* sleeper */%' AND pid <> pg_backend_pid()"
)


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def start_and_kill_in_sleep(project: Project, url: str) -> tuple[int, sa.engine.Engine]:
    eng = engine(url)
    proc = start_cli(["--config", str(project.config), "apply"], cwd=project.root)
    with eng.connect() as conn:
        pids = wait_for(lambda: conn.execute(SLEEPERS).scalars().all(), 60, "the sleeping revision")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    return int(pids[0]), eng


class Sampler(threading.Thread):
    """Samples how many sleeping revision statements run at once, until stopped."""

    def __init__(self, eng: sa.engine.Engine) -> None:
        super().__init__(daemon=True)
        self.eng = eng
        self.max_concurrent = 0
        self.pids: set[int] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        with self.eng.connect() as conn:
            while not self.stop.is_set():
                pids = conn.execute(SLEEPERS).scalars().all()
                self.pids.update(int(p) for p in pids)
                self.max_concurrent = max(self.max_concurrent, len(pids))
                time.sleep(0.01)


@pytest.mark.postgres
def test_sigkill_leaves_previous_revision_then_next_apply_reaches_head(tmp_path: Path, pg_url: str) -> None:
    project = sleeper_project(tmp_path, pg_url)
    orphan, eng = start_and_kill_in_sleep(project, pg_url)
    with eng.connect() as conn:
        wait_for(lambda: orphan not in conn.execute(SLEEPERS).scalars().all(), 30, "orphan end")
    assert db_heads(pg_url) == {"k0"}
    assert "t_k1" not in table_names(pg_url)  # no trace of the killed revision
    assert [r["outcome"] for r in journal_rows(pg_url)] == ["applied", "started"]
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert db_heads(pg_url) == {"k2"}
    outcomes = [(r["revision"], r["outcome"]) for r in journal_rows(pg_url)]
    assert outcomes[:2] == [("k0", "applied"), ("k1", "rolled_back")]
    assert outcomes[2:] == [("k1", "applied"), ("k2", "applied")]
    eng.dispose()


def kill_then_race(
    tmp_path: Path, url: str, env: dict[str, str] | None, sleep: float = SLEEP
) -> tuple[Sampler, float]:
    project = sleeper_project(tmp_path, url, sleep)
    _orphan, eng = start_and_kill_in_sleep(project, url)
    sampler = Sampler(eng)
    sampler.start()
    killed_at = time.monotonic()
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root, env=env, timeout=120)
    sampler.stop.set()
    sampler.join(10)
    assert result.returncode == 0, result.stderr
    assert db_heads(url) == {"k2"}
    eng.dispose()
    return sampler, time.monotonic() - killed_at


@pytest.mark.postgres
def test_no_orphan_window_after_sigkill(tmp_path: Path, pg_url: str) -> None:
    sampler, elapsed = kill_then_race(tmp_path, pg_url, None)
    assert sampler.max_concurrent == 1  # nobody entered k1 while the killed statement ran
    assert len(sampler.pids) == 2  # the orphan, then the new applier
    print(f"apply after the kill reached head in {elapsed:.1f} s")


@pytest.mark.postgres
def test_orphan_window_shows_without_the_wait(tmp_path: Path, pg_url: str) -> None:
    # The orphan sleeps long enough for the next applier (a CLI process, its worker, env.py) to
    # reach k1 even on a loaded machine: at 4 s a slow start could miss the window it shows.
    sampler, _ = kill_then_race(tmp_path, pg_url, {UNSAFE: "orphan_wait"}, sleep=20)
    assert sampler.max_concurrent == 2  # the bad outcome: k1 entered while the orphan still ran


def test_worker_dies_with_killed_apply(tmp_path: Path, pg_url: str) -> None:
    project = sleeper_project(tmp_path, pg_url)
    proc = start_cli(["--config", str(project.config), "apply"], cwd=project.root)
    eng = engine(pg_url)
    with eng.connect() as conn:
        wait_for(lambda: conn.execute(SLEEPERS).scalars().all(), 60, "the sleeping revision")
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    worker_pids = [int(p) for p in children.stdout.split()]
    assert worker_pids
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    def gone() -> bool:
        for pid in worker_pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split()[2] != "Z":
                    return False
        return True

    wait_for(gone, 10, "the worker to die with its parent")
    eng.dispose()
