"""Dev mode: save-to-applied latency at any pace, side by side with `flask db migrate && flask db upgrade`.

    python -m bench.devloop [--sizes 50,200,1000] [--dialects sqlite,postgresql] [--saves 3]
                            [--cases 0.2s,0.5s,1s,5s,rename,burst,reader5,reader10,reader100]

For a project of N model classes (tables) already at head: a model file gains a column; the time
from the file written to the column present in the database. Ours: `reconciler run --mode dev`
already running, once with drafts off (each save one plain revision, as `flask db migrate` makes)
and once with drafts on, the default (the first save writes the draft, the next ones amend it:
downgrade, regenerate, apply). Theirs: the whole `flask db migrate && flask db upgrade` on an
identical copy (the pace does not change it; a polling reader does, so it runs beside theirs too).

Cases (median of --saves each):

- `0.2s`, `0.5s`, `1s`, `5s`: the save is made this long after the previous change was applied,
  written in place (`path.write_text`, as most editors do);
- `rename`: 1 s, saved by writing a temporary file and renaming it over the model file;
- `burst`: ten saves 0.1 s apart (each adds a column); the time from the LAST save to its column
  present, and the generations the daemon's log shows for the burst (the goal: one);
- `readerN`: 1 s, with another process opening the SQLite file every N ms and reading a table
  (an app's dev server or a test polling its database); SQLite only.

The database is watched without taking its locks, or the benchmark would measure itself: one open
PostgreSQL connection with a catalog query per look; for SQLite, `stat()` of the file (and of its
rollback journal) every 5 ms, and `pragma table_info` only after that changed.
Goals: <= 0.3 s at 50 tables, <= 0.8 s at 200, <= 1.5 s at 1000 whatever the pace; the burst <=
0.3 s after its last save at 50 tables, in one generation; <= 0.4 s with a reader every 10 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from bench.common import APP, BIN, env_for, median, reconciler
from tests import dbs
from tests.builders import Project, flask_project

APPLIED_EVENTS = ("revision_generated", "draft_removed")  # a generation that wrote (or removed) its revision
DISCARDED_EVENT = "generation_discarded"  # one dropped before it was applied (a newer save, a pull)


@dataclass(frozen=True)
class Case:
    pause: float = 1.0  # seconds after the previous change was applied
    rename: bool = False  # save by tmp file + rename (else in place)
    burst: int = 1  # saves 0.1 s apart; timed from the last
    reader: float | None = None  # seconds between a reader's opens of the SQLite file


CASES = {
    "0.2s": Case(pause=0.2),
    "0.5s": Case(pause=0.5),
    "1s": Case(pause=1.0),
    "5s": Case(pause=5.0),
    "rename": Case(rename=True),
    "burst": Case(burst=10),
    "reader5": Case(reader=0.005),
    "reader10": Case(reader=0.010),
    "reader100": Case(reader=0.100),
}
BURST_GAP = 0.1


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


def project(
    folder: Path, url: str, tables: int, draft: bool = False, debounce: float | None = None
) -> Project:
    proj = flask_project(folder, url, models=models_source(tables, {}))
    (proj.root / "myapp" / "app.py").write_text(APP)
    body = "\n".join(
        f'op.create_table("t{n}", sa.Column("id", sa.Integer(), nullable=False), '
        f'sa.Column("name", sa.String(length=50), nullable=True), sa.PrimaryKeyConstraint("id"))'
        for n in range(tables)
    )
    proj.revision("init0001", None, upgrade=body, message="initial")
    dev = f"[dev]\ndraft = {str(draft).lower()}\n"
    if debounce is not None:
        dev += f"debounce = {debounce}\n"
    proj.write_config(extra=dev, models="myapp.models:db")
    subprocess.run(
        reconciler(proj, "apply"), cwd=proj.root, env=env_for(url), check=True, capture_output=True
    )
    return proj


class ColumnProbe:
    """Watches for a column without disturbing what it measures: on PostgreSQL one open connection
    and one catalog query per look (a new connection and a full reflection per look, 5 ms apart,
    would load the 2-core machine the measured process runs on); on SQLite a `stat()` of the file
    and of its rollback journal per look, and a read only after they changed (a read takes a
    SHARED lock, which a committing writer waits for: the benchmark would slow what it measures)."""

    QUERIES = {
        "postgresql": "SELECT count(*) FROM pg_attribute WHERE attrelid = CAST(:table AS regclass) "
        "AND attname = :column AND NOT attisdropped",
        "sqlite": "SELECT count(*) FROM pragma_table_info(:table) WHERE name = :column",
    }

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        self.query = sa.text(self.QUERIES[self.engine.dialect.name])
        self.conn = self.engine.connect()
        database = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        self.files = (Path(database), Path(database + "-journal")) if database else ()
        self.seen: tuple[object, ...] | None = None
        self.recheck = 0.0  # file times are coarse (a clock tick): one more read soon after a change

    def _stamp(self) -> tuple[object, ...]:
        out: list[object] = []
        for path in self.files:
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def has(self, table: str, column: str) -> bool:
        if self.files:
            stamp, now = self._stamp(), time.monotonic()
            if stamp[1] is not None:
                return False  # a write in progress: look again when its journal is gone
            if stamp == self.seen:
                if not self.recheck or now < self.recheck:
                    return False
                self.recheck = 0.0
            else:
                self.seen, self.recheck = stamp, now + 0.02
        return bool(self.conn.execute(self.query, {"table": table, "column": column}).scalar())

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def save(proj: Project, text: str, rename: bool = False) -> None:
    path = proj.root / "myapp" / "models.py"
    if not rename:
        path.write_text(text)  # in place, as most editors do
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def wait_column(probe: ColumnProbe, column: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not probe.has("t0", column):
        if time.monotonic() > deadline:
            raise SystemExit(f"column {column} never appeared")
        time.sleep(0.005)


def _read_forever(database: str, every: float, reads: multiprocessing.Value) -> None:  # type: ignore[type-arg]
    """An app's polling: open the file, read a table, close; every `every` seconds."""
    while True:
        try:
            conn = sqlite3.connect(database, timeout=5.0)
            conn.execute("SELECT count(*) FROM t1").fetchall()
            conn.close()
            reads.value += 1
        except sqlite3.Error:
            pass  # e.g. a table being rebuilt: the app retries on its next poll
        time.sleep(every)


@contextmanager
def polling_reader(url: str, every: float | None) -> Iterator[None]:
    """Another process reading the SQLite file every `every` seconds while the block runs."""
    if every is None or not url.startswith("sqlite"):
        yield
        return
    reads = multiprocessing.Value("i", 0)
    proc = multiprocessing.Process(
        target=_read_forever, args=(sa.engine.make_url(url).database, every, reads), daemon=True
    )
    proc.start()
    try:
        deadline = time.monotonic() + 10
        while reads.value == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        yield
    finally:
        proc.terminate()
        proc.join(5)


class Daemon:
    """`reconciler run --mode dev` on a project, its JSON log readable while it runs."""

    def __init__(self, proj: Project, url: str, verbose: bool = False) -> None:
        self.proj, self.url = proj, url
        self.log = proj.root / "dev.log"
        cmd = [
            *reconciler(proj, "--log-format", "json", *(["-v"] if verbose else []), "run", "--mode", "dev")
        ]
        with open(self.log, "w") as stderr:
            self.proc = subprocess.Popen(
                cmd, cwd=proj.root, env=env_for(url), stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + 300  # the start-up full compare ends with "no_changes"
        while "no_changes" not in self.log.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"dev mode did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def events(self, since: int) -> list[str]:
        out = []
        for line in self.log.read_text()[since:].splitlines():
            try:
                out.append(json.loads(line).get("event", ""))
            except ValueError:
                continue
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def ours(
    daemon: Daemon, probe: ColumnProbe, tables: int, case: Case, saves: int, extra: list[str]
) -> tuple[list[float], list[tuple[int, int]]]:
    """Seconds from the (last) save to its column present; per burst, (generations applied,
    generations discarded)."""
    times: list[float] = []
    generations: list[tuple[int, int]] = []
    with polling_reader(daemon.url, case.reader):
        for _ in range(saves):
            time.sleep(case.pause)
            since = len(daemon.log.read_text())
            for n in range(case.burst):
                if n:
                    time.sleep(BURST_GAP)
                extra.append(f"c{len(extra)}")
                started = time.perf_counter()
                save(daemon.proj, models_source(tables, {0: extra}), case.rename)
            wait_column(probe, extra[-1])
            times.append(time.perf_counter() - started)
            if case.burst > 1:
                time.sleep(1.0)  # a generation still to come after the last column
                events = daemon.events(since)
                generations.append((sum(e in APPLIED_EVENTS for e in events), events.count(DISCARDED_EVENT)))
    return times, generations


def theirs(folder: Path, url: str, tables: int, saves: int, reader: float | None) -> list[float]:
    proj = project(folder, url, tables)
    env = env_for(url)
    flask = [str(BIN / "flask"), "--app", "myapp.app", "db"]
    out = []
    extra: list[str] = []
    with polling_reader(url, reader):
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


def run_ours(
    folder: Path, kind: str, tables: int, draft: bool, cases: list[str], args: argparse.Namespace
) -> dict[str, tuple[float, list[tuple[int, int]]]]:
    with dbs.database(kind, folder) as url:
        proj = project(folder / ("d" if draft else "o"), url, tables, draft, args.debounce)
        daemon = Daemon(proj, url, args.verbose)
        probe = ColumnProbe(url)
        out: dict[str, tuple[float, list[tuple[int, int]]]] = {}
        extra: list[str] = []
        try:
            for name in cases:
                times, generations = ours(daemon, probe, tables, CASES[name], args.saves, extra)
                out[name] = (median(times), generations)
        finally:
            probe.close()
            daemon.stop()
            if args.keep_logs:
                target = Path(args.keep_logs) / f"{kind}-{tables}-{'draft' if draft else 'plain'}.log"
                target.write_text(daemon.log.read_text())
    return out


def _gens(runs: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}+{d}d" if d else str(a) for a, d in runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="50,200,1000")
    parser.add_argument("--dialects", default="sqlite,postgresql")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--saves", type=int, default=3, help="repeats per case (the median is shown)")
    parser.add_argument(
        "--debounce", type=float, default=None, help="[dev] debounce (default: the product's)"
    )
    parser.add_argument("--no-flask", action="store_true", help="skip flask migrate+upgrade")
    parser.add_argument("--no-drafts", action="store_true", help="skip the drafts-on daemon")
    parser.add_argument("--verbose", action="store_true", help="the daemons log at debug level")
    parser.add_argument("--keep-logs", default=None, help="a directory to copy the daemons' JSON logs to")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {','.join(CASES)}")
    print(
        "save -> column present in the database (seconds, median); gens: generations per burst "
        "(applied+discarded), drafts off / on"
    )
    print(
        f"{'dialect':<11} {'tables':>6}  {'case':<9}  {'ours':>6}  {'drafts':>6}  {'flask':>6}  "
        f"{'ratio':>6}  {'drafts':>6}  gens",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.dialects.split(","):
            mine = [c for c in cases if kind == "sqlite" or CASES[c].reader is None]
            for size in (int(s) for s in args.sizes.split(",")):
                folder = Path(tempfile.mkdtemp(dir=tmp))
                plain = run_ours(folder, kind, size, False, mine, args)
                drafts = {} if args.no_drafts else run_ours(folder, kind, size, True, mine, args)
                flask: dict[float | None, float] = {}
                for name in mine:
                    reader = CASES[name].reader
                    if reader not in flask and not args.no_flask:
                        with dbs.database(kind, folder) as url:
                            f = folder / f"t{len(flask)}"
                            flask[reader] = median(theirs(f, url, size, args.saves, reader))
                    a, gens = plain[name]
                    d, dgens = drafts.get(name, (float("nan"), []))
                    b = flask.get(reader, float("nan"))
                    g = f"{_gens(gens)} / {_gens(dgens)}" if gens else ""
                    print(
                        f"{kind:<11} {size:>6}  {name:<9}  {a:6.3f}  {d:6.3f}  {b:6.3f}  "
                        f"{a / b:5.2f}x  {d / b:5.2f}x  {g}",
                        flush=True,
                    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
