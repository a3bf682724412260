"""Every sync state, on SQLite, PostgreSQL and MariaDB, through the real CLI."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.builders import Project, create_table, db_heads, flask_project, table_names
from tests.cli import run_cli

pytestmark = pytest.mark.core


def status(project: Project) -> tuple[int, dict[str, Any]]:
    result = run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def apply(project: Project) -> Any:
    return run_cli(["apply", "--config", str(project.config)], cwd=project.root)


def test_lifecycle_of_states(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(3)

    code, data = status(project)
    assert code == 0
    assert data["state"] == data["sync_state"] == "uninitialized_empty"
    assert data["pending"] == ["r0000", "r0001", "r0002"]
    assert {"state", "sync_state", "conditions", "db_heads", "repo_heads", "pending"} <= set(data)

    result = apply(project)
    assert result.returncode == 0, result.stderr
    code, data = status(project)
    assert (code, data["state"], data["db_heads"], data["pending"]) == (0, "in_sync", ["r0002"], [])

    project.chain(1, prefix="s", start_down="r0002")
    code, data = status(project)
    assert (data["state"], data["pending"]) == ("behind", ["s0000"])
    assert apply(project).returncode == 0
    assert db_heads(db_url) == {"s0000"}

    # The app was rolled back: the repository no longer has s0000 → ahead, nothing applied.
    (next(project.versions.glob("s0000_*.py"))).unlink()
    code, data = status(project)
    assert (code, data["state"], data["unknown"]) == (0, "ahead", ["s0000"])
    result = apply(project)
    assert result.returncode == 4
    assert "s0000" in result.stderr
    assert db_heads(db_url) == {"s0000"}

    # Meanwhile someone else wrote another revision on r0002 → diverged.
    project.chain(1, prefix="x", start_down="r0002")
    _, data = status(project)
    assert data["state"] == "diverged"
    assert apply(project).returncode == 4
    assert db_heads(db_url) == {"s0000"}
    assert "t_x0" not in table_names(db_url)


def test_multiple_heads_exit_4_naming_heads_and_branch_point(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    project.revision("a1", "r0001", upgrade=create_table("ta"))
    project.revision("b1", "r0001", upgrade=create_table("tb"))
    _, data = status(project)
    assert data["state"] == "multiple_heads"
    assert sorted(data["fork"]) == ["a1", "b1"] and data["branch_point"] == "r0001"
    result = apply(project)
    assert result.returncode == 4
    assert "a1" in result.stderr and "b1" in result.stderr and "r0001" in result.stderr
    assert "merge" in result.stderr
    assert not {"ta", "tb", "t_r0"} & table_names(db_url)


def test_apply_through_a_merge_revision(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(1)
    project.revision("a1", "r0000", upgrade=create_table("ta"))
    project.revision("b1", "r0000", upgrade=create_table("tb"))
    project.revision("m1", ["a1", "b1"], message="merge heads")
    project.revision("c1", "m1", upgrade=create_table("tc"))
    result = apply(project)
    assert result.returncode == 0, result.stderr
    assert db_heads(db_url) == {"c1"}
    assert {"ta", "tb", "tc", "t_r0"} <= table_names(db_url)
    _, data = status(project)
    assert data["state"] == "in_sync"


def test_independent_labelled_branches_are_legitimate_heads(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.revision("a1", None, branch_labels="shop", upgrade=create_table("ta"))
    project.revision("b1", None, branch_labels="auth", upgrade=create_table("tb"))
    result = apply(project)
    assert result.returncode == 0, result.stderr
    assert db_heads(db_url) == {"a1", "b1"}
    assert status(project)[1]["state"] == "in_sync"


def test_tables_without_version_table_need_adoption(tmp_path: Path, db_url: str) -> None:
    project = flask_project(tmp_path / "p", db_url)
    project.chain(2)
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE legacy (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    _, data = status(project)
    assert data["state"] == "uninitialized_with_tables"
    result = apply(project)
    assert result.returncode == 4
    assert "stamp" in result.stderr
    assert table_names(db_url) == {"legacy"}  # history was not replayed over existing tables


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_is_unknown_exit_5(tmp_path: Path) -> None:
    url = f"postgresql://root@127.0.0.1:{free_port()}/nothing"
    project = flask_project(tmp_path / "p", url)
    project.chain(1)
    code, data = status(project)
    assert (code, data["state"]) == (5, "unknown")
    result = apply(project)
    assert result.returncode == 5
    assert "unreachable" in result.stderr
    assert "Traceback" not in result.stderr
