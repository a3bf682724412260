"""What the fleet records once, in the journal's flags: the prod marker and alert claims.

Both take no lock: `flags.claim` is an insert-on-conflict, so of 200 replicas seeing the same
transition exactly one sends its alert. Neither connects to a SQLite file that does not exist
(connecting would create it).
"""

from __future__ import annotations

from reconciler.control.target import TargetHandle, journal_exists, missing_database_file
from reconciler.db import connection, flags


def mark_prod(handle: TargetHandle) -> bool:
    """Record that a prod reconciler owns this database (dev mode refuses it); False while
    there is nothing to mark yet (no database file, no journal: marked once it exists)."""
    key = flags.environment_key(handle.target_name)
    if missing_database_file(handle) is not None:
        return False  # an observer on a SQLite file not made yet: connecting would create it
    with connection.connect(handle.engine) as conn:
        if not journal_exists(handle, conn):
            return False  # nothing applied by us yet
        if flags.read(conn, handle.journal, [key]).get(key) != "prod":
            flags.put(conn, handle.journal, key, "prod")
    return True


def claim_alert(handle: TargetHandle, event: str, episode: str) -> bool:
    """True when this replica is the first to record `episode` of `event` (it sends the alert);
    without a journal to coordinate in, every replica sends."""
    if missing_database_file(handle) is not None:
        return True  # no database, so no journal to coordinate in (and no file to create)
    with connection.connect(handle.engine) as conn:
        if not journal_exists(handle, conn):
            return True
        return flags.claim(conn, handle.journal, flags.alert_key(handle.target_name, event), episode)
