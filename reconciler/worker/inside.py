"""Whether this process is reconciler's worker: set at the worker's start, read by
`reconciler.hooks.migration_lock` (an env.py run by the worker must not wait for the lock its
control plane already holds). Standard library only: `reconciler.hooks` imports it in any app.
"""

from __future__ import annotations

_IN_WORKER = [False]


def inside_reconciler_worker() -> None:
    """Called by reconciler's worker at start: `migration_lock` in env.py then takes no lock (the
    reconciler that runs env.py holds it already, on another connection)."""
    _IN_WORKER[0] = True


def in_reconciler_worker() -> bool:
    """True in reconciler's worker process (after its start)."""
    return _IN_WORKER[0]
