"""What a daemon shows during a long first apply, and what the progress note costs.

    python -m bench.visibility [--revisions 200] [--dialects sqlite,postgresql]

1. A daemon's first apply of --revisions revisions: /status and /metrics polled every 50 ms
   until the run ends; the share of polls that had a `state` other than `unknown`, a non-empty
   `pending` and an `applying` object, the longest stretch without a state, and the share of
   /metrics scrapes where some state gauge read 1 (issue 12 part 10: "for 14 s /status has no
   state or pending and every state gauge reads 0").
2. The progress note in the journal (`progress/<target>`, one upsert per revision, for `wait`):
   `reconciler apply` of the same history in this process, each note's write timed; its total
   against the apply's duration.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import env_for, project, row
from reconciler import logs
from reconciler.config.load import load_settings
from reconciler.control.reconcile import reconcile_once
from reconciler.control.target import open_target, release_target
from reconciler.db import flags
from tests import dbs
from tests.cli import start_cli
from tests.runtime.test_daemon import free_port

POLL = 0.05


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


def _some_state_gauge_is_one(metrics: str) -> bool:
    return any(
        line.startswith("reconciler_state{") and line.rstrip().endswith(" 1.0")
        for line in metrics.splitlines()
    )


def daemon_apply(folder: Path, url: str, revisions: int) -> dict[str, Any]:
    """Poll a daemon's /status and /metrics through its first apply."""
    proj = project(folder, url, revisions)
    proj.write_config(extra="[daemon]\ninterval = 600\njitter = 0\n", models="myapp.models:db")
    port = free_port()
    proc = start_cli(
        ["--config", str(proj.config), "run", "--http", f"127.0.0.1:{port}"], cwd=proj.root, env=env_for(url)
    )
    polls: list[tuple[float, dict[str, Any], bool]] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            code, body = _get(f"http://127.0.0.1:{port}/status")
            if code == 200:
                status = json.loads(body)
                gauges = _some_state_gauge_is_one(_get(f"http://127.0.0.1:{port}/metrics")[1])
                if status.get("runs", 0) >= 1:
                    break
                polls.append((time.monotonic(), status, gauges))
            time.sleep(POLL)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    with_state = [s.get("state") not in (None, "unknown") for _t, s, _g in polls]
    longest, since = 0.0, None
    for (when, _s, _g), ok in zip(polls, with_state):
        if not ok and since is None:
            since = when
        if ok and since is not None:
            longest, since = max(longest, when - since), None
    if since is not None and polls:
        longest = max(longest, polls[-1][0] - since)
    n = max(1, len(polls))
    return {
        "polls": len(polls),
        "state": sum(with_state) / n,
        "pending": sum(bool(s.get("pending")) for _t, s, _g in polls) / n,
        "applying": sum(bool(s.get("applying")) for _t, s, _g in polls) / n,
        "gauge": sum(g for _t, _s, g in polls) / n,
        "longest_without_state": longest,
    }


def progress_cost(folder: Path, url: str, revisions: int) -> dict[str, float]:
    """`apply` in this process with each progress note's write timed."""
    proj = project(folder, url, revisions)
    proj.write_config(models="myapp.models:db")
    settings = load_settings(str(proj.config), cwd=proj.root)
    writes: list[float] = []
    put = flags.put

    def timed_put(conn: Any, jt: Any, key: str, value: str) -> None:
        started = time.perf_counter()
        put(conn, jt, key, value)
        if key.startswith("progress/"):
            writes.append(time.perf_counter() - started)

    flags.put = timed_put  # type: ignore[assignment]
    handle = open_target(settings)
    try:
        started = time.perf_counter()
        reconcile_once(handle, trigger="bench")
        total = time.perf_counter() - started
    finally:
        flags.put = put  # type: ignore[assignment]
        release_target(handle)
    return {"writes": len(writes), "note_ms": sum(writes) * 1000, "apply_s": total}


def main() -> None:
    logs.setup(level="error")  # the in-process apply's lines would drown the figures
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=200)
    parser.add_argument("--dialects", default="sqlite,postgresql")
    args = parser.parse_args()
    widths = (11, 6, 7, 8, 9, 8, 14)
    print(f"1. daemon first apply of {args.revisions} revisions: share of /status polls with ...")
    print(row(("dialect", "polls", "state", "pending", "applying", "gauge=1", "longest w/o st"), widths))
    costs = []
    for dialect in args.dialects.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            with dbs.database(dialect, Path(tmp)) as url:
                seen = daemon_apply(Path(tmp) / "d", url, args.revisions)
            with dbs.database(dialect, Path(tmp)) as url:
                costs.append((dialect, progress_cost(Path(tmp) / "a", url, args.revisions)))
        print(
            row(
                (
                    dialect,
                    seen["polls"],
                    f"{seen['state']:.0%}",
                    f"{seen['pending']:.0%}",
                    f"{seen['applying']:.0%}",
                    f"{seen['gauge']:.0%}",
                    f"{seen['longest_without_state']:.2f} s",
                ),
                widths,
            )
        )
    print(f"\n2. progress notes in the journal during `apply` of {args.revisions} revisions")
    print(row(("dialect", "notes", "notes ms", "apply s", "share"), (11, 6, 9, 8, 7)))
    for dialect, cost in costs:
        share = cost["note_ms"] / 1000 / cost["apply_s"] if cost["apply_s"] else 0.0
        print(
            row(
                (dialect, cost["writes"], f"{cost['note_ms']:.0f}", f"{cost['apply_s']:.1f}", f"{share:.1%}"),
                (11, 6, 9, 8, 7),
            )
        )


if __name__ == "__main__":
    main()
