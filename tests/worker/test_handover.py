"""The guard's recording session handed to env.py's first connection (PostgreSQL, `worker.handover`)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import sqlalchemy as sa

from reconciler.worker import handover
from tests.builders import db_heads, flask_project
from tests.cli import run_cli

# Each run of upgrade() (the guard's recording, then the real one) appends its session's pid to
# a file, and sets work_mem on its bind: a SET reads, so the recording runs it for real.
UPGRADE = """\
with open(os.environ["PID_FILE"], "a") as out:
    out.write(f"{op.get_bind().execute(sa.text('SELECT pg_backend_pid()')).scalar()}\\n")
op.get_bind().execute(sa.text("SET work_mem = '1234kB'"))
op.create_table("seen", sa.Column("pid", sa.Integer), sa.Column("work_mem", sa.Text))
op.execute("INSERT INTO seen SELECT pg_backend_pid(), current_setting('work_mem')")"""


def test_env_py_gets_the_recording_session_reset(tmp_path: Path, pg_url: str) -> None:
    project = flask_project(tmp_path / "p", pg_url)
    project.revision("h0", None, upgrade='op.create_table("t0", sa.Column("id", sa.Integer))', message="t0")
    first = run_cli(["--config", str(project.config), "apply"], cwd=project.root)
    assert first.returncode == 0, first.stderr  # the database is not empty: the guard records
    project.revision("h1", "h0", upgrade=UPGRADE, message="seen", extra="import os\n")
    pids = tmp_path / "pids.txt"
    applied = run_cli(
        ["--config", str(project.config), "apply"], cwd=project.root, env={"PID_FILE": str(pids)}
    )
    assert applied.returncode == 0, applied.stderr
    assert db_heads(pg_url) == {"h1"}
    recorded, upgraded = pids.read_text().split()
    assert recorded == upgraded  # one server session for the recording and env.py
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        pid, work_mem = conn.execute(sa.text("SELECT pid, work_mem FROM seen")).one()
    engine.dispose()
    # the SET ran in the recording; env.py's session starts clean, and then the real run set it
    assert str(pid) == upgraded and work_mem == "1234kB"


def _libpq(url: str) -> str:
    parsed = sa.engine.make_url(url)
    return f"host={parsed.host} port={parsed.port or 5432} user={parsed.username} dbname={parsed.database}"


def test_a_kept_session_is_reset_and_only_for_the_same_arguments(pg_url: str) -> None:
    conn = psycopg.connect(_libpq(pg_url))
    conn.execute("SET work_mem = '1234kB'")
    conn.execute("CREATE TEMP TABLE leftover (x int)")
    conn.commit()
    # negative control: without the reset, the session carries the setting and the temp table
    assert conn.execute("SHOW work_mem").fetchone() == ("1234kB",)
    conn.commit()
    key = handover.connect_key("psycopg", (), {"dbname": "a"})
    assert handover.offer(key, conn)
    assert handover.take(handover.connect_key("psycopg", (), {"dbname": "b"}), {}) is None
    assert conn.closed  # other arguments: the kept session is closed, not left idle
    again = psycopg.connect(_libpq(pg_url))
    again.execute("SET work_mem = '1234kB'")
    again.commit()
    assert handover.offer(key, again)
    taken = handover.take(key, {})
    assert taken is again
    assert taken.execute("SELECT current_setting('work_mem')").fetchone() != ("1234kB",)
    assert taken.execute("SELECT to_regclass('pg_temp.leftover')").fetchone() == (None,)
    taken.close()


def test_drivers_without_a_full_reset_are_not_kept() -> None:
    assert not handover.offer(("pymysql", "()", "[]"), object())
    assert not handover.offer(None, object())
    assert handover.take(("pymysql", "()", "[]"), {}) is None
