"""`reconciler apply` / `status` against `flask db upgrade` / `current` on the same project.

    python bench/apply_vs_flask.py [--revisions 50] [--repeat 5]

For SQLite and PostgreSQL: from an empty database to head, and at head (the no-op), each as a
whole process, median of --repeat runs; prints seconds and the ratio reconciler / flask.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import env_for, flask_db, median, project, reconciler, row, timed
from tests import dbs


def measure(kind: str, revisions: int, repeat: int, folder: Path) -> list[tuple[str, float, float]]:
    results: dict[str, list[float]] = {}
    for attempt in range(repeat):
        for tool in ("flask", "reconciler"):
            with dbs.database(kind, folder) as url:
                proj = project(folder / f"{tool}{attempt}", url, revisions)
                env = env_for(url)
                up = flask_db(proj, "upgrade") if tool == "flask" else reconciler(proj, "apply")
                cur = flask_db(proj, "current") if tool == "flask" else reconciler(proj, "status")
                results.setdefault(f"{tool} empty→head", []).append(timed(up, proj.root, env))
                results.setdefault(f"{tool} at head", []).append(timed(up, proj.root, env))
                results.setdefault(f"{tool} current", []).append(timed(cur, proj.root, env))
    out = []
    for case in ("empty→head", "at head", "current"):
        flask = median(results[f"flask {case}"])
        ours = median(results[f"reconciler {case}"])
        out.append((case, flask, ours))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--revisions", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dialects", default="sqlite,postgresql")
    args = parser.parse_args()
    widths = (12, 14, 14, 16, 8)
    print(f"{args.revisions} revisions, median of {args.repeat} whole-process runs")
    print(row(("dialect", "case", "flask db (s)", "reconciler (s)", "ratio"), widths))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.dialects.split(","):
            for case, flask, ours in measure(kind, args.revisions, args.repeat, Path(tmp) / kind):
                print(row((kind, case, f"{flask:.3f}", f"{ours:.3f}", f"{ours / flask:.2f}x"), widths))


if __name__ == "__main__":
    main()
