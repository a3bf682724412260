"""The status page's weight and render time for a long history, beside what a user runs instead.

    python -m bench.statuspage [--revisions 200] [--dialect sqlite] [--requests 100]

A project of N revisions (each a table), applied by `reconciler apply` (so the journal has more
than the 50 steps the page shows), then a daemon (`reconciler run --http`):
- the page's size in bytes (goal, issue 17: under 100 KB at 200 revisions);
- the render itself, in this process, from the daemon's own status document and the graph read
  from the files: `statuspage.page_of`, median and p95 of --requests renders (goal: <= 50 ms);
- `GET /` and `GET /status` on the daemon, median and p95 of --requests requests each, measured
  by the client (the render plus the HTTP round trip on loopback);
- the peer: `flask db history` (Flask-Migrate: the history as text, a new process each time),
  median of 3, and the ratio peer / `GET /`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import env_for, flask_db, median, percentile, project, reconciler, row, timed
from reconciler.core.graph import RevisionGraph
from reconciler.project.revisions import load_graph
from reconciler.runtime import statuspage
from tests import dbs
from tests.cli import start_cli
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import free_port

WIDTHS = (34, 12, 12, 12)


@dataclass(frozen=True)
class Files:
    """The graph as the daemon caches it (`Project.cached_graph`), read from the files."""

    cached_graph: RevisionGraph


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except OSError:
        return 0, b""


def _times(call: Callable[[], object], count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def _ms(values: list[float]) -> tuple[str, str]:
    return f"{median(values) * 1000:.2f}", f"{percentile(values, 95) * 1000:.2f}"


def measure(folder: Path, url: str, revisions: int, requests: int) -> dict[str, Any]:
    proj = project(folder, url, revisions)
    proj.write_config(extra="[daemon]\ninterval = 600\njitter = 0\n")
    timed(reconciler(proj, "apply", "-q"), proj.root, env_for(url))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_cli(["--config", str(proj.config), "run", "--http", f"127.0.0.1:{port}"], cwd=proj.root)
    try:
        wait_until(lambda: _status(base).get("state") == "in_sync", 60, "the daemon in sync")
        page = _get(f"{base}/")[1]
        _times(lambda: _get(f"{base}/"), 5)  # warm
        served = _times(lambda: _get(f"{base}/"), requests)
        status = _times(lambda: _get(f"{base}/status"), requests)
        doc = _status(base)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    graph, _ = load_graph([proj.versions])
    files = Files(graph)
    rendered = _times(lambda: statuspage.page_of(doc, files, 10), requests)
    peer = [timed(flask_db(proj, "history"), proj.root, env_for(url)) for _ in range(3)]
    shown = {"nodes": page.count(b'class="node'), "steps": page.split(b'id="journal"')[-1].count(b"<tr>") - 1}
    return {
        "size": len(page),
        "shown": shown,
        **{"render": rendered, "page": served, "status": status},
        "peer": peer,
    }


def _status(base: str) -> dict[str, Any]:
    code, body = _get(f"{base}/status")
    return json.loads(body) if code == 200 else {}


def report(revisions: int, dialect: str, got: dict[str, Any]) -> None:
    print(f"status page, {revisions} revisions ({dialect}); page {got['size'] / 1000:.1f} KB (goal < 100 KB)")
    print(f"shown: {got['shown']['nodes']} graph nodes, {got['shown']['steps']} journal steps")
    print(row(("", "median ms", "p95 ms", ""), WIDTHS))
    print(row(("render (page_of, in process)", *_ms(got["render"]), "goal <= 50"), WIDTHS))
    print(row(("GET / (daemon, loopback)", *_ms(got["page"]), ""), WIDTHS))
    print(row(("GET /status (daemon, loopback)", *_ms(got["status"]), ""), WIDTHS))
    print(row(("peer: flask db history (process)", *_ms(got["peer"]), ""), WIDTHS))
    print(f"ratio flask db history / GET /: {median(got['peer']) / median(got['page']):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--revisions", type=int, default=200)
    parser.add_argument("--dialect", default="sqlite", choices=("sqlite", "postgresql", "mysql"))
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dbs.database(args.dialect, Path(tmp)) as url:
        report(args.revisions, args.dialect, measure(Path(tmp) / "p", url, args.revisions, args.requests))


if __name__ == "__main__":
    main()
