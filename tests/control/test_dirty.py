"""A half-applied revision on MariaDB (DDL commits as it goes) is `dirty`: stop, alert once, never
retry, until an operator resolves it. PostgreSQL rolls the same revision back as one transaction.

Real CLI and daemon processes, real databases, a real webhook receiver.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builders import Project, db_heads, flask_project, journal_rows, table_names
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import config, daemon
from tests.system.test_cli_admin import HALF_APPLIED, cli, execute, ok, status
from tests.webhooks import Recorder

pytestmark = pytest.mark.slow  # several CLI processes each (about 10 s a test)

UNSAFE = {"RECONCILER_UNSAFE_DISABLE": "dirty"}
EXISTS = "already exists"


def half_project(tmp_path: Path, url: str) -> Project:
    """r0000 applied; b1 creates table `half`, then fails indexing a column it does not have."""
    project = flask_project(tmp_path / "p", url)
    project.chain(1)
    project.revision("b1", "r0000", upgrade=HALF_APPLIED, message="half applied")
    return project


def outcomes(url: str, revision: str = "b1") -> list[object]:
    return [r["outcome"] for r in journal_rows(url) if r["revision"] == revision]


@pytest.mark.mysql
def test_dirty_on_mariadb_stops_alerts_once_and_resolves(tmp_path: Path, mysql_url: str) -> None:
    project = half_project(tmp_path, mysql_url)
    first = cli(project, "apply")
    assert first.returncode == 1, first.stderr
    assert "half" in table_names(mysql_url) and db_heads(mysql_url) == {"r0000"}  # half-applied
    again = cli(project, "apply")
    assert again.returncode == 6, again.stderr
    assert "resolve b1" in again.stderr and EXISTS not in again.stderr  # refused, not re-run
    data = status(project)
    assert (data["state"], data["dirty"]) == ("dirty", ["b1"])
    assert outcomes(mysql_url) == ["dirty"]

    hooks = Recorder()
    config(project, interval=0.2, sinks=[hooks.url])
    try:
        with daemon(project) as d:
            d.wait_status(lambda s: s["runs"] >= 10, 30, "ten runs")
            wait_until(lambda: hooks.events("dirty"), 10, "the dirty alert")
            assert d.status()["state"] == "dirty" and d.status()["last_outcome"] == "refused"
            assert outcomes(mysql_url) == ["dirty"]  # ten runs, no retry
            (alert,) = hooks.events("dirty")
            assert alert["details"]["dirty"] == ["b1"] and "resolve b1" in alert["message"]

            execute(mysql_url, "DROP TABLE half")  # the operator undoes it by hand ...
            path = next(project.versions.glob("b1_*.py"))  # ... and fixes the revision
            path.write_text(path.read_text().replace('op.create_index("ix_half_code", "half", ["code"])', ""))
            assert "resolved as rolled_back" in ok(project, "resolve", "b1", "--rolled-back").stderr
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after resolve")
            wait_until(
                lambda: [b for b in hooks.events("recovered") if b["details"]["recovered_from"] == "dirty"],
                10,
                "the recovery",
            )
            assert len(hooks.events("dirty")) == 1
        assert db_heads(mysql_url) == {"b1"}
        assert outcomes(mysql_url) == ["resolved_rolled_back", "applied"]
    finally:
        hooks.close()


@pytest.mark.mysql
def test_without_the_dirty_safeguard_mariadb_retries_into_already_exists(
    tmp_path: Path, mysql_url: str
) -> None:
    """Negative control: the half-applied revision is re-run and fails the same way forever."""
    project = half_project(tmp_path, mysql_url)
    assert cli(project, "apply", env=UNSAFE).returncode == 1
    retries = [cli(project, "apply", env=UNSAFE) for _ in range(2)]
    for result in retries:
        assert result.returncode == 1, result.stderr
        assert EXISTS in result.stderr and "half" in result.stderr
    assert "safeguards_disabled" in retries[0].stderr
    assert outcomes(mysql_url) == ["failed", "failed", "failed"]
    assert status(project)["state"] == "behind"  # nobody is told it is half-applied


@pytest.mark.postgres
def test_postgresql_rolls_the_same_revision_back_atomically(tmp_path: Path, pg_url: str) -> None:
    project = half_project(tmp_path, pg_url)
    for _ in range(2):
        result = cli(project, "apply")
        assert result.returncode == 1, result.stderr
        assert EXISTS not in result.stderr
    assert "half" not in table_names(pg_url) and db_heads(pg_url) == {"r0000"}
    assert outcomes(pg_url) == ["failed", "failed"]
    data = status(project)
    assert data["state"] == "behind" and "dirty" not in data["conditions"]
