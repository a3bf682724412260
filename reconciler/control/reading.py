"""Read one target's state: the version table, the journal's conditions, the guard's last word.

`read_status` is what `status`, `wait` and every run's first look call: `unknown` (not an
exception) when the database is unreachable, and no connection at all to a SQLite file that does
not exist yet. `chain_status` is one chain's read on a connection the caller holds (under the
lock, the run reads again with it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import sqlalchemy as sa

from reconciler.control import guard
from reconciler.control.conditions import read_conditions
from reconciler.control.target import TargetHandle, locate_journal, missing_database_file, retrying
from reconciler.core.graph import RevisionGraph
from reconciler.core.state import DbSnapshot, Decision, decide
from reconciler.core.status import Status, with_chains
from reconciler.db import connection, journal
from reconciler.errors import UnreachableError


def read_graph(handle: TargetHandle, *, check_files: bool = True) -> RevisionGraph:
    """The chain's revision graph; `check_files` False trusts the cache (a watcher is looking)."""
    return handle.project.graph(check=check_files)


def read_status(handle: TargetHandle, *, check_files: bool = True) -> Status:
    """The state of the target; `unknown` (not an exception) when the database is unreachable."""
    graph = read_graph(handle, check_files=check_files)
    missing = missing_database_file(handle)
    if missing is not None:
        return _status_of_missing_file(handle, graph, missing)
    try:
        return retrying(handle, lambda: first_look(handle, graph, fast=False))
    except UnreachableError as exc:
        decision = decide(connection.unreachable_snapshot(), graph)
        return Status(
            handle.target_name, handle.redacted_url, dataclasses.replace(decision, message=str(exc))
        )


def first_look(handle: TargetHandle, graph: RevisionGraph, *, fast: bool) -> Status:
    """Every chain's status on a connection of its own; `fast` may reuse recent flags."""
    with connection.connect(handle.engine) as conn:
        return status_all(handle, conn, graph, fresh=not fast)


def status_all(
    handle: TargetHandle, conn: sa.engine.Connection, graph: RevisionGraph, fresh: bool = True
) -> Status:
    """Every chain's status, [target]'s carrying the others' (see `with_chains`)."""
    main = chain_status(handle, conn, graph, fresh)
    return with_chains(main, tuple(chain_status(c, conn, read_graph(c), fresh) for c in handle.chains))


def chain_status(
    handle: TargetHandle, conn: sa.engine.Connection, graph: RevisionGraph, fresh: bool = True
) -> Status:
    """Read and decide. With `fresh` False and the database in sync, one query: the journal's
    flags are reused for up to CONDITIONS_TTL seconds (nothing would be applied anyway)."""
    settings = handle.settings
    try:
        locate_journal(handle, conn)
        snap = connection.snapshot(
            conn,
            settings.target.version_table,
            settings.target.version_table_schema or None,
            (*handle.journal.names, *handle.other_version_tables),
        )
        if handle.chain and not snap.version_table_exists:
            # Another chain's tables are no reason to adopt: this chain starts from base.
            snap = dataclasses.replace(snap, has_user_tables=False)
        ancestry = _ancestry(handle, conn, snap.db_heads, graph)
        decision = _decide(handle, snap, graph, ancestry)
        inputs = (snap.db_heads, graph.fingerprint)
        cached = handle.cache.conditions
        if fresh or decision.sync_state != "in_sync" or cached is None or not cached.fresh_for(inputs):
            cached = handle.cache.conditions = read_conditions(handle, conn, graph, inputs, ancestry)
    except sa.exc.DBAPIError as exc:
        if connection.is_disconnect(exc):
            raise connection.unreachable(handle.engine, exc) from None
        raise
    names, messages = cached.names, cached.messages
    refusal = guard.refusal_for(handle, graph, decision.pending)
    if refusal:
        names, messages = (*names, "destructive_pending"), {**messages, "destructive_pending": refusal}
    return Status(
        handle.target_name,
        handle.redacted_url,
        decision,
        names,
        cached.dirty,
        messages,
        cached.blocked,
        cached.drift,
        cached.audit,
        cached.baseline,
        guard.guard_for(handle, graph, decision.pending),
        handle.chain,
        settings.target.version_table,
        settle=cached.settle,
    )


def _status_of_missing_file(handle: TargetHandle, graph: RevisionGraph, path: Path) -> Status:
    """Every chain as on an empty database (all pending), saying the file does not exist. The
    guard has nothing to refuse there (nothing can be lost), so no worker is started for it."""
    empty = DbSnapshot(
        reachable=True, version_table_exists=False, db_heads=frozenset(), has_user_tables=False
    )
    note = f"; the database file {path} does not exist yet (`reconciler apply` creates it)"
    nothing = guard.summary(guard.Analysis((), "built-in"), handle.settings)

    def one(chain: TargetHandle, chain_graph: RevisionGraph) -> Status:
        decision = decide(empty, chain_graph)
        decision = dataclasses.replace(decision, message=decision.message + note)
        return Status(
            chain.target_name,
            chain.redacted_url,
            decision,
            chain=chain.chain,
            version_table=chain.settings.target.version_table,
            guard=nothing if decision.pending else None,
        )

    return with_chains(one(handle, graph), tuple(one(c, read_graph(c)) for c in handle.chains))


def _decide(
    handle: TargetHandle, snap: DbSnapshot, graph: RevisionGraph, ancestry: dict[str, tuple[str, ...]]
) -> Decision:
    """`decide` is pure: the same inputs give the same decision, so the no-op tick reuses it."""
    key = (snap, graph.fingerprint, tuple(sorted(ancestry.items())))
    decided = handle.cache.decided
    if decided is not None and decided[0] == key:
        return decided[1]
    decision = decide(snap, graph, ancestry)
    handle.cache.decided = (key, decision)
    return decision


def _ancestry(
    handle: TargetHandle, conn: sa.engine.Connection, db_heads: frozenset[str], graph: RevisionGraph
) -> dict[str, tuple[str, ...]]:
    if all(head in graph.revisions for head in db_heads):
        return {}  # the common case: no journal query needed
    return journal.ancestry(conn, handle.journal)
