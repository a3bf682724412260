"""`reconciler apply` end to end: failures, both project layouts, journal, secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.builders import alembic_project, db_heads, flask_project, journal_rows, table_names
from tests.cli import run_cli
from tests.dbs import CANARY_PASSWORD

pytestmark = pytest.mark.core

RAISES = """op.create_table("half", sa.Column("id", sa.Integer, primary_key=True))
raise RuntimeError("boom in revision")"""


def test_failing_revision_leaves_previous_revision(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    project.revision("bad1", "r0001", upgrade=RAISES, message="bad one")
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 1
    assert "bad1" in result.stderr and "boom in revision" in result.stderr
    assert "Traceback" not in result.stderr
    assert db_heads(db_url) == {"r0001"}
    rows = journal_rows(db_url)
    last = rows[-1]
    assert last["revision"] == "bad1" and last["error_class"] == "RuntimeError"
    if db_url.startswith(("postgresql", "sqlite")):
        # One transaction per revision: nothing of the failed one remains.
        assert "half" not in table_names(db_url)
        assert last["outcome"] == "failed"
    else:
        # MariaDB commits DDL as it goes: the revision may be half-applied, so it is dirty and
        # is not retried blindly.
        assert "half" in table_names(db_url)
        assert last["outcome"] == "dirty"
        again = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
        assert again.returncode == 6
        assert "bad1" in again.stderr and "resolve" in again.stderr
        status = run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root)
        data = json.loads(status.stdout)
        assert data["state"] == "dirty" and data["sync_state"] == "behind"


def test_plain_alembic_project_unchanged(tmp_path: Path, db_url: str) -> None:
    project = alembic_project(tmp_path / "p", db_url)
    project.chain(3)
    env_before = (project.migrations / "env.py").read_bytes()
    ini_before = (project.root / "alembic.ini").read_bytes()
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    assert db_heads(db_url) == {"r0002"}
    assert (project.migrations / "env.py").read_bytes() == env_before
    assert (project.root / "alembic.ini").read_bytes() == ini_before


def test_journal_records_each_step(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    revs = project.chain(3)
    assert run_cli(["--config", str(project.config), "apply"], cwd=project.root).returncode == 0
    rows = journal_rows(db_url)
    assert [r["revision"] for r in rows] == revs
    assert all(r["outcome"] == "applied" and r["completed_at"] for r in rows)
    assert [r["down_revisions"] for r in rows] == ["", "r0000", "r0001"]
    assert all(len(str(r["file_hash"])) == 64 and r["host"] and r["tool_version"] for r in rows)
    # The journal lives in a place of its own, out of autogenerate's (and adoption's) sight.
    assert not {"reconciler_journal", "reconciler_journal_flags"} & table_names(db_url)


def test_url_from_environment_and_flags_after_command(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", "sqlite:///ignored.db")
    project.chain(1)
    result = run_cli(
        ["apply", "--migrations", str(project.migrations), "--models", "myapp.models:db"],
        cwd=project.root,
        env={"RECONCILER_URL": sqlite_url, "RECONCILER_CONFIG": str(project.config)},
    )
    assert result.returncode == 0, result.stderr
    assert db_heads(sqlite_url) == {"r0000"}


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_password_never_in_output(tmp_path: Path, kind: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_canary_url" if kind == "postgresql" else "mysql_canary_url")
    assert CANARY_PASSWORD not in url  # it needs escaping: the URL holds the encoded form
    project = flask_project(tmp_path / "p", url)
    project.chain(2)
    project.revision(
        "bad1",
        "r0001",
        upgrade=(
            "u = op.get_bind().engine.url\n"  # SQLAlchemy 1.3's str() shows the password
            'raise RuntimeError("cannot use " + (u.render_as_string(False) '
            'if hasattr(u, "render_as_string") else str(u)))'
        ),
    )
    # run_cli asserts the canary (raw, URL-encoded, double-encoded) is in no output.
    run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root)
    failed = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert failed.returncode == 1
    assert "***" in failed.stderr  # the URL was in the error, masked
    run_cli(["--config", str(project.config), "history"], cwd=project.root)
    run_cli(["--config", str(project.config), "plan", "--sql"], cwd=project.root)
    bad_db = url.rsplit("/", 1)[0] + "/no_such_database"
    result = run_cli(["--url", bad_db, "--config", str(project.config), "status"], cwd=project.root)
    assert result.returncode == 5
    for row in journal_rows(url):
        assert CANARY_PASSWORD not in str(row)


@pytest.mark.postgres
def test_lock_timeout_exit_3_names_the_holder(tmp_path: Path, pg_url: str) -> None:
    import sqlalchemy as sa

    from reconciler.db import locks

    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    project.write_config(extra="[apply]\nlock_acquire_timeout = 1.5\n", models="myapp.models:db")
    database = sa.engine.make_url(pg_url).database or ""
    holder = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with holder.connect() as conn:
        conn.execute(sa.text("SET application_name = 'release-job-7'"))
        lock = locks.AdvisoryLock(conn, locks.lock_key(database, None, "alembic_version"))
        assert lock.try_acquire()
        result = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        lock.release()
    holder.dispose()
    assert result.returncode == 3, result.stderr
    assert "release-job-7" in result.stderr and str(pid) in result.stderr
    assert db_heads(pg_url) == set()
