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

from reconciler.core.backoff import retry_window
from reconciler.runtime.prod import next_delay
from reconciler.settings import DaemonSettings
from tests.builders import Project, flask_project
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import Running, daemon
from tests.webhooks import Recorder

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


def default_config(project: Project, extra: str = "", sinks: tuple[str, ...] = ()) -> None:
    """The [daemon] defaults (interval, idle_disconnect_after) except what `extra` sets."""
    alerts = "".join(f'\n[[alerts]]\nkind = "webhook"\nurl = "{url}"\n' for url in sinks)
    project.write_config(extra=f"[daemon]\n{extra}\n{alerts}", models="myapp.models:db")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_database_down_retries_are_never_faster_than_the_interval(tmp_path: Path) -> None:
    """With the server unreachable, each retry waits at least the interval and the waits grow
    to backoff_max: read off the daemon's own run_finished timestamps, not a stopwatch."""
    interval, backoff_max = 0.3, 2.4
    hooks = Recorder()
    project = flask_project(tmp_path / "p", f"postgresql://u@127.0.0.1:{closed_port()}/app")
    project.chain(1)
    settings = f"interval = {interval}\njitter = 0\nbackoff_max = {backoff_max}\n"
    default_config(project, settings + "[alerting]\nunreachable_after = 3", sinks=(hooks.url,))
    running = Running(project)
    try:
        running.wait_status(lambda s: s.get("consecutive_failures", 0) >= 6, 60, "six failed runs")
    finally:
        running.stop()
        hooks.close()
    times = failed_run_times(running.stderr)
    assert len(times) >= 6, running.stderr[-2000:]
    gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    for attempt, gap in enumerate(gaps, start=1):
        floor, _ceiling = retry_window(attempt, interval, backoff_max)
        assert gap >= floor, (attempt, gaps)  # from a run's end to the next one's: wait + run
    assert all(gap >= interval for gap in gaps)
    assert max(gaps) >= backoff_max / 2  # grown to the cap's band
    # The unreachable alert came once, after the third failed run (not a second after start).
    alerts = hooks.events("unreachable")
    assert len(alerts) == 1, hooks.bodies
    sent = datetime.fromisoformat(str(alerts[0]["timestamp"]).replace("Z", "+00:00"))
    assert sent >= times[2].replace(microsecond=0), (sent, times[:3])


# outcome, consecutive failures, interval, backoff_max -> (shortest, longest) delay; None: the interval
NEXT_DELAYS = [
    ("noop", 0, 30.0, 300.0, None),
    ("applied", 0, 30.0, 300.0, None),
    ("refused", 0, 30.0, 300.0, None),  # needs a person, not a faster retry
    ("lock_busy", 4, 30.0, 300.0, None),  # another replica applies: look again at the interval
    ("unreachable", 1, 30.0, 300.0, (30.0, 60.0)),
    ("unreachable", 2, 30.0, 300.0, (60.0, 120.0)),
    ("failed", 3, 30.0, 300.0, (120.0, 240.0)),
    ("failed", 9, 30.0, 300.0, (150.0, 300.0)),
    ("unreachable", 1, 2.0, 300.0, (2.0, 4.0)),  # interval 2: no more 1 s retries
    ("unreachable", 5, 30.0, 10.0, (30.0, 30.0)),  # backoff_max below the interval: the interval
]


@pytest.mark.parametrize(("outcome", "failures", "interval", "cap", "window"), NEXT_DELAYS)
def test_next_delay_table(
    outcome: str, failures: int, interval: float, cap: float, window: tuple[float, float] | None
) -> None:
    settings = DaemonSettings(interval=interval, backoff_max=cap)
    delays = [next_delay(outcome, failures, settings) for _ in range(50)]
    if window is None:
        assert delays == [None] * 50
        return
    low, high = window
    assert all(d is not None and low <= d <= high for d in delays), delays
    assert low == high or len(set(delays)) > 1  # jittered
