"""Waiting in the main thread for a stop that a signal handler starts.

CPython runs a Python signal handler in the main thread, when that thread next executes bytecode.
A process-directed SIGTERM may be delivered to another thread (one blocked in a system call); a
main thread blocked in `Event.wait()` without a timeout is then never woken to run the handler,
and the process ignores the signal. Waking up now and then lets the handler run.
"""

from __future__ import annotations

import threading

WAKE_EVERY = 0.25  # seconds


def wait_for(done: threading.Event) -> None:
    """Block until `done` is set, running pending signal handlers at least every WAKE_EVERY."""
    while not done.wait(WAKE_EVERY):
        pass
