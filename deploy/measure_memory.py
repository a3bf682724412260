"""Measure the memory the reconciler needs, to size a container's request and limit (Linux only).

Run from the repository root with the development virtualenv:

    .venv/bin/python deploy/measure_memory.py --backend postgresql --revisions 30

It builds a Flask-Migrate project (the test suite's `flask_project`: Flask, Flask-SQLAlchemy,
Flask-Migrate, one model) with N pending revisions on a throwaway database (PostgreSQL from the
test suite's service settings, or a SQLite file), then measures two scenarios:

- `run`: the long-running `reconciler run` applies the N revisions, then idles in sync. Reported:
  the daemon's resident set once idle (VmRSS, the request), its peak (VmHWM) and the peak of
  every worker subprocess it started.
- `apply`: the one-shot `reconciler apply` (a Job or init step) and its worker.
- `wait`: `reconciler wait` (an init container) on the database `apply` brought to the heads.

Every process is sampled from /proc/<pid>/status every 10 ms; VmHWM is the kernel's own
high-water mark of the resident set, so a short peak between two samples is not missed.
Your project's worker imports your models and whatever they import: measure with your own
project (change `_project` to lay it out) before trusting these figures for it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import proc_kib  # noqa: E402  (the repository root must be on sys.path first)
from tests import builders, dbs  # noqa: E402
from tests.cli import cli_command, cli_env  # noqa: E402

SAMPLE_EVERY = 0.01
IDLE_SECONDS = 10.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


@dataclass
class Sampler:
    """High-water marks of one process and of every child it starts, sampled in a thread."""

    pid: int
    peak_kib: int = 0
    children_peak_kib: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_kib(self.pid, "VmHWM"))
            for child in _children(self.pid):
                peak = proc_kib(child, "VmHWM")
                self.children_peak_kib[child] = max(self.children_peak_kib.get(child, 0), peak)
            self._stop.wait(SAMPLE_EVERY)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            return dict(json.load(response))
    except OSError:
        return {}


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not callable(predicate) or not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


@contextmanager
def _database(backend: str, folder: Path) -> Iterator[str]:
    with dbs.database(backend, folder) as url:
        yield url


def _project(folder: Path, url: str, revisions: int, interval: float) -> builders.Project:
    with contextlib.redirect_stdout(io.StringIO()):  # Alembic's init talks on stdout
        project = builders.flask_project(folder, url)
    project.chain(revisions)
    project.write_config(extra=f"[daemon]\ninterval = {interval}\njitter = 0\n", models="myapp.models:db")
    return project


def measure_run(project: builders.Project) -> dict[str, object]:
    port = _free_port()
    args = ["--config", str(project.config), "run", "--http", f"127.0.0.1:{port}"]
    process = subprocess.Popen(
        cli_command(args),
        cwd=project.root,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sampler = Sampler(process.pid)
    try:
        _wait(lambda: _status(port).get("state") == "in_sync", 300, "the daemon to reach in_sync")
        time.sleep(IDLE_SECONDS)  # a few idle ticks (measuring, not synchronising)
        idle = proc_kib(process.pid, "VmRSS")
    finally:
        process.terminate()
        process.wait(60)
        sampler.stop()
    workers = sorted(sampler.children_peak_kib.values(), reverse=True)
    return {
        "daemon_idle_rss_mib": _mib(idle),
        "daemon_peak_mib": _mib(sampler.peak_kib),
        "worker_peaks_mib": [_mib(k) for k in workers],
        "exit_code": process.returncode,
    }


def measure_apply(project: builders.Project) -> dict[str, object]:
    process = subprocess.Popen(
        cli_command(["--config", str(project.config), "apply"]),
        cwd=project.root,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sampler = Sampler(process.pid)
    process.wait(300)
    sampler.stop()
    workers = sorted(sampler.children_peak_kib.values(), reverse=True)
    return {
        "apply_peak_mib": _mib(sampler.peak_kib),
        "worker_peaks_mib": [_mib(k) for k in workers],
        "exit_code": process.returncode,
    }


def measure_wait(project: builders.Project) -> dict[str, object]:
    process = subprocess.Popen(
        cli_command(["--config", str(project.config), "wait", "--timeout", "60"]),
        cwd=project.root,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sampler = Sampler(process.pid)
    process.wait(120)
    sampler.stop()
    return {
        "wait_peak_mib": _mib(sampler.peak_kib),
        "children": len(sampler.children_peak_kib),
        "exit_code": process.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backend", choices=["postgresql", "sqlite", "mysql"], default="postgresql")
    parser.add_argument("--revisions", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.0, help="the daemon's tick while idle")
    options = parser.parse_args()
    results: dict[str, object] = {
        "backend": options.backend,
        "revisions": options.revisions,
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory(prefix="reconciler-memory-") as tmp:
        folder = Path(tmp)
        with _database(options.backend, folder) as url:
            project = _project(folder / "run", url, options.revisions, options.interval)
            results["run"] = measure_run(project)
        with _database(options.backend, folder) as url:
            project = _project(folder / "apply", url, options.revisions, options.interval)
            results["apply"] = measure_apply(project)
            results["wait"] = measure_wait(project)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
