"""One reconcile of one target: read → decide → lock → re-read → apply → verify → record.

`reconcile_once` is the whole control path as a list of named steps; each step is a function of
its own module (reading, locking, applying, ...), taking the target handle first and the
run's collaborators as keyword arguments. Applying happens one revision per step, each
journaled before it starts and after it ends, in a worker subprocess that runs the project's
env.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from reconciler.control.applying import apply_pending, finish, refuse, settled_status
from reconciler.control.conditions import forget_conditions
from reconciler.control.locking import target_lock
from reconciler.control.progress import LiveRun, clear_plan, set_plan
from reconciler.control.reading import first_look, read_graph
from reconciler.control.steps import ProgressFn
from reconciler.control.target import TargetHandle, retrying
from reconciler.core.graph import RevisionGraph
from reconciler.core.status import ApplyResult, Status
from reconciler.db import connection
from reconciler.errors import LockTimeout, Refused


def reconcile_once(
    handle: TargetHandle,
    *,
    run: LiveRun | None = None,
    trigger: str = "apply",
    progress: ProgressFn | None = None,
    fast: bool = False,
    lock_timeout: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    check_files: bool = True,
    guard: bool = True,
    retry_gate: bool = False,
    look_first: bool = True,
) -> ApplyResult:
    """Bring the database to the repository's heads, or raise saying why not.

    `run` is where the caller watches the run (the daemon's /status); `fast` lets an in-sync
    run reuse recent journal flags (the daemon's no-op: one query); `should_stop` is asked
    before each revision (graceful shutdown); `check_files` False trusts the graph cache (a
    watcher is looking); `guard` and `retry_gate` as in `applying.apply_pending`; `look_first`
    False: the caller's read stands for the first look (a fleet's one read of every tenant), so
    the run goes straight to the lock and decides on the re-read under it (a tenant another
    replica holds costs one try)."""
    started = time.monotonic()
    run = run if run is not None else LiveRun()
    graph = read_graph(handle, check_files=check_files)
    if look_first:
        noop = _look_first(handle, run, graph, fast, guard, started)
        if noop is not None:
            return noop
    timeout = handle.settings.apply.lock_acquire_timeout if lock_timeout is None else lock_timeout
    try:
        # Why here: the lock is polled for, then the state is read again under it (invariant 3).
        with connection.connect(handle.engine) as conn, target_lock(handle, conn, timeout) as waited:
            return apply_pending(
                handle,
                conn,
                graph,
                run=run,
                trigger=trigger,
                progress=progress,
                should_stop=should_stop,
                waited=waited,
                started=started,
                guard=guard,
                retry_gate=retry_gate,
            )
    finally:
        clear_plan(handle, run)


def _look_first(
    handle: TargetHandle, run: LiveRun, graph: RevisionGraph, fast: bool, guard: bool, started: float
) -> ApplyResult | None:
    """The read before the lock: the no-op result when there is nothing to do, else None (the
    plan is set: until the lock's re-read, the lock wait and the worker's start show it)."""
    # Why here: the first look needs no lock; an in-sync target costs this one query.
    status = retrying(handle, lambda: first_look(handle, graph, fast=fast))
    refuse(handle, status)
    if status.sync_state == "in_sync" and status.settle:
        status = _settle_once(handle, graph, status)
    if status.sync_state == "in_sync" and not status.needs_recording:
        handle.project.close_worker()  # nothing to apply: a worker kept from the headers goes
        return finish(handle, run, "noop", (), status, 0.0, started)
    if guard and "destructive_pending" in status.conditions:
        raise Refused(status.messages["destructive_pending"])  # nothing changed since it was refused
    set_plan(handle, run, status)
    return None


def _settle_once(handle: TargetHandle, graph: RevisionGraph, status: Status) -> Status:
    """In sync with an interrupted step that is not dirty (its revision committed before the
    step was recorded): record it under a one-try lock, so that no later run is held up by
    it; a busy lock means its holder settles it. The fresh status afterwards."""
    try:
        with connection.connect(handle.engine) as conn, target_lock(handle, conn, 0.0):
            for chain in handle.every_chain:
                settled_status(chain, conn, graph if chain is handle else read_graph(chain))
    except LockTimeout:
        return status
    forget_conditions(handle)
    return first_look(handle, graph, fast=False)
