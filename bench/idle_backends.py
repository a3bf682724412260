"""What a fleet of default-config daemons costs PostgreSQL: backends, connections, queries.

    python -m bench.idle_backends [--replicas 30] [--seconds 64] [--idle-disconnect-after S]

`--replicas` real `reconciler run` processes with the default [daemon] settings (interval 30 s,
jitter 2 s, idle_disconnect_after) share one database, in sync, on a private PostgreSQL cluster
(tests/pgcluster.py). For `--seconds` (about two ticks each) it samples pg_stat_activity every
0.1 s and has the server log every connection and statement (log_connections, log_statement),
then prints:

- backends held at idle: ours that sat idle for more than a second (a connection kept between
  ticks); must be 0;
- the most backends of ours seen at once (a tick's connection, while it runs);
- connections opened per tick, statements per tick, and queries per second per replica;
- the same figures extrapolated linearly to 200 replicas.

`--idle-disconnect-after 3600` (above the interval) is the control: each replica then keeps its
pooled connection between ticks, as every replica did before issue 12.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import sqlalchemy as sa

from bench.common import env_for, reconciler
from tests.builders import flask_project
from tests.pgcluster import PrivateCluster, wait_until
from tests.runtime.test_daemon import free_port

OURS = (
    "SELECT count(*), count(*) FILTER (WHERE state = 'idle' AND state_change < now() - "
    "interval '1 second') FROM pg_stat_activity WHERE datname = 'app' "
    "AND application_name LIKE 'reconciler/%'"
)
LOGGING = (
    "ALTER SYSTEM SET log_connections = on",
    "ALTER SYSTEM SET log_statement = 'all'",
    "ALTER SYSTEM SET log_line_prefix = '%m db=%d '",
)
FLEET = 200


def runs(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
            return int(json.loads(resp.read()).get("runs", 0))
    except OSError:
        return 0


def start_fleet(
    cluster: PrivateCluster, folder: Path, replicas: int, idle_disconnect_after: float | None
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    url = cluster.create_database("app")
    proj = flask_project(folder, url)
    proj.chain(2)
    keep = "" if idle_disconnect_after is None else f"idle_disconnect_after = {idle_disconnect_after}"
    proj.write_config(extra=f"[daemon]\n{keep}\n", models="myapp.models:db")  # else the defaults
    env = env_for(url)
    subprocess.run(reconciler(proj, "apply"), cwd=proj.root, env=env, check=True, capture_output=True)
    ports = [free_port() for _ in range(replicas)]
    procs = [
        subprocess.Popen(
            reconciler(proj, "run", "--http", f"127.0.0.1:{port}"),
            cwd=proj.root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    wait_until(lambda: all(runs(p) >= 1 for p in ports), 300, "every daemon's first run", poll=0.5)
    return procs, ports


def sample(admin: sa.engine.Engine, seconds: float) -> tuple[int, int, int, int, int]:
    """(samples, samples with none of ours, their sum, most at once, most held idle > 1 s)."""
    count = zero = summed = most = held = 0
    deadline = time.monotonic() + seconds
    with admin.connect() as conn:
        while time.monotonic() < deadline:
            total, idle = conn.execute(sa.text(OURS)).one()
            count += 1
            zero += total == 0
            summed += int(total)
            most, held = max(most, int(total)), max(held, int(idle))
            time.sleep(0.1)
    return count, zero, summed, most, held


def server_log_counts(log: Path, offset: int) -> tuple[int, list[str]]:
    """(connections, statements) the server logged for database app after `offset`."""
    text = log.read_bytes()[offset:].decode("utf-8", "replace")
    connections = len(re.findall(r"db=app LOG:  connection authorized", text))
    statements = re.findall(r"db=app LOG:  statement: (.*)", text)
    return connections, statements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=64.0)
    parser.add_argument("--idle-disconnect-after", type=float, default=None)
    args = parser.parse_args()
    cluster = PrivateCluster()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        cluster.init()
        cluster.start()
        with tempfile.TemporaryDirectory() as tmp:
            procs, ports = start_fleet(cluster, Path(tmp) / "p", args.replicas, args.idle_disconnect_after)
            admin = sa.create_engine(cluster.url(), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
            with admin.connect() as conn:
                for statement in LOGGING:
                    conn.execute(sa.text(statement))
                conn.execute(sa.text("SELECT pg_reload_conf()"))
            time.sleep(0.5)  # the reload reaches every backend; not a measured quantity
            offset = cluster.log.stat().st_size
            before = sum(runs(p) for p in ports)
            samples, zero, summed, most, held = sample(admin, args.seconds)
            ticks = sum(runs(p) for p in ports) - before
            admin.dispose()
            connections, statements = server_log_counts(cluster.log, offset)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.destroy()
    setting = "default" if args.idle_disconnect_after is None else args.idle_disconnect_after
    print(f"[daemon] idle_disconnect_after: {setting}")
    report(
        args.replicas, args.seconds, (samples, zero, summed, most, held), ticks, connections, len(statements)
    )
    print_kinds(statements)


def print_kinds(statements: list[str]) -> None:
    print("statements by kind over the window (literals as ?):")
    kinds = collections.Counter(re.sub(r"'[^']*'|\d+", "?", text)[:90] for text in statements)
    for text, n in kinds.most_common(12):
        print(f"  {n:5d}  {text}")


def report(
    replicas: int,
    seconds: float,
    sampled: tuple[int, int, int, int, int],
    ticks: int,
    connections: int,
    statements: int,
) -> None:
    samples, zero, summed, most, held = sampled
    mean = summed / max(samples, 1)
    per_tick_conn = connections / ticks if ticks else float("nan")
    per_tick_stmt = statements / ticks if ticks else float("nan")
    qps_replica = statements / seconds / replicas
    tick_rate = ticks / seconds / replicas  # ticks per second per replica
    print(f"{replicas} daemons (default interval 30 s), PostgreSQL, {seconds:.0f} s window, {ticks} ticks")
    print(f"backends held at idle (idle > 1 s):  {held}")
    print(
        f"backends of ours at once:            mean {mean:.2f}, most {most} "
        f"(none at all in {zero} of {samples} samples)"
    )
    print(f"connections opened per tick:         {per_tick_conn:.2f}")
    print(f"statements per tick:                 {per_tick_stmt:.2f}")
    print(f"queries per second per replica:      {qps_replica:.3f}")
    print(f"extrapolated to {FLEET} replicas (linear in replicas):")
    print(f"  backends held at idle:             {held * FLEET // max(replicas, 1)}")
    print(f"  connections opened per second:     {FLEET * tick_rate * per_tick_conn:.1f}")
    print(f"  queries per second:                {FLEET * qps_replica:.1f}")
    print(f"  backends at once (mean):           {mean * FLEET / replicas:.2f}")


if __name__ == "__main__":
    main()
