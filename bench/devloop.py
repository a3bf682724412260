"""Dev mode: save-to-applied latency, side by side with `flask db migrate && flask db upgrade`.

    python -m bench.devloop [--sizes 50,200,1000] [--dialects sqlite,postgresql] [--saves 3]

For a project of N model classes (tables) already at head: a model file gains a column; the time
from the file written to the column present in the database. Ours: `reconciler run --mode dev`
already running, once with drafts off (each save one plain revision, as `flask db migrate` makes)
and once with drafts on, the default (the first save writes the draft, the next ones amend it:
downgrade, regenerate, apply). Theirs: the whole `flask db migrate && flask db upgrade` on an
identical copy. Median of --saves, the saves THINK_TIME apart (as a developer's are; dev mode
readies its next interpreter then). Targets: <= 0.3 s at 50 tables, <= 1 s at 200, 3 s at 1000.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench.common import APP, BIN, env_for, median, reconciler
from tests import dbs
from tests.builders import Project, flask_project

# A developer saves seconds apart; in between, dev mode starts its next spare interpreter.
THINK_TIME = 1.0


def models_source(tables: int, extra: dict[int, list[str]]) -> str:
    lines = ["from flask_sqlalchemy import SQLAlchemy", "", "db = SQLAlchemy()", ""]
    for n in range(tables):
        lines += [
            "",
            f"class T{n}(db.Model):",
            f"    __tablename__ = 't{n}'",
            "    id = db.Column(db.Integer, primary_key=True)",
            "    name = db.Column(db.String(50))",
        ]
        lines += [f"    {col} = db.Column(db.Integer)" for col in extra.get(n, [])]
    return "\n".join(lines) + "\n"


def project(folder: Path, url: str, tables: int, draft: bool = False) -> Project:
    proj = flask_project(folder, url, models=models_source(tables, {}))
    (proj.root / "myapp" / "app.py").write_text(APP)
    body = "\n".join(
        f'op.create_table("t{n}", sa.Column("id", sa.Integer(), nullable=False), '
        f'sa.Column("name", sa.String(length=50), nullable=True), sa.PrimaryKeyConstraint("id"))'
        for n in range(tables)
    )
    proj.revision("init0001", None, upgrade=body, message="initial")
    proj.write_config(
        extra=f"[dev]\ndraft = {str(draft).lower()}\ndebounce = 0.05\n", models="myapp.models:db"
    )
    subprocess.run(
        reconciler(proj, "apply"), cwd=proj.root, env=env_for(url), check=True, capture_output=True
    )
    return proj


class ColumnProbe:
    """Watches for a column on one open connection with one catalog query per look: a new
    connection and a full reflection per look (5 ms apart) would load the 2-core machine that the
    measured process runs on, and slow what it measures."""

    QUERIES = {
        "postgresql": "SELECT count(*) FROM pg_attribute WHERE attrelid = CAST(:table AS regclass) "
        "AND attname = :column AND NOT attisdropped",
        "sqlite": "SELECT count(*) FROM pragma_table_info(:table) WHERE name = :column",
    }

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        self.query = sa.text(self.QUERIES[self.engine.dialect.name])
        self.conn = self.engine.connect()

    def has(self, table: str, column: str) -> bool:
        return bool(self.conn.execute(self.query, {"table": table, "column": column}).scalar())

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def save(proj: Project, text: str) -> None:
    path = proj.root / "myapp" / "models.py"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def wait_column(probe: ColumnProbe, column: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not probe.has("t0", column):
        if time.monotonic() > deadline:
            raise SystemExit(f"column {column} never appeared")
        time.sleep(0.005)


def ours(folder: Path, url: str, tables: int, saves: int, draft: bool = False) -> list[float]:
    proj = project(folder, url, tables, draft)
    log = proj.root / "dev.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [*reconciler(proj, "run", "--mode", "dev")],
            cwd=proj.root,
            env=env_for(url),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    out = []
    probe = ColumnProbe(url)
    try:
        deadline = time.monotonic() + 300  # the start-up full compare ends with "no_changes"
        while "no_changes" not in log.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"dev mode did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        extra: list[str] = []
        for n in range(saves):
            time.sleep(THINK_TIME)
            extra.append(f"c{n}")
            started = time.perf_counter()
            save(proj, models_source(tables, {0: extra}))
            wait_column(probe, f"c{n}")
            out.append(time.perf_counter() - started)
    finally:
        probe.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return out


def theirs(folder: Path, url: str, tables: int, saves: int) -> list[float]:
    proj = project(folder, url, tables)
    env = env_for(url)
    flask = [str(BIN / "flask"), "--app", "myapp.app", "db"]
    out = []
    extra: list[str] = []
    for n in range(saves):
        extra.append(f"c{n}")
        started = time.perf_counter()
        save(proj, models_source(tables, {0: extra}))
        for args in (["migrate", "-m", f"c{n}"], ["upgrade"]):
            subprocess.run(
                [*flask, *args, "-d", str(proj.migrations)],
                cwd=proj.root,
                env=env,
                check=True,
                capture_output=True,
            )
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="50,200,1000")
    parser.add_argument("--dialects", default="sqlite,postgresql")
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    print("save -> column present in the database (seconds, median)")
    print("dialect     tables  reconciler dev  (drafts on)  flask migrate+upgrade  ratio  (drafts on)")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.dialects.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                with dbs.database(kind, Path(tmp)) as url:
                    a = median(ours(Path(tmp) / f"o{kind}{size}", url, size, args.saves))
                with dbs.database(kind, Path(tmp)) as url:
                    d = median(ours(Path(tmp) / f"d{kind}{size}", url, size, args.saves, draft=True))
                with dbs.database(kind, Path(tmp)) as url:
                    b = median(theirs(Path(tmp) / f"t{kind}{size}", url, size, args.saves))
                print(
                    f"{kind:<11} {size:>6}  {a:14.3f}  {d:11.3f}  {b:21.3f}  {a / b:5.2f}x  {d / b:10.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
