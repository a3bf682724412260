"""Several migrations directories (chains) for one database, each with its own version table:
declared with [[target.chains]], reconciled under one lock, reported each."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.builders import Project, alembic_project, create_table, db_heads, journal_rows, table_names
from tests.cli import run_cli
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import daemon

pytestmark = pytest.mark.core

CHAINS = """
[[target.chains]]
name = "plugin"
migrations = "plugin_migrations"
version_table = "plugin_version"
"""


def plugin_dir(project: Project) -> Path:
    """A plugin's own migrations directory: env.py as `alembic init` writes it, passing its own
    version table, and revisions independent of the app's."""
    plugin = project.root / "plugin_migrations"
    (plugin / "versions").mkdir(parents=True)
    for name in ("env.py", "script.py.mako"):
        shutil.copy(project.migrations / name, plugin / name)
    env = plugin / "env.py"
    env.write_text(
        env.read_text().replace(
            "connection=connection, target_metadata=target_metadata",
            'connection=connection, target_metadata=target_metadata, version_table="plugin_version"',
        )
    )
    return plugin


def plugin_revisions(project: Project, start: int, stop: int) -> list[str]:
    plugin = Project(project.root, project.root / "plugin_migrations", project.url)
    revs = []
    for n in range(start, stop):
        rev = f"p{n:04d}"
        plugin.revision(
            rev,
            f"p{n - 1:04d}" if n else None,
            upgrade=create_table(f"plugin_t{n}"),
            downgrade=f'op.drop_table("plugin_t{n}")',
            message=f"plugin {n}",
        )
        revs.append(rev)
    return revs


def two_chains(tmp_path: Path, url: str) -> Project:
    """The app's chain at head, the plugin's three revisions behind (p0000 applied)."""
    project = alembic_project(tmp_path / "p", url)
    project.chain(2)
    plugin_dir(project)
    plugin_revisions(project, 0, 1)
    project.write_config(CHAINS, models="myapp.models:Base")
    first = cli(project, "apply")
    assert first.returncode == 0, first.stderr
    assert db_heads(url) == {"r0001"} and db_heads(url, "plugin_version") == {"p0000"}
    plugin_revisions(project, 1, 4)
    return project


def cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(project.config), *args], cwd=project.root)


def status(project: Project) -> dict[str, object]:
    result = run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_status_reports_each_chain_and_the_worst_state(tmp_path: Path, db_url: str) -> None:
    project = two_chains(tmp_path, db_url)
    data = status(project)
    assert (data["state"], data["sync_state"]) == ("behind", "behind")
    assert data["pending"] == ["p0001", "p0002", "p0003"]
    chains = {c["chain"]: c for c in data["chains"]}  # type: ignore[union-attr]
    assert list(chains) == ["main", "plugin"]
    assert (chains["main"]["state"], chains["main"]["version_table"]) == ("in_sync", "alembic_version")
    assert chains["plugin"]["state"] == "behind" and chains["plugin"]["version_table"] == "plugin_version"
    assert chains["plugin"]["db_heads"] == ["p0000"] and len(chains["plugin"]["pending"]) == 3
    text = run_cli(["--config", str(project.config), "status"], cwd=project.root).stdout
    assert "chain main (alembic_version): in_sync at r0001" in text
    assert "chain plugin (plugin_version): behind at p0000; 3 pending" in text
    assert "chain plugin:" in text  # the message names the chain that is behind


def test_negative_control_undeclared_the_plugin_chain_is_invisible(tmp_path: Path, sqlite_url: str) -> None:
    """What happened before chains could be declared: in_sync while the plugin is behind."""
    project = two_chains(tmp_path, sqlite_url)
    project.write_config(models="myapp.models:Base")
    data = status(project)
    assert data["state"] == "in_sync" and "chains" not in data
    assert db_heads(sqlite_url, "plugin_version") == {"p0000"}


def test_apply_brings_every_chain_to_its_heads_and_journals_the_chain(tmp_path: Path, db_url: str) -> None:
    project = two_chains(tmp_path, db_url)
    result = cli(project, "apply")
    assert result.returncode == 0, result.stderr
    assert "applied 3 revision(s); in sync" in result.stderr
    assert db_heads(db_url) == {"r0001"}
    assert db_heads(db_url, "plugin_version") == {"p0003"}
    assert "p0001" not in db_heads(db_url)  # each chain in its own version table
    rows = [r for r in journal_rows(db_url) if r["operation"] == "upgrade"]
    targets = {str(r["revision"]): str(r["target"]) for r in rows}
    main_target = targets["r0000"]
    assert targets["r0001"] == main_target and "/" not in main_target
    assert {targets[p] for p in ("p0000", "p0001", "p0002", "p0003")} == {f"{main_target}/plugin"}
    data = status(project)
    assert data["state"] == "in_sync"
    assert [c["state"] for c in data["chains"]] == ["in_sync", "in_sync"]  # type: ignore[union-attr]
    listed = json.loads(
        run_cli(["--config", str(project.config), "journal", "--json"], cwd=project.root).stdout
    )
    assert {row["revision"] for row in listed} >= {"r0000", "p0003"}
    again = cli(project, "apply")
    assert again.returncode == 0
    assert again.stderr.strip().splitlines()[-1] == "in sync at r0001 (main); p0003 (plugin)"


def test_from_empty_every_chain_is_applied_in_config_order(tmp_path: Path, db_url: str) -> None:
    project = alembic_project(tmp_path / "p", db_url)
    project.chain(2)
    plugin_dir(project)
    plugin_revisions(project, 0, 3)
    project.write_config(CHAINS, models="myapp.models:Base")
    before = status(project)
    assert [c["sync_state"] for c in before["chains"]] == ["uninitialized_empty"] * 2  # type: ignore[union-attr]
    result = cli(project, "apply")
    assert result.returncode == 0, result.stderr
    order = [r["revision"] for r in journal_rows(db_url) if r["operation"] == "upgrade"]
    assert order == ["r0000", "r0001", "p0000", "p0001", "p0002"]


def test_a_chain_whose_env_py_uses_another_version_table_writes_nothing(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Validated before anything is written for any chain: the app's chain is not applied either."""
    project = alembic_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    plugin_dir(project)
    plugin_revisions(project, 0, 1)
    project.write_config(CHAINS.replace('"plugin_version"', '"other_version"'), models="myapp.models:Base")
    result = cli(project, "apply")
    assert result.returncode == 2, result.stderr
    assert "version_table" in result.stderr
    assert table_names(sqlite_url) == set()


@pytest.mark.slow
def test_the_daemon_applies_and_reports_every_chain(tmp_path: Path, pg_url: str) -> None:

    project = two_chains(tmp_path, pg_url)
    project.write_config(
        CHAINS + "\n[daemon]\ninterval = 600\njitter = 0\ndebounce = 0.1\n", models="myapp.models:Base"
    )
    with daemon(project) as running:
        wait_until(lambda: db_heads(pg_url, "plugin_version") == {"p0003"}, 60, "plugin at p0003")
        doc = running.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
        assert [(c["chain"], c["state"]) for c in doc["chains"]] == [
            ("main", "in_sync"),
            ("plugin", "in_sync"),
        ]
