"""The prod loop: an APScheduler 3.x interval job plus run-now triggers and follow-up delays.

The only importer of APScheduler. One job runs the reconcile function:

- every `interval` seconds (plus up to `jitter`), first at once on `start()`;
- at once on `trigger()` (a revision file changed, a signal); a trigger that arrives during a run
  is not lost: that run is followed by exactly one more, however many triggers came in;
- after a run that asked for another delay (backoff after a transient error), at that delay; the
  normal interval resumes after the run it scheduled. `reconciler.core.backoff` gives the daemon's:
  never shorter than the interval, growing to `backoff_max`.

The run function is never executed concurrently with itself: interval ticks, triggers and
follow-ups share one job with `max_instances=1`, run by one worker thread. Ticks that fall due
while a run is in progress coalesce into the next one. Nothing escaping the run function stops
the loop. Worker and scheduler threads are daemon threads, so a run that outlasts the shutdown
grace cannot keep the process alive.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from reconciler import logs
from reconciler.errors import ConfigError

RunFn = Callable[[str], Optional[float]]
"""run(reason) -> seconds until the next run (e.g. a backoff), or None for the normal interval."""

_MAX_DELAY = 365 * 24 * 3600.0  # a delay beyond a year is a bug; keep datetime arithmetic finite
_SKIPPED = "maximum number of running instances"

log = logs.get("reconciler.scheduler")


class _QuietSkips(logging.Filter):
    """Drops APScheduler's "skipped: maximum number of running instances" warning.

    A tick or a wake-up that falls due during a run is skipped by design (coalescing; triggers
    are kept as a pending follow-up), so on a slow migration the warning is noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return _SKIPPED not in str(record.msg)


class _RunThread(BaseExecutor):  # type: ignore[misc]
    """An APScheduler executor with one persistent daemon worker thread.

    The stock thread pool's workers are joined at interpreter exit, so a hung run would keep the
    process alive after shutdown. `on_done` is called after the executor has released the job's
    instance slot, when a new submission can no longer be refused.
    """

    def __init__(self, name: str, on_done: Callable[[], None]) -> None:
        super().__init__()
        self._queue: queue.SimpleQueue[tuple[Any, list[datetime]] | None] = queue.SimpleQueue()
        self._on_done = on_done
        self.thread = threading.Thread(target=self._serve, name=name + "-run", daemon=True)

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        if not self.thread.is_alive():
            self.thread.start()

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        self._queue.put((job, run_times))

    def shutdown(self, wait: bool = True) -> None:
        self._queue.put(None)
        if wait and self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, run_times = item
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as exc:  # run_job catches the job's own errors; this is belt and braces
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, events)
            self._on_done()


class Loop:
    """Runs `run(reason)` on an interval and on demand, one run at a time; see the module doc.

    Reasons passed to `run`: "startup" (the first run), "interval", "backoff" (a delay the
    previous run asked for), or the reason given to `trigger()` (the first one, when several
    coalesce into one follow-up run).
    """

    def __init__(self, run: RunFn, interval: float, jitter: float = 0.0, name: str = "reconcile") -> None:
        if not interval > 0:
            raise ConfigError(
                f"daemon interval must be a positive number of seconds, got {interval!r}; "
                "set [daemon] interval (or RECONCILER_INTERVAL)"
            )
        if not jitter >= 0:
            raise ConfigError(
                f"daemon jitter must be zero or a positive number of seconds, got {jitter!r}; "
                "set [daemon] jitter"
            )
        self._run = run
        self._interval = float(interval)
        self._jitter = float(jitter)
        self._name = name
        self._lock = threading.RLock()  # reentrant: trigger() may come from a signal handler
        self._idle = threading.Condition(self._lock)
        self._running = False
        self._started = False
        self._stopping = False
        self._pending: str | None = None  # a trigger's reason, waiting for the next run
        self._scheduled_reason = "startup"
        self._last_beat = time.monotonic()
        self._executor = _RunThread(name, self._after_job)
        self._scheduler: Any = None

    @property
    def running(self) -> bool:
        """A run is in progress."""
        return self._running

    @property
    def last_beat(self) -> float:
        """`time.monotonic()` of the last run start or end, or `beat()` call."""
        return self._last_beat

    def beat(self) -> None:
        """Heartbeat from inside a long run (liveness must not depend on run length)."""
        self._last_beat = time.monotonic()

    def start(self) -> None:
        """Start the background scheduler; the first run starts at once."""
        with self._lock:
            if self._started or self._stopping:
                return
            self._started = True
        scheduler_log = logging.getLogger("apscheduler.scheduler." + self._name)
        if not any(isinstance(f, _QuietSkips) for f in scheduler_log.filters):
            scheduler_log.addFilter(_QuietSkips())
        self._scheduler = BackgroundScheduler(
            timezone="UTC", logger=scheduler_log, executors={"default": self._executor}, daemon=True
        )
        trigger = IntervalTrigger(seconds=self._interval, jitter=self._jitter or None, timezone="UTC")
        self._scheduler.add_job(
            self._execute,
            trigger=trigger,
            id=self._name,
            name=self._name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=_now(),
            replace_existing=True,
        )
        self._scheduler.start()

    def trigger(self, reason: str) -> None:
        """Run as soon as possible; during a run, exactly one more run follows it. Never blocks."""
        with self._lock:
            if self._stopping:
                return
            if self._pending is None:
                self._pending = reason
            if self._running or not self._started:
                return  # the run in progress (or the first run) picks the pending reason up
        self._wake(0.0)

    def stop(self, wait: bool = True, timeout: float | None = None) -> bool:
        """No new runs; with `wait`, wait up to `timeout` for the run in progress.

        Returns whether no run is in progress any more. Called from inside the run, it does not
        wait (the run would wait for itself) and returns False.
        """
        with self._lock:
            self._stopping = True
            self._pending = None
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            try:
                scheduler.shutdown(wait=False)
            except Exception:  # already stopped; nothing to undo
                log.debug("scheduler_shutdown_failed", loop=self._name, exc_info=True)
        if not wait or threading.current_thread() is self._executor.thread:
            return not self._running
        with self._idle:
            self._idle.wait_for(lambda: not self._running, timeout)
            return not self._running

    # -- inside the worker thread -------------------------------------------------------------

    def _execute(self) -> None:
        with self._lock:
            if self._running or self._stopping:
                return
            self._running = True
            reason = self._pending or self._scheduled_reason
            self._pending = None
            self._scheduled_reason = "interval"
        try:
            while True:
                self._run_once(reason)
                with self._lock:
                    if self._pending is None or self._stopping:
                        break
                    reason, self._pending = self._pending, None
        finally:
            with self._lock:
                self._running = False
                self._idle.notify_all()
            self.beat()

    def _run_once(self, reason: str) -> None:
        self.beat()
        delay: float | None = None
        try:
            delay = self._run(reason)
        except Exception:
            log.error("run_failed", loop=self._name, reason=reason, exc_info=True)
        self.beat()
        if delay is not None and not self._stopping:
            with self._lock:
                self._scheduled_reason = "backoff"
            self._wake(delay)

    def _after_job(self) -> None:
        """A trigger that came between the run's end and the slot's release was refused: re-wake."""
        with self._lock:
            lost = self._pending is not None and not self._running and not self._stopping
        if lost:
            self._wake(0.0)

    def _wake(self, delay: float) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        seconds = _clamp(delay)
        try:
            scheduler.modify_job(self._name, next_run_time=_now() + timedelta(seconds=seconds))
        except JobLookupError:  # stopped meanwhile
            log.debug("wake_after_stop", loop=self._name)


def _clamp(delay: float) -> float:
    value = float(delay)
    if math.isnan(value) or value < 0:
        return 0.0
    return min(value, _MAX_DELAY)


def _now() -> datetime:
    return datetime.now(timezone.utc)
