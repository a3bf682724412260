"""Shared pieces of the benchmarks: a project both tools can run, and timing helpers.

The project is built by the test suite's builders (Flask-Migrate's own template), plus the small
Flask app `flask db` needs, so `reconciler` and Flask-Migrate work on the very same files.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.builders import Project, flask_project  # noqa: E402

APP = """\
import os

from flask import Flask
from flask_migrate import Migrate

from myapp.models import db

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
db.init_app(app)
migrate = Migrate(app, db)
"""

BIN = Path(sys.executable).parent


def project(folder: Path, url: str, revisions: int) -> Project:
    proj = flask_project(folder, url)
    (proj.root / "myapp" / "app.py").write_text(APP)
    proj.chain(revisions)
    return proj


def env_for(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env["DATABASE_URL"] = url
    env["PYTHONPATH"] = str(ROOT)
    return env


def timed(cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def flask_db(proj: Project, *args: str) -> list[str]:
    return [str(BIN / "flask"), "--app", "myapp.app", "db", *args, "-d", str(proj.migrations)]


def reconciler(proj: Project, *args: str) -> list[str]:
    return [sys.executable, "-m", "reconciler", "--config", str(proj.config), *args]


def proc_kib(pid: int, key: str, table: str = "status") -> int:
    """A KiB figure of /proc/<pid>/<table> (`VmHWM`, `VmRSS` of status; `Pss` of smaps_rollup);
    0 when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/{table}").read_text()
    except OSError:  # it ended between the listing and the read
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def row(cells: Sequence[object], widths: Sequence[int]) -> str:
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
