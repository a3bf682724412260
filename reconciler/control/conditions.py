"""The journal's side of a target's state: dirty steps, fleet flags, checksums, drift.

`read_conditions` is what a status read asks the journal, beside the version table; it is cached
in the handle's `TargetCache` so that the in-sync tick can reuse it for up to CONDITIONS_TTL
seconds (one query per tick). The messages say what to do about each condition.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import sqlalchemy as sa

from reconciler.control.locking import lock_holder
from reconciler.control.target import TargetHandle, journal_seen
from reconciler.core import checksums, failures
from reconciler.core import drift as drift_rules
from reconciler.core.graph import RevisionGraph
from reconciler.core.status import CONDITION_ORDER, Conditions, still_blocked
from reconciler.db import flags, hashes, journal


def read_conditions(
    handle: TargetHandle,
    conn: sa.engine.Connection,
    graph: RevisionGraph,
    inputs: tuple[frozenset[str], str],
    ancestry: dict[str, tuple[str, ...]],
) -> Conditions:
    if not journal_seen(handle, conn):  # everything applied so far is seen for the first time
        audit = checksums.audit(graph, inputs[0], {}, ancestry)
        return Conditions(read_at=time.monotonic(), audit=audit, inputs=inputs)
    names: list[str] = []
    messages: dict[str, str] = {}
    applied = frozenset(graph.closure(h for h in inputs[0] if h in graph.revisions))
    dirty, reasons, settle = _dirty(handle, conn, applied)
    if dirty:
        names.append("dirty")
        messages["dirty"] = _dirty_message(dirty, reasons, applied)
    keys = [
        flags.suspended_key(handle.target_name),
        flags.blocked_key(handle.journal_target),
        flags.checksums_key(handle.journal_target),
        drift_rules.flag_key(handle.target_name),
    ]
    found = flags.read(conn, handle.journal, keys)
    held = hashes.recorded_hashes(conn, handle.journal, handle.journal_target)
    audit = checksums.audit(graph, inputs[0], held, ancestry)
    if audit.mismatches and "checksums" not in handle.settings.unsafe:
        names.append("checksum_mismatch")
        messages["checksum_mismatch"] = _mismatch_message(audit.mismatches)
    blocked = failures.Failure.loads(found.get(keys[1]))
    if blocked and still_blocked(blocked, graph):
        names.append("blocked")
        messages["blocked"] = _blocked_message(blocked)
    else:
        blocked = None
    if keys[0] in found:
        names.append("suspended")
        messages["suspended"] = _suspended_message(found[keys[0]])
    report = _drift_report(handle, found.get(keys[3]))
    if report and report.drifted:
        names.append("drift")
        messages["drift"] = report.message()
    names.sort(key=CONDITION_ORDER.index)
    return Conditions(
        tuple(names),
        dirty,
        blocked,
        messages,
        time.monotonic(),
        report,
        audit,
        keys[2] in found,
        inputs,
        settle,
    )


def forget_conditions(handle: TargetHandle) -> None:
    """The journal's flags changed: the next status of every chain reads them again."""
    for chain in handle.every_chain:
        chain.cache.conditions = None


def _drift_report(handle: TargetHandle, value: str | None) -> drift_rules.DriftReport | None:
    if handle.settings.drift.interval <= 0 or handle.chain:
        return None  # one compare for the database, reported with [target]'s chain
    report = drift_rules.DriftReport.loads(value)
    return report.filtered(handle.settings.drift.ignore) if report else None


def _dirty(
    handle: TargetHandle, conn: sa.engine.Connection, applied: frozenset[str]
) -> tuple[tuple[str, ...], dict[str, str], tuple[str, ...]]:
    """(dirty revisions, why each left its transaction, interrupted revisions that are not
    dirty and can be settled under the lock): the journal's steps judged with the version
    table (`applied`), as `settle_interrupted` will judge them."""
    # one query for both kinds: this runs on every conditions read
    steps = journal.rows_with_outcome(conn, handle.journal, ("dirty", "started"), handle.row_target)
    rows = [r for r in steps if r["outcome"] == "dirty"]
    open_rows = [r for r in steps if r["outcome"] == "started"]
    if open_rows and lock_holder(handle, conn) is not None:
        open_rows = []  # somebody is applying it now
    reasons = journal.marks(conn, handle.journal, [r["id"] for r in (*rows, *open_rows)])
    unsafe = "dirty" in handle.settings.unsafe
    settle: list[str] = []
    for row in open_rows:
        if journal.judge(row, applied, row["id"] in reasons, handle.backend, unsafe) == "dirty":
            rows.append(row)
        else:
            settle.append(str(row["revision"]))
    why = {str(r["revision"]): reasons.get(r["id"], "") for r in rows}
    return tuple(dict.fromkeys(str(r["revision"]) for r in rows)), why, tuple(settle)


def _blocked_message(blocked: failures.Failure) -> str:
    return (
        f"revision {blocked.revision} failed {blocked.count} times the same way "
        f"({blocked.error_class or 'error'}{' ' + blocked.sqlstate if blocked.sqlstate else ''}): "
        f"{blocked.message} — it is retried when its file changes, or after `reconciler resume`"
    )


def _suspended_message(value: str) -> str:
    return f"applying is suspended ({value}); `reconciler resume` lets replicas apply again"


def _mismatch_message(found: tuple[checksums.Mismatch, ...]) -> str:
    return (
        f"applied revision file(s) changed or vanished since they were applied: "
        f"{'; '.join(m.describe() for m in found)}. Applying stops: restore the file(s), or review "
        f"the change and run `reconciler accept {found[0].revision}` (or `--all`)"
    )


def _dirty_message(revisions: tuple[str, ...], reasons: Mapping[str, str], applied: frozenset[str]) -> str:
    """What to check and which `resolve` flag, for each dirty revision."""
    return " ".join(_dirty_one(rev, reasons.get(rev, ""), rev in applied) for rev in revisions)


def _dirty_one(rev: str, reason: str, listed: bool) -> str:
    why = reason or "this database commits DDL as it goes"
    if listed:
        return (
            f"revision {rev} started and did not complete ({why}), yet the version table lists "
            f"{rev}: someone finished or stamped it. Check that everything it does is in the "
            f"schema, then run `reconciler resolve {rev} --applied`."
        )
    return (
        f"revision {rev} started and did not complete after it left its transaction ({why}); "
        f"the version table does not list {rev}, so part of it may have run and it is not run "
        "again. Inspect the schema against the revision: if you finish the rest by hand, run "
        f"`reconciler resolve {rev} --applied`; if you undo what ran, run "
        f"`reconciler resolve {rev} --rolled-back` (the next apply runs it again)."
    )
