"""The daemon's no-op run, side by side with `flask db upgrade` at head and a bare query floor.

    python -m bench.noop [--runs 1000] [--sizes 50,500,2000] [--dialects sqlite,postgresql]
                         [--idle-seconds 60]

1. No-op run in the daemon (`reconciler run --interval 0.01`, durations from its own debug
   `run_finished` lines): p50 / p99 over --runs runs, at each project size; against
   - the floor: `SELECT version_num FROM alembic_version` on an open connection, issued at the
     same pacing (after the same 10 ms sleep), and
   - `flask db upgrade` at head as a whole process (median of 3).
2. Revision file written → applied, with the interval at 60 s (median of 5).
3. The idle daemon (prod, default interval) over --idle-seconds: RSS and CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench.common import APP, env_for, flask_db, median, percentile, reconciler, timed
from tests import dbs
from tests.builders import Project, create_table, db_heads, flask_project

PACE = 0.01


def empty_project(folder: Path, url: str, size: int) -> Project:
    """`size` revisions with empty bodies, the database stamped at head (fast to set up)."""
    proj = flask_project(folder, url)
    (proj.root / "myapp" / "app.py").write_text(APP)
    proj.chain(0)
    down = None
    for n in range(size):
        rev = f"e{n:05d}"
        proj.revision(rev, down, message=f"step {n}")
        down = rev
    proj.write_config(extra='[logging]\nlevel = "debug"\nformat = "json"\n', models="myapp.models:db")
    subprocess.run(
        reconciler(proj, "stamp", "heads", "--force"),
        cwd=proj.root,
        env=env_for(url),
        check=True,
        capture_output=True,
    )
    return proj


def daemon_noop(proj: Project, url: str, runs: int) -> list[float]:
    """Durations (ms) of the daemon's no-op runs, from its own log lines."""
    log_path = proj.root / "daemon.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [*reconciler(proj, "run", "--interval", str(PACE), "--http", "127.0.0.1:0")],
            cwd=proj.root,
            env=env_for(url),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        try:
            deadline = time.monotonic() + 120 + runs * 0.05
            while _count_runs(log_path) < runs + 20 and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    durations = []
    for line in log_path.read_text().splitlines():
        if '"run_finished"' in line:
            event = json.loads(line)
            if event.get("outcome") == "noop":
                durations.append(float(event["duration_ms"]))
    return durations[20 : 20 + runs]  # the first runs warm up caches


def _count_runs(path: Path) -> int:
    try:
        return path.read_text().count('"run_finished"')
    except OSError:
        return 0


def floor(url: str, runs: int) -> list[float]:
    """A bare version query on an open connection, at the daemon's pacing (ms)."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    out = []
    with engine.connect() as conn:
        query = sa.text("SELECT version_num FROM alembic_version")
        for _ in range(runs):
            time.sleep(PACE)
            started = time.perf_counter()
            conn.execute(query).fetchall()
            out.append((time.perf_counter() - started) * 1000)
    engine.dispose()
    return out


def flask_at_head(proj: Project, url: str) -> float:
    return median([timed(flask_db(proj, "upgrade"), proj.root, env_for(url)) for _ in range(3)])


def file_to_applied(folder: Path, url: str, samples: int = 5) -> list[float]:
    proj = flask_project(folder, url)
    proj.chain(1)
    proj.write_config(extra="[daemon]\ninterval = 60\njitter = 0\n", models="myapp.models:db")
    proc = subprocess.Popen(
        reconciler(proj, "run", "--http", "127.0.0.1:0"),
        cwd=proj.root,
        env=env_for(url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = []
    try:
        _wait(lambda: db_heads(url) == {"r0000"}, 60)
        down = "r0000"
        for n in range(samples):
            rev = f"lat{n}"
            staged = proj.root / f"{rev}.py.tmp"
            proj.revision(rev, down, upgrade=create_table(f"t_{rev}")).rename(staged)
            started = time.perf_counter()
            staged.rename(proj.versions / f"{rev}.py")  # atomic, as a checkout or an image would
            _wait(lambda r=rev: db_heads(url) == {r}, 30, poll=0.002)
            out.append(time.perf_counter() - started)
            down = rev
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def idle(folder: Path, url: str, seconds: float) -> tuple[float, float]:
    """RSS (MiB) at the end and CPU (% of one core) of an idle prod daemon."""
    proj = flask_project(folder, url)
    proj.chain(3)
    proc = subprocess.Popen(
        reconciler(proj, "run", "--http", "127.0.0.1:0"),
        cwd=proj.root,
        env=env_for(url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait(lambda: db_heads(url) == {"r0002"}, 60)
        time.sleep(2)  # the applying worker has exited; measure the idle control plane
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        return _rss_mib(proc.pid), 100 * (cpu1 - cpu0) / (t1 - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait(predicate, timeout: float, poll: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(poll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--sizes", default="50,500,2000")
    parser.add_argument("--dialects", default="sqlite,postgresql")
    parser.add_argument("--idle-seconds", type=float, default=60)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        print(f"1. no-op run, {args.runs} runs paced {PACE * 1000:.0f} ms (ms; flask db upgrade: s)")
        print("dialect     revisions  daemon p50  daemon p99  floor p50  p50/floor  flask upgrade")
        for kind in args.dialects.split(","):
            p50s = {}
            for size in sizes:
                with dbs.database(kind, base) as url:
                    proj = empty_project(base / f"{kind}{size}", url, size)
                    ours = daemon_noop(proj, url, args.runs)
                    bare = floor(url, args.runs)
                    flask = flask_at_head(proj, url)
                p50, p99, f50 = median(ours), percentile(ours, 99), median(bare)
                p50s[size] = p50
                print(
                    f"{kind:<11} {size:>9}  {p50:10.3f}  {p99:10.3f}  {f50:9.3f}  "
                    f"{p50 / f50:8.1f}x  {flask:11.2f}"
                )
            print(
                f"{kind:<11} flatness: p50 at {sizes[-1]} / p50 at {sizes[0]} = "
                f"{p50s[sizes[-1]] / p50s[sizes[0]]:.2f}"
            )
        print("\n2. revision file written -> applied, interval 60 s (seconds)")
        for kind in args.dialects.split(","):
            with dbs.database(kind, base) as url:
                lat = file_to_applied(base / f"lat{kind}", url)
            print(f"{kind:<11} median {median(lat):.3f}  max {max(lat):.3f}  (n={len(lat)})")
        print(f"\n3. idle prod daemon over {args.idle_seconds:.0f} s")
        for kind in args.dialects.split(","):
            with dbs.database(kind, base) as url:
                rss, cpu = idle(base / f"idle{kind}", url, args.idle_seconds)
            print(f"{kind:<11} RSS {rss:.1f} MiB  CPU {cpu:.2f}% of a core")


if __name__ == "__main__":
    main()
