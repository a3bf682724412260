"""The destructive-change guard: classification tables, the recorder, and `apply` / `plan` end to end."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler.core import safety
from reconciler.worker.generated import type_info
from reconciler.worker.recorder import record_revision
from tests.builders import Project, db_heads, flask_project, table_names
from tests.cli import run_cli

# --- pure classification ---------------------------------------------------------------------


def op(kind: str, table: str = "t", line: int = 10, **extra: Any) -> dict[str, Any]:
    return {"op": kind, "table": table, "schema": "", "text": f"{kind} {table}", "line": line, **extra}


def rev(revision: str, *ops: Mapping[str, Any], error: str | None = None) -> dict[str, Any]:
    return {
        "revision": revision,
        "path": f"/x/{revision}_m.py",
        "ops": list(ops),
        "error": error,
        "error_line": 7 if error else 0,
    }


def kinds(findings: list[safety.Finding]) -> list[tuple[str, str, str]]:
    return [(f.revision, f.kind, f.rule) for f in findings]


def alter(old: Any, new: Any) -> dict[str, Any]:
    return op(
        "AlterColumnOp",
        column="c",
        existing_type=type_info(old) if old is not None else None,
        new_type=type_info(new),
    )


CASES = [
    ("drop table", [op("DropTableOp")], "sqlite", [("data-loss", "drop-table")]),
    ("drop column", [op("DropColumnOp", column="c")], "sqlite", [("data-loss", "drop-column")]),
    (
        "String(200) -> String(50)",
        [alter(sa.String(200), sa.String(50))],
        "sqlite",
        [("data-loss", "type-narrowing")],
    ),
    (
        "BigInteger -> Integer",
        [alter(sa.BigInteger(), sa.Integer())],
        "sqlite",
        [("data-loss", "type-narrowing")],
    ),
    ("Text -> String(50)", [alter(sa.Text(), sa.String(50))], "sqlite", [("data-loss", "type-narrowing")]),
    ("String(50) -> String(200) widens", [alter(sa.String(50), sa.String(200))], "sqlite", []),
    ("Integer -> BigInteger widens", [alter(sa.Integer(), sa.BigInteger())], "sqlite", []),
    ("old type unknown", [alter(None, sa.String(50))], "sqlite", [("data-loss", "type-change-unknown")]),
    (
        "drop unique",
        [op("DropConstraintOp", name="uq", constraint_type="unique")],
        "sqlite",
        [("data-loss", "drop-constraint")],
    ),
    (
        "raw DROP TABLE",
        [op("ExecuteSQLOp", table="", sql_text="DROP TABLE audit")],
        "sqlite",
        [("data-loss", "raw-sql")],
    ),
    ("raw UPDATE is fine", [op("ExecuteSQLOp", table="", sql_text="UPDATE t SET a = 1")], "sqlite", []),
    (
        "index on PostgreSQL",
        [op("CreateIndexOp", name="ix", concurrently=False)],
        "postgresql",
        [("lock-risk", "index-not-concurrent")],
    ),
    ("concurrent index", [op("CreateIndexOp", name="ix", concurrently=True)], "postgresql", []),
    ("index on SQLite", [op("CreateIndexOp", name="ix", concurrently=False)], "sqlite", []),
    (
        "NOT NULL without default",
        [op("AddColumnOp", column="c", nullable=False, server_default=False)],
        "mysql",
        [("lock-risk", "not-null-without-default")],
    ),
    (
        "NOT NULL with default",
        [op("AddColumnOp", column="c", nullable=False, server_default=True)],
        "mysql",
        [],
    ),
    (
        "set NOT NULL",
        [op("AlterColumnOp", column="c", nullable=False)],
        "postgresql",
        [("lock-risk", "set-not-null")],
    ),
    (
        "batch copy on SQLite",
        [op("DropIndexOp", batch=True), op("AlterColumnOp", column="c", batch=True, nullable=True)],
        "sqlite",
        [("lock-risk", "batch-recreate")],
    ),
]


@pytest.mark.parametrize(("ops", "dialect", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classification(ops: list[dict[str, Any]], dialect: str, expected: list[tuple[str, str]]) -> None:
    found = safety.classify([rev("r1", *ops)], dialect)
    assert [(f.kind, f.rule) for f in found] == expected
    assert all(f.line == 10 and f.where == "r1_m.py:10" for f in found)


def test_objects_created_earlier_in_the_plan_are_exempt() -> None:
    plan = [
        rev(
            "r1",
            op("CreateTableOp", table="fresh", columns=["id"]),
            op("AddColumnOp", table="old", column="tmp", nullable=True),
        ),
        rev(
            "r2",
            op("CreateIndexOp", table="fresh", name="ix"),
            op("DropColumnOp", table="old", column="tmp"),
            op("DropTableOp", table="fresh"),
        ),
        rev("r3", op("DropColumnOp", table="old", column="kept")),
    ]
    assert kinds(safety.classify(plan, "postgresql")) == [("r3", "data-loss", "drop-column")]
    # negative control: without r1 in the plan the same drops are data loss
    assert kinds(safety.classify(plan[1:], "postgresql")) == [
        ("r2", "lock-risk", "index-not-concurrent"),
        ("r2", "data-loss", "drop-column"),
        ("r2", "data-loss", "drop-table"),
        ("r3", "data-loss", "drop-column"),
    ]


def test_replaying_a_long_history_from_empty_finds_nothing() -> None:
    plan = []
    for n in range(199):
        ops = [op("CreateTableOp", table=f"t{n}", columns=["id"])]
        if n:
            ops += [op("DropTableOp", table=f"t{n - 1}")]
        plan.append(rev(f"r{n:03d}", *ops))
    assert safety.classify(plan, "postgresql") == []


def test_marker_acknowledges_data_loss_not_lock_risk_and_policy_decides() -> None:
    plan = [
        rev("r1", op("DropColumnOp", column="c"), op("CreateIndexOp", name="ix")),
        rev("r2", error="NoInspectionAvailable: ..."),
    ]
    found = safety.classify(plan, "postgresql", acknowledged={"r1"})
    assert [(f.kind, f.acknowledged) for f in found] == [
        ("data-loss", True),
        ("lock-risk", False),
        ("unanalysable", False),
    ]
    assert found[2].line == 7
    refused = [(f.revision, f.kind) for f in safety.refused(found, safety.Policy())]
    assert refused == [("r2", "unanalysable")]
    assert [
        f.kind for f in safety.refused(found, safety.Policy(strict_locking=True, on_unanalysable="warn"))
    ] == ["lock-risk"]
    unacknowledged = safety.classify(plan[:1], "postgresql")
    assert [f.kind for f in safety.refused(unacknowledged, safety.Policy())] == ["data-loss"]
    assert safety.refused(unacknowledged, safety.Policy(allow_destructive=True)) == []


def test_external_lock_findings_replace_the_built_in_ones() -> None:
    plan = [rev("r1", op("CreateIndexOp", name="ix"), op("DropColumnOp", column="c"))]
    external = {("r1", 0): [("require-concurrent-index-creation", "use concurrently")]}
    assert kinds(safety.classify(plan, "postgresql", external=external)) == [
        ("r1", "lock-risk", "require-concurrent-index-creation"),
        ("r1", "data-loss", "drop-column"),
    ]


# --- the recorder (real Alembic operations, no database) -------------------------------------

RECORDED = """\
from alembic import op
import sqlalchemy as sa

revision = "x1"
down_revision = None


def upgrade():
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.execute(sa.text("UPDATE acct SET note = 'x'"))
    with op.batch_alter_table("acct") as batch:
        batch.drop_column("note")
    op.create_index("ix_acct_x", "acct", ["x"])
"""


def _load(tmp_path: Path, source: str) -> tuple[Any, str]:
    from alembic.util import load_python_file

    path = tmp_path / "x1_rev.py"
    path.write_text(source, encoding="utf-8")
    return load_python_file(str(tmp_path), path.name), str(path)


def test_recorder_follows_get_bind_and_batch_mode_with_lines(tmp_path: Path) -> None:
    module, path = _load(tmp_path, RECORDED)
    recorded = record_revision(module, path, "x1", "postgresql://u@h/db")
    assert recorded["error"] is None
    assert [(o["op"], o["line"]) for o in recorded["ops"]] == [
        ("ExecuteSQLOp", 11),
        ("DropColumnOp", 13),
        ("CreateIndexOp", 14),
    ]
    assert recorded["ops"][1]["batch"] is True and recorded["ops"][1]["column"] == "note"
    assert "CREATE INDEX ix_acct_x ON acct (x)" in recorded["ops"][2]["sql"]
    assert kinds(safety.classify([recorded], "postgresql")) == [
        ("x1", "data-loss", "drop-column"),
        ("x1", "lock-risk", "index-not-concurrent"),
    ]


def test_recorder_marks_code_that_needs_the_database_unanalysable(tmp_path: Path) -> None:
    source = RECORDED.replace(
        "    bind = op.get_bind()\n", '    bind = op.get_bind()\n    sa.inspect(bind).get_columns("acct")\n'
    )
    module, path = _load(tmp_path, source)
    recorded = record_revision(module, path, "x1", "sqlite://")
    assert recorded["error"] and recorded["error_line"] == 10 and recorded["error_kind"] == "unanalysable"
    assert recorded["ops"] == []


def test_a_revision_that_raises_by_itself_is_left_to_fail_when_run(tmp_path: Path) -> None:
    source = RECORDED.replace("    bind = op.get_bind()\n", '    raise RuntimeError("not ready")\n')
    module, path = _load(tmp_path, source)
    recorded = record_revision(module, path, "x1", "sqlite://")
    assert (recorded["error_kind"], recorded["error_line"]) == ("fails", 9)
    found = safety.classify([recorded], "sqlite")
    assert [f.kind for f in found] == ["fails"] and safety.refused(found, safety.Policy()) == []


MULTIDB = """\
from alembic import op
import sqlalchemy as sa

revision = "x1"
down_revision = None


def upgrade(engine_name):
    globals()["upgrade_%s" % engine_name]()


def upgrade_():
    op.drop_table("old")


def upgrade_users():
    op.add_column("user", sa.Column("age", sa.Integer))
"""


def test_recorder_reads_each_engine_of_a_multidb_revision(tmp_path: Path) -> None:
    module, path = _load(tmp_path, MULTIDB)
    recorded = record_revision(module, path, "x1", "sqlite://")
    assert recorded["error"] is None
    assert [(o["op"], o["line"]) for o in recorded["ops"]] == [("DropTableOp", 13), ("AddColumnOp", 17)]


# --- end to end -------------------------------------------------------------------------------

CREATE_ACCT = """op.create_table("acct", sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("note", sa.String(200)))
op.execute("INSERT INTO acct (id, note) VALUES (1, 'keep me')")"""
DROP_NOTE = 'op.drop_column("acct", "note")'


def cli(project: Project, *args: str) -> Any:
    return run_cli(["--config", str(project.config), *args], cwd=project.root)


def notes(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("acct")}
            if "note" not in columns:
                return []
            return [tuple(r) for r in conn.execute(sa.text("SELECT id, note FROM acct"))]
    finally:
        engine.dispose()


def acct_project(tmp_path: Path, url: str) -> Project:
    project = flask_project(tmp_path / "p", url)
    project.revision("a1", None, upgrade=CREATE_ACCT, message="acct")
    assert cli(project, "apply").returncode == 0
    return project


@pytest.mark.slow
@pytest.mark.parametrize("acknowledge", ["setting", "file marker"])
def test_pending_drop_column_is_refused_until_acknowledged(
    tmp_path: Path, db_url: str, acknowledge: str
) -> None:
    project = acct_project(tmp_path, db_url)
    path = project.revision("a2", "a1", upgrade=DROP_NOTE, message="drop note")
    refused = cli(project, "apply")
    assert refused.returncode == 6, refused.stderr
    assert "destructive_refused" in refused.stderr and "a2_drop_note.py:20" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert db_heads(db_url) == {"a1"} and notes(db_url) == [(1, "keep me")]
    status = json.loads(cli(project, "status", "--json").stdout)
    assert status["state"] == "destructive_pending" and "destructive_pending" in status["conditions"]
    # negative control: with the guard satisfied, the column and its data are gone
    if acknowledge == "setting":
        project.write_config("[safety]\nallow_destructive = true\n", models="myapp.models:db")
    else:
        marked = path.read_text().replace("depends_on = None", "depends_on = None\nallow_destructive = True")
        path.write_text(marked)
    applied = cli(project, "apply")
    assert applied.returncode == 0, applied.stderr
    assert db_heads(db_url) == {"a2"} and notes(db_url) == []


@pytest.mark.slow
def test_drop_of_a_table_created_earlier_in_the_plan_is_not_refused(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.revision("b1", None, upgrade=CREATE_ACCT, message="acct")
    project.revision("b2", "b1", upgrade='op.drop_table("acct")', message="drop acct")
    assert cli(project, "apply").returncode == 0
    assert db_heads(db_url) == {"b2"} and "acct" not in table_names(db_url)


@pytest.mark.slow
def test_the_same_drop_against_an_existing_table_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    """Negative control of the exemption: b1 applied first, b2 alone is data loss."""
    project = acct_project(tmp_path, sqlite_url)
    project.revision("b2", "a1", upgrade='op.drop_table("acct")', message="drop acct")
    result = cli(project, "apply")
    assert result.returncode == 6 and "drop table acct" in result.stderr
    assert "acct" in table_names(sqlite_url)


BIND_AND_BATCH = """conn = op.get_bind()
conn.execute(sa.text("UPDATE acct SET note = 'x'"))
with op.batch_alter_table("acct") as batch:
    batch.drop_column("note")"""
NEEDS_DATABASE = """session = Session(bind=op.get_bind())
session.add(Acct(note="new"))
session.flush()  # the recording wrote nothing: the ORM gets no new key, the revision is unanalysable
op.add_column("acct", sa.Column("extra", sa.Integer))"""
ORM_MODEL = """from sqlalchemy.orm import Session, declarative_base

Base = declarative_base()


class Acct(Base):
    __tablename__ = "acct"
    id = sa.Column(sa.Integer, primary_key=True)
    note = sa.Column(sa.String(200))
"""


@pytest.mark.slow
def test_get_bind_and_batch_mode_are_analysed(tmp_path: Path, sqlite_url: str) -> None:
    project = acct_project(tmp_path, sqlite_url)
    project.revision("c2", "a1", upgrade=BIND_AND_BATCH, message="batch drop")
    result = cli(project, "plan", "--json")
    assert result.returncode == 0, result.stderr
    found = [(f["kind"], f["rule"], f["line"]) for f in json.loads(result.stdout)["findings"]]
    assert ("data-loss", "drop-column", 23) in found and all(k != "unanalysable" for k, _r, _l in found)
    assert cli(project, "apply").returncode == 6
    assert notes(sqlite_url) == [(1, "keep me")], "the UPDATE through get_bind() did not run"


@pytest.mark.slow
@pytest.mark.mysql
def test_unanalysable_revision_is_refused_or_warned_per_setting(tmp_path: Path, mysql_url: str) -> None:
    """Where DDL commits implicitly (MySQL) the recording is the only check: refused up front."""
    sqlite_url = mysql_url
    project = acct_project(tmp_path, sqlite_url)
    project.revision("d2", "a1", upgrade=NEEDS_DATABASE, message="inspects", extra=ORM_MODEL)
    status = json.loads(cli(project, "status", "--json").stdout)
    assert status["state"] == "destructive_pending" and "could not be analysed" in status["message"]
    refused = cli(project, "apply")
    assert refused.returncode == 6 and "could not be analysed" in refused.stderr
    assert "d2_inspects.py:" in refused.stderr
    assert db_heads(sqlite_url) == {"a1"}
    # negative control: on_unanalysable = "warn" applies it
    project.write_config('[safety]\non_unanalysable = "warn"\n', models="myapp.models:db")
    applied = cli(project, "apply")
    assert applied.returncode == 0, applied.stderr
    assert "revision_unanalysable" in applied.stderr and db_heads(sqlite_url) == {"d2"}


@pytest.mark.slow
def test_plan_shows_findings_and_fail_on_gates(tmp_path: Path, sqlite_url: str) -> None:
    project = acct_project(tmp_path, sqlite_url)
    project.revision("a2", "a1", upgrade=DROP_NOTE, message="drop note")
    text = cli(project, "plan")
    assert text.returncode == 0, text.stderr
    assert "a2  drop note" in text.stdout
    assert "data-loss    a2_drop_note.py:20  drop column acct.note: its values are lost" in text.stdout
    gate = cli(project, "plan", "--fail-on", "data-loss")
    assert gate.returncode == 6 and "drop column acct.note" in gate.stderr
    assert cli(project, "plan", "--fail-on", "lock-risk").returncode == 0
    assert db_heads(sqlite_url) == {"a1"}, "plan never applies"


INDEX = 'op.create_index("ix_acct_note", "acct", ["note"])'
CONCURRENT_INDEX = """with op.get_context().autocommit_block():
    op.create_index("ix_acct_note", "acct", ["note"], postgresql_concurrently=True)"""


def pg_indexes(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return {str(i["name"]) for i in sa.inspect(conn).get_indexes("acct")}
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize(
    ("squawk", "rule"), [("auto", "require-concurrent-index-creation"), ("off", "index-not-concurrent")]
)
def test_blocking_index_warns_and_strict_locking_refuses(
    tmp_path: Path, pg_url: str, squawk: str, rule: str
) -> None:
    project = acct_project(tmp_path, pg_url)
    project.revision("e2", "a1", upgrade=INDEX, message="index")
    project.write_config(f'[safety]\nstrict_locking = true\nsquawk = "{squawk}"\n', models="myapp.models:db")
    refused = cli(project, "apply")
    assert refused.returncode == 6 and rule in refused.stderr and "e2_index.py:20" in refused.stderr
    assert "ix_acct_note" not in pg_indexes(pg_url)
    # negative control: without strict_locking it is a warning and the blocking build happens
    project.write_config(f'[safety]\nsquawk = "{squawk}"\n', models="myapp.models:db")
    applied = cli(project, "apply")
    assert applied.returncode == 0, applied.stderr
    assert "lock_risk" in applied.stderr and rule in applied.stderr
    assert "ix_acct_note" in pg_indexes(pg_url)


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_index_has_no_lock_finding(tmp_path: Path, pg_url: str) -> None:
    project = acct_project(tmp_path, pg_url)
    project.revision("f2", "a1", upgrade=CONCURRENT_INDEX, message="index")
    project.write_config("[safety]\nstrict_locking = true\n", models="myapp.models:db")
    plan = json.loads(cli(project, "plan", "--json").stdout)
    assert plan["findings"] == [] and plan["lock_rules"] == "squawk"
    assert cli(project, "apply").returncode == 0
    assert "ix_acct_note" in pg_indexes(pg_url)


@pytest.mark.slow
@pytest.mark.postgres
def test_prod_daemon_refuses_alerts_once_and_applies_after_the_marker(tmp_path: Path, pg_url: str) -> None:
    from tests.pgcluster import wait_until
    from tests.runtime.test_daemon import config, daemon
    from tests.webhooks import Recorder

    hooks = Recorder()
    project = acct_project(tmp_path, pg_url)
    path = project.revision("a2", "a1", upgrade=DROP_NOTE, message="drop note")
    config(project, interval=0.2, sinks=[hooks.url])
    try:
        with daemon(project) as d:
            d.wait_status(lambda s: s["state"] == "destructive_pending", 60, "destructive_pending")
            wait_until(lambda: hooks.events("destructive_refused"), 10, "the destructive_refused alert")
            runs = d.status()["runs"]
            d.wait_status(lambda s: s.get("runs", 0) >= runs + 5, 30, "more runs")  # no repeat alert
            assert len(hooks.events("destructive_refused")) == 1
            assert notes(pg_url) == [(1, "keep me")]
            path.write_text(
                path.read_text().replace("depends_on = None", "depends_on = None\nallow_destructive = True")
            )
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after the marker")
        assert notes(pg_url) == [] and db_heads(pg_url) == {"a2"}
        wait_until(lambda: hooks.events("recovered"), 10, "the recovered alert")
    finally:
        hooks.close()


def test_a_foreign_key_re_created_in_the_same_revision_is_not_data_loss() -> None:
    drop = op("DropConstraintOp", table="child", name="fk_c", constraint_type="foreignkey")
    create = op(
        "CreateForeignKeyOp",
        table="child",
        name="fk_c",
        constraint_type="foreignkey",
        columns=["acct_id"],
        ondelete="CASCADE",
    )
    assert kinds(safety.classify([rev("r1", drop, create)], "sqlite")) == []
    # negative control: dropped without the re-creation, it is data loss
    assert kinds(safety.classify([rev("r1", drop)], "sqlite")) == [("r1", "data-loss", "drop-constraint")]


def test_a_type_change_is_judged_against_the_live_type_when_the_revision_does_not_say() -> None:
    live = type_info(sa.String(128))
    widen = op(
        "AlterColumnOp",
        column="c",
        existing_type=live,
        existing_type_from="database",
        new_type=type_info(sa.String(256)),
    )
    narrow = {**widen, "new_type": type_info(sa.String(64))}
    assert kinds(safety.classify([rev("r1", widen)], "sqlite")) == []
    assert kinds(safety.classify([rev("r1", narrow)], "sqlite")) == [("r1", "data-loss", "type-narrowing")]


def test_nothing_refuses_on_an_empty_database() -> None:
    plan = [rev("r1", op("DropColumnOp", column="c")), rev("r2", error="NoResultFound: ...")]
    found = safety.classify(plan, "postgresql", empty=True)
    assert [f.exempt for f in found] == [safety.EMPTY_DATABASE] * 2
    assert safety.refused(found, safety.Policy()) == []
    # negative control: the same plan against a database with tables is refused
    assert len(safety.refused(safety.classify(plan, "postgresql"), safety.Policy())) == 2
