"""`wait`: block until the database is at (or, unless exact, ahead of) the repository's heads.

What an init container or a deploy script runs before the app starts. While revisions are
pending it says which one the applier (any replica) is running, from the journal's progress
note. Drift is reported, never waited on.
"""

from __future__ import annotations

import time

from reconciler import logs
from reconciler.control.progress import read_progress
from reconciler.control.reading import read_status
from reconciler.control.target import TargetHandle
from reconciler.core.status import Status
from reconciler.errors import WaitTimeout

log = logs.get("reconciler.reconcile")


def wait(handle: TargetHandle, timeout: float, *, exact: bool = False, poll: float = 1.0) -> Status:
    """Block until the database is at (or, unless exact, ahead of) the repo heads."""
    deadline = time.monotonic() + timeout
    wanted = ("in_sync",) if exact else ("in_sync", "ahead")
    last = ""
    said: tuple[object, ...] = ()
    while True:
        status = read_status(handle)
        # Drift is reported, never waited on: a column added by hand must not hold the app back.
        if status.sync_state in wanted and not set(status.conditions) - {"drift"}:
            return status
        if status.state != last:
            log.info("waiting", target=handle.target_name, state=status.state, reason=status.message)
            last = status.state
        said = _say_progress(handle, status, said)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(
                f"gave up after {timeout:g} s: the database of target {handle.target_name} is "
                f"{status.state} ({status.message}); run `reconciler apply` or raise --timeout"
            )
        time.sleep(min(poll, remaining))


def _say_progress(handle: TargetHandle, status: Status, said: tuple[object, ...]) -> tuple[object, ...]:
    """While revisions are pending, one `apply_progress` line each time the applier (any
    replica) moves on to another revision; returns what was said."""
    progress = read_progress(handle) if status.pending else None
    if not progress:
        return said
    now = (progress.get("revision"), progress.get("n"), progress.get("started_at"))
    if now != said:
        log.info(
            "apply_progress",
            target=handle.target_name,
            revision=progress.get("revision"),
            n=progress.get("n"),
            total=progress.get("total"),
            started_at=progress.get("started_at"),
            replica=progress.get("replica"),
            pending=len(status.pending),
        )
    return now
