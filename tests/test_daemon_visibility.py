"""What a prod daemon shows while it cannot decide or is busy: an unreadable revision file, a long
apply, alert deliveries that fail. Real daemon processes, real local webhook servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.builders import create_table, db_heads, flask_project
from tests.cli import run_cli
from tests.pgcluster import wait_until
from tests.test_daemon import Running, config, daemon
from tests.webhooks import Recorder

pytestmark = pytest.mark.slow

RAISES = 'raise RuntimeError("boom")'
BROKEN = "revision = 'broken'\ndown_revision = 'r0001'\n\n\ndef upgrade(:\n    pass\n"  # line 5


def metric(d: Running, name: str, **labels: str) -> float | None:
    """The value of one sample of /metrics (None when the series is not there)."""
    from prometheus_client.parser import text_string_to_metric_families

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
