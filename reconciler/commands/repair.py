"""What a person runs to repair a target: stamp, downgrade, resolve, suspend, resume, accept.

The schema, the version table and the journal's steps change only under the target's advisory
lock; suspend and resume set or clear a journal flag.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from reconciler import logs
from reconciler.commands.common import listing, revision_id
from reconciler.control.locking import ensure_journal, target_lock
from reconciler.control.reading import read_graph, read_status
from reconciler.control.starting import start_worker
from reconciler.control.target import TargetHandle, journal_exists
from reconciler.core import checksums
from reconciler.core.graph import RevisionGraph
from reconciler.core.status import Status, applied_revisions, refuse_unless_applicable
from reconciler.db import connection, flags, hashes, journal
from reconciler.errors import ConfigError, Refused, RevisionFailed, StateError, UnreachableError
from reconciler.project import differences
from reconciler.sessions import replica_id

log = logs.get("reconciler.admin")


journal_log = logs.get("reconciler.journal_admin")


# --- stamp -------------------------------------------------------------------------------------
def stamp(handle: TargetHandle, revision: str, force: bool) -> tuple[str, ...]:
    """Adopt a database that has tables but no version table, after comparing it with the models.

    Nothing is replayed: the version table is set to `revision`. Without `force` the database must
    have no version table and must not differ from the models (minus the known differences).
    """
    targets = _stamp_targets(read_graph(handle), revision)
    with (
        connection.connect(handle.engine) as conn,
        target_lock(handle, conn, handle.settings.apply.lock_acquire_timeout),
        start_worker(handle, conn) as worker,
    ):
        if not force:
            _refuse_unless_adoptable(read_status(handle))
            known = differences.load_for(handle.settings)
            found = differences.unknown(worker.compare(), known)
            if found:
                raise Refused(
                    f"the database differs from the models, so stamping {', '.join(targets)} "
                    f"would record a schema it does not have:\n{listing(found)}\n"
                    "align them first, or pass --force"
                )
        ensure_journal(handle, conn)
        graph = read_graph(handle)
        rows = [
            journal.record_started(
                conn,
                handle.journal,
                target=handle.target_name,
                operation="stamp",
                revision=rev,
                down_revisions=graph.revisions[rev].down_revisions,
                file_hash=graph.revisions[rev].file_hash,
            )
            for rev in targets
        ]
        worker.stamp(list(targets), purge=force)
        for row in rows:
            journal.record_finished(conn, handle.journal, row, outcome="stamped")
        _record_below(handle, conn, graph, targets)
    log.info("stamped", target=handle.target_name, revisions=list(targets), forced=force)
    return targets


def _record_below(
    handle: TargetHandle, conn: sa.engine.Connection, graph: RevisionGraph, targets: tuple[str, ...]
) -> None:
    """Stamping marks the ancestors applied too: record their hashes, so they are ours, not a
    foreign writer's."""
    held = hashes.recorded_hashes(conn, handle.journal, handle.target_name)
    for rev in graph.topological(graph.closure(targets)):
        if rev not in targets and rev not in held:
            hashes.record_seen(conn, handle.journal, handle.target_name, graph.revisions[rev], "stamp")


def _stamp_targets(graph: RevisionGraph, revision: str) -> tuple[str, ...]:
    if revision in ("head", "heads"):
        if not graph.heads:
            raise ConfigError("the repository has no revisions; there is nothing to stamp")
        if revision == "head" and len(graph.heads) > 1:
            raise ConfigError(
                f"the repository has several heads ({', '.join(graph.heads)}); name one, or say `heads`"
            )
        return tuple(graph.heads)
    return (graph.resolve(revision),)


def _refuse_unless_adoptable(status: Status) -> None:
    if status.sync_state == "unknown":
        raise UnreachableError(status.message)
    if status.sync_state == "uninitialized_empty":
        raise StateError(
            "the database has no tables: there is nothing to adopt; `reconciler apply` creates "
            "the schema from the revisions"
        )
    if status.sync_state != "uninitialized_with_tables":
        raise StateError(
            f"the database is {status.sync_state} (version table rows: "
            f"{', '.join(sorted(status.decision.db_heads)) or 'none'}); stamp only adopts a "
            "database without a version table (pass --force to overwrite the version table)"
        )


# --- downgrade ---------------------------------------------------------------------------------
def downgrade_plan(handle: TargetHandle, revision: str) -> tuple[str, list[str]]:
    """What `downgrade REVISION` would undo, newest first (`base` undoes everything)."""
    graph = read_graph(handle)
    status = read_status(handle)
    refuse_unless_applicable(status)  # dirty, unreachable, ahead, diverged, unmerged, unadopted
    steps = relative_steps(revision)
    if steps is not None:
        target = steps_down(graph, status.decision.db_heads, steps)
    else:
        target = "base" if revision == "base" else graph.resolve(revision)
    applied = applied_revisions(graph, status)
    if target != "base" and target not in applied:
        raise StateError(
            f"revision {target} is not applied (db heads: "
            f"{', '.join(sorted(status.decision.db_heads)) or 'none'}); nothing to downgrade to"
        )
    keep = frozenset() if target == "base" else graph.ancestors(target)
    return target, [r for r in reversed(graph.topological(applied)) if r not in keep]


def relative_steps(revision: str) -> int | None:
    """`-N` (Alembic's relative downgrade): N; None for a revision id, `base` or a label."""
    if not revision.startswith("-"):
        return None
    if not revision[1:].isdigit() or int(revision[1:]) == 0:
        raise ConfigError(
            f"{revision!r} is neither a revision nor a relative step: say `-1` (one step down), "
            "`-2`, a revision id, or `base`"
        )
    return int(revision[1:])


def steps_down(graph: RevisionGraph, db_heads: Iterable[str], steps: int) -> str:
    """The revision `steps` below the database's one current revision (`base` below the first)."""
    heads = sorted(db_heads)
    if not heads:
        return "base"  # nothing is applied: nothing to undo
    if len(heads) > 1:
        raise ConfigError(
            f"`downgrade -{steps}` counts down from one current revision, and the database has "
            f"{len(heads)} ({', '.join(heads)}); name the revision to go down to: "
            "`reconciler downgrade REV`"
        )
    rev = heads[0]
    for done in range(steps):
        if rev == "base":
            raise StateError(
                f"only {done} revision(s) are applied below {heads[0]}: `downgrade -{steps}` goes "
                f"below the base; `reconciler downgrade base` undoes everything"
            )
        downs = graph.revisions[rev].down_revisions
        if len(downs) > 1:
            raise ConfigError(
                f"revision {rev} merges {', '.join(downs)}: one step down from it is ambiguous; "
                "name the revision to go down to: `reconciler downgrade REV`"
            )
        rev = downs[0] if downs else "base"
    return rev


Confirm = Callable[[str, list[str]], bool]


def downgrade(handle: TargetHandle, revision: str, confirm: Confirm) -> tuple[str, list[str]]:
    """Undo revisions down to `revision`, one per step, journaled, all under the target's lock.

    The plan is made under the lock and `confirm(target, undo)` (which shows it and asks the
    person) is called under the lock too, so what is confirmed is what gets undone.
    """
    # Before connecting: a revision the repository does not know is a typo, not a database state.
    if relative_steps(revision) is None and revision != "base":
        read_graph(handle).resolve(revision)
    with (
        connection.connect(handle.engine) as conn,
        target_lock(handle, conn, handle.settings.apply.lock_acquire_timeout),
    ):
        target, undo = downgrade_plan(handle, revision)
        if not undo:
            return target, undo
        if not confirm(target, undo):
            raise Refused("downgrade not confirmed; nothing was changed")
        ensure_journal(handle, conn)
        with start_worker(handle, conn) as worker:
            for rev in undo:
                _downgrade_one(handle, conn, worker, rev)
    return target, undo


def _downgrade_one(handle: TargetHandle, conn: sa.engine.Connection, worker: Any, rev: str) -> None:
    row = journal.record_started(
        conn,
        handle.journal,
        target=handle.target_name,
        operation="downgrade",
        revision=rev,
        trigger="downgrade",
    )
    try:
        # `rev@-1`: one step down on rev's own branch. Its plain parent as the destination
        # would also undo every other head that descends from that parent.
        seconds = worker.downgrade(f"{rev}@-1")
    except RevisionFailed as exc:
        transactional = handle.backend in journal.TRANSACTIONAL_DDL
        journal.record_finished(
            conn,
            handle.journal,
            row,
            outcome="failed" if transactional else "dirty",
            error_class=exc.error_class,
            error=str(exc),
            sqlstate=exc.sqlstate,
        )
        raise
    journal.record_finished(conn, handle.journal, row, outcome="downgraded", duration_ms=int(seconds * 1000))
    log.info("revision_downgraded", target=handle.target_name, revision=rev)


# --- resolve -----------------------------------------------------------------------------------
def resolve(handle: TargetHandle, revision: str, outcome: str) -> str:
    """An operator says what became of a dirty revision: `applied` or `rolled_back`.

    `applied` also sets the version table to the revision (it failed before Alembic could), so
    the next reconcile goes on after it; `rolled_back` lets the next reconcile apply it again.
    """
    if outcome not in ("applied", "rolled_back"):
        raise ConfigError(f"outcome must be applied or rolled_back, got {outcome!r}")
    graph = read_graph(handle)
    rev = _dirty_revision_id(graph, revision, outcome)
    with (
        connection.connect(handle.engine) as conn,
        target_lock(handle, conn, handle.settings.apply.lock_acquire_timeout),
    ):
        ensure_journal(handle, conn)
        status = read_status(handle)
        # Why here: the same judgement status made (journal and version table together).
        settled = journal.settle_interrupted(
            conn,
            handle.journal,
            applied_revisions(graph, status),
            handle.backend,
            unsafe="dirty" in handle.settings.unsafe,
        )
        dirty = list(dict.fromkeys(str(r["revision"]) for r in settled))
        if rev not in dirty:
            raise StateError(_not_dirty(rev, dirty, rev in applied_revisions(graph, status)))
        if outcome == "applied" and rev not in applied_revisions(graph, status):
            with start_worker(handle, conn) as worker:
                worker.stamp(rev)
        journal.resolve_dirty(conn, handle.journal, rev, outcome)
    log.info("dirty_resolved", target=handle.target_name, revision=rev, outcome=outcome)
    return rev


def _not_dirty(rev: str, dirty: list[str], listed: bool) -> str:
    where = (
        f"the version table lists {rev}: it is applied, and the journal records it so"
        if listed
        else f"the version table does not list {rev} and no step of it left its "
        "transaction: the next apply runs it"
    )
    return (
        f"revision {rev} is not dirty in the journal ({where}; dirty: "
        f"{', '.join(dirty) or 'none'}); nothing to resolve"
    )


def _dirty_revision_id(graph: RevisionGraph, revision: str, outcome: str) -> str:
    """The full id; a revision rolled back by hand may have left the repository, so keep it."""
    try:
        return graph.resolve(revision)
    except ConfigError:
        if outcome == "applied":
            raise
        return revision


# --- suspend / resume ----------------------------------------------------------------------
def suspend(handle: TargetHandle, reason: str) -> None:
    """Stop every replica of the target from applying until `resume` (a flag in the journal)."""
    value = f"by {replica_id()} at {_utc_now()}" + (f": {reason}" if reason else "")
    with connection.connect(handle.engine) as conn:
        if not journal_exists(handle, conn):
            with target_lock(handle, conn, handle.settings.apply.lock_acquire_timeout):
                ensure_journal(handle, conn)
        flags.put(conn, handle.journal, flags.suspended_key(handle.target_name), value)
    log.info("suspended", target=handle.target_name, reason=reason)


def resume(handle: TargetHandle) -> list[str]:
    """Let replicas apply again: clears `suspended` and `blocked`; returns what was cleared."""
    cleared: list[str] = []
    with connection.connect(handle.engine) as conn:
        if not journal_exists(handle, conn):
            return cleared
        for name, key in (
            ("suspended", flags.suspended_key(handle.target_name)),
            ("blocked", flags.blocked_key(handle.target_name)),
        ):
            if flags.delete(conn, handle.journal, key):
                cleared.append(name)
        flags.clear_failures(conn, handle.journal, handle.target_name)
    log.info("resumed", target=handle.target_name, cleared=cleared)
    return cleared


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- accept ------------------------------------------------------------------------------------
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
            hashes.record_hash(
                conn,
                handle.journal,
                target=handle.target_name,
                operation=hashes.ACCEPT,
                revision=item.revision,
                file_hash=item.current,
                down_revisions=downs,
                outcome="forgotten" if item.vanished else "accepted",
                trigger="accept",
            )
    for item in chosen:
        journal_log.info(
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
    wanted = revision_id(handle, revision)
    chosen = [m for m in found if m.revision == wanted]
    if not chosen:
        listed = ", ".join(m.revision for m in found) or "none"
        raise StateError(
            f"revision {wanted} has no checksum mismatch (mismatched: {listed}); nothing to "
            "accept — `reconciler status` shows the mismatches"
        )
    return chosen
