"""A pool of one pre-warmed worker: the spare that dev mode hands out, and its starting thread.

`WarmWorker` keeps one spare worker started and initialised (dev mode: each generation gets a
fresh interpreter without paying for the imports), starting the next when the last one taken is
closed; its own long-lived thread starts them all (the kernel's parent-death signal fires when
the thread that started a worker exits). On Linux the spare is forked from a fork server
(`control.zygote`) that has the libraries imported, in milliseconds; elsewhere, or when the
zygote cannot start, it is spawned (`python -m reconciler.worker --preload`, about a second).
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

from reconciler import logs
from reconciler.control.workers import Worker, WorkerJob
from reconciler.control.zygote import ForkedProcess, Zygote, ZygoteStale, ZygoteUnavailable, supported
from reconciler.errors import ReconcilerError, WorkerError

log = logs.get("reconciler.dev")


class WarmWorker:
    """Keeps one spare worker started and initialised so that the next job starts at once.

    Each `take()` hands out a fresh interpreter (the project's modules are imported anew by every
    job) and starts the next spare in the background. All workers are started by this object's own
    thread, which lives until `close()` and until every worker it started has exited, so the
    kernel's parent-death signal never fires early. A spare whose alembic.ini or env.py changed
    since it started is replaced. `fork`: fork the workers from a zygote (None: where fork is
    safe, Linux; False: always spawn them). `spare` False keeps no spare: `start(job)` forks a
    worker for any job on demand (a tenant fleet's, one per tenant). `prefault` False: a forked
    worker copies the zygote's pages only as it writes them (a fleet's short upgrade workers:
    less CPU a tenant; dev mode's generation wants them copied up front). Thread-safe.
    """

    def __init__(
        self,
        job: WorkerJob,
        python: str | None = None,
        on_log: Callable[[str], None] | None = None,
        timeout: float | None = None,
        fork: bool | None = None,
        spare: bool = True,
        prefault: bool = True,
    ) -> None:
        self._job = job
        self._prefault = prefault
        self._python = python
        self._on_log = on_log
        self._timeout = timeout
        self._lock = threading.Lock()
        self._orders: queue.Queue[tuple[Future[Worker], WorkerJob | None] | None] = queue.Queue()
        self._started: list[Worker] = []
        self._closed = False
        self._fork = supported() if fork is None else fork and supported()
        self._zygote: Zygote | None = None  # the starting thread's
        self._retired: list[Zygote] = []  # stale or failed, closed once their children exited
        self._thread = threading.Thread(target=self._starter, daemon=True, name="warm-worker")
        self._thread.start()
        self._keep_spare = spare
        self._spare: tuple[Future[Worker], tuple[Any, ...]] | None = self._order() if spare else None

    @property
    def zygote_pid(self) -> int | None:
        """The fork server's pid while one runs (None: workers are spawned)."""
        zygote = self._zygote
        return zygote.pid if zygote is not None and zygote.alive() else None

    @property
    def spare_pid(self) -> int | None:
        """The spare's pid once it is started (None while it starts or when there is none)."""
        with self._lock:
            spare = self._spare
        if spare is None or not spare[0].done() or spare[0].exception() is not None:
            return None
        return spare[0].result().pid

    def take(self) -> Worker:
        """A started, initialised worker: the spare (waited for if still starting), else a new one.

        The next spare is started when the taken worker is closed, not before: on a small
        machine its start-up (an interpreter importing SQLAlchemy, Alembic, Flask) would take CPU
        from the generation it was taken for. Raises what starting a worker raises (ConfigError
        for a missing interpreter, ...); the next take() tries again. The caller closes the worker.
        """
        with self._lock:
            if self._closed:
                raise WorkerError("the warm worker pool is closed")
            order, self._spare = self._spare, None
        try:
            worker = self._usable(order) or self._wait(self._order()[0])
        except BaseException:
            self._replenish()
            raise
        worker.after_close.append(self._replenish)
        return worker

    def start(self, job: WorkerJob) -> Worker:
        """A fresh worker for `job`, started by this pool's thread (forked when the zygote
        serves): the caller closes it."""
        with self._lock:
            if self._closed:
                raise WorkerError("the warm worker pool is closed")
        future: Future[Worker] = Future()
        self._orders.put((future, job))
        return future.result()

    def _replenish(self) -> None:
        with self._lock:
            if self._keep_spare and not self._closed and self._spare is None:
                self._spare = self._order()

    def close(self) -> None:
        """Stop the spare (waiting for it if it is starting) and the starting thread.

        Workers already taken are the caller's: the thread waits for them to exit before it ends.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            order, self._spare = self._spare, None
        self._orders.put(None)
        if order is not None and not order[0].cancel():
            with contextlib.suppress(BaseException):
                order[0].result().close()

    def __enter__(self) -> WarmWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # plumbing

    def _order(self) -> tuple[Future[Worker], tuple[Any, ...]]:
        future: Future[Worker] = Future()
        stamp = self._stamp()
        self._orders.put((future, None))
        return future, stamp

    def _usable(self, order: tuple[Future[Worker], tuple[Any, ...]] | None) -> Worker | None:
        if order is None:
            return None
        future, stamp = order
        try:
            worker = future.result()
        except (ReconcilerError, CancelledError):
            return None  # start a new one: the error, if it persists, is raised from there
        if worker._process.poll() is None and stamp == self._stamp():
            return worker
        worker.close()
        return None

    @staticmethod
    def _wait(future: Future[Worker]) -> Worker:
        return future.result()

    def _stamp(self) -> tuple[Any, ...]:
        """What a worker reads at init (alembic.ini, env.py): their size and mtime."""
        migrations = Path(self._job.migrations_dir)
        paths = [migrations / "env.py", migrations / "alembic.ini"]
        if self._job.alembic_ini:
            paths.append(Path(self._job.alembic_ini))
        out: list[Any] = []
        for path in paths:
            try:
                stat = path.stat()
                out.append((str(path), stat.st_size, stat.st_mtime_ns))
            except OSError:
                out.append((str(path), None))
        return tuple(out)

    def _starter(self) -> None:
        while True:
            order = self._orders.get()
            if order is None:
                break
            future, job = order
            if not future.set_running_or_notify_cancel():
                continue
            try:
                worker = self._start(job or self._job)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                self._started = [w for w in self._started if w._process.poll() is None]
                self._started.append(worker)
                future.set_result(worker)
            self._close_retired()
        for worker in self._started:  # they die with this thread: outlive them
            with contextlib.suppress(OSError):
                worker._process.wait()
        for zygote in [*self._retired, *([self._zygote] if self._zygote else [])]:
            zygote.close()

    def _start(self, job: WorkerJob) -> Worker:
        """A forked worker when the zygote serves (started or replaced here), else a spawned one."""
        for _attempt in range(2):
            zygote = self._live_zygote()
            if zygote is None:
                break
            try:
                process = zygote.fork(job.url, self._prefault)
            except (ZygoteStale, ZygoteUnavailable) as exc:
                log.info("zygote_replaced", pid=zygote.pid, reason=str(exc).splitlines()[0])
                self._retire()
                continue
            return Worker.adopt(process, job, on_log=self._on_log, timeout=self._timeout)
        return Worker.start(
            job, python=self._python, on_log=self._on_log, timeout=self._timeout, preload=True
        )

    def _live_zygote(self) -> Zygote | None:
        if not self._fork:
            return None
        if self._zygote is not None and self._zygote.alive():
            return self._zygote
        self._retire()
        try:
            self._zygote = Zygote.start(self._python or self._job.python or sys.executable, self._job.root)
        except ZygoteUnavailable as exc:
            self._fork = False
            log.warning("zygote_unavailable", error=str(exc), next_step="workers are spawned instead")
            return None
        except ReconcilerError:
            return None  # the interpreter cannot start: spawning it says why, to take()
        log.debug("zygote_started", pid=self._zygote.pid)
        return self._zygote

    def _retire(self) -> None:
        if self._zygote is not None:
            self._retired.append(self._zygote)
            self._zygote = None
        self._close_retired()

    def _close_retired(self) -> None:
        """Close the retired zygotes none of whose children still runs (they die with it)."""
        running = {
            id(w._process.zygote)
            for w in self._started
            if isinstance(w._process, ForkedProcess) and w._process.poll() is None
        }
        keep = []
        for zygote in self._retired:
            if id(zygote) in running:
                keep.append(zygote)
            else:
                zygote.close()
        self._retired = keep
