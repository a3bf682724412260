"""The destructive-change guard on what real revisions do: the recording follows the bind (ORM
sessions, reflection, Enum.create, results), `op.get_context().config`, a foreign key re-created
with another `ondelete`, a type change judged against the live column; an empty database is never
refused; what the recording cannot follow is checked operation by operation where DDL is
transactional. Each with its negative control."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.builders import Project, db_heads, flask_project, journal_rows
from tests.cli import run_cli

# The recording runs users' revisions in the worker: CI runs these on the oldest SQLAlchemy sets too.
pytestmark = pytest.mark.core

ORM = """from sqlalchemy.orm import Session

try:
    from sqlalchemy.orm import declarative_base
except ImportError:  # SQLAlchemy 1.3
    from sqlalchemy.ext.declarative import declarative_base

Base = declarative_base()


class Acct(Base):
    __tablename__ = "acct"
    id = sa.Column(sa.Integer, primary_key=True)
    note = sa.Column(sa.String(128))
"""

CREATE = """location = op.get_context().config.get_main_option("script_location")
assert location, "the real Alembic Config"
op.create_table("acct", sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("note", sa.String(128)))
op.create_table("child", sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("acct_id", sa.Integer),
                sa.ForeignKeyConstraint(["acct_id"], ["acct.id"], name="fk_child_acct"))"""

SEED = """op.execute("INSERT INTO acct (note) VALUES (' keep me ')")
op.execute("INSERT INTO child (id, acct_id) VALUES (1, 1)")"""

PATTERNS = """bind = op.get_bind()
if bind.dialect.name == "postgresql":
    postgresql.ENUM("happy", "sad", name="mood").create(bind, checkfirst=True)
    mood = postgresql.ENUM("happy", "sad", name="mood", create_type=False)
else:
    mood = sa.Enum("happy", "sad", name="mood")
op.add_column("acct", sa.Column("mood", mood, nullable=True))
columns = {c["name"] for c in sa.inspect(bind).get_columns("acct")}
if "extra" not in columns:
    op.add_column("acct", sa.Column("extra", sa.Integer, nullable=True))
if bind.engine.url.get_backend_name() == "postgresql" and bind.dialect.name == "postgresql":
    op.execute("COMMENT ON TABLE acct IS 'accounts'")
for row in bind.execute(sa.text("SELECT id, note FROM acct")):
    bind.execute(sa.text("UPDATE acct SET note = :n WHERE id = :i"), {"n": row.note.strip(), "i": row.id})
session = Session(bind=bind)
if session.query(Acct).count() > 0:
    op.create_index("ix_acct_note", "acct", ["note"])
session.commit()"""

RECREATE_AND_WIDEN = """with op.batch_alter_table("child") as batch:
    batch.drop_constraint("fk_child_acct", type_="foreignkey")
    batch.create_foreign_key("fk_child_acct", "acct", ["acct_id"], ["id"], ondelete="CASCADE")
with op.batch_alter_table("acct") as batch:
    batch.alter_column("note", type_=sa.String(256))"""

NARROW = """with op.batch_alter_table("acct") as batch:
    batch.alter_column("note", type_=sa.String(64))"""
DROP_FK = """with op.batch_alter_table("child") as batch:
    batch.drop_constraint("fk_child_acct", type_="foreignkey")"""

EXTRA = "from sqlalchemy.dialects import postgresql\n" + ORM


def cli(project: Project, *args: str) -> Any:
    return run_cli(["--config", str(project.config), *args], cwd=project.root)


def project_at_seed(tmp_path: Path, url: str) -> Project:
    project = flask_project(tmp_path / "p", url)
    project.revision("a1", None, upgrade=CREATE, message="acct")
    project.revision("a2", "a1", upgrade=SEED, message="seed")
    return project


def plan_findings(project: Project) -> list[tuple[str, str, str, str]]:
    result = cli(project, "plan", "--json")
    assert result.returncode == 0, result.stderr
    return [
        (f["revision"], f["kind"], f["rule"], f["message"]) for f in json.loads(result.stdout)["findings"]
    ]


def false_findings(found: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
    return [f for f in found if f[1] in ("data-loss", "unanalysable", "fails")]


@pytest.mark.slow
def test_every_pattern_is_recorded_against_a_database_with_rows(tmp_path: Path, db_url: str) -> None:
    project = project_at_seed(tmp_path, db_url)
    assert cli(project, "apply").returncode == 0
    project.revision("a3", "a2", upgrade=PATTERNS, message="patterns", extra=EXTRA)
    project.revision("a4", "a3", upgrade=RECREATE_AND_WIDEN, message="widen")
    found = plan_findings(project)
    assert false_findings(found) == [], found
    if db_url.startswith("postgresql"):
        # the ORM count saw the real row, so the index was recorded; squawk (or the built-in
        # rules) still judge it although statements recorded from the bind come first
        assert [f[:2] for f in found if f[0] == "a3"] == [("a3", "lock-risk")], found
    applied = cli(project, "apply")
    assert applied.returncode == 0, applied.stderr
    assert db_heads(db_url) == {"a4"}
    assert "revision_unanalysable" not in applied.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "rule"), [(NARROW, "type-narrowing"), (DROP_FK, "drop-constraint")], ids=["narrow", "drop-fk"]
)
def test_a_real_narrowing_or_drop_is_still_refused(tmp_path: Path, db_url: str, body: str, rule: str) -> None:
    """Negative control: judged against the live column / without a re-creation, it is data loss."""
    project = project_at_seed(tmp_path, db_url)
    assert cli(project, "apply").returncode == 0
    project.revision("a3", "a2", upgrade=body, message="lossy")
    assert ("a3", "data-loss", rule) in [f[:3] for f in plan_findings(project)]
    refused = cli(project, "apply")
    assert refused.returncode == 6, refused.stderr
    assert db_heads(db_url) == {"a2"}
    status = json.loads(cli(project, "status", "--json").stdout)
    assert status["state"] == "destructive_pending"
    assert status["guard"]["would_refuse"] and status["guard"]["refused"][0]["rule"] == rule


@pytest.mark.slow
def test_apply_from_empty_with_every_pattern_and_a_drop_exits_0(tmp_path: Path, db_url: str) -> None:
    project = project_at_seed(tmp_path, db_url)
    project.revision("a3", "a2", upgrade=PATTERNS, message="patterns", extra=EXTRA)
    project.revision("a4", "a3", upgrade=RECREATE_AND_WIDEN, message="widen")
    project.revision("a5", "a4", upgrade=NARROW + "\n" + DROP_FK, message="lossy")
    status = json.loads(cli(project, "status", "--json").stdout)
    assert status["sync_state"] == "uninitialized_empty" and not status["guard"]["would_refuse"]
    applied = cli(project, "apply")
    assert applied.returncode == 0, applied.stderr
    assert db_heads(db_url) == {"a5"}
    assert "lock_risk" not in applied.stderr and "destructive_refused" not in applied.stderr


ORM_WRITE = """session = Session(bind=op.get_bind())
session.add(Acct(note="new"))
session.flush()
op.add_column("acct", sa.Column("extra", sa.Integer, nullable=True))"""
AND_DROP = """
with op.batch_alter_table("acct") as batch:
    batch.drop_column("note")"""


def notes(url: str) -> list[Any]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT id, note FROM acct ORDER BY id"))]
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("dialect_url", ["sqlite_url", pytest.param("pg_url", marks=pytest.mark.postgres)])
def test_what_the_recording_cannot_follow_is_checked_as_it_runs(
    tmp_path: Path, dialect_url: str, request: pytest.FixtureRequest
) -> None:
    """Transactional DDL: an ORM write (unanalysable ahead) is applied with each operation checked;
    the same revision with a drop column is refused as it runs and rolled back whole."""
    url = request.getfixturevalue(dialect_url)
    project = project_at_seed(tmp_path, url)
    assert cli(project, "apply").returncode == 0
    path = project.revision("a3", "a2", upgrade=ORM_WRITE + AND_DROP, message="orm", extra=EXTRA)
    status = json.loads(cli(project, "status", "--json").stdout)
    assert status["guard"]["checked_per_operation"] == ["a3"] and not status["guard"]["would_refuse"]
    refused = cli(project, "apply")
    assert refused.returncode == 6, refused.stderr
    assert "rolled back" in refused.stderr and "drop column acct.note" in refused.stderr
    assert db_heads(url) == {"a2"} and notes(url) == [(1, " keep me ")], "nothing half-applied"
    rows = [r["outcome"] for r in journal_rows(url) if r["revision"] == "a3"]
    assert rows == ["refused"]
    path.write_text(path.read_text().replace(AND_DROP.strip().replace("\n", "\n    "), "pass"))
    assert "drop_column" not in path.read_text()
    applied = cli(project, "apply")
    assert applied.returncode == 0, applied.stderr
    assert db_heads(url) == {"a3"} and [n for _i, n in notes(url)] == [" keep me ", "new"]


CONFIG_THEN_TABLE = """cfg = op.get_context().config
if cfg.get_main_option("script_location"):
    op.create_table("fresh", sa.Column("id", sa.Integer, primary_key=True))"""
ON_THE_NEW_TABLE = """op.add_column("fresh", sa.Column("flag", sa.Boolean, nullable=False))
op.create_index("ix_fresh_flag", "fresh", ["flag"])"""


@pytest.mark.slow
def test_a_revision_reading_the_config_is_followed_and_its_tables_stay_known(
    tmp_path: Path, db_url: str
) -> None:
    """`op.get_context().config` is the real Config: no predicted failure, and the table the
    revision creates is the plan's own, so later operations on it carry no lock risk."""
    project = project_at_seed(tmp_path, db_url)
    assert cli(project, "apply").returncode == 0
    project.revision("a3", "a2", upgrade=CONFIG_THEN_TABLE, message="config")
    project.revision("a4", "a3", upgrade=ON_THE_NEW_TABLE, message="on fresh")
    assert plan_findings(project) == []
    applied = cli(project, "apply")
    assert applied.returncode == 0, applied.stderr
    assert "lock_risk" not in applied.stderr and db_heads(db_url) == {"a4"}


RAW_CURSOR_WRITE = """cursor = op.get_bind().connection.cursor()
cursor.execute("DELETE FROM acct")"""


@pytest.mark.slow
def test_the_recording_transaction_is_read_only_and_rolled_back(tmp_path: Path, sqlite_url: str) -> None:
    """Negative control of the real recording connection: a write past the interception (a raw
    DB-API cursor) fails there, the revision is unanalysable, and the rows are still there."""
    project = project_at_seed(tmp_path, sqlite_url)
    assert cli(project, "apply").returncode == 0
    project.revision("a3", "a2", upgrade=RAW_CURSOR_WRITE, message="raw")
    assert [f[:2] for f in plan_findings(project)] == [("a3", "unanalysable")]
    assert notes(sqlite_url) == [(1, " keep me ")]


@pytest.mark.parametrize(
    ("statement", "reads"),
    [
        ("SELECT id FROM acct", True),
        ("/* note */\n  select 1", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", True),
        ("WITH gone AS (DELETE FROM acct RETURNING id) SELECT * FROM gone", False),
        ("SELECT * INTO acct_copy FROM acct", False),
        ("PRAGMA table_info(acct)", True),
        ("UPDATE acct SET note = 'x'", False),
        ("CREATE TYPE mood AS ENUM ('a')", False),
        ("-- c\nDROP TABLE acct", False),
    ],
)
def test_what_the_recording_connection_runs(statement: str, reads: bool) -> None:
    from reconciler.worker.recorder import is_read

    assert is_read(statement) is reads


@pytest.mark.slow
def test_no_check_as_it_runs_where_env_py_turns_transactional_ddl_off(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Negative control of the per-operation check: without a transaction to roll back, an
    unanalysable revision is refused before its first operation runs."""
    project = project_at_seed(tmp_path, sqlite_url)
    assert cli(project, "apply").returncode == 0
    env = project.migrations / "env.py"
    env.write_text(
        env.read_text().replace("**conf_args", "transactional_ddl=False,\n            **conf_args")
    )
    project.revision("a3", "a2", upgrade=ORM_WRITE, message="orm", extra=EXTRA)
    refused = cli(project, "apply")
    assert refused.returncode == 6, refused.stderr
    assert "transactional_ddl off" in refused.stderr
    assert db_heads(sqlite_url) == {"a2"}
    assert "extra" not in {c["name"] for c in sa.inspect(sa.create_engine(sqlite_url)).get_columns("acct")}


def test_statements_recorded_from_the_bind_are_lintable() -> None:
    from reconciler.control.squawk import lintable

    assert lintable("UPDATE acct SET note = %(n)s WHERE id = %(i)s") == (
        "UPDATE acct SET note = NULL WHERE id = NULL;"
    )
    assert lintable("CREATE INDEX ix ON t (a);\n") == "CREATE INDEX ix ON t (a);"


NAMED = """name = op.get_bind().execute(sa.text("SELECT current_setting('application_name')")).scalar()
if "/apply/" in name:
    raise RuntimeError("connected as " + name)
op.create_table("named", sa.Column("id", sa.Integer, primary_key=True))"""


@pytest.mark.slow
@pytest.mark.postgres
def test_status_analysis_reads_as_read_never_as_an_applier(tmp_path: Path, pg_url: str) -> None:
    """The orphan wait waits on `apply` sessions: the guard's analysis for `status` / `plan` runs
    in a worker named `read`, so another replica's status read never holds an apply up."""
    project = project_at_seed(tmp_path, pg_url)
    assert cli(project, "apply").returncode == 0
    project.revision("a3", "a2", upgrade=NAMED, message="named")
    assert false_findings(plan_findings(project)) == []
    status = json.loads(cli(project, "status", "--json").stdout)
    assert status["state"] == "behind" and "destructive_pending" not in status["conditions"]
    # control: the worker that applies is named `apply` (what the orphan wait looks for)
    applied = cli(project, "apply")
    assert applied.returncode == 1 and "/apply/" in applied.stderr, applied.stderr
