"""`reconciler test` on real SQLite, PostgreSQL and MariaDB: a clean history passes; each seeded
defect is caught and named (revision, step, difference); JUnit XML for CI; `--since`."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.builders import Project, create_table
from tests.commands.test_heads import GitRepo
from tests.runtime.test_devloop import CREATE_USER, baseline_project
from tests.system.test_cli_admin import cli

pytestmark = pytest.mark.core

CREATE_KIND = (
    'op.create_table("kind", sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Integer))'
)
DROP_KIND = 'op.drop_table("kind")'
KIND_MODEL = (
    "\n\nclass Kind(db.Model):\n    id = db.Column(db.Integer, primary_key=True)\n"
    "    v = db.Column(db.Integer)\n"
)


def project_of(tmp_path: Path, url: str, extra_models: str = KIND_MODEL) -> Project:
    """The tutorial's user table (base0001) and a `kind` table (k1), each as its models say."""
    project = baseline_project(tmp_path, url)
    project.revision(  # with the downgrade `flask db migrate` writes (the fixture's has none)
        "base0001", None, upgrade=CREATE_USER, downgrade='op.drop_table("user")', message="create user table"
    )
    models = project.root / "myapp" / "models.py"
    models.write_text(models.read_text() + extra_models)
    project.revision("k1", "base0001", upgrade=CREATE_KIND, downgrade=DROP_KIND, message="kind")
    project.write_config(models="myapp.models:db")
    return project


def run_test(project: Project, *args: str) -> tuple[int, str]:
    result = cli(project, "test", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr


def test_a_clean_history_passes(tmp_path: Path, db_url: str) -> None:
    project = project_of(tmp_path, db_url)
    junit = tmp_path / "junit.xml"
    code, err = run_test(project, "--junit", str(junit))
    assert code == 0, err
    assert "2 of 2 revision(s) stepped: passed" in err
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "6" and suite.get("failures") == "0"


def test_an_empty_downgrade_is_caught(tmp_path: Path, db_url: str) -> None:
    project = project_of(tmp_path, db_url)
    project.revision("k1", "base0001", upgrade=CREATE_KIND, downgrade="pass", message="kind")
    junit = tmp_path / "junit.xml"
    code, err = run_test(project, "--junit", str(junit))
    assert code == 7 and "k1: downgrade: extra table kind" in err, err
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert cases["base0001 downgrade"].find("failure") is None
    assert "extra table kind" in str(cases["k1 downgrade"].find("failure").get("message"))  # type: ignore[union-attr]
    assert cases["k1 upgrade again"].find("skipped") is not None


def test_a_downgrade_that_leaves_an_index(tmp_path: Path, db_url: str) -> None:
    project = project_of(tmp_path, db_url)
    project.revision(
        "ix2", "k1", upgrade='op.create_index("ix_kind_v", "kind", ["v"])', downgrade="pass", message="index"
    )
    code, err = run_test(project)
    assert code == 7 and "ix2: downgrade: extra index" in err and "ix_kind_v" in err, err


@pytest.mark.postgres
def test_an_enum_type_left_by_the_downgrade(tmp_path: Path, pg_url: str) -> None:
    project = project_of(tmp_path, pg_url)
    project.revision(
        "en2",
        "k1",
        upgrade='op.create_table("feeling", sa.Column("mood", sa.Enum("ok", "sad", name="mood")))',
        downgrade='op.drop_table("feeling")',  # the classic: the type create_table made stays
        message="mood",
    )
    code, err = run_test(project)
    assert code == 7 and "en2: downgrade: extra enum mood (ok, sad)" in err, err


def test_an_upgrade_that_is_not_repeatable(tmp_path: Path, db_url: str) -> None:
    project = project_of(tmp_path, db_url)
    insert = (
        'op.bulk_insert(sa.table("user", sa.column("username"), sa.column("email")), '
        '[{"username": "admin", "email": "admin@example.invalid"}])'
    )
    project.revision("d2", "k1", upgrade=insert, downgrade="pass", message="seed admin")
    code, err = run_test(project)
    assert code == 7 and "d2: upgrade again: IntegrityError" in err, err


def test_a_model_module_nobody_imports(tmp_path: Path, db_url: str) -> None:
    project = project_of(tmp_path, db_url, extra_models="")
    (project.root / "myapp" / "kinds.py").write_text("from myapp.models import db\n" + KIND_MODEL)
    code, err = run_test(project)
    assert code == 7 and "model modules imported" in err and "table(s) kind" in err, err


def test_since_steps_only_the_changed_revisions(tmp_path: Path) -> None:
    project = project_of(tmp_path, f"sqlite:///{tmp_path / 'app.db'}")
    git = GitRepo(project.root)
    git.commit("two revisions")
    project.revision(
        "ix2", "k1", upgrade='op.create_index("ix_kind_v", "kind", ["v"])', downgrade="pass", message="index"
    )
    code, err = run_test(project, "--since", "main")
    assert code == 7 and "ix2: downgrade" in err and "2 applied first" in err, err
    code, err = run_test(project, "--since", "no-such-ref")
    assert code == 2 and "--since 'no-such-ref'" in err, err


def scratch_databases(url: str) -> set[str]:
    query = "SELECT datname FROM pg_database WHERE datname LIKE 'reconciler_test_%'"
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.text(query))}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_parallel_ranges_from_template_snapshots(tmp_path: Path, pg_url: str) -> None:
    project = project_of(tmp_path, pg_url)
    before = scratch_databases(pg_url)
    code, err = run_test(project, "--jobs", "2")  # two ranges of one revision each, then the models
    assert code == 0 and "2 of 2 revision(s) stepped: passed" in err, err
    down = "k1"
    for n in range(6):
        body = create_table(f"t_c{n}")
        undo = "pass" if n == 4 else f'op.drop_table("t_c{n}")'
        project.revision(f"c{n}", down, upgrade=body, downgrade=undo)
        down = f"c{n}"
    code, err = run_test(project, "--jobs", "3")  # ranges base0001..c0, c1..c3, c4..c5
    assert code == 7 and "c4: downgrade: extra table t_c4" in err, err
    assert "c3" not in err.split("c4: downgrade")[0]  # the ranges before it passed
    assert scratch_databases(pg_url) <= before  # every snapshot dropped


def test_parallel_ranges_need_postgresql(tmp_path: Path) -> None:
    project = project_of(tmp_path, f"sqlite:///{tmp_path / 'app.db'}")
    code, err = run_test(project, "--jobs", "2")
    assert code == 2 and "only PostgreSQL" in err, err
