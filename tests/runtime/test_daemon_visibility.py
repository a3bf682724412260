"""What a prod daemon shows while it cannot decide or is busy: an unreadable revision file, a long
apply, alert deliveries that fail. Real daemon processes, real local webhook servers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.builders import create_table, db_heads, flask_project
from tests.cli import run_cli
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import Running, config, daemon
from tests.webhooks import Recorder

pytestmark = pytest.mark.slow
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

RAISES = 'raise RuntimeError("boom")'
BROKEN = "revision = 'broken'\ndown_revision = 'r0001'\n\n\ndef upgrade(:\n    pass\n"  # line 5


def metric(d: Running, name: str, **labels: str) -> float | None:
    """The value of one sample of /metrics (None when the series is not there)."""
    code, body = d.get("/metrics")
    assert code == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def keys_of(status: dict[str, Any]) -> frozenset[str]:
    assert status, "no /status document"
    return frozenset(status)


def test_a_revision_file_that_does_not_parse_alerts_counts_a_failure_and_recovers(
    tmp_path: Path, sqlite_url: str
) -> None:
    hooks = Recorder()
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    config(project, interval=0.3, sinks=[hooks.url])
    try:
        with daemon(project) as d:
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
            broken = project.versions / "broken.py"
            broken.write_text(BROKEN, encoding="utf-8")
            status = d.wait_status(lambda s: s["state"] == "revision_unreadable", 30, "the broken file")
            assert status["revision_unreadable"]["path"].endswith("broken.py")
            assert status["revision_unreadable"]["line"] == 5
            assert status["conditions"] == ["revision_unreadable"] and status["last_outcome"] == "failed"
            d.wait_status(lambda s: s["consecutive_failures"] >= 2, 30, "failures counted")
            (alert,) = wait_until(lambda: hooks.events("revision_unreadable"), 30, "the alert")
            assert "broken.py" in alert["message"] and "line 5" in alert["message"]
            assert alert["details"]["unreadable"].endswith("broken.py:5")
            assert metric(d, "reconciler_state", state="revision_unreadable") == 1.0
            assert (metric(d, "reconciler_runs_total", outcome="failed") or 0) >= 2
            assert (metric(d, "reconciler_consecutive_failures") or 0) >= 2
            # Readiness is the pod's (docs/production.md): a broken file does not take the app out.
            assert d.get("/readyz")[0] == 200

            broken.write_text(BROKEN.replace("def upgrade(:", "def upgrade():"), encoding="utf-8")
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after the fix")
            (recovered,) = wait_until(lambda: hooks.events("recovered"), 30, "the recovery")
            assert recovered["details"]["recovered_from"] == "revision_unreadable"
            assert d.status()["consecutive_failures"] == 0
            assert len(hooks.events("revision_unreadable")) == 1 and not hooks.events("failed")
        assert db_heads(sqlite_url) == {"broken"}
    finally:
        hooks.close()


def test_status_has_the_same_keys_in_every_state(tmp_path: Path, sqlite_url: str) -> None:
    """A dashboard or `jq` never meets a missing key: in_sync, suspended, failed, an unreadable
    file, behind (an observer), unknown (a database that cannot be reached) all list them all."""
    seen: dict[str, frozenset[str]] = {}
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    config(project, interval=0.3, extra="blocked_after = 100")
    cfg = ["--config", str(project.config)]
    with daemon(project) as d:
        seen["in_sync"] = keys_of(d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync"))
        assert run_cli([*cfg, "suspend", "--reason", "test"], cwd=project.root).returncode == 0
        project.revision("later", "r0000", upgrade=create_table("t_later"))
        seen["suspended"] = keys_of(d.wait_status(lambda s: s["state"] == "suspended", 30, "suspended"))
        assert run_cli([*cfg, "resume"], cwd=project.root).returncode == 0
        d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after resume")
        bad = project.revision("bad", "later", upgrade=RAISES)
        seen["failed"] = keys_of(d.wait_status(lambda s: s["last_outcome"] == "failed", 30, "failed"))
        bad.write_text("revision = 'bad'\ndown_revision = 'later'\nx = (\n", encoding="utf-8")
        seen["revision_unreadable"] = keys_of(
            d.wait_status(lambda s: "syntax error" in (s["last_error"] or ""), 30, "unreadable")
        )

    observer = flask_project(tmp_path / "o", sqlite_url)  # the same database, a newer repository
    observer.chain(1)
    observer.revision("later", "r0000", upgrade=create_table("t_later"))
    observer.revision("newer", "later", upgrade=create_table("t_newer"))
    config(observer, interval=0.3, extra="apply = false")
    with daemon(observer) as d:
        seen["behind"] = keys_of(d.wait_status(lambda s: s["state"] == "behind", 30, "behind"))

    nowhere = flask_project(tmp_path / "n", f"sqlite:///{tmp_path}/no/such/dir/app.db")
    nowhere.chain(1)
    config(nowhere, interval=0.3)
    with daemon(nowhere) as d:
        seen["unknown"] = keys_of(d.wait_status(lambda s: s["state"] == "unknown", 30, "unknown"))

    expected = seen["in_sync"]
    assert {"state", "conditions", "db_heads", "repo_heads", "pending", "applying"} <= expected
    assert {state: keys for state, keys in seen.items() if keys != expected} == {}
    assert len(seen) == 6


def gated(gate: Path) -> str:
    """An upgrade() that, when really applied (not when the guard records it as SQL), waits for
    `gate` to exist: a condition the test controls, bounded."""
    return (
        "import os, time\n"
        "deadline = time.monotonic() + 120\n"
        f"while not op.get_context().as_sql and not os.path.exists({str(gate)!r}) "
        "and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n" + create_table("t_gate")
    )


def log_events(stderr: str, name: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == name:
            out.append(event)
    return out


def test_a_long_first_apply_shows_its_progress_in_status_metrics_and_wait(
    tmp_path: Path, sqlite_url: str
) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(3)
    gate = tmp_path / "gate"
    project.revision("gate", "r0002", upgrade=gated(gate))
    project.revision("after1", "gate", upgrade=create_table("t_after1"))
    project.revision("after2", "after1", upgrade=create_table("t_after2"))
    config(project, interval=60)
    d = Running(project)
    try:
        status = d.wait_status(lambda s: (s["applying"] or {}).get("revision") == "gate", 60, "at gate")
        assert status["runs"] == 0  # the first run is still going
        assert (status["state"], status["sync_state"]) == ("behind", "behind")
        assert status["pending"] == ["gate", "after1", "after2"]
        applying = status["applying"]
        assert (applying["n"], applying["total"]) == (4, 6)
        assert ISO_UTC.match(applying["started_at"]) and ISO_UTC.match(applying["run_started_at"])
        assert "gate" in status["message"] and "4 of 6" in status["message"]
        assert metric(d, "reconciler_applying") == 1.0
        assert metric(d, "reconciler_applying_revision_number") == 4.0
        assert metric(d, "reconciler_applying_revisions") == 6.0
        assert metric(d, "reconciler_state", state="behind") == 1.0
        assert metric(d, "reconciler_pending_revisions") == 3.0

        # `wait` in another process (an init container) says what is being applied, n of N
        waited = run_cli(
            ["--config", str(project.config), "wait", "--timeout", "1", "--interval", "0.1"],
            cwd=project.root,
        )
        assert waited.returncode == 8, waited.stderr[-2000:]
        (said,) = log_events(waited.stderr, "apply_progress")
        assert (said["revision"], said["n"], said["total"]) == ("gate", 4, 6)
        assert ISO_UTC.match(said["started_at"]) and said["pending"] == 3

        gate.touch()
        done = d.wait_status(lambda s: s["runs"] >= 1, 60, "the first run's end")
        assert done["state"] == "in_sync" and done["applying"] is None and done["pending"] == []
        assert metric(d, "reconciler_applying") == 0.0
        assert metric(d, "reconciler_state", state="in_sync") == 1.0
        waited = run_cli(["--config", str(project.config), "wait", "--timeout", "30"], cwd=project.root)
        assert waited.returncode == 0 and not log_events(waited.stderr, "apply_progress")
    finally:
        gate.touch()
        d.stop()
    assert db_heads(sqlite_url) == {"after2"}


def test_failed_and_dropped_alert_deliveries_are_counted_in_the_metrics(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A sink answering 500 counts `failed`; a hung sink's full queue counts `dropped`; both
    series exist at 0 before anything happened."""
    failing, hung = Recorder(status=500), Recorder(hang=True)
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    config(
        project,
        interval=0.3,
        sinks=[failing.url, hung.url],
        extra="blocked_after = 2",
        alerting="send_timeout = 60\nretries = 2\nqueue_size = 1",
    )
    try:
        with daemon(project) as d:
            for sink in ("webhook1", "webhook2"):
                for name in ("reconciler_alerts_failed_total", "reconciler_alerts_dropped_total"):
                    assert metric(d, name, event="failed", sink=sink) == 0.0, (name, sink)
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
            bad = project.revision("bad", "r0000", upgrade=RAISES)
            d.wait_status(lambda s: "blocked" in s["conditions"], 60, "blocked")
            wait_until(lambda: len(hung.bodies) >= 1, 30, "the hung sink's first delivery")
            bad.write_text(bad.read_text().replace(RAISES, create_table("t_fixed")), encoding="utf-8")
            d.wait_status(lambda s: s["state"] == "in_sync", 60, "in sync after the fix")
            # failed, blocked, applied, recovered x2 reached the hung sink's queue of one: all
            # but the one in flight and the last queued were pushed out
            wait_until(
                lambda: (
                    (metric(d, "reconciler_alerts_dropped_total", sink="webhook2", event="blocked") or 0) >= 1
                ),
                30,
                "the blocked alert dropped from the hung sink's queue",
            )
            wait_until(
                lambda: (
                    (metric(d, "reconciler_alerts_failed_total", sink="webhook1", event="failed") or 0) >= 1
                ),
                30,
                "the failed alert counted failed at the 500 sink",
            )
            assert len(hung.bodies) == 1  # still in flight: the drops are not delivery failures
            assert metric(d, "reconciler_alerts_failed_total", sink="webhook2", event="failed") == 0.0
            assert metric(d, "reconciler_alerts_total", sink="webhook1", event="failed") == 0.0
            assert len(failing.events("failed")) == 2  # both attempts were made, and answered 500
    finally:
        failing.close()
        hung.close()


def test_a_revision_whose_parent_never_arrives_is_unreadable_after_the_debounce(
    tmp_path: Path, sqlite_url: str
) -> None:
    """One debounce window for a half-synced checkout, then the same counted failure and alert as
    a file that does not parse (it went quiet as `refused`, state unknown, before)."""
    hooks = Recorder()
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    config(project, interval=0.3, sinks=[hooks.url])
    try:
        with daemon(project) as d:
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
            orphan = project.revision("orphan", "nope", upgrade=create_table("t_orphan"))
            status = d.wait_status(lambda s: s["state"] == "revision_unreadable", 30, "the orphan")
            assert status["revision_unreadable"]["path"].endswith(orphan.name)
            assert "nope" in status["message"] and status["consecutive_failures"] >= 1
            (alert,) = wait_until(lambda: hooks.events("revision_unreadable"), 30, "the alert")
            assert orphan.name in alert["message"]
            orphan.unlink()
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync without it")
            wait_until(lambda: hooks.events("recovered"), 30, "the recovery")
    finally:
        hooks.close()
