"""One prod daemon over the whole fleet (issue 15, part 5): its memory and its server sessions.

`reconciler run --mode prod` is started on the fleet with one new revision pending and watched
until every tenant is at the new head: the daemon process's peak RSS (its own; the workers it
forks are separate processes, shown as the peak PSS of the whole process tree for information), and
on PostgreSQL the peak count of the server sessions our processes hold (`application_name`
starting with `reconciler`), against the bound `[fleet] concurrency` + 2. Then SIGTERM, and its
exit code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from bench.common import proc_kib, reconciler
from bench.fleetproject import Fleet, versions

DAEMON_REVISION = "fleet0002"
DAEMON_UPGRADE = 'op.create_table("t_daemon", sa.Column("id", sa.Integer, primary_key=True))\n'
SAMPLE_EVERY = 0.1  # seconds between two samples of memory and sessions
HEADS_EVERY = 1.0  # seconds between two reads of every tenant's version rows


@dataclass
class DaemonFigures:
    seconds: float  # from start until every tenant was at the new head (or the deadline)
    at_head: int
    tenants: int
    peak_rss_mib: float  # the daemon process's own VmHWM
    peak_tree_mib: float  # the daemon and its workers' PSS (pages a fork shares counted once), summed
    peak_processes: int  # the daemon and its workers at most at once
    peak_sessions: int | None  # PostgreSQL: our server sessions at most at once; None elsewhere
    exit_code: int
    stderr_tail: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from /proc's children lists (one per thread)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):  # a child is its thread's
            try:
                todo.extend(int(child) for child in task.read_text().split())
            except OSError:  # the thread ended
                continue
    return found


def _sessions(conn: sa.engine.Connection) -> int:
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name LIKE 'reconciler%' AND pid <> pg_backend_pid()"
    )
    return int(conn.execute(sa.text(query)).scalar() or 0)


def run_daemon(found: Fleet, parent: str, timeout: float = 1800.0) -> DaemonFigures:
    """Add `DAEMON_REVISION` on `parent` to our project, run the daemon until the fleet has it."""
    found.ours.revision(DAEMON_REVISION, parent, upgrade=DAEMON_UPGRADE, message="fleet daemon")
    command = reconciler(found.ours, "run", "--mode", "prod", "--interval", "2")
    command += ["--http", f"127.0.0.1:{_free_port()}", "-q"]
    log = found.ours.root / "daemon.stderr"
    watcher = None
    if found.dialect == "postgresql":  # autocommit: pg_stat_activity is read once per transaction
        watcher = sa.create_engine(found.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            command, cwd=found.ours.root, env=found.env, stdout=subprocess.DEVNULL, stderr=err
        )
    rss = tree = processes = 0
    sessions: int | None = 0 if watcher is not None else None
    at_head, checked = 0, 0.0
    try:
        conn = watcher.connect() if watcher is not None else None
        while time.perf_counter() - started < timeout and proc.poll() is None:
            rss = max(rss, proc_kib(proc.pid, "VmHWM"))
            family = _descendants(proc.pid)
            tree = max(tree, sum(proc_kib(pid, "Pss", "smaps_rollup") for pid in family))
            processes = max(processes, len(family))
            if conn is not None and sessions is not None:
                sessions = max(sessions, _sessions(conn))
            if time.perf_counter() - checked >= HEADS_EVERY:
                checked = time.perf_counter()
                at_head = sum(1 for v in versions(found, found.tenants).values() if v == {DAEMON_REVISION})
                if at_head == len(found.tenants):
                    break
            time.sleep(SAMPLE_EVERY)
        seconds = time.perf_counter() - started
        rss = max(rss, proc_kib(proc.pid, "VmHWM"))
        if conn is not None:
            conn.close()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # the daemon this function started
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if watcher is not None:
            watcher.dispose()
    tail = log.read_text(errors="replace")[-600:]
    return DaemonFigures(
        seconds, at_head, len(found.tenants), rss / 1024, tree / 1024, processes, sessions, code, tail
    )
