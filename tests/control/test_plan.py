"""A plan of revisions in one run of env.py: still one transaction, one journal step and one chance
to stop per revision; an env.py with its own transaction gets one revision per run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.builders import Project, create_table, db_heads, flask_project, journal_rows
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import Running, config
from tests.system.test_cli_admin import cli, ok

# prepended to env.py: each run of it adds a line to runs.txt beside it
COUNT_RUNS = """import pathlib as _pathlib
with open(_pathlib.Path(__file__).with_name("runs.txt"), "a") as _runs:
    _runs.write("run\\n")
"""
# env.py's own transaction around run_migrations: nothing commits before env.py ends
OWN_TRANSACTION = (
    "    with connectable.connect() as connection:\n",
    "    with connectable.connect() as connection, connection.begin():\n",
)
FAILS = 'op.execute("SELECT * FROM no_such_table")'


def counted(project: Project, own_transaction: bool = False) -> Path:
    env_py = project.migrations / "env.py"
    text = env_py.read_text()
    if own_transaction:
        assert OWN_TRANSACTION[0] in text
        text = text.replace(*OWN_TRANSACTION)
    env_py.write_text(COUNT_RUNS + text)
    return project.migrations / "runs.txt"


def runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def outcomes(url: str) -> list[tuple[object, object]]:
    return [(r["revision"], r["outcome"]) for r in journal_rows(url) if r["operation"] == "upgrade"]


def test_a_plan_is_one_run_of_env_py_with_one_journal_step_per_revision(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    revisions = project.chain(5)
    counter = counted(project)
    ok(project, "apply")
    assert db_heads(db_url) == {"r0004"}
    assert runs(counter) == 2, "one probe and one run for the whole plan"
    rows = [r for r in journal_rows(db_url) if r["operation"] == "upgrade"]
    assert [(r["revision"], r["outcome"]) for r in rows] == [(rev, "applied") for rev in revisions]
    for row in rows:
        assert row["completed_at"] is not None and row["started_at"] <= row["completed_at"]
        assert row["duration_ms"] is not None and row["file_hash"]


def test_a_revision_failing_mid_plan_leaves_the_ones_before_it_committed(tmp_path: Path, db_url: str) -> None:
    """One transaction per revision: the failing third is rolled back, the first two stay."""
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    project.revision("bad", "r0001", upgrade=FAILS)
    project.revision("after", "bad", upgrade=create_table("t_after"))
    failed = cli(project, "apply")
    assert failed.returncode == 1, failed.stderr
    assert db_heads(db_url) == {"r0001"}
    assert outcomes(db_url) == [("r0000", "applied"), ("r0001", "applied"), ("bad", "failed")]


def test_env_py_with_its_own_transaction_gets_one_revision_per_run(tmp_path: Path, db_url: str) -> None:
    """Its revisions commit only when env.py ends: each run applies one, so a step journaled
    `applied` is committed even when a later one fails."""
    project = flask_project(tmp_path / "p", db_url)
    project.chain(3)
    project.revision("bad", "r0002", upgrade=FAILS)
    counter = counted(project, own_transaction=True)
    failed = cli(project, "apply")
    assert failed.returncode == 1, failed.stderr
    assert db_heads(db_url) == {"r0002"}
    assert outcomes(db_url) == [
        ("r0000", "applied"),
        ("r0001", "applied"),
        ("r0002", "applied"),
        ("bad", "failed"),
    ]
    assert runs(counter) == 1 + 4, "a probe, then one run per revision"


SLOW = 'op.execute("SELECT pg_sleep(3)")\n' + create_table("t_slow")


@pytest.mark.postgres
def test_sigterm_during_a_plan_stops_it_between_two_revisions(tmp_path: Path, pg_url: str) -> None:
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    project.revision("slow", "r0000", upgrade=SLOW)
    project.revision("after1", "slow", upgrade=create_table("t_after1"))
    project.revision("after2", "after1", upgrade=create_table("t_after2"))
    config(project, interval=60, extra="grace = 20")
    d = Running(project)  # its first run applies the four in one plan
    try:
        wait_until(lambda: any(r["revision"] == "slow" for r in journal_rows(pg_url)), 60, "slow started")
    finally:
        code = d.stop(signal.SIGTERM)
    assert code == 0, d.stderr[-3000:]
    assert db_heads(pg_url) == {"slow"}, "the running revision finished, the next ones did not start"
    assert outcomes(pg_url)[-1] == ("slow", "applied")
    assert "apply_stopped" in d.stderr
