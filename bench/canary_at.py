"""Issue 12 part 5: canary hits when the database password holds an unescaped `@`.

The canary user's password (`p%40ss/w@rd:x`, tests/dbs.py) is written into the URL as it is, and
every output of `status`, `status --json`, `apply`, `wait` and `run` (JSON and text logs, from
`--url`, from the config file and from the Flask app's DATABASE_URL, on PostgreSQL and MariaDB),
the worker's error text, and a daemon's /status, /metrics and logs while a revision fails with
the URL unescaped in its error (tests/test_unescaped_at.py) are searched for it: raw,
URL-decoded, URL-encoded once and twice, and every piece of 4 characters or more. Prints the
number of outputs read and the hits, which must be 0.

    python -m bench.canary_at
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import env_for
from bench.common import project as bench_project
from tests import dbs
from tests.cli import cli_command

COMMANDS = (("status",), ("status", "--json"), ("apply",), ("wait", "--timeout", "1"), ("run",))


def _outputs(kind: str, folder: Path) -> list[str]:
    import subprocess

    from reconciler.control.workers import Worker, WorkerJob
    from reconciler.errors import ReconcilerError

    texts: list[str] = []
    with dbs.database(kind, folder, canary=True) as good:
        project = bench_project(folder / kind, good, 1)  # its Flask app reads DATABASE_URL
        bad = dbs.unescaped_canary_url(good)
        runs = [(fmt, ["--url", bad, *args]) for fmt in ("json", "text") for args in COMMANDS]
        project.url = bad
        project.write_config()
        runs += [(fmt, ["--config", str(project.config), "status"]) for fmt in ("json", "text")]
        for fmt, args in runs:
            done = subprocess.run(
                cli_command(args, fmt),
                cwd=project.root,
                env=env_for(bad),
                capture_output=True,
                text=True,
                timeout=120,
            )
            texts.append(done.stdout + done.stderr)
        logs: list[str] = []
        job = WorkerJob(
            url=bad,
            migrations_dir=str(project.migrations),
            root=str(project.root),
            models="myapp.models:db",
            connect_timeout=5,
            timeout=60,
        )
        try:
            with Worker.start(job, on_log=logs.append) as worker:
                worker.upgrade("r0000")
        except ReconcilerError as exc:
            texts.append(str(exc))
        texts.extend(logs)
        texts.extend(_daemon_outputs(folder / f"{kind}_daemon", good))
    return texts


def _daemon_outputs(folder: Path, url: str) -> list[str]:
    from tests.runtime.test_daemon import config, daemon
    from tests.system.test_unescaped_at import UNESCAPED_IN_ERROR

    project = bench_project(folder, url, 1)
    project.revision("bad", "r0000", upgrade=UNESCAPED_IN_ERROR)
    config(project, interval=0.3)
    with daemon(project) as running:
        running.wait_status(lambda s: "cannot use" in (s.get("last_error") or ""), 60, "the error")
        bodies = [running.get(path)[1] for path in ("/status", "/metrics", "/healthz", "/readyz")]
    return [*bodies, running.stdout, running.stderr]


def main() -> None:
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("postgresql", "mysql"):
            texts = _outputs(kind, Path(tmp))
            hits = dbs.canary_hits(*texts)
            total += len(hits)
            print(f"{kind:<10} outputs read: {len(texts):>3}  canary hits: {len(hits)}  {hits}")
    print(f"canary hits with an unescaped '@', all outputs: {total}")


if __name__ == "__main__":
    main()
