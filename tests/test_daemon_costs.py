"""How fast a prod daemon retries when it fails.

A real daemon (`reconciler run`); the retry rhythm is read from its own `run_finished` log events.
"""

from __future__ import annotations

import json
import socket
from datetime import datetime
from pathlib import Path

import pytest

from reconciler.backoff import retry_window
from tests.builders import Project, flask_project
from tests.test_daemon import Running, free_port

pytestmark = pytest.mark.slow


def default_config(project: Project, extra: str = "") -> None:
    """The [daemon] defaults (interval, idle_disconnect_after) except what `extra` sets."""
    project.write_config(extra=f"[daemon]\n{extra}\n", models="myapp.models:db")


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
