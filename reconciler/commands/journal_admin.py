"""Commands about the journal: `journal` (what happened, for an incident) and `accept` (a reviewed
change of an applied revision). Kept beside `admin.py`, with the same rule: writes take the lock.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from reconciler import logs
from reconciler.control.locking import ensure_journal, target_lock
from reconciler.control.reading import read_graph, read_status
from reconciler.control.target import TargetHandle, locate_journal, missing_database_file
from reconciler.core import checksums
from reconciler.db import connection, journal
from reconciler.errors import ConfigError, StateError

log = logs.get("reconciler.journal_admin")

COLUMNS = (
    "id",
    "started_at",
    "operation",
    "revision",
    "outcome",
    "duration_ms",
    "trigger",
    "host",
    "tool_version",
    "file_hash",
    "error",
)
FIELDS = (
    "id",
    "target",
    "operation",
    "revision",
    "down_revisions",
    "file_hash",
    "started_at",
    "completed_at",
    "duration_ms",
    "outcome",
    "error_class",
    "error",
    "sqlstate",
    "host",
    "tool_version",
    "trigger",
)


def steps(handle: TargetHandle, limit: int = 50, revision: str | None = None) -> list[dict[str, Any]]:
    """The target's newest `limit` journal steps, oldest first, as JSON-ready dicts."""
    if limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1")
    wanted = _revision_id(handle, revision) if revision else None
    if missing_database_file(handle) is not None:
        return []  # no database yet, so no journal; connecting would create the file
    with connection.connect(handle.engine) as conn:
        where = locate_journal(handle, conn)  # the side place, or where the previous release left it
        rows = journal.steps(conn, where, target=handle.journal_targets, revision=wanted, limit=limit)
    return [{name: _plain(row.get(name)) for name in FIELDS} for row in rows]


def _revision_id(handle: TargetHandle, revision: str) -> str:
    """A full id, a label or a prefix of a known revision; any other text as it is (the journal
    also holds revisions whose files are gone)."""
    try:
        return read_graph(handle).resolve(revision)
    except ConfigError:
        return revision


def _plain(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Rows as aligned text columns (hashes shortened, errors cut to one line)."""
    cells = [[_cell(name, row.get(name)) for name in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(COLUMNS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    return lines


def _cell(name: str, value: object) -> str:
    if value is None or value == "":
        return "-"
    text = str(value)
    if name == "file_hash":
        return text[:12]
    if name == "error":
        return text.strip().splitlines()[0] if text.strip() else "-"
    return text


def accept(handle: TargetHandle, revision: str | None) -> list[checksums.Mismatch]:
    """Record the current hash of changed applied revisions (or forget vanished ones), under the
    lock. `revision` None means every mismatch."""
    with (
        connection.connect(handle.engine) as conn,
        target_lock(handle, conn, handle.settings.apply.lock_acquire_timeout),
    ):
        ensure_journal(handle, conn)
        found = read_status(handle).audit.mismatches
        chosen = list(found) if revision is None else _chosen(handle, found, revision)
        graph = read_graph(handle)
        for item in chosen:
            downs = graph.revisions[item.revision].down_revisions if not item.vanished else ()
            journal.record_hash(
                conn,
                handle.journal,
                target=handle.target_name,
                operation=journal.ACCEPT,
                revision=item.revision,
                file_hash=item.current,
                down_revisions=downs,
                outcome="forgotten" if item.vanished else "accepted",
                trigger="accept",
            )
    for item in chosen:
        log.info(
            "checksum_accepted",
            target=handle.target_name,
            revision=item.revision,
            file=item.file,
            recorded_hash=item.recorded,
            accepted_hash=item.current,
            vanished=item.vanished,
        )
    return chosen


def _chosen(
    handle: TargetHandle, found: tuple[checksums.Mismatch, ...], revision: str
) -> list[checksums.Mismatch]:
    wanted = _revision_id(handle, revision)
    chosen = [m for m in found if m.revision == wanted]
    if not chosen:
        listed = ", ".join(m.revision for m in found) or "none"
        raise StateError(
            f"revision {wanted} has no checksum mismatch (mismatched: {listed}); nothing to "
            "accept — `reconciler status` shows the mismatches"
        )
    return chosen
