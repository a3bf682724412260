"""What a prod daemon costs the database between ticks, and how fast it retries when it fails.

Real daemons (`reconciler run`) on PostgreSQL: the backends they hold are read from
pg_stat_activity; the retry rhythm from the daemon's own `run_finished` log events.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.backoff import retry_window
from tests.builders import Project, flask_project
from tests.pgcluster import wait_until
from tests.test_daemon import Running, daemon, free_port

pytestmark = pytest.mark.slow

OURS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name LIKE 'reconciler/%' AND pid <> pg_backend_pid()"
)


def our_backends(url: str) -> int:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(OURS)).scalar_one())
    finally:
        engine.dispose()


def default_config(project: Project, extra: str = "") -> None:
    """The [daemon] defaults (interval, idle_disconnect_after) except what `extra` sets."""
    project.write_config(extra=f"[daemon]\n{extra}\n", models="myapp.models:db")


def test_default_daemon_holds_no_backend_between_ticks(tmp_path: Path, pg_url: str) -> None:
    """200 sidecars must not hold 200 server connections: with the default interval the
    connection is closed after each run, so between ticks the server shows none of ours."""
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(2)
    default_config(project)
    with daemon(project) as d:
        d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
        # The default interval is 30 s: the next tick is far away while we wait here.
        wait_until(lambda: our_backends(pg_url) == 0, 20, "no backend of ours between ticks")
        assert d.status()["runs"] == 1


def test_negative_control_a_longer_idle_disconnect_after_keeps_the_backend(
    tmp_path: Path, pg_url: str
) -> None:
    """With idle_disconnect_after above the interval the pooled connection stays open between
    ticks (the shape of the bug: a backend per replica, forever)."""
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(2)
    default_config(project, "idle_disconnect_after = 3600")
    with daemon(project) as d:
        d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
        wait_until(lambda: our_backends(pg_url) >= 1, 20, "our pooled backend")
        assert d.status()["runs"] == 1  # between the first and second tick, and still held


def closed_port() -> int:
    """A local port nobody listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def failed_run_times(stderr: str) -> list[datetime]:
    times = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "run_finished" and event.get("outcome") == "unreachable":
            times.append(datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")))
    return times


def test_database_down_retries_are_never_faster_than_the_interval(tmp_path: Path) -> None:
    """With the server unreachable, each retry waits at least the interval and the waits grow
    to backoff_max: read off the daemon's own run_finished timestamps, not a stopwatch."""
    interval, backoff_max = 0.3, 2.4
    project = flask_project(tmp_path / "p", f"postgresql://u@127.0.0.1:{closed_port()}/app")
    project.chain(1)
    default_config(
        project,
        f"interval = {interval}\njitter = 0\nbackoff_max = {backoff_max}\n[alerting]\nunreachable_after = 3",
    )
    running = Running(project, free_port())
    try:
        running.wait_status(lambda s: s.get("consecutive_failures", 0) >= 6, 60, "six failed runs")
    finally:
        running.stop()
    times = failed_run_times(running.stderr)
    assert len(times) >= 6, running.stderr[-2000:]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    for attempt, gap in enumerate(gaps, start=1):
        floor, _ceiling = retry_window(attempt, interval, backoff_max)
        assert gap >= floor, (attempt, gaps)  # a run's end to the next run's end: the wait, plus
    assert all(gap >= interval for gap in gaps)
    assert max(gaps) >= backoff_max / 2  # grown to the cap's band
