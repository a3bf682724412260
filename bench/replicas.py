"""Many replicas at once, and the orphan window after a killed applier (PostgreSQL).

    python bench/replicas.py [--replicas 20] [--revisions 30]

1. `--replicas` processes start at once on an empty database with `--revisions` pending:
   `reconciler apply` against `flask db upgrade` (which has no lock). Prints the time until all
   exited, how many failed, and how many revisions were entered more than once (witnessed by
   sequences, which no rollback undoes).
2. The applier is SIGKILLed while a revision sleeps on the server; a new `apply` starts at once.
   Prints how long the killed statement and a new run of the same revision overlapped, with the
   orphan wait and without it (RECONCILER_UNSAFE_DISABLE=orphan_wait), and what the wait cost.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import sqlalchemy as sa

from bench.common import APP, env_for, flask_db, reconciler
from tests import dbs
from tests.builders import flask_project
from tests.system.test_concurrency import (
    SLEEPERS,
    entries,
    prepare_witness,
    sleeper_project,
    wait_for,
    witnessed_chain,
)


def replicas(tool: str, count: int, revisions: int, folder: Path) -> tuple[float, int, int]:
    with dbs.pg_database() as url:
        proj = flask_project(folder / tool, url)
        (proj.root / "myapp" / "app.py").write_text(APP)
        revs = witnessed_chain(proj, revisions, "postgresql")
        prepare_witness(url, revs, "postgresql")
        cmd = reconciler(proj, "apply") if tool == "reconciler" else flask_db(proj, "upgrade")
        env = env_for(url)
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                cmd, cwd=proj.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            for _ in range(count)
        ]
        failed = sum(1 for p in procs if p.wait(timeout=600) != 0)
        elapsed = time.perf_counter() - started
        twice = sum(1 for n in entries(url, revs, "postgresql").values() if n > 1)
        return elapsed, failed, twice


class Overlap(threading.Thread):
    """Measures, from pg_stat_activity, how long two runs of the sleeping revision overlapped."""

    def __init__(self, engine: sa.engine.Engine, orphan: int) -> None:
        super().__init__(daemon=True)
        self.engine, self.orphan = engine, orphan
        self.overlap = 0.0
        self.orphan_end: float | None = None
        self.next_start: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        last = time.perf_counter()
        with self.engine.connect() as conn:
            while not self.stop.is_set():
                pids = set(conn.execute(SLEEPERS).scalars().all())
                now = time.perf_counter()
                if len(pids) > 1:
                    self.overlap += now - last
                if self.orphan not in pids and self.orphan_end is None:
                    self.orphan_end = now
                if pids - {self.orphan} and self.next_start is None:
                    self.next_start = now
                last = now
                time.sleep(0.005)


def orphan_window(folder: Path, disable_wait: bool) -> tuple[float, float]:
    with dbs.pg_database() as url:
        proj = sleeper_project(folder / ("nowait" if disable_wait else "wait"), url)
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        env = env_for(url)
        killed = subprocess.Popen(
            reconciler(proj, "apply"),
            cwd=proj.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with engine.connect() as conn:
            orphan = int(wait_for(lambda: conn.execute(SLEEPERS).scalars().all(), 60, "sleep")[0])
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        if disable_wait:
            env["RECONCILER_UNSAFE_DISABLE"] = "orphan_wait"
        watcher = Overlap(engine, orphan)
        watcher.start()
        subprocess.run(reconciler(proj, "apply"), cwd=proj.root, env=env, check=True, capture_output=True)
        watcher.stop.set()
        watcher.join()
        engine.dispose()
        gap = (watcher.next_start or 0) - (watcher.orphan_end or 0)
        return watcher.overlap, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--revisions", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{args.replicas} processes at once, {args.revisions} pending revisions, PostgreSQL")
        print("tool                 seconds  failed  revisions entered twice")
        for tool, label in (("flask", "flask db upgrade"), ("reconciler", "reconciler apply")):
            elapsed, failed, twice = replicas(tool, args.replicas, args.revisions, Path(tmp))
            print(f"{label:<20} {elapsed:7.1f}  {failed:6d}  {twice:6d}")
        print("\norphan window after SIGKILL of the applier (revision sleeps 4 s on the server)")
        for disable, label in ((False, "with orphan wait"), (True, "without (unsafe)")):
            overlap, gap = orphan_window(Path(tmp), disable)
            print(f"{label:<18} overlap {overlap:5.2f} s   next entry {gap:+.2f} s after the orphan ended")


if __name__ == "__main__":
    main()
