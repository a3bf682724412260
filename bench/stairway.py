"""`reconciler test` against pytest-alembic on the same generated history, side by side.

    python -m bench.stairway [--revisions 200] [--dialect postgresql] [--repeat 1]

The project is `alembic init`'s layout with a history of N revisions, each creating a table and
a unique index (downgrade: drops them), and models declaring all of them. Measured as whole
processes, on a fresh database each:
- ours: `reconciler test` (every revision upgraded, downgraded, upgraded again, three schema
  fingerprints each; then the models at head);
- the peer: pytest-alembic's `test_up_down_consistency` and `test_upgrade`, in its own virtual
  environment (made on the first run in bench/.venv-peers, from PyPI);
- ours with `--jobs 2` (PostgreSQL: two ranges at once, from a template snapshot);
- ours with `--since HEAD` after an edit of the last 2 revisions (the project is a git repository).
Prints seconds and the ratio peer / ours. Goal (issue 16): >= 3x on PostgreSQL for the full run,
and the `--since` run over 2 changed revisions <= 10 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, median, row, timed
from tests import dbs
from tests.builders import Project, alembic_project

PEERS = ROOT / "bench" / ".venv-peers"
PEER_PACKAGES = ("pytest", "pytest-alembic", "alembic", "sqlalchemy", "psycopg[binary]", "pymysql")

CONFTEST = """\
import os

import pytest
import sqlalchemy as sa
from pytest_alembic.config import Config


@pytest.fixture
def alembic_config():
    return Config(config_options={"file": "alembic.ini", "script_location": "migrations"})


@pytest.fixture
def alembic_engine():
    return sa.create_engine(os.environ["BENCH_URL"])
"""
PEER_TESTS = "from pytest_alembic.tests import test_up_down_consistency, test_upgrade  # noqa: F401\n"


def peer_python() -> Path:
    python = PEERS / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def history(folder: Path, url: str, revisions: int) -> Project:
    tables = [f"t{n:04d}" for n in range(revisions)]
    models = "import sqlalchemy as sa\nfrom sqlalchemy.orm import declarative_base\n\n"
    models += "Base = declarative_base()\n"
    models += "".join(
        f'sa.Table("{t}", Base.metadata, sa.Column("id", sa.Integer, primary_key=True), '
        f'sa.Column("code", sa.String(20)), sa.Index("ix_{t}_code", "code", unique=True))\n'
        for t in tables
    )
    proj = alembic_project(folder, url, models)
    down = None
    for n, table in enumerate(tables):
        rev = f"r{n:04d}"
        upgrade = (
            f'op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True), '
            f'sa.Column("code", sa.String(20)))\n'
            f'op.create_index("ix_{table}_code", "{table}", ["code"], unique=True)'
        )
        downgrade = f'op.drop_index("ix_{table}_code", table_name="{table}")\nop.drop_table("{table}")'
        proj.revision(rev, down, upgrade=upgrade, downgrade=downgrade, message=f"create {table}")
        down = rev
    (proj.root / "conftest.py").write_text(CONFTEST)
    (proj.root / "test_migrations.py").write_text(PEER_TESTS)
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=proj.root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=proj.root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "history"], cwd=proj.root, check=True)
    return proj


def env(url: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    out.update(BENCH_URL=url, PYTHONPATH=str(ROOT))
    return out


def measure(kind: str, revisions: int, folder: Path, peer: Path) -> dict[str, float]:
    seconds: dict[str, float] = {}
    ours = [sys.executable, "-m", "reconciler", "-q"]
    with dbs.database(kind, folder) as url:
        proj = history(folder / "ours", url, revisions)
        seconds["reconciler test"] = timed([*ours, "--config", str(proj.config), "test"], proj.root, env(url))
        if kind == "postgresql":
            jobs = [*ours, "--config", str(proj.config), "test", "--jobs", "2"]
            seconds["reconciler test --jobs 2"] = timed(jobs, proj.root, env(url))
        since = [*ours, "--config", str(proj.config), "test", "--since", "HEAD"]
        # the last 2 revisions edited since the commit: their messages reworded
        for rev in (f"r{revisions - 2:04d}", f"r{revisions - 1:04d}"):
            (path,) = proj.versions.glob(f"{rev}_*.py")
            path.write_text(path.read_text().replace('"""create', '"""Create', 1))
        seconds["reconciler test --since (2 changed)"] = timed(since, proj.root, env(url))
    with dbs.database(kind, folder) as url:
        proj = history(folder / "peer", url, revisions)
        cmd = [str(peer), "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_migrations.py"]
        seconds["pytest-alembic"] = timed(cmd, proj.root, env(url))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revisions", type=int, default=200)
    parser.add_argument("--dialect", default="postgresql", choices=("sqlite", "postgresql", "mysql"))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    peer = peer_python()
    runs: list[dict[str, float]] = []
    for attempt in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-stairway-") as tmp:
            runs.append(measure(args.dialect, args.revisions, Path(tmp) / str(attempt), peer))
    result = {key: median([r[key] for r in runs]) for key in runs[0]}
    widths = (40, 10, 10)
    print(row(("case", "seconds", "peer/ours"), widths))
    peer_s = result["pytest-alembic"]
    for key, value in result.items():
        ratio = f"{peer_s / value:.1f}x" if key.startswith("reconciler test") and "since" not in key else ""
        print(row((key, f"{value:.2f}", ratio), widths))
    print(f"({args.revisions} revisions on {args.dialect}; median of {args.repeat})")


if __name__ == "__main__":
    main()
