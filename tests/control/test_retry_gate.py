"""The fleet's retry gate: a failing revision is tried at most once per backoff, fleet-wide.

The failure record (the journal's `failures/<target>` flag) says when the fleet may try the
revision again (`retry_after`, on the database's clock); a daemon tick that holds the lock before
then reports `deferred` and runs nothing. So `blocked_after = N` means N tries at least a backoff
apart, whatever the number of replicas. Real daemons on PostgreSQL; the spacing is read from the
times the database recorded (log events), never from a stopwatch in the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler.config.load import load_settings
from reconciler.control.reconcile import reconcile_once
from reconciler.control.target import open_target, release_target
from reconciler.core import failures
from reconciler.core.backoff import retry_window
from reconciler.db import flags, journal
from tests.builders import Project, flask_project, journal_engine, journal_rows
from tests.cli import run_cli
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import FAILS, Running, daemon

FAILURE = failures.Failure(
    revision="bad",
    file_hash="h1",
    error_class="DataError",
    sqlstate="22012",
    count=2,
    failed_at=1000.0,
    retry_after=1003.0,
)


# failure, pending revisions -> file hash, database clock -> deferred?
GATE_CASES = [
    pytest.param(None, {"bad": "h1"}, 1001.0, False, id="no failure recorded"),
    pytest.param(FAILURE, {"bad": "h1"}, 1001.0, True, id="retry not due yet"),
    pytest.param(FAILURE, {"bad": "h1"}, 1002.999, True, id="a millisecond early"),
    pytest.param(FAILURE, {"bad": "h1"}, 1003.0, False, id="due at retry_after"),
    pytest.param(FAILURE, {"bad": "h1"}, 5000.0, False, id="long due"),
    pytest.param(FAILURE, {"bad": "h2"}, 1001.0, False, id="its file changed: new hash lifts the gate"),
    pytest.param(FAILURE, {"good": "h9"}, 1001.0, False, id="another revision is pending"),
    pytest.param(FAILURE, {"good": "h9", "bad": "h1"}, 1001.0, True, id="the run would reach it"),
    pytest.param(FAILURE, {}, 1001.0, False, id="nothing pending"),
    pytest.param(
        failures.Failure("bad", "h1", "E", "", count=2),
        {"bad": "h1"},
        1001.0,
        False,
        id="an older release's record: no gate",
    ),
]


@pytest.mark.parametrize(("failure", "pending", "now", "deferred"), GATE_CASES)
def test_retry_gate_decision_table(
    failure: failures.Failure | None, pending: dict[str, str], now: float, deferred: bool
) -> None:
    assert failures.retry_deferred(failure, pending, now) is deferred


def test_failure_records_stay_readable_across_releases() -> None:
    old = '{"count": 2, "error_class": "E", "file_hash": "h", "message": "", "revision": "r", "sqlstate": ""}'
    loaded = failures.Failure.loads(old)
    assert loaded is not None and loaded.count == 2 and loaded.retry_after == 0.0
    newer = failures.Failure.loads(old.replace('"count"', '"later_field": 1, "count"'))
    assert newer is not None and newer.count == 2  # a later release's keys are ignored
    assert "retry_after" not in json.loads(failures.Failure("r", "h", "E", "").dumps())  # the old shape


def test_record_failure_sets_retry_after_from_the_database_clock(db_url: str) -> None:
    """On each backend: `failed_at` is the server's clock, `retry_after` is one shared backoff
    later (1-2 intervals, then 2-4 ...), and the blocked record keeps the old shape."""
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    jt = journal.tables("reconciler_journal")
    failure = failures.Failure(revision="bad", file_hash="h1", error_class="DataError", sqlstate="22012")
    try:
        with engine.connect() as conn:
            journal.ensure(conn, jt)
            before = flags.db_time(conn)
            counted = [
                flags.record_failure(conn, jt, "app", failure, 3, retry_base=10.0, retry_cap=25.0)
                for _ in range(3)
            ]
            after = flags.db_time(conn)
            found = flags.read(conn, jt, [flags.failures_key("app"), flags.blocked_key("app")])
    finally:
        engine.dispose()
    assert [c.count for c in counted] == [1, 2, 3]
    for c in counted:
        low, high = retry_window(c.count, 10.0, 25.0)
        assert before - 0.01 <= c.failed_at <= after + 0.01
        assert low <= c.retry_after - c.failed_at <= high
    stored = failures.Failure.loads(found[flags.failures_key("app")])
    assert stored is not None and stored.retry_after == pytest.approx(counted[-1].retry_after)
    blocked = json.loads(found[flags.blocked_key("app")])
    assert blocked["count"] == 3 and "retry_after" not in blocked and "failed_at" not in blocked


# --- real daemons ------------------------------------------------------------------------------
def gate_config(project: Project, interval: float, backoff_max: float, blocked_after: int) -> None:
    project.write_config(
        extra=f"[daemon]\ninterval = {interval}\njitter = 0\ndebounce = 0.1\n"
        f"backoff_max = {backoff_max}\nblocked_after = {blocked_after}\n",
        models="myapp.models:db",
    )


def events(stderr: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def fleet_events(replicas: list[Running], name: str) -> list[dict[str, Any]]:
    return [e for d in replicas for e in events(d.stderr, name) if e.get("revision") == "bad"]


def fleet_of_five(tmp_path: Path, pg_url: str, env: dict[str, str] | None = None) -> list[Running]:
    """Five in-sync replicas at interval 1 s, then a revision that always fails appears for all
    of them at once (the watcher triggers every replica: each would try it); stopped once every
    replica reports it blocked."""
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    gate_config(project, interval=1.0, backoff_max=16, blocked_after=3)
    replicas = [Running(project, env) for _ in range(5)]
    try:
        for d in replicas:
            d.wait_status(lambda s: s.get("state") == "in_sync", 60, "in sync")
        project.revision("bad", "r0000", upgrade=FAILS)
        for d in replicas:
            d.wait_status(lambda s: "blocked" in s.get("conditions", []), 90, "blocked everywhere")
    finally:
        for d in replicas:
            d.stop()
    return replicas


def failed_tries(url: str) -> list[dict[str, object]]:
    return [r for r in journal_rows(url) if r["revision"] == "bad"]


def counted_failures(replicas: list[Running]) -> list[dict[str, Any]]:
    return sorted(fleet_events(replicas, "revision_failure_counted"), key=lambda e: e["failures"])


@pytest.mark.slow
def test_a_fleet_tries_a_failing_revision_once_per_backoff(tmp_path: Path, pg_url: str) -> None:
    replicas = fleet_of_five(tmp_path, pg_url)
    counted = counted_failures(replicas)
    # Run exactly as often as counted, and blocked after blocked_after tries, not before.
    assert [e["failures"] for e in counted] == [1, 2, 3]
    assert len(failed_tries(pg_url)) == 3
    # Each try after the first began (database clock) no sooner than the recorded retry_after,
    # so consecutive fleet-wide failures are at least one backoff apart.
    due = sorted(fleet_events(replicas, "retry_due"), key=lambda e: e["failures"])
    assert [e["failures"] for e in due] == [1, 2]
    assert all(e["db_time"] >= e["retry_after"] for e in due), due
    for earlier, later, started in zip(counted, counted[1:], due):
        assert started["retry_after"] == earlier["retry_after"]
        assert later["failed_at"] >= earlier["retry_after"] > earlier["failed_at"], counted
    # The fleet was held back meanwhile: replicas deferred, each deferral before retry_after.
    deferred = fleet_events(replicas, "retry_deferred")
    assert deferred, "no replica was deferred"
    assert all(e["db_time"] < e["retry_after"] for e in deferred), deferred


@pytest.mark.slow
def test_negative_control_without_the_gate_the_fleet_blocks_within_one_backoff(
    tmp_path: Path, pg_url: str
) -> None:
    """RECONCILER_UNSAFE_DISABLE=retry_gate: each replica tries once, so the revision is blocked
    after tries closer together than the backoff the failure record asked for."""
    replicas = fleet_of_five(tmp_path, pg_url, {"RECONCILER_UNSAFE_DISABLE": "retry_gate"})
    counted = counted_failures(replicas)
    assert [e["failures"] for e in counted] == [1, 2, 3]
    assert not fleet_events(replicas, "retry_deferred")
    early = [
        later for earlier, later in zip(counted, counted[1:]) if later["failed_at"] < earlier["retry_after"]
    ]
    assert early, counted


@pytest.mark.slow
def test_daemon_defers_a_recent_failure_a_person_runs_it_a_file_change_lifts_it(
    tmp_path: Path, pg_url: str
) -> None:
    """A person's failed `apply` records retry_after an interval (30 s) ahead: the daemon's
    first tick defers (status behind, the failure visible, nothing counted), a person's second
    `apply` runs it anyway, and a change of the file lets the daemon try it at once."""
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    bad = project.revision("bad", "r0000", upgrade=FAILS)
    gate_config(project, interval=30, backoff_max=300, blocked_after=3)
    first = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert first.returncode == 1, first.stderr[-2000:]
    with daemon(project) as d:
        status = d.wait_status(lambda s: s.get("last_outcome") == "deferred", 30, "a deferred run")
        assert status["sync_state"] == "behind" and "bad" in status["pending"]
        assert "retries it no sooner than" in status["last_error"]
        assert status["consecutive_failures"] == 0
        assert len(failed_tries(pg_url)) == 1
        # A person asked: the gate does not apply to `reconciler apply`.
        again = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
        assert again.returncode == 1 and "bad" in again.stderr
        assert len(failed_tries(pg_url)) == 2
        # A new file hash lifts the gate (still failing: a third try, by the daemon, at once).
        bad.write_text(bad.read_text().replace("1/0", "2/0"))
        wait_until(lambda: len(failed_tries(pg_url)) == 3, 30, "the daemon tried the changed file")
    assert events(d.stderr, "retry_deferred")


# --- a block is lifted by a changed file only --------------------------------------------------
def two_checkouts(tmp_path: Path, pg_url: str) -> tuple[Project, Project, Path]:
    """Checkout `ahead` has revision `bad` (blocked after two tries); checkout `behind` is the
    same repository one commit earlier: a replica whose watcher has not seen the file yet, or one
    still on the previous release during a rolling deploy."""
    ahead, behind = flask_project(tmp_path / "ahead", pg_url), flask_project(tmp_path / "behind", pg_url)
    for project in (ahead, behind):
        project.chain(1)
        gate_config(project, interval=30, backoff_max=300, blocked_after=2)
    bad = ahead.revision("bad", "r0000", upgrade=FAILS)
    for _ in range(2):
        failed = run_cli(["--config", str(ahead.config), "apply"], cwd=ahead.root)
        assert failed.returncode == 1, failed.stderr[-2000:]
    assert "blocked" in cli_status(ahead)["conditions"]
    return ahead, behind, bad


def cli_status(project: Project) -> dict[str, Any]:
    result = run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root)
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def stored_block(pg_url: str) -> dict[str, str]:
    engine, schema = journal_engine(pg_url, "reconciler_journal")
    table = f"{schema}.reconciler_journal_flags" if schema else "reconciler_journal_flags"
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT key, value FROM {table}")).all()
    finally:
        engine.dispose()
    return {key.partition("/")[0]: value for key, value in rows if key.startswith(("blocked/", "failures/"))}


def run_under_the_lock(project: Project) -> str:
    """One run of `project`'s checkout that goes straight to the lock and decides on the
    re-read under it: a replica whose first look found work (here, before `bad` was blocked)
    and then waited for the lock while other replicas tried `bad`."""
    handle = open_target(load_settings(str(project.config), cwd=project.root))
    try:
        return reconcile_once(handle, look_first=False, lock_timeout=10.0).outcome
    finally:
        release_target(handle)


def test_a_checkout_without_the_revision_does_not_lift_its_block(tmp_path: Path, pg_url: str) -> None:
    """A revision missing from a replica's checkout is not a changed file: that replica's runs
    leave the fleet's block and failure count as they are (the flake this came from: a replica
    whose graph predated `bad` took the lock after `bad` was blocked and lifted the block; `bad`
    failed twice more and the fleet got a `recovered`, then a second `blocked` alert)."""
    ahead, behind, _bad = two_checkouts(tmp_path, pg_url)
    before = stored_block(pg_url)
    assert json.loads(before["blocked"])["revision"] == "bad"
    assert run_under_the_lock(behind) == "noop"
    assert stored_block(pg_url) == before
    assert "blocked" in cli_status(ahead)["conditions"]
    refused = run_cli(["--config", str(ahead.config), "apply"], cwd=ahead.root)
    assert refused.returncode != 0 and len(failed_tries(pg_url)) == 2  # not tried a third time


def test_control_a_checkout_with_the_file_changed_lifts_the_block(tmp_path: Path, pg_url: str) -> None:
    """The same run from a checkout where `bad` is fixed lifts the block, and applies it."""
    _ahead, behind, bad = two_checkouts(tmp_path, pg_url)
    fixed = bad.read_text().replace(FAILS, 'op.execute("SELECT 1")')
    (behind.versions / bad.name).write_text(fixed)
    assert run_under_the_lock(behind) == "applied"
    assert "blocked" not in stored_block(pg_url)
    assert "blocked" not in cli_status(behind)["conditions"]
