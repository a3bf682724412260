"""The journal command, checksums of applied revisions (and `accept`), and foreign writers:
the real CLI in its own process, real databases, real revision files, real alembic runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.project.revisions import parse_revision_file
from tests.builders import Project, alembic_project, create_table, db_heads, flask_project, journal_rows
from tests.cli import cli_env, run_cli, start_cli
from tests.pgcluster import wait_until

UNSAFE = "RECONCILER_UNSAFE_DISABLE"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def cli(project: Project, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(project.config), *args], cwd=project.root, env=env)


def ok(project: Project, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = cli(project, *args, env=env)
    assert result.returncode == 0, result.stderr
    return result


def status(project: Project) -> dict[str, Any]:
    return dict(json.loads(ok(project, "status", "--json").stdout))


def steps(project: Project, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(ok(project, "journal", "--json", *args).stdout))


def file_of(project: Project, rev: str) -> Path:
    return next(project.versions.glob(f"{rev}_*.py"))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, (old, text)
    path.write_text(text.replace(old, new), encoding="utf-8")


def alembic_upgrade(project: Project) -> None:
    """What an app that migrates itself at start-up does: plain Alembic, no reconciler."""
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", "alembic.ini", "upgrade", "heads"],
        cwd=project.root,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- journal


@pytest.mark.slow
def test_journal_shows_every_field_as_a_table_and_as_json(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    ok(project, "apply")
    project.revision("bad", "r0001", upgrade='op.execute("SELECT * FROM no_such_table")')
    assert cli(project, "apply").returncode == 1

    rows = steps(project)
    upgrades = [r for r in rows if r["operation"] == "upgrade"]
    done = [(r["revision"], r["outcome"]) for r in upgrades[:2]]
    assert done == [("r0000", "applied"), ("r0001", "applied")]
    for row in upgrades[:2]:
        assert HEX64.match(row["file_hash"])
        assert ISO.match(row["started_at"]) and ISO.match(row["completed_at"])
        assert isinstance(row["duration_ms"], int) and row["duration_ms"] >= 0
        assert row["host"] and row["tool_version"] and row["trigger"] == "apply"
        assert row["target"] and row["error"] is None
    failed = upgrades[-1]
    assert failed["revision"] == "bad" and failed["outcome"] in ("failed", "dirty")  # MariaDB: dirty
    assert failed["error_class"] and "no_such_table" in failed["error"]
    assert isinstance(failed["duration_ms"], int) and failed["completed_at"]
    assert upgrades[1]["down_revisions"] == "r0000"

    assert [r["revision"] for r in steps(project, "--revision", "r0000")] == ["r0000"]
    assert [r["revision"] for r in steps(project, "--limit", "1")] == ["bad"]

    text = ok(project, "journal").stdout.splitlines()
    assert text[0].split()[:5] == ["id", "started_at", "operation", "revision", "outcome"]
    assert any("r0001" in line and "applied" in line for line in text[1:])
    assert any("bad" in line and "no_such_table" in line for line in text[1:])


def test_journal_on_a_database_without_journal_says_so(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    assert steps(project) == []
    assert "no steps" in ok(project, "journal").stderr
    bad = cli(project, "journal", "--limit", "0")
    assert bad.returncode == 2 and "--limit 0" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- checksums

REFORMATTED_HEAD = "# reformatted by a formatter; comments are not code\n"


def reformat(path: Path) -> None:
    """What a formatter and a Windows checkout do: quotes, indentation, comments, CRLF."""
    text = path.read_text(encoding="utf-8")
    text = text.replace('op.create_table("', "op.create_table('")
    text = text.replace('", sa.Column("id"', "', sa.Column('id'")
    text = text.replace("\n    ", "\n        ")  # function bodies re-indented
    text = REFORMATTED_HEAD + text.replace("def upgrade():", "def upgrade():  # noqa")
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))


def test_crlf_and_reformatting_do_not_alarm(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    ok(project, "apply")
    path = file_of(project, "r0000")
    before = parse_revision_file(path)
    reformat(path)
    assert b"\r\n" in path.read_bytes() and b"'t_r0'" in path.read_bytes()
    after = parse_revision_file(path)
    assert before and after and before.file_hash == after.file_hash

    data = status(project)
    assert (data["state"], data["conditions"]) == ("in_sync", [])
    project.chain(1, prefix="s", start_down="r0001")
    ok(project, "apply")
    assert db_heads(sqlite_url) == {"s0000"}


@pytest.mark.slow
def test_a_changed_applied_revision_stops_applying_until_accepted(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    ok(project, "apply")
    path = file_of(project, "r0001")
    edit(path, 'create_table("t_r1"', 'create_table("t_changed"')
    project.chain(1, prefix="s", start_down="r0001")

    data = status(project)
    assert data["state"] == "checksum_mismatch" and data["sync_state"] == "behind"
    [mismatch] = data["checksum_mismatch"]
    assert mismatch["revision"] == "r0001" and mismatch["file"] == str(path)
    assert HEX64.match(mismatch["recorded_hash"]) and HEX64.match(mismatch["current_hash"])
    assert mismatch["recorded_hash"] != mismatch["current_hash"]
    assert path.name in data["message"] and mismatch["current_hash"][:12] in data["message"]

    refused = cli(project, "apply")
    assert refused.returncode == 6, refused.stderr
    assert path.name in refused.stderr and "accept" in refused.stderr and "Traceback" not in refused.stderr
    assert db_heads(db_url) == {"r0001"}

    wrong = cli(project, "accept", "r0000")
    assert wrong.returncode == 4 and "r0000 has no checksum mismatch" in wrong.stderr
    assert "accepted r0001" in ok(project, "accept", "r0001").stderr
    ok(project, "apply")
    assert db_heads(db_url) == {"s0000"}
    accepted = [r for r in steps(project, "--revision", "r0001") if r["operation"] == "accept"]
    assert [(r["outcome"], r["file_hash"]) for r in accepted] == [("accepted", mismatch["current_hash"])]


@pytest.mark.slow
def test_negative_control_without_checksums_a_change_goes_unnoticed(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    ok(project, "apply")
    edit(file_of(project, "r0001"), 'create_table("t_r1"', 'create_table("t_changed"')
    project.chain(1, prefix="s", start_down="r0001")
    unsafe = {UNSAFE: "checksums"}
    result = ok(project, "apply", env=unsafe)
    assert "safeguards_disabled" in result.stderr
    assert db_heads(sqlite_url) == {"s0000"}  # applied on top of a revision that no longer says what ran
    data = json.loads(ok(project, "status", "--json", env=unsafe).stdout)
    assert data["state"] == "in_sync" and data["conditions"] == []


@pytest.mark.slow
def test_a_vanished_revision_is_a_mismatch_but_a_newer_one_is_ahead(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(3)
    ok(project, "apply")
    # History rewritten: r0001's file removed and r0002 re-pointed at r0000.
    file_of(project, "r0001").unlink()
    edit(file_of(project, "r0002"), "down_revision = 'r0001'", "down_revision = 'r0000'")
    data = status(project)
    assert data["state"] == "checksum_mismatch"
    found = {m["revision"]: m for m in data["checksum_mismatch"]}
    assert set(found) == {"r0001", "r0002"}
    assert found["r0001"]["vanished"] is True and found["r0001"]["file"] == ""
    assert found["r0002"]["vanished"] is False
    assert cli(project, "apply").returncode == 6
    assert "accepted r0002, r0001" in ok(project, "accept", "--all").stderr
    data = status(project)
    assert (data["state"], data["conditions"]) == ("in_sync", [])

    # A head whose file is gone is an old checkout or an app rollback: `ahead`, never a mismatch.
    project.chain(1, prefix="s", start_down="r0002")
    ok(project, "apply")
    file_of(project, "s0000").unlink()
    data = status(project)
    assert (data["state"], data["conditions"]) == ("ahead", [])


@pytest.mark.slow
def test_accept_needs_a_revision_or_all(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    ok(project, "apply")
    for args in ([], ["r0000", "--all"]):
        result = cli(project, "accept", *args)
        assert result.returncode == 2 and "--all" in result.stderr and "Traceback" not in result.stderr
    assert "nothing to accept" in ok(project, "accept", "--all").stderr


@pytest.mark.slow
def test_a_draft_is_exempt_until_sealed(tmp_path: Path, sqlite_url: str) -> None:
    from reconciler.config.load import load_settings
    from reconciler.control.reconcile import reconcile_once
    from reconciler.control.target import open_target, release_target

    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    project.revision("d1", "r0000", upgrade=create_table("t_d1"), extra="draft = True")
    handle = open_target(load_settings(str(project.config), environ={}))
    try:
        reconcile_once(handle, trigger="draft")  # as dev mode applies its draft
    finally:
        release_target(handle)
    edit(file_of(project, "d1"), 'create_table("t_d1"', 'create_table("t_d1_renamed"')
    assert status(project)["conditions"] == []  # drafts change on every save

    ok(project, "seal", "-m", "add d1")
    ok(project, "apply")  # records the sealed file's hash
    sealed = [r for r in steps(project, "--revision", "d1") if r["operation"] == "record"]
    assert [r["trigger"] for r in sealed] == ["seal"]
    assert status(project)["conditions"] == []
    edit(file_of(project, "d1"), 'create_table("t_d1_renamed"', 'create_table("t_d1_again"')
    assert status(project)["state"] == "checksum_mismatch"  # sealed: no longer exempt


# --------------------------------------------------------------------------- first sight, foreign


@pytest.mark.slow
def test_revisions_applied_before_the_journal_are_recorded_on_sight(tmp_path: Path, db_url: str) -> None:
    project = alembic_project(tmp_path / "p", db_url)
    project.chain(2)
    alembic_upgrade(project)  # before the reconciler was installed
    data = status(project)
    assert data["state"] == "in_sync" and "foreign_writes" not in data

    result = ok(project, "apply")
    assert "checksum_recorded_first_sight" in result.stderr and "foreign_writer" not in result.stderr
    recorded = [(r["revision"], r["operation"], r["trigger"]) for r in journal_rows(db_url)]
    assert recorded == [("r0000", "record", "first_sight"), ("r0001", "record", "first_sight")]
    assert "checksum_recorded_first_sight" not in ok(project, "apply").stderr  # once

    edit(file_of(project, "r0000"), 'create_table("t_r0"', 'create_table("t_other"')
    assert status(project)["state"] == "checksum_mismatch"  # the first-sight hash is the reference


@pytest.mark.slow
def test_an_upgrade_behind_our_back_is_a_foreign_writer(tmp_path: Path, db_url: str) -> None:
    project = alembic_project(tmp_path / "p", db_url)
    project.chain(2)
    ok(project, "apply")
    project.chain(1, prefix="s", start_down="r0001")
    alembic_upgrade(project)  # the app's own start-up upgrade
    data = status(project)
    assert (data["state"], data["foreign_writes"]) == ("in_sync", ["s0000"])

    result = ok(project, "apply")
    assert "foreign_writer" in result.stderr and "s0000" in result.stderr
    rows = [r for r in journal_rows(db_url) if r["revision"] == "s0000"]
    assert [(r["operation"], r["trigger"]) for r in rows] == [("record", "foreign")]
    assert "foreign_writes" not in status(project)
    assert "foreign_writer" not in ok(project, "apply").stderr  # said once


@pytest.mark.slow
def test_a_stamp_records_the_revisions_below_it_as_ours(tmp_path: Path, sqlite_url: str) -> None:
    import sqlalchemy as sa

    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(3)
    engine = sa.create_engine(sqlite_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for n in range(3):
            conn.execute(sa.text(f"CREATE TABLE t_r{n} (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    ok(project, "stamp", "--force")
    rows = [(r["revision"], r["operation"], r["trigger"]) for r in journal_rows(sqlite_url)]
    assert rows == [("r0002", "stamp", ""), ("r0000", "record", "stamp"), ("r0001", "record", "stamp")]
    result = ok(project, "apply")
    assert "foreign_writer" not in result.stderr and "first_sight" not in result.stderr
    assert "foreign_writes" not in status(project)


# --------------------------------------------------------------------------- the lock helper

WAIT_IN_REVISION = """\
import os, pathlib, time
trace = pathlib.Path(os.environ["TRACE_FILE"])
with trace.open("a") as handle:
    handle.write(f"enter {os.getpid()}\\n")
go = pathlib.Path(os.environ["GO_FILE"])
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
with trace.open("a") as handle:
    handle.write(f"exit {os.getpid()}\\n")
"""
APP_START = """\
import sys

from alembic import command
from alembic.config import Config

config = Config("alembic.ini")
if "--with-lock" in sys.argv:
    import sqlalchemy as sa
    from reconciler.hooks import migration_lock

    with migration_lock(sa.create_engine(config.get_main_option("sqlalchemy.url"))):
        command.upgrade(config, "heads")
else:
    command.upgrade(config, "heads")
"""


def entered(trace: Path) -> list[str]:
    text = trace.read_text() if trace.exists() else ""
    return [line for line in text.splitlines() if line.startswith("enter")]


def racing_project(tmp_path: Path, url: str) -> tuple[Project, dict[str, str]]:
    """An app that upgrades itself at start-up, and a revision that waits inside until told."""
    project = alembic_project(tmp_path / "p", url)
    project.write_config("[apply]\nlock_acquire_timeout = 2.0\n", models="myapp.models:Base")
    project.chain(1)
    ok(project, "apply")
    project.revision("slow1", "r0000", upgrade=WAIT_IN_REVISION)
    (project.root / "app_start.py").write_text(APP_START)
    env = {"TRACE_FILE": str(tmp_path / "trace"), "GO_FILE": str(tmp_path / "go")}
    return project, env


def start_app(project: Project, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "app_start.py", *args],
        cwd=project.root,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.postgres
@pytest.mark.slow
def test_an_app_upgrading_under_migration_lock_never_runs_beside_us(tmp_path: Path, pg_url: str) -> None:
    project, env = racing_project(tmp_path, pg_url)
    trace = Path(env["TRACE_FILE"])
    app = start_app(project, env, "--with-lock")
    try:
        wait_until(lambda: entered(trace), 60, "the app inside slow1")
        busy = cli(project, "apply", env=env)
        assert busy.returncode == 3, busy.stderr  # waited for the app's lock, never entered slow1
        assert len(entered(trace)) == 1
    finally:
        Path(env["GO_FILE"]).touch()
        _out, err = app.communicate(timeout=60)
    assert app.returncode == 0, err
    result = ok(project, "apply", env=env)
    assert "foreign_writer" in result.stderr  # locked, but still not journaled: it is said
    assert len(entered(trace)) == 1 and db_heads(pg_url) == {"slow1"}


@pytest.mark.postgres
@pytest.mark.slow
def test_negative_control_an_app_upgrading_without_the_lock_runs_beside_reconciler(
    tmp_path: Path, pg_url: str
) -> None:
    project, env = racing_project(tmp_path, pg_url)
    trace = Path(env["TRACE_FILE"])
    app = start_app(project, env)
    reconciler = None
    try:
        wait_until(lambda: entered(trace), 60, "the app inside slow1")
        reconciler = start_cli(["--config", str(project.config), "apply"], cwd=project.root, env=env)
        both = wait_until(lambda: len(entered(trace)) == 2, 60, "reconciler inside slow1 too")
        assert both  # two processes inside the same revision at once
    finally:
        Path(env["GO_FILE"]).touch()
        app.communicate(timeout=60)
        if reconciler is not None:
            reconciler.communicate(timeout=60)


# --------------------------------------------------------------------------- the daemon


@pytest.mark.slow
def test_the_daemon_alerts_foreign_writer_and_checksum_mismatch_once(tmp_path: Path, sqlite_url: str) -> None:
    from tests.runtime.test_daemon import config, daemon
    from tests.webhooks import Recorder

    hooks = Recorder()
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    other = alembic_project(tmp_path / "other", sqlite_url)  # the app's own checkout, a release ahead
    other.chain(2)
    other.chain(1, prefix="s", start_down="r0001")
    config(project, interval=0.3, sinks=[hooks.url])
    try:
        with daemon(project, env={"NO_PROXY": "127.0.0.1"}) as d:
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
            alembic_upgrade(other)  # the app migrates itself at start-up
            d.wait_status(lambda s: s["state"] == "ahead", 30, "ahead of the daemon's files")
            shutil.copy(file_of(other, "s0000"), project.versions)  # the daemon's files catch up
            wait_until(lambda: hooks.events("foreign_writer"), 30, "the foreign_writer alert")
            [alert] = hooks.events("foreign_writer")
            assert alert["details"]["foreign"] == ["s0000"] and "migration_lock" in alert["message"]

            path = file_of(project, "r0001")
            edit(path, 'create_table("t_r1"', 'create_table("t_changed"')
            status = d.wait_status(lambda s: s["state"] == "checksum_mismatch", 30, "the mismatch")
            assert path.name in status["message"] and status["checksum_mismatch"][0]["file"] == str(path)
            wait_until(lambda: hooks.events("checksum_mismatch"), 30, "the checksum_mismatch alert")
            runs = status["runs"]
            d.wait_status(lambda s: s["runs"] >= runs + 5, 30, "more runs")
            ok(project, "accept", "r0001")
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after accept")
            wait_until(lambda: hooks.events("recovered"), 30, "the recovery")
        assert len(hooks.events("foreign_writer")) == 1 and len(hooks.events("checksum_mismatch")) == 1
        assert "foreign_writer" in d.stderr and "checksum_mismatch" in d.stderr
    finally:
        hooks.close()


ENV_PY_WITH_LOCK = """\
    from reconciler.hooks import migration_lock

    with migration_lock(config.get_main_option("sqlalchemy.url"), timeout=3):
        run_migrations_online()
"""


@pytest.mark.slow
def test_migration_lock_in_env_py_serves_alembic_and_reconciler(tmp_path: Path, sqlite_url: str) -> None:
    project = alembic_project(tmp_path / "p", sqlite_url)
    env_py = project.migrations / "env.py"
    text = env_py.read_text()
    assert text.endswith("    run_migrations_online()\n")
    env_py.write_text(text[: -len("    run_migrations_online()\n")] + ENV_PY_WITH_LOCK)
    project.chain(1)
    alembic_upgrade(project)  # plain alembic takes the lock and lets it go
    project.chain(1, prefix="s", start_down="r0000")
    ok(project, "apply")  # the reconciler's worker runs this env.py under the lock it holds: no self-wait
    assert db_heads(sqlite_url) == {"s0000"}
