"""Dev mode's fresh worker, spawned vs forked from the zygote: `take()` called to a worker that
answered init, side by side. Not a test; the figures are noisy on a busy machine.

    python -m bench.worker_start [--runs 15]

Two cases for each kind of pool (`WarmWorker(fork=False)`: a spawned `--preload` spare;
`fork=None`: a child of the zygote):
- cold: `take()` right after the previous worker was closed (the next spare is still starting);
- warm: `take()` once the spare is ready.
and, for comparison, a generate() in the taken worker (the models imported, compared).
Prints the medians (ms) and the spawned/forked ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import median
from reconciler.control.workerpool import WarmWorker
from reconciler.control.workers import Worker, WorkerJob
from tests.builders import flask_project


def _job(folder: Path) -> WorkerJob:
    url = f"sqlite:///{folder / 'dev.db'}"
    project = flask_project(folder / "p", url)
    job = WorkerJob(
        url=url,
        migrations_dir=str(project.migrations),
        root=str(project.root),
        models="myapp.models:db",
        timeout=120.0,
    )
    with Worker.start(job) as worker:  # the database at the first revision: generate finds nothing
        first = worker.generate()
        assert first.revision is not None
        worker.upgrade(first.revision)
    return job


def _until(condition: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("the spare did not start within 120 s")
        time.sleep(0.005)


def measure(job: WorkerJob, fork: bool, runs: int) -> tuple[list[float], list[float], list[float]]:
    """(cold, warm) take() durations and a generate()'s in the taken worker, in ms."""
    cold: list[float] = []
    warm: list[float] = []
    generate: list[float] = []
    with WarmWorker(job, fork=None if fork else False) as pool:
        pool.take().close()  # the zygote (or the first spare) is up
        for _ in range(runs):
            started = time.perf_counter()
            worker = pool.take()  # right after a close: the spare is starting
            cold.append((time.perf_counter() - started) * 1000)
            worker.close()
            _until(lambda: pool.spare_pid is not None)
            started = time.perf_counter()
            worker = pool.take()
            warm.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            worker.generate()  # imports the models: the same work in either kind of worker
            generate.append((time.perf_counter() - started) * 1000)
            worker.close()
    return cold, warm, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        job = _job(Path(folder))
        spawned = measure(job, False, args.runs)
        forked = measure(job, True, args.runs)
    print(f"take() to an initialised worker, median of {args.runs} (ms):")
    print(f"{'case':<34}{'spawned':>10}{'forked':>10}{'ratio':>8}")
    for name, s, f in (
        ("cold (take right after a close)", spawned[0], forked[0]),
        ("warm (spare ready)", spawned[1], forked[1]),
        ("generate() in the taken worker", spawned[2], forked[2]),
    ):
        ratio = median(s) / median(f) if median(f) else float("inf")
        print(f"{name:<34}{median(s):>10.1f}{median(f):>10.2f}{ratio:>8.1f}")


if __name__ == "__main__":
    main()
