"""A lock holder that stops answering (SIGSTOP): reported once as "lock held too long" with its pid
and host, nobody else takes the lock meanwhile, and everything converges when it resumes or dies.

Process A is `reconciler apply` of a revision that sleeps on the server; it is frozen with its
worker (the whole process group). Process B is a daemon. Real PostgreSQL and MariaDB.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import dbs
from tests.builders import Project, create_table, db_heads, flask_project, journal_rows
from tests.cli import cli_command, cli_env
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import Running, daemon
from tests.system.test_cli_admin import ok
from tests.webhooks import Recorder

pytestmark = pytest.mark.slow  # two processes and a daemon (10-20 s a test)

SERVERS = [
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]
SLEEP = {"postgresql": "SELECT pg_sleep(3)", "mysql": "SELECT SLEEP(3)"}
B_SETTINGS = (
    "[daemon]\ninterval = 0.2\njitter = 0\nbackoff_max = 1\n[apply]\nlock_acquire_timeout = 0.3\n"
    "[alerting]\nlock_held_after = 1\n"
)
UNSAFE = {"RECONCILER_UNSAFE_DISABLE": "lock,orphan_wait"}


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    with dbs.database(request.param, tmp_path) as url:
        yield request.param, url


def slow_project(tmp_path: Path, url: str, kind: str) -> Project:
    """r0000 applied; `slow` sleeps 3 s on the server, then creates t_slow."""
    project = flask_project(tmp_path / "p", url)
    project.chain(1)
    ok(project, "apply")
    project.revision("slow", "r0000", upgrade=f'op.execute("{SLEEP[kind]}")\n{create_table("t_slow")}')
    return project


@contextmanager
def frozen_applier(project: Project, url: str) -> Iterator[subprocess.Popen[str]]:
    """A: `reconciler apply` (own process group, so its worker freezes with it), stopped once it
    has journaled `slow` as started; always continued and reaped at the end."""
    proc = subprocess.Popen(
        cli_command(["--config", str(project.config), "apply"]),
        cwd=project.root,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(lambda: rows(url, "slow"), 60, "A starting the slow revision")
        os.killpg(proc.pid, signal.SIGSTOP)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def config_b(project: Project, hooks: Recorder | None = None) -> None:
    """B: a daemon ticking every 0.2 s that waits 0.3 s for the lock and says "held" after 1 s."""
    sink = f'[[alerts]]\nkind = "webhook"\nurl = "{hooks.url}"\n' if hooks else ""
    project.write_config(extra=B_SETTINGS + sink, models="myapp.models:db")


def rows(url: str, revision: str) -> list[dict[str, object]]:
    return [r for r in journal_rows(url) if r["revision"] == revision]


def outcomes_of(url: str, pid: int) -> list[object]:
    """The outcomes of the `slow` steps process `pid` journaled (the journal's host is host:pid)."""
    return [r["outcome"] for r in rows(url, "slow") if str(r["host"]).endswith(f":{pid}")]


def a_host() -> str:
    return (os.environ.get("HOSTNAME") or socket.gethostname())[:24]


def lock_held_alert(hooks: Recorder, d: Running, a_pid: int) -> dict[str, Any]:
    """Waits for B's one lock_held alert naming A; checks B kept out meanwhile."""
    wait_until(lambda: hooks.events("lock_held"), 30, "the lock_held alert")
    runs = d.status()["runs"]
    d.wait_status(lambda s: s["runs"] >= runs + 3, 30, "three more runs of B")
    (alert,) = hooks.events("lock_held")
    holder = alert["details"]["holder"]
    assert (holder["replica_pid"], holder["replica_host"]) == (a_pid, a_host())
    assert f"replica_pid={a_pid}" in alert["message"] and f"replica_host={a_host()}" in alert["message"]
    assert d.status()["last_outcome"] == "lock_busy"
    return alert


def test_frozen_holder_is_reported_once_and_all_converges_when_it_resumes(
    tmp_path: Path, server: tuple[str, str]
) -> None:
    kind, url = server
    project = slow_project(tmp_path, url, kind)
    hooks = Recorder()
    try:
        with frozen_applier(project, url) as a:
            config_b(project, hooks)
            with daemon(project) as d:
                lock_held_alert(hooks, d, a.pid)
                assert [r["outcome"] for r in rows(url, "slow")] == ["started"]  # B never entered
                assert db_heads(url) == {"r0000"}
                os.killpg(a.pid, signal.SIGCONT)
                assert a.wait(60) == 0
                d.wait_status(lambda s: s["state"] == "in_sync", 30, "B in sync")
                wait_until(lambda: hooks.events("recovered"), 15, "the recovery")
                assert hooks.events("recovered")[0]["details"]["recovered_from"] == "lock_held"
                assert len(hooks.events("lock_held")) == 1
        assert db_heads(url) == {"slow"}
        assert [r["outcome"] for r in rows(url, "slow")] == ["applied"]
    finally:
        hooks.close()


def test_killed_frozen_holder_lets_b_take_over(tmp_path: Path, server: tuple[str, str]) -> None:
    """B waits out the orphan and applies. A was killed inside the revision's transaction
    (before its first DDL), so the step is rolled back on MariaDB too, never a false `dirty`."""
    kind, url = server
    project = slow_project(tmp_path, url, kind)
    hooks = Recorder()
    try:
        with frozen_applier(project, url) as a:
            config_b(project, hooks)
            with daemon(project) as d:
                lock_held_alert(hooks, d, a.pid)
                os.killpg(a.pid, signal.SIGKILL)
                a.wait(30)
                d.wait_status(lambda s: s["state"] == "in_sync", 30, "B in sync after the kill")
        assert db_heads(url) == {"slow"}
        outcomes = [r["outcome"] for r in rows(url, "slow")]
        assert outcomes == ["rolled_back", "applied"]
        assert len(hooks.events("lock_held")) == 1
        assert not hooks.events("dirty")
    finally:
        hooks.close()


def test_without_the_lock_b_enters_while_the_holder_is_frozen(
    tmp_path: Path, server: tuple[str, str]
) -> None:
    """Negative control: with the lock off, B goes in while A is frozen inside the revision: it
    settles A's running step as interrupted (rolled back), then B runs the revision A is in."""
    kind, url = server
    project = slow_project(tmp_path, url, kind)
    with frozen_applier(project, url) as a:
        config_b(project)
        running = Running(project, UNSAFE)
        try:
            settled = wait_until(
                lambda: [o for o in outcomes_of(url, a.pid) if o != "started"], 60, "B settling A's step"
            )
            assert a.poll() is None  # A is still frozen inside the revision
            assert settled == ["rolled_back"]
            wait_until(
                lambda: len(rows(url, "slow")) > len(outcomes_of(url, a.pid)),
                30,
                "B starting the revision A is in",
            )
        finally:
            running.stop(signal.SIGKILL)


def free_port() -> int:
    from tests.runtime.test_daemon import free_port as port

    return port()
