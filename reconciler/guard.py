"""The destructive-change guard: record the pending revisions in the worker, classify, decide.

The worker records each pending revision's operations (nothing runs on the database);
`safety.classify` turns them into findings; on PostgreSQL squawk, when installed, supplies the
lock findings. `enforce` logs every finding and raises `Refused` (exit 6, event
`destructive_refused`) when the `[safety]` policy stops the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reconciler import logs, safety, squawk
from reconciler.config import Settings
from reconciler.errors import Refused
from reconciler.graph import RevisionGraph

if TYPE_CHECKING:
    from reconciler.workerclient import Worker

log = logs.get("reconciler.guard")
_noted: set[str] = set()
_EVENTS = {safety.LOCK_RISK: "lock_risk", safety.UNANALYSABLE: "revision_unanalysable",
           safety.FAILS: "revision_raises"}


@dataclass(frozen=True)
class Analysis:
    findings: tuple[safety.Finding, ...]
    linter: str  # squawk | built-in: where the PostgreSQL lock findings came from

    def of_kind(self, kind: str) -> list[safety.Finding]:
        return [f for f in self.findings if f.kind == kind]


def policy(settings: Settings) -> safety.Policy:
    s = settings.safety
    return safety.Policy(s.allow_destructive, s.strict_locking, s.on_unanalysable)


def analyse(worker: Worker, graph: RevisionGraph, pending: Sequence[str], backend: str,
            settings: Settings) -> Analysis:
    """The findings of the pending plan, in plan order."""
    if not pending:
        return Analysis((), "built-in")
    recorded = worker.record(pending)
    revisions = graph.revisions
    acknowledged = {rev for rev in pending if rev in revisions and revisions[rev].allow_destructive}
    external, linter = _external(recorded, backend, settings)
    return Analysis(tuple(safety.classify(recorded, backend, acknowledged, external)), linter)


def _external(recorded: Sequence[Mapping[str, Any]], backend: str, settings: Settings
              ) -> tuple[safety.External | None, str]:
    if backend != "postgresql" or settings.safety.squawk == "off":
        return None, "built-in"
    binary = squawk.find()
    if binary is None:
        _note_once("squawk_not_installed", "PostgreSQL lock risk is judged by the built-in rules; "
                   "pip install schema-reconciler[squawk] for squawk's, or set [safety] squawk = \"off\"")
        return None, "built-in"
    statements = [((str(r["revision"]), index), str(op.get("sql") or ""))
                  for r in recorded for index, op in enumerate(r.get("ops") or ())
                  if op.get("op") != "CreateTableOp"]
    try:
        found = squawk.lint(binary, statements)
    except squawk.SquawkFailed as exc:
        log.warning("squawk_failed", error=str(exc), fallback="built-in rules")
        return None, "built-in"
    return {key: value for key, value in found.items() if isinstance(key, tuple)}, "squawk"


def _note_once(event: str, hint: str) -> None:
    if event not in _noted:
        _noted.add(event)
        log.info(event, hint=hint)


def enforce(analysis: Analysis, settings: Settings, target: str) -> None:
    """Log every finding; raise Refused when the policy stops the plan."""
    refusals = safety.refused(analysis.findings, policy(settings))
    for finding in analysis.findings:
        if finding not in refusals:
            event = _EVENTS.get(finding.kind, "destructive_allowed")
            log.warning(event, target=target, revision=finding.revision, where=finding.where,
                        kind=finding.kind, rule=finding.rule, finding=finding.message)
    if not refusals:
        return
    log.error("destructive_refused", target=target,
              revisions=sorted({f.revision for f in refusals}),
              findings=[f.text() for f in refusals])
    raise Refused(safety.refusal_message(target, refusals))


def data_loss_pending(analysis: Analysis, settings: Settings) -> list[safety.Finding]:
    """Unacknowledged data-loss findings (the `destructive_pending` condition)."""
    if settings.safety.allow_destructive:
        return []
    return [f for f in analysis.of_kind(safety.DATA_LOSS) if not f.acknowledged]
