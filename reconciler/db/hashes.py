"""The revision hashes the journal holds: what a revision file was when it was applied, recorded
on first sight, accepted or forgotten. `recorded_hashes` reads them back for the checksum
conditions (`core.checksums`); the rows are journal steps like any other (`db.journal`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import sqlalchemy as sa

from reconciler.core.checksums import HashRecord
from reconciler.core.graph import Revision
from reconciler.db.journal import (  # the journal's own transaction helpers
    RECORD,
    JournalTables,
    _commit,
    _now,
    _rollback,
    record_finished,
    record_started,
)
from reconciler.sessions import replica_id
from reconciler.version import __version__

# A revision's recorded hash is the file_hash of its newest row that says it is applied; a newer
# row that says it was undone (or forgotten by `accept`) means we hold no hash for it.
ACCEPT = "accept"  # operation: an operator accepted a changed (or vanished) revision
APPLYING = frozenset(
    {
        ("upgrade", "applied"),
        ("upgrade", "resolved_applied"),
        ("upgrade", "skipped"),
        ("stamp", "stamped"),
        (RECORD, "recorded"),
        (ACCEPT, "accepted"),
    }
)
UNDOING = frozenset({("downgrade", "downgraded"), ("downgrade", "draft_rebuilt"), (ACCEPT, "forgotten")})


def recorded_hashes(conn: sa.engine.Connection, jt: JournalTables, target: str) -> dict[str, HashRecord]:
    """revision → the hash we hold for it as applied (empty without a journal)."""
    ops = sorted({op for op, _ in APPLYING | UNDOING})
    try:
        rows = cast(
            "list[tuple[str, str | None, str, str, str | None]]",
            conn.execute(
                sa.select(
                    jt.steps.c.revision,
                    jt.steps.c.file_hash,
                    jt.steps.c.operation,
                    jt.steps.c.outcome,
                    jt.steps.c.trigger,
                )
                .where(jt.steps.c.target == target[:64], jt.steps.c.operation.in_(ops))
                .order_by(jt.steps.c.id)
            ).fetchall(),
        )
    except sa.exc.DBAPIError:
        _rollback(conn)
        return {}
    _commit(conn)
    held: dict[str, HashRecord] = {}
    for rev, file_hash, operation, outcome, trigger in rows:
        if (operation, outcome) in APPLYING:
            held[rev] = HashRecord(rev, file_hash or "", operation, trigger or "")
        elif (operation, outcome) in UNDOING:
            held.pop(rev, None)
    return held


def record_hash(
    conn: sa.engine.Connection,
    jt: JournalTables,
    *,
    target: str,
    operation: str,
    revision: str,
    file_hash: str,
    down_revisions: Iterable[str] = (),
    outcome: str = "recorded",
    trigger: str = "",
) -> int:
    """One completed row that records (or, with outcome `forgotten`, drops) a revision's hash."""
    row = record_started(
        conn,
        jt,
        target=target,
        operation=operation,
        revision=revision,
        down_revisions=down_revisions,
        file_hash=file_hash,
        trigger=trigger,
    )
    record_finished(conn, jt, row, outcome=outcome, duration_ms=0)
    return row


def record_seen(
    conn: sa.engine.Connection, jt: JournalTables, target: str, revision: Revision, trigger: str
) -> int:
    """`record_hash` of a revision file as it is now (first sight, a foreign writer's, a seal, a stamp)."""
    return record_hash(
        conn,
        jt,
        target=target,
        operation=RECORD,
        revision=revision.revision,
        file_hash=revision.file_hash,
        down_revisions=revision.down_revisions,
        trigger=trigger,
    )


def record_seen_all(
    conn: sa.engine.Connection, jt: JournalTables, target: str, seen: Sequence[tuple[Revision, str]]
) -> None:
    """`record_seen` of several revision files (revision, trigger) in one statement: the same
    completed rows, oldest first."""
    if not seen:
        return
    now = _now()
    rows = [
        {
            "target": target[:64],
            "operation": RECORD,
            "revision": revision.revision,
            "down_revisions": ",".join(revision.down_revisions),
            "file_hash": revision.file_hash,
            "started_at": now,
            "completed_at": now,
            "duration_ms": 0,
            "outcome": "recorded",
            "error_class": None,
            "error": None,
            "sqlstate": None,
            "host": replica_id()[:128],
            "tool_version": __version__,
            "trigger": trigger[:64],
        }
        for revision, trigger in seen
    ]
    conn.execute(jt.steps.insert(), rows)
    _commit(conn)
