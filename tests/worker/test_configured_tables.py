"""Tables made at mapper configuration go with their source table in a scoped compare.

A versioning extension (SQLAlchemy-Continuum's pattern, built here by a `__declare_last__` hook)
adds `<table>_version` with the source's columns, and one `transaction` table, when
`configure_mappers()` runs; neither has a foreign key to the source, and no file defines them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.test_dev_real_package import VERSIONED, VERSIONED_BASE
from tests.worker.test_generate import flask_gen, ops_of, run_sql

pytestmark = pytest.mark.core

DESCRIPTION = "    description = db.Column(db.String(200))\n"


def versioned_gen(root: Path, url: str, extra_models: str = ""):  # type: ignore[no-untyped-def]
    made = flask_gen(root, url, VERSIONED.format(project_extra="") + extra_models)
    made.project.revision("base0001", None, message="versioned project", upgrade=VERSIONED_BASE)
    with made.start() as worker:
        worker.upgrade("base0001")
    return made


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_changed_class_brings_its_version_table(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from tests.worker.test_generate import URL_FIXTURES

    url = request.getfixturevalue(URL_FIXTURES[kind])
    made = versioned_gen(tmp_path / "proj", url)
    run_sql(url, "ALTER TABLE note ADD COLUMN extra INTEGER")  # only a full compare sees it
    made.edit_models(
        "    name = db.Column(db.String(80), nullable=False)\n",
        "    name = db.Column(db.String(80), nullable=False)\n" + DESCRIPTION,
    )
    models = str(made.models_file)

    scoped = made.generate(files=[models], classes={models: ["Project"]})
    assert scoped.compared == ["project", "project_version", "transaction"]
    assert sorted(ops_of(scoped)) == [
        ("add_column", "project", "description"),
        ("add_column", "project_version", "description"),
    ]
    Path(str(scoped.path)).unlink()

    other = made.generate(files=[models], classes={models: ["Note"]})  # control: still narrow
    assert other.compared == ["note", "transaction"]
    assert ops_of(other) == [("drop_column", "note", "extra")]
    Path(str(other.path)).unlink()

    by_table = made.generate(tables=["project"])  # a draft's tables (its amend) are scoped alike
    assert by_table.compared == ["project", "project_version", "transaction"]
