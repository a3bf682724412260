"""`reconciler apply` / `status` against `flask db upgrade` / `current` on the same project.

    python -m bench.apply_vs_flask [--sizes 50,500] [--dialects sqlite,postgresql,mysql] [--repeat 3]

For each database and history size: from an empty database to head, and at head (the no-op), and
`status` against `flask db current`, each as a whole process on the same generated project, the
two tools alternating, median of --repeat runs; prints seconds and the ratio reconciler / flask.
Goal (issue 14): empty → head at most 1.1x `flask db upgrade` at 50 and 500 revisions.
`--profile` writes one cProfile of the reconciler's empty → head run per case instead.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import env_for, flask_db, median, project, reconciler, row, timed
from tests import dbs

CASES = ("empty→head", "at head", "current")


def measure(kind: str, revisions: int, repeat: int, folder: Path) -> list[tuple[str, float, float]]:
    results: dict[str, list[float]] = {}
    for attempt in range(repeat):
        order = ("flask", "reconciler") if attempt % 2 == 0 else ("reconciler", "flask")
        for tool in order:
            with dbs.database(kind, folder) as url:
                proj = project(folder / f"{tool}{attempt}", url, revisions)
                env = env_for(url)
                up = flask_db(proj, "upgrade") if tool == "flask" else reconciler(proj, "apply")
                cur = flask_db(proj, "current") if tool == "flask" else reconciler(proj, "status")
                results.setdefault(f"{tool} empty→head", []).append(timed(up, proj.root, env))
                results.setdefault(f"{tool} at head", []).append(timed(up, proj.root, env))
                results.setdefault(f"{tool} current", []).append(timed(cur, proj.root, env))
    return [(case, median(results[f"flask {case}"]), median(results[f"reconciler {case}"])) for case in CASES]


def profile(kind: str, revisions: int, folder: Path) -> Path:
    """One cProfile of `reconciler apply` from empty (the control plane's side)."""
    out = folder / f"apply-{kind}-{revisions}.prof"
    with dbs.database(kind, folder) as url:
        proj = project(folder / "profiled", url, revisions)
        command = reconciler(proj, "apply")
        timed([command[0], "-m", "cProfile", "-o", str(out), *command[1:]], proj.root, env_for(url))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="50,500", help="history sizes (revisions), comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dialects", default="sqlite,postgresql,mysql")
    parser.add_argument("--profile", metavar="DIR", help="write cProfile files here instead of timing")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            for kind in args.dialects.split(","):
                for size in sizes:
                    found = profile(kind, size, Path(tmp) / f"{kind}{size}")
                    target = Path(args.profile) / found.name
                    target.write_bytes(found.read_bytes())
                    print(target)
            return
        widths = (11, 9, 12, 13, 15, 7)
        print(f"median of {args.repeat} whole-process runs, the tools alternating")
        print(row(("dialect", "revisions", "case", "flask db (s)", "reconciler (s)", "ratio"), widths))
        for kind in args.dialects.split(","):
            for size in sizes:
                for case, flask, ours in measure(kind, size, args.repeat, Path(tmp) / f"{kind}{size}"):
                    label = "mariadb" if kind == "mysql" else kind  # the machine's MySQL server
                    cells = (label, size, case, f"{flask:.3f}", f"{ours:.3f}", f"{ours / flask:.2f}x")
                    print(row(cells, widths), flush=True)


if __name__ == "__main__":
    main()
