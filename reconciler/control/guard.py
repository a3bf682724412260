"""The destructive-change guard: record the pending revisions in the worker, classify, decide.

The worker records each pending revision's operations (reads answered by the database, nothing
written); `safety.classify` turns them into findings; on PostgreSQL squawk, when installed,
supplies the lock findings. `enforce` logs every finding and raises `Refused` (exit 6, event
`destructive_refused`) when the `[safety]` policy stops the plan. On an empty database nothing
is refused (nothing can be lost). A revision the recording could not follow is, where DDL is
transactional (PostgreSQL, SQLite), not refused up front: `enforce` returns it to be checked
operation by operation while it really runs (`LiveCheck`; the worker refuses there and the
revision's transaction rolls back). Where DDL commits implicitly (MySQL, MariaDB) it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reconciler import logs
from reconciler.control import squawk
from reconciler.control.target import TargetHandle
from reconciler.core import safety
from reconciler.core.graph import RevisionGraph
from reconciler.errors import Refused
from reconciler.settings import Settings

if TYPE_CHECKING:
    from reconciler.control.workers import Worker

log = logs.get("reconciler.guard")
_noted: set[str] = set()
_EVENTS = {
    safety.LOCK_RISK: "lock_risk",
    safety.UNANALYSABLE: "revision_unanalysable",
    safety.FAILS: "revision_raises",
}
TRANSACTIONAL_DDL = frozenset({"postgresql", "sqlite"})  # a revision is one transaction there


@dataclass(frozen=True)
class Analysis:
    findings: tuple[safety.Finding, ...]
    linter: str  # squawk | built-in: where the PostgreSQL lock findings came from
    backend: str = ""
    created: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per revision: tables
    # the plan's recorded operations create before it

    def of_kind(self, kind: str) -> list[safety.Finding]:
        return [f for f in self.findings if f.kind == kind]


@dataclass(frozen=True)
class LiveCheck:
    """What the worker needs to check one revision's operations as they run."""

    created: tuple[str, ...]  # tables created earlier in the plan (their drops lose nothing)

    def payload(self) -> dict[str, Any]:
        return {"created": list(self.created)}


@dataclass(frozen=True)
class Verdict:
    """What `enforce` decided: the findings refused up front, and the revisions left to the
    per-operation check."""

    refused: tuple[safety.Finding, ...]
    live: Mapping[str, LiveCheck]


def policy(settings: Settings) -> safety.Policy:
    s = settings.safety
    return safety.Policy(s.allow_destructive, s.strict_locking, s.on_unanalysable)


def analyse(
    worker: Worker,
    graph: RevisionGraph,
    pending: Sequence[str],
    backend: str,
    settings: Settings,
    empty: bool = False,
) -> Analysis:
    """The findings of the pending plan, in plan order. `empty`: the database has no tables."""
    if not pending:
        return Analysis((), "built-in", backend)
    recorded = worker.record(pending)
    revisions = graph.revisions
    acknowledged = {rev for rev in pending if rev in revisions and revisions[rev].allow_destructive}
    external, linter = _external(recorded, backend, settings)
    findings = tuple(safety.classify(recorded, backend, acknowledged, external, empty))
    unfollowed = {f.revision for f in findings if f.kind == safety.UNANALYSABLE}
    created = {rev: tuple(safety.created_by(recorded, rev)) for rev in unfollowed}
    return Analysis(findings, linter, backend, created)


def verdict(analysis: Analysis, settings: Settings) -> Verdict:
    """The findings that refuse the plan up front, and the revisions checked as they run."""
    refusals = safety.refused(analysis.findings, policy(settings))
    live: dict[str, LiveCheck] = {}
    if analysis.backend in TRANSACTIONAL_DDL:
        live = {
            f.revision: LiveCheck(tuple(analysis.created.get(f.revision, ())))
            for f in refusals
            if f.kind == safety.UNANALYSABLE
        }
    up_front = tuple(f for f in refusals if not (f.kind == safety.UNANALYSABLE and f.revision in live))
    return Verdict(up_front, live)


def _external(
    recorded: Sequence[Mapping[str, Any]], backend: str, settings: Settings
) -> tuple[safety.External | None, str]:
    if backend != "postgresql" or settings.safety.squawk == "off":
        return None, "built-in"
    binary = squawk.find()
    if binary is None:
        _note_once(
            "squawk_not_installed",
            "PostgreSQL lock risk is judged by the built-in rules; "
            'pip install schema-reconciler[squawk] for squawk\'s, or set [safety] squawk = "off"',
        )
        return None, "built-in"
    statements = [
        ((str(r["revision"]), index), str(op.get("sql") or ""))
        for r in recorded
        for index, op in enumerate(r.get("ops") or ())
        if op.get("op") != "CreateTableOp"
    ]
    try:
        found = squawk.lint(binary, statements)
    except squawk.SquawkFailed as exc:
        log.warning("squawk_failed", error=str(exc), fallback="built-in rules")
        return None, "built-in"
    return {key: value for key, value in found.items() if isinstance(key, tuple)}, "squawk"


def _note_once(event: str, hint: str) -> None:
    """A hint about the set-up, once per process and at debug (-v): it is not about this
    database, and every analysis of a one-shot command would repeat it otherwise."""
    if event not in _noted:
        _noted.add(event)
        log.debug(event, hint=hint)


def enforce(analysis: Analysis, settings: Settings, target: str) -> Verdict:
    """Log every finding; raise Refused when the policy stops the plan up front. The verdict's
    `live` revisions are to be upgraded with the per-operation check."""
    decided = verdict(analysis, settings)
    refusals = safety.refused(analysis.findings, policy(settings))
    exempt = [f for f in analysis.findings if f.exempt]
    if exempt:
        log.info("guard_exempt", target=target, findings=len(exempt), reason=safety.EMPTY_DATABASE)
    for finding in analysis.findings:
        if finding not in refusals and not finding.exempt:
            event = _EVENTS.get(finding.kind, "destructive_allowed")
            log.warning(
                event,
                target=target,
                revision=finding.revision,
                where=finding.where,
                kind=finding.kind,
                rule=finding.rule,
                finding=finding.message,
            )
    for rev in decided.live:
        log.info(
            "revision_checked_per_operation",
            target=target,
            revision=rev,
            detail="its upgrade() could not be recorded ahead; each operation is checked as "
            "it runs, and a refused one rolls the revision back",
        )
    if not decided.refused:
        return decided
    log.error(
        "destructive_refused",
        target=target,
        revisions=sorted({f.revision for f in decided.refused}),
        findings=[f.text() for f in decided.refused],
    )
    raise Refused(safety.refusal_message(target, decided.refused))


def pending_refusals(analysis: Analysis, settings: Settings) -> list[safety.Finding]:
    """What would refuse the plan up front (the `destructive_pending` condition)."""
    return list(verdict(analysis, settings).refused)


def summary(analysis: Analysis, settings: Settings) -> dict[str, Any]:
    """What `status` shows of the guard: what would refuse `apply` and why, the revisions
    checked operation by operation, and the other findings."""
    decided = verdict(analysis, settings)
    return {
        "would_refuse": bool(decided.refused),
        "refused": [f.as_dict() for f in decided.refused],
        "checked_per_operation": sorted(decided.live),
        "findings": [f.as_dict() for f in analysis.findings],
    }


def check_pending(
    handle: TargetHandle, worker: Worker, graph: RevisionGraph, pending: tuple[str, ...], empty: bool = False
) -> Analysis:
    """Analyse the pending revisions (`empty`: from an empty database); remember what would
    refuse them (the `destructive_pending` condition) in the handle's cache."""
    settings = handle.settings
    analysis = analyse(worker, graph, pending, handle.backend, settings, empty)
    loss = pending_refusals(analysis, settings)
    key = (graph.fingerprint, pending)
    handle.cache.guard_info = (key, summary(analysis, settings))
    if loss:
        handle.cache.refusal = (key, safety.refusal_message(handle.target_name, loss))
    elif handle.cache.refusal and handle.cache.refusal[0] == key:
        handle.cache.refusal = None
    return analysis


def remember_refusal(
    handle: TargetHandle, graph: RevisionGraph, pending: tuple[str, ...], message: str
) -> None:
    """A revision was refused as it ran: say so until these revision files change."""
    handle.cache.refusal = ((graph.fingerprint, pending), message)


def guard_for(handle: TargetHandle, graph: RevisionGraph, pending: tuple[str, ...]) -> dict[str, Any] | None:
    """The guard's last analysis, while the same revision files are pending."""
    if handle.cache.guard_info is None or not pending:
        return None
    key, info = handle.cache.guard_info
    return info if key == (graph.fingerprint, pending) else None


def refusal_for(handle: TargetHandle, graph: RevisionGraph, pending: tuple[str, ...]) -> str | None:
    """The guard's last refusal, while the same revision files are pending."""
    if handle.cache.refusal is None or not pending:
        return None
    key, message = handle.cache.refusal
    return message if key == (graph.fingerprint, pending) else None
