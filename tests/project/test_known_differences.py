"""The known-differences baseline (`reconciler baseline`): a difference is accepted whole (both
sides' values), per dialect, so a later change to an accepted column is drift again; and drift
you can read (enums with their values, a foreign key whose ondelete differs as one line).

The fixture is the pattern seen on real projects: an enum column whose models and migrations
disagree (values added or the type renamed in the models, never migrated), accepted with
`reconciler baseline`; then someone narrows the column by hand to `varchar(5)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler import logs
from reconciler.config.load import load_settings
from reconciler.control.workers import Worker, WorkerJob
from reconciler.errors import ConfigError
from reconciler.project import differences
from tests import dbs
from tests.builders import Project, flask_project
from tests.system.test_cli_admin import cli, ok

BILLING_MODELS = """\
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()


class Acct(db.Model):
    id = db.Column(db.Integer, primary_key=True)


class Invoice(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    bill_type = db.Column(db.Enum("paid", "free", "trial", name="bill_kind"))
    acct_id = db.Column(db.Integer, db.ForeignKey("acct.id", ondelete="{ondelete}"))
    created = db.Column(db.DateTime(timezone=True))
"""
BILLING_TABLES = """\
op.create_table("acct", sa.Column("id", sa.Integer, primary_key=True))
op.create_table(
    "invoice",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("bill_type", sa.Enum("paid", "free", name="bill_type")),
    sa.Column("acct_id", sa.Integer, sa.ForeignKey("acct.id", ondelete="CASCADE")),
    sa.Column("created", sa.DateTime()),
)"""
NARROW = {
    "postgresql": "ALTER TABLE invoice ALTER COLUMN bill_type TYPE varchar(5)",
    "mysql": "ALTER TABLE invoice MODIFY bill_type varchar(5)",
}
BILL_TYPE = "modify_type invoice.bill_type"


def billing_project(root: Path, url: str, ondelete: str = "CASCADE") -> Project:
    project = flask_project(root, url, BILLING_MODELS.replace("{ondelete}", ondelete))
    project.revision(
        "b1",
        None,
        upgrade=BILLING_TABLES,
        downgrade='op.drop_table("invoice")\nop.drop_table("acct")',
        message="create billing",
    )
    return project


def drift_of(project: Project) -> list[dict[str, Any]]:
    result = cli(project, "drift", "--json")
    assert result.returncode in (0, 7), result.stderr
    return list(json.loads(result.stdout)["differences"])


def execute(url: str, *statements: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def worker_for(project: Project) -> Worker:
    settings = load_settings(str(project.config), cwd=project.root)
    return Worker.start(WorkerJob.from_settings(settings), python=settings.target.python or None)


def known_file(project: Project) -> dict[str, Any]:
    return dict(json.loads((project.migrations / differences.FILE_NAME).read_text()))


def use_url(project: Project, url: str, extra: str = "") -> Project:
    """The same repository pointed at another database (a developer's SQLite, CI's PostgreSQL)."""
    project.url = url
    project.write_config(extra=extra, models="myapp.models:db")
    return project


# --------------------------------------------------------------------------- whole differences


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [pytest.param("postgresql", marks=pytest.mark.postgres), pytest.param("mysql", marks=pytest.mark.mysql)],
)
def test_a_baselined_enum_column_altered_by_hand_is_drift_again(tmp_path: Path, kind: str) -> None:
    with dbs.database(kind, tmp_path) as url:
        project = billing_project(tmp_path / "p", url)
        ok(project, "apply")
        accepted = drift_of(project)
        assert BILL_TYPE in [d["key"] for d in accepted]
        ok(project, "baseline")
        assert drift_of(project) == []
        ok(project, "check")
        with worker_for(project) as worker:
            assert worker.generate().path is None  # dev mode leaves the accepted difference out

        execute(url, NARROW[kind])  # the enum column narrowed by hand
        found = drift_of(project)
        assert [d["key"] for d in found] == [BILL_TYPE]
        assert "database VARCHAR(5)" in found[0]["text"] and "ENUM bill_kind(" in found[0]["text"]
        assert cli(project, "check").returncode == 7
        with worker_for(project) as worker:
            generated = worker.generate()
        assert [(op["kind"], op["name"]) for op in generated.operations] == [("alter_column", "bill_type")]

        # negative control: matched by kind and object name only (the old rule), it is hidden
        by_name = differences.Known.of_keys(d["key"] for d in accepted)
        assert differences.unknown(found, by_name) == []
        assert differences.unknown(found, differences.load_for(settings_of(project))) == found


def settings_of(project: Project) -> Any:
    return load_settings(str(project.config), cwd=project.root)


@pytest.mark.slow
@pytest.mark.postgres
def test_baseline_on_one_dialect_keeps_the_others(tmp_path: Path, pg_url: str, sqlite_url: str) -> None:
    project = billing_project(tmp_path / "p", pg_url)
    ok(project, "apply")
    on_pg = {d["key"] for d in drift_of(project)}
    ok(project, "baseline")
    use_url(project, sqlite_url)
    ok(project, "apply")
    on_sqlite = {d["key"] for d in drift_of(project)}
    assert on_pg - on_sqlite == {"modify_type invoice.created"}  # timezone: PostgreSQL keeps it
    ok(project, "baseline")
    saved = known_file(project)
    assert saved["version"] == 2 and set(saved["dialects"]) == {"postgresql", "sqlite"}
    assert {d["key"] for d in saved["dialects"]["postgresql"]} == on_pg
    assert {d["key"] for d in saved["dialects"]["sqlite"]} == on_sqlite
    assert drift_of(project) == []
    use_url(project, pg_url)
    assert drift_of(project) == []  # SQLite's baseline did not overwrite PostgreSQL's
    ok(project, "check")

    # negative control: one list for every dialect (the old file), the last baseline's: PostgreSQL
    # reports the difference SQLite does not have
    only_sqlite = differences.Known(frozenset((d["key"], d["detail"]) for d in saved["dialects"]["sqlite"]))
    with worker_for(project) as worker:
        left = differences.unknown(worker.compare(), only_sqlite)
    assert {d["key"] for d in left} == {BILL_TYPE, "modify_type invoice.created"}  # values differ too


# --------------------------------------------------------------------------- readable drift


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def test_a_foreign_key_whose_ondelete_differs_is_one_readable_difference(tmp_path: Path, kind: str) -> None:
    with dbs.database(kind, tmp_path) as url:
        project = billing_project(tmp_path / "p", url, ondelete="SET NULL")
        ok(project, "apply")
        fks = [d for d in drift_of(project) if "fk" in d["kind"]]
        assert [(d["kind"], d["key"]) for d in fks] == [("modify_fk", FK)]
        assert fks[0]["text"] == (
            f"foreign key {FK.split(' ', 1)[1]} differs only in ondelete (database CASCADE, models SET NULL)"
        )
        result = cli(project, "drift")
        assert result.stderr.count("acct_id") == 1, result.stderr  # one line, not two alike
        enum = next(d for d in drift_of(project) if d["key"] == BILL_TYPE)
        assert "VARCHAR(4), models VARCHAR" not in enum["text"]  # the enum shown as an enum
        assert "'paid', 'free', 'trial'" in enum["text"]

        ok(project, "baseline")
        assert drift_of(project) == []
        with worker_for(project) as worker:
            assert worker.generate().path is None  # drop and re-create left out together
            redone = worker.generate(known=[])  # the control: it is a real difference
        assert sorted(op["kind"] for op in redone.operations if "foreign" in op["kind"]) == [
            "add_foreign_key",
            "drop_foreign_key",
        ]
        Path(str(redone.path)).unlink()  # the control's revision is not kept

        project.root.joinpath("myapp", "models.py").write_text(
            BILLING_MODELS.replace("{ondelete}", "RESTRICT")
        )  # another ondelete: drift again
        again = [d for d in drift_of(project) if d["kind"] == "modify_fk"]
        assert len(again) == 1 and "models RESTRICT" in again[0]["text"]


FK = "modify_fk invoice(acct_id)->acct(id)"


# --------------------------------------------------------------------------- format 1 files

V1_FILE = {
    "version": 1,
    "differences": [
        {"key": BILL_TYPE, "text": f"{BILL_TYPE}: database VARCHAR(4), models VARCHAR(5)"},
        {"key": "remove_table audit_log", "text": "table audit_log is only in the database"},
    ],
}


def diff(key: str, detail: str = "") -> dict[str, str]:
    return {"kind": key.split(" ", 1)[0], "key": key, "detail": detail, "text": key}


def test_a_format_1_file_loads_with_its_value_blind_entries_left_out(tmp_path: Path) -> None:
    path = tmp_path / differences.FILE_NAME
    path.write_text(json.dumps(V1_FILE))
    known = differences.load(path, "sqlite")
    assert known.matches(diff("remove_table audit_log"))  # the key is the whole difference
    assert not known.matches(diff(BILL_TYPE, "database VARCHAR(5); models ENUM('a')"))
    assert list(known) == ["remove_table audit_log"]

    accepted = diff(BILL_TYPE, "database ENUM bill_type('paid', 'free'); models ENUM ...")
    assert differences.save(path, [accepted], "postgresql") == 1
    saved = json.loads(path.read_text())
    assert saved["version"] == 2 and saved["differences"] == V1_FILE["differences"]
    on_pg = differences.load(path, "postgresql")
    assert on_pg.matches(accepted) and not on_pg.matches(diff("remove_table audit_log"))
    assert differences.load(path, "sqlite") == known  # not baselined there yet: the old list
    assert differences.dialect_of("postgres://u@h/db") == "postgresql"
    assert differences.dialect_of("mysql+pymysql://u@h/db") == "mysql"


@pytest.mark.parametrize(
    "body",
    [
        '{"differences": [{"text": "no key"}]}',
        "[1]",
        "not json",
        '{"version": 2, "dialects": {"sqlite": [1]}}',
    ],
)
def test_a_broken_known_differences_file_names_itself_and_the_fix(tmp_path: Path, body: str) -> None:
    path = tmp_path / differences.FILE_NAME
    path.write_text(body)
    with pytest.raises(ConfigError, match="reconciler baseline") as caught:
        differences.load(path, "sqlite")
    assert str(path) in str(caught.value)


@pytest.mark.slow
def test_a_format_1_baseline_still_loads_and_no_longer_hides_a_column(
    tmp_path: Path, sqlite_url: str
) -> None:
    project = billing_project(tmp_path / "p", sqlite_url)
    ok(project, "apply")
    (project.migrations / differences.FILE_NAME).write_text(json.dumps(V1_FILE))
    result = cli(project, "drift", "--json")
    assert result.returncode == 7, result.stderr
    assert [d["key"] for d in json.loads(result.stdout)["differences"]] == [BILL_TYPE]
    assert "known_differences_outdated" in result.stderr and "reconciler baseline" in result.stderr
    ok(project, "baseline")
    assert drift_of(project) == []
    assert known_file(project)["differences"] == V1_FILE["differences"]  # kept for other dialects


# --------------------------------------------------------------------------- Alembic's chatter


@pytest.mark.parametrize(
    ("logger", "message", "level"),
    [
        (
            "alembic.ddl.postgresql",
            "Detected sequence named 'invoice_id_seq' as owned by integer "
            "column 'invoice(id)', assuming SERIAL and omitting",
            "debug",
        ),
        ("alembic.runtime.plugins", "setting up autogenerate plugin alembic.autogenerate.schemas", "debug"),
        ("alembic.autogenerate.compare", "Detected type change from ENUM to VARCHAR", "debug"),
        ("alembic.runtime.migration", "Context impl PostgresqlImpl.", "debug"),
        ("alembic.runtime.migration", "Running upgrade  -> b1, create billing", "debug"),  # ours says it
        ("alembic.ddl.postgresql", "Detected sequence named 'x'", "warning"),  # not info: kept
        ("myapp", "Detected a thing", "info"),  # not Alembic's
    ],
)
def test_alembic_chatter_is_debug(logger: str, message: str, level: str) -> None:
    given = "warning" if level == "warning" else "info"
    assert logs.alembic_level(given, logger, message) == level


@pytest.mark.slow
@pytest.mark.postgres
def test_alembic_info_lines_stay_out_of_the_console_at_info(tmp_path: Path, pg_url: str) -> None:
    project = billing_project(tmp_path / "p", pg_url)
    ok(project, "apply")
    chatter = ("assuming SERIAL", "setting up autogenerate plugin", "Detected ")
    shown = cli(project, "drift")
    assert shown.returncode == 7, shown.stderr
    assert "bill_type" in shown.stderr and not any(c in shown.stderr for c in chatter), shown.stderr
    # negative control: at debug they are there (the fixture does produce them)
    use_url(project, pg_url, extra='[logging]\nlevel = "debug"\n')
    verbose = cli(project, "drift")
    assert all(c in verbose.stderr for c in chatter), verbose.stderr


# --------------------------------------------------------------------------- dev mode


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("baselined", [True, False], ids=["baselined", "negative_control"])
def test_dev_mode_generates_nothing_for_a_baselined_difference(
    tmp_path: Path, pg_url: str, baselined: bool
) -> None:
    """`run --mode dev` compares everything at start: the accepted enum difference is left out
    (no revision); without the baseline it is generated."""
    from tests.pgcluster import wait_until
    from tests.runtime.test_devloop import dev, revision_files

    project = billing_project(tmp_path / "p", pg_url)
    ok(project, "apply")
    if baselined:
        ok(project, "baseline")
    with dev(project, "draft = false") as log:
        event = "no_changes" if baselined else "revision_generated"
        wait_until(lambda: f'"{event}"' in log.text() or f" {event} " in log.text(), 60, event)
        written = [p.name for p in revision_files(project) if not p.name.startswith("b1_")]
        assert len(written) == (0 if baselined else 1), log.text()
        assert baselined or "bill_type" in written[0]
        assert ("known_differences" in log.text()) is baselined


# --------------------------------------------------------------------------- compare = generation

EDITS = {
    "add_index": ("email = db.Column(db.String(120))", "email = db.Column(db.String(120), index=True)"),
    "add_unique": ("email = db.Column(db.String(120))", "email = db.Column(db.String(120), unique=True)"),
    "modify_nullable": (
        "email = db.Column(db.String(120))",
        "email = db.Column(db.String(120), nullable=False)",
    ),
    "add_column": (
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n    age = db.Column(db.Integer, nullable=False)\n",
    ),
    "add_table": (
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n\n\n"
        "class Tag(db.Model):\n    id = db.Column(db.Integer, primary_key=True)\n",
    ),
}


@pytest.mark.core
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_generation_leaves_out_exactly_what_compare_described(
    tmp_path: Path, sqlite_url: str, edit: str
) -> None:
    """Dev mode matches the operations it generates against the file the compare wrote: both
    must describe a difference alike (key and detail), for each kind."""
    from tests.worker.test_generate import flask_gen

    made = flask_gen(tmp_path / "proj", sqlite_url)
    made.baseline()
    made.edit_models(*EDITS[edit])
    with made.start() as worker:
        found = worker.compare()
    assert found
    whole = differences.Known(frozenset((d["key"], d["detail"]) for d in found))
    assert made.generate(known=whole).path is None
    other = differences.Known(frozenset((d["key"], d["detail"] + " (other)") for d in found))
    assert made.generate(known=other).path is not None  # the same objects, other values: generated
