"""Apply under the lock: re-read, validate, record hashes, run the pending revisions, verify.

`apply_pending` is the part of a reconcile that runs while the caller holds the target's lock
(`locking.target_lock`): what another applier did meanwhile is read again there and counts.
Every chain of the database is applied in config order; each one's worker is started and
checked before anything is written for any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import sqlalchemy as sa

from reconciler import logs
from reconciler.control import guard as destructive
from reconciler.control.locking import ensure_journal
from reconciler.control.progress import LiveRun, clear_plan, progress_done, set_plan
from reconciler.control.reading import chain_status, read_graph, status_all
from reconciler.control.retries import count_failure, defer_unless_due, unblock_if_changed
from reconciler.control.starting import start_worker
from reconciler.control.steps import PlanRun, ProgressFn, Steps
from reconciler.control.target import TargetHandle, journal_seen
from reconciler.control.workers import Worker
from reconciler.core import safety
from reconciler.core.graph import RevisionGraph
from reconciler.core.status import (
    APPLICABLE,
    ApplyResult,
    Status,
    applied_revisions,
    refuse_unless_applicable,
    verify,
)
from reconciler.db import flags, hashes, journal
from reconciler.errors import ReconcilerError, Refused, RevisionFailed

log = logs.get("reconciler.reconcile")


def apply_pending(
    handle: TargetHandle,
    conn: sa.engine.Connection,
    graph: RevisionGraph,
    *,
    run: LiveRun,
    trigger: str = "apply",
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    waited: float = 0.0,
    started: float | None = None,
    guard: bool = True,
    retry_gate: bool = False,
) -> ApplyResult:
    """The work under the lock held on `conn`, for every chain (see the module docstring).
    `guard`: the destructive-change guard ([safety]); `retry_gate`: honour the fleet's
    `retry_after` (daemon ticks do; a person's `reconciler apply` runs the revision when asked)."""
    started = time.monotonic() if started is None else started
    results: list[tuple[str, Steps, Status]] = []
    with ExitStack() as stack:
        plans = []
        for chain in handle.every_chain:
            chain_graph = graph if chain is handle else read_graph(chain)
            before = settled_status(chain, conn, chain_graph)
            if retry_gate:
                defer_unless_due(chain, conn, chain_graph, before)
            worker = stack.enter_context(_validated(chain, run, conn, before))
            plans.append((chain, chain_graph, before, worker))
        for chain, chain_graph, before, worker in plans:
            results.append(
                _apply_chain(
                    chain, run, conn, chain_graph, before, worker, trigger, progress, should_stop, guard
                )
            )
    if not handle.chains:
        outcome, applied, final = results[0]
        return finish(handle, run, outcome, applied, final, waited, started)
    outcome = "applied" if any(r[0] == "applied" for r in results) else "noop"
    applied = tuple(step for r in results for step in r[1])
    return finish(handle, run, outcome, applied, status_all(handle, conn, graph), waited, started)


def _apply_chain(
    handle: TargetHandle,
    run: LiveRun,
    conn: sa.engine.Connection,
    graph: RevisionGraph,
    before: Status,
    worker: Worker | None,
    trigger: str,
    progress: ProgressFn | None,
    should_stop: Callable[[], bool] | None,
    guard: bool,
) -> tuple[str, Steps, Status]:
    """One chain's part of `apply_pending`: (outcome, revisions we applied, its status)."""
    # Why here: the worker and env.py's connection were checked; writing starts.
    ensure_journal(handle, conn)
    # env.py ran in the worker (its probe; dev mode's generation): an app factory may have
    # migrated the database meanwhile. A fleet's tenant worker (`run.starter`) ran no user code.
    ran_user_code = worker is not None and run.starter is None
    status = chain_status(handle, conn, graph) if ran_user_code else before
    during = applied_revisions(graph, status) - applied_revisions(graph, before)
    if record_hashes(handle, run, conn, graph, status, during):
        status = chain_status(handle, conn, graph)
    refuse(handle, status)
    if status.sync_state == "in_sync" or worker is None:  # another replica did the work
        return ("applied" if during else "noop"), (), status  # "applied": moved, not by us
    steps = _apply_counted(handle, run, conn, worker, graph, status, trigger, progress, should_stop, guard)
    final = chain_status(handle, conn, graph)
    if len(steps) == len(status.decision.pending):
        verify(final)
    # A step Alembic found already done (an app factory upgrading inside the worker) was
    # journaled `skipped`: it is the other writer's, never counted as applied by us.
    ours = tuple(step for step in steps if step[0] not in run.foreign)
    return "applied", ours, final


def refuse(handle: TargetHandle, status: Status) -> None:
    """`refuse_unless_applicable`, saying `checksum_mismatch` once per distinct mismatch."""
    found = status.audit.mismatches if "checksum_mismatch" in status.conditions else ()
    if found and found != handle.cache.mismatch_logged:
        log.error(
            "checksum_mismatch",
            target=handle.target_name,
            revisions=[m.as_dict() for m in found],
            hint="review the change, then `reconciler accept REV` (or --all)",
        )
    handle.cache.mismatch_logged = found
    refuse_unless_applicable(status)


def record_hashes(
    handle: TargetHandle,
    run: LiveRun,
    conn: sa.engine.Connection,
    graph: RevisionGraph,
    status: Status,
    during: frozenset[str] = frozenset(),
) -> bool:
    """Under the lock: record the hashes of applied revisions we hold none for (first sight,
    or a foreign writer's: after the baseline, or applied `during` this run) and of sealed
    drafts. True when something was recorded."""
    audit, target = status.audit, handle.target_name
    foreign = [r for r in audit.unrecorded if status.baseline or r in during]
    seen = [
        (
            graph.revisions[rev],
            "seal" if rev in audit.sealed else "foreign" if rev in foreign else "first_sight",
        )
        for rev in (*audit.unrecorded, *audit.sealed)
    ]
    hashes.record_seen_all(conn, handle.journal, handle.journal_target, seen)
    if audit.sealed:
        log.info("checksum_recorded_after_seal", target=target, revisions=list(audit.sealed))
    if foreign:
        run.foreign.extend(foreign)
        log.warning(
            "foreign_writer",
            target=target,
            revisions=foreign,
            hint="applied without reconciler (an app upgrading itself at start-up?): "
            "switch that off, or take our lock with reconciler.hooks.migration_lock",
        )
    first_sight = [r for r in audit.unrecorded if r not in foreign]
    if first_sight:
        log.info(
            "checksum_recorded_first_sight",
            target=target,
            revisions=first_sight,
            detail="applied before the journal recorded hashes; trusted as they are now",
        )
    if not status.baseline:
        flags.put(conn, handle.journal, flags.checksums_key(handle.journal_target), journal.now_iso())
    handle.cache.conditions = None
    return status.needs_recording


def settled_status(handle: TargetHandle, conn: sa.engine.Connection, graph: RevisionGraph) -> Status:
    """The chain's status once a changed blocked revision is unblocked and interrupted steps
    that are not dirty are settled (under the lock)."""
    if not journal_seen(handle, conn):
        return chain_status(handle, conn, graph)  # nothing to settle, and nothing is created here
    unblock_if_changed(handle, conn, graph)
    status = chain_status(handle, conn, graph)
    applied = applied_revisions(graph, status)
    unsafe = "dirty" in handle.settings.unsafe
    if journal.settle_interrupted(conn, handle.journal, applied, handle.backend, handle.row_target, unsafe):
        return chain_status(handle, conn, graph)
    return status


@contextmanager
def _validated(
    handle: TargetHandle, run: LiveRun, conn: sa.engine.Connection, status: Status
) -> Iterator[Worker | None]:
    """The worker that will apply `status`'s pending revisions, once everything that can
    refuse as a configuration error (exit 2) was checked: the role, the worker's start, the
    models, env.py's connection and version table (a run of env.py that applies and creates
    nothing). None when nothing is to be applied (or a refusal follows anyway). The guard
    comes later: its refusal is no configuration error, and is claimed in the journal."""
    try:
        refuse_unless_applicable(status)
    except ReconcilerError:
        yield None
        return
    if status.sync_state not in APPLICABLE:
        yield None
        return
    # dev mode's worker already ran env.py for its generation; a fleet's tenant worker runs it
    # once, for the upgrade (its failure is that tenant's, journaled: the others go on)
    probe = run.lent is None and run.starter is None
    with start_worker(handle, conn, run=run) as worker:
        if probe:
            worker.probe()
        yield worker


def _apply_counted(
    handle: TargetHandle,
    run: LiveRun,
    conn: sa.engine.Connection,
    worker: Worker,
    graph: RevisionGraph,
    status: Status,
    trigger: str,
    progress: ProgressFn | None,
    should_stop: Callable[[], bool] | None,
    guard: bool,
) -> Steps:
    """Apply the pending revisions; count a failure fleet-wide, block it when it repeats."""
    set_plan(handle, run, status)
    try:
        empty = status.sync_state == "uninitialized_empty"
        pending = status.decision.pending
        applied = _run_pending(
            handle, run, conn, worker, graph, pending, trigger, progress, should_stop, guard, empty
        )
    except RevisionFailed as exc:
        count_failure(handle, conn, graph, exc)
        raise
    finally:
        clear_plan(handle, run)
        progress_done(handle, run, conn)
    flags.clear_failures(conn, handle.journal, handle.journal_target)
    return applied


def _run_pending(
    handle: TargetHandle,
    run: LiveRun,
    conn: sa.engine.Connection,
    worker: Worker,
    graph: RevisionGraph,
    pending: tuple[str, ...],
    trigger: str,
    progress: ProgressFn | None,
    should_stop: Callable[[], bool] | None,
    guard: bool,
    empty: bool,
) -> Steps:
    if guard and empty:  # every finding would be exempt: nothing to lose, nothing to record
        log.debug(
            "guard_exempt", target=handle.target_name, revisions=len(pending), reason=safety.EMPTY_DATABASE
        )
    elif guard:
        analysis = destructive.check_pending(handle, worker, graph, pending, empty)
        verdict = destructive.enforce(analysis, handle.settings, handle.target_name)
        worker.check_operations({rev: c.payload() for rev, c in verdict.live.items()})
    plan = PlanRun(
        handle, run, conn, graph, pending, trigger=trigger, progress=progress, should_stop=should_stop
    )
    try:
        return plan.apply(worker)
    except Refused as exc:  # refused as it ran: say so until the files change
        destructive.remember_refusal(handle, graph, pending[plan.position :], str(exc))
        raise


def finish(
    handle: TargetHandle,
    run: LiveRun,
    outcome: str,
    applied: Steps,
    status: Status,
    waited: float,
    started: float,
) -> ApplyResult:
    """The run's result; an `applied` one is logged with its summary line."""
    duration = time.monotonic() - started
    foreign = tuple(run.foreign)
    if outcome != "applied":
        return ApplyResult(outcome, applied, status, waited, duration, foreign)
    log.info(
        "reconcile_finished",
        target=handle.target_name,
        outcome=outcome,
        state=status.state,
        applied=[rev for rev, _ in applied],
        foreign=list(foreign),
        summary=summary(ApplyResult(outcome, applied, status, foreign=foreign)),
        lock_wait_ms=int(waited * 1000),
        duration_ms=int(duration * 1000),
    )
    return ApplyResult(outcome, applied, status, waited, duration, foreign)


def summary(result: ApplyResult, ids: bool = False) -> str:
    """One line that says what this run did, as the journal records it: revisions we applied,
    and apart from them the ones another writer applied meanwhile (journaled `skipped`). `ids`:
    every revision id (-v); else a long list is its count, first and last."""
    state = "in sync" if result.status.sync_state == "in_sync" else result.status.state
    foreign = result.foreign
    listed = f" ({', '.join(rev for rev, _ in result.applied)})" if ids and result.applied else ""
    if not foreign:
        if result.outcome == "noop":
            return f"in sync at {_heads_text(result.status)}"
        return f"applied {len(result.applied)} revision(s){listed}; {state}"
    others = (
        f"{len(foreign)} {'was' if len(foreign) == 1 else 'were'} applied by another writer "
        f"{'during' if result.outcome == 'applied' else 'before'} the run "
        f"(foreign_writer: {logs.ids_text(foreign, full=ids)}); an app upgrading itself at "
        "start-up? switch that off or take reconciler.hooks.migration_lock"
    )
    return f"{len(result.applied)} applied by the reconciler{listed}; {others}; {state}"


def _heads_text(status: Status) -> str:
    """The database heads; with several chains, each chain's, named."""

    def heads(one: Status) -> str:
        return ", ".join(sorted(one.decision.db_heads)) or "base"

    if not status.chains:
        return heads(status)
    return "; ".join(f"{heads(c)} ({c.chain_name})" for c in status.every_chain)
