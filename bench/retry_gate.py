"""How fast a fleet blocks a failing revision, with the fleet-wide retry gate and without it.

    python -m bench.retry_gate [--replicas 5] [--interval 2] [--blocked-after 3]

`--replicas` daemons (`reconciler run`) on one PostgreSQL database, in sync; then a revision
that always fails appears for all of them at once. Prints, from the database's clock as the
failure records hold it: the tries until `blocked`, the seconds from the first failed try to the
blocking one, the shortest gap between consecutive tries next to the backoff the earlier one
asked for, and how many runs were `deferred`. Then the same with
RECONCILER_UNSAFE_DISABLE=retry_gate (each replica tries once: the behaviour before).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.common import row
from tests import dbs
from tests.builders import flask_project, journal_rows
from tests.control.test_retry_gate import events, gate_config
from tests.runtime.test_daemon import FAILS, Running, free_port


def fleet(folder: Path, replicas: int, interval: float, blocked_after: int, env: dict[str, str]) -> list[Any]:
    with dbs.pg_database() as url:
        project = flask_project(folder, url)
        project.chain(1)
        gate_config(project, interval=interval, backoff_max=300, blocked_after=blocked_after)
        daemons = [Running(project, free_port(), env) for _ in range(replicas)]
        try:
            for d in daemons:
                d.wait_status(lambda s: s.get("state") == "in_sync", 120, "in sync")
            project.revision("bad", "r0000", upgrade=FAILS)
            for d in daemons:
                d.wait_status(lambda s: "blocked" in s.get("conditions", []), 600, "blocked")
        finally:
            for d in daemons:
                d.stop()
        tries = sum(1 for r in journal_rows(url) if r["revision"] == "bad")
    logs = "\n".join(d.stderr for d in daemons)
    counted = sorted(events(logs, "revision_failure_counted"), key=lambda e: e["failures"])
    deferred = len(events(logs, "retry_deferred"))
    span = counted[-1]["failed_at"] - counted[0]["failed_at"]
    gaps = [
        (b["failed_at"] - a["failed_at"], a["retry_after"] - a["failed_at"])
        for a, b in zip(counted, counted[1:])
    ]
    shortest = min(gaps)
    return [tries, f"{span:.2f}", f"{shortest[0]:.2f} (asked {shortest[1]:.2f})", deferred]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--blocked-after", type=int, default=3)
    args = parser.parse_args()
    widths = (38, 6, 22, 34, 9)
    print(f"{args.replicas} replicas, interval {args.interval} s, blocked_after {args.blocked_after}")
    print(row(("", "tries", "first to blocked (s)", "shortest gap between tries (s)", "deferred"), widths))
    runs = (
        ("retry gate (this tree)", {}),
        ("RECONCILER_UNSAFE_DISABLE=retry_gate", {"RECONCILER_UNSAFE_DISABLE": "retry_gate"}),
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in runs:
            cells = fleet(Path(tmp) / name.split()[0], args.replicas, args.interval, args.blocked_after, env)
            print(row((name, *cells), widths))


if __name__ == "__main__":
    main()
