"""The typed state of a prod run says what its /status document says, and every error names an outcome."""

from __future__ import annotations

import pytest

from reconciler import errors
from reconciler.core.failures import Failure
from reconciler.core.state import Decision
from reconciler.core.status import Progress, Status
from reconciler.runtime.metrics import OUTCOMES
from reconciler.runtime.runs import RunRecord, RunResult, observation
from reconciler.runtime.statusdoc import UNREADABLE, RunState


def _errors() -> list[type[errors.ReconcilerError]]:
    found, todo = [], [errors.ReconcilerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _status(
    sync_state: str,
    pending: tuple[str, ...] = (),
    conditions: tuple[str, ...] = (),
    blocked: Failure | None = None,
) -> Status:
    decision = Decision(
        sync_state=sync_state,
        pending=pending,
        repo_heads=("c",),
        db_heads=(),
        unknown=(),
        fork=(),
        branch_point=None,
        message="m",
    )
    return Status(target="t", url="sqlite://", decision=decision, conditions=conditions, blocked=blocked)


def _same(state: RunState) -> None:
    doc = state.as_dict()
    assert doc["state"] == state.state
    assert doc["sync_state"] == state.sync_state
    assert tuple(doc.get("conditions", ())) == tuple(state.conditions)
    assert tuple(doc.get("pending", ())) == state.pending


@pytest.mark.parametrize("cls", _errors(), ids=lambda c: c.__name__)
def test_every_error_class_carries_an_outcome_the_metrics_know(cls: type[errors.ReconcilerError]) -> None:
    assert cls.outcome in OUTCOMES


def test_the_outcome_of_an_error_is_the_daemons_of_before() -> None:
    assert errors.LockTimeout.outcome == "lock_busy"
    assert errors.UnreachableError.outcome == "unreachable"
    assert errors.RevisionFailed.outcome == "failed"
    assert errors.RetryDeferred.outcome == "deferred"
    assert errors.Blocked.outcome == "blocked"
    assert errors.Suspended.outcome == "suspended"
    assert errors.StateError.outcome == errors.ConfigError.outcome == errors.Refused.outcome == "refused"


def test_a_read_state_is_what_its_document_says() -> None:
    _same(RunState.read(_status("behind", ("a", "b"))))


def test_a_first_apply_in_progress_is_behind_and_counts_its_pending_down() -> None:
    plan = _status("uninitialized_empty", ("a", "b", "c"))
    progress = Progress("b", "two", n=2, total=3, started_at=0.0, run_started_at=0.0, plan=plan)
    state = RunState.in_progress(plan, progress)
    assert (state.sync_state, state.state, state.pending) == ("behind", "behind", ("b", "c"))
    _same(state)
    assert state.as_dict()["applying"]["n"] == 2


def test_a_blind_run_is_unknown_or_names_the_unreadable_file() -> None:
    _same(RunState.blind("down", None))
    unreadable = RunState.blind("bad file", {"path": "v/x.py", "line": 3, "file_hash": "h"})
    assert (unreadable.state, unreadable.conditions) == (UNREADABLE, (UNREADABLE,))
    _same(unreadable)


def test_the_alert_observation_takes_the_blocked_record_from_the_status() -> None:
    blocked = Failure(revision="b", file_hash="f", error_class="E", sqlstate="", count=3)
    status = _status("behind", ("b",), conditions=("blocked",), blocked=blocked)
    result = RunResult("blocked", status, failed_revision="x", failure_signature="s")
    seen = observation(result, result.state, RunRecord())
    assert (seen.state, seen.failed_revision) == ("blocked", "b")
    assert seen.blocked == f"b:{blocked.signature}"
    assert seen.heads == ("c",)
