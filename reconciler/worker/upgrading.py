"""An upgrade plan in one run of env.py: one step and one transaction per revision, each announced
to the control plane before it runs.

Alembic runs the steps `fn` gives it one by one, each in its own transaction when
`transaction_per_migration` is on (the configure wrapper turns it on while a plan runs, see
`PER_MIGRATION`) or the dialect has no transactional DDL. The steps here are a generator: before
each revision but the first (journaled before the request was sent) it asks the control plane
(which journals the step as `started`, or says stop), then reads the database's heads and only
then hands Alembic the step; when Alembic asks for the next one, the previous one is committed,
and the next question says so; the reply reports the last one. A run of env.py whose steps do not
commit one by one (env.py began its own transaction around `run_migrations`) runs one revision
only, and the control plane asks again for the rest: a step is never called committed before it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from reconciler.errors import StateError
from reconciler.protocol import StepDone
from reconciler.worker.opcheck import checking_operations
from reconciler.worker.sections import SECTIONS

# [True] while a plan's run of env.py configures its context (the configure wrapper reads it)
PER_MIGRATION: list[bool] = []

# (the revision about to run, the previous one once committed) -> go on (False: stop)
StepAsk = Callable[[str, Optional[StepDone]], bool]  # a runtime alias: Optional for Python 3.9


@contextmanager
def per_migration() -> Iterator[None]:
    """While a plan runs: `context.configure` gets `transaction_per_migration=True`."""
    PER_MIGRATION[:] = [True]
    try:
        yield
    finally:
        PER_MIGRATION.clear()


@dataclass
class PlanOutcome:
    """What a plan did: its last committed step, unless a step event reported it (`stopped`)."""

    last: StepDone | None = None
    stopped: bool = False


def defer_flushes(context: Any, deferring: bool, last: bool) -> bool:
    """PostgreSQL: the steps' commits are not flushed one by one; the last one flushes them all.

    Said in the transaction the next step runs in (it begins here, Alembic's step goes on in
    it): `SET synchronous_commit TO off` for the session, committed with the first step, and
    `RESET` in the last step's, so that its commit flushes the log, every earlier commit of the
    plan included (a plan stopped or failed half-way is flushed by the control plane's commit
    after it, see `db.journal.flushed_by_the_worker`, which says why this is safe). Whether the
    session defers now."""
    if getattr(context.dialect, "name", "") != "postgresql" or deferring == (not last):
        return deferring
    context.execute("RESET synchronous_commit" if last else "SET synchronous_commit TO off")
    return not last


def commits_per_step(context: Any) -> bool:
    """Whether Alembic commits each step on its own in this migration context."""
    if getattr(context, "_in_external_transaction", False):
        return False  # env.py's own transaction: everything commits when env.py ends
    if getattr(context.impl, "transactional_ddl", False):
        return bool(getattr(context, "_transaction_per_migration", False))
    return True  # no transactional DDL: Alembic begins and commits one transaction per step


class UpgradePlan:
    """The steps of one plan, for `Migrations._run`; `running` names the revision in progress."""

    def __init__(
        self,
        script: Any,
        revisions: Sequence[str],
        checks: Mapping[str, Mapping[str, Any]],
        ask: StepAsk,
    ) -> None:
        self.script = script
        self.revisions = list(revisions)
        self.checks = checks
        self.ask = ask
        self.outcome = PlanOutcome()
        self.running: str | None = None
        self._steps: Iterator[Any] | None = None
        self._planned: dict[str, Any] | None = None  # Alembic's steps for the plan, worked out once

    def steps(self, _heads: Any, context: Any) -> Iterator[Any]:
        """The `fn` of env.py's run: the plan's steps, one at a time."""
        self._steps = self._generate(context)
        return self._steps

    def close(self) -> None:
        """End the generator now (a failed step leaves it suspended inside the step)."""
        if self._steps is not None:
            self._steps.close()  # type: ignore[attr-defined]
        SECTIONS.end()

    def _generate(self, context: Any) -> Iterator[Any]:
        one_by_one = commits_per_step(context)
        deferring = False
        finished: StepDone | None = None
        for n, rev in enumerate(self.revisions):
            # the first was journaled before the request: here env.py's connection may hold the
            # version table it just created (on SQLite, a write lock on the file)
            if n and not self.ask(rev, finished):
                self.outcome.stopped = True  # `finished` went with the question
                return
            began = time.monotonic()
            with ExitStack() as stack:
                self._check(rev, stack)  # first: a step holds the module's upgrade() it was made with
                steps = self._one_step(rev, context)  # (a revision file failing to load is no step's)
                if steps and one_by_one:
                    deferring = defer_flushes(context, deferring, last=n == len(self.revisions) - 1)
                self.running = rev
                SECTIONS.begin(rev)
                if steps:
                    yield steps[0]  # Alembic runs it; it has committed when we are resumed
            SECTIONS.end()
            self.running = None
            finished = StepDone(rev, bool(steps), round((time.monotonic() - began) * 1000))
            if not one_by_one:
                break  # committed when env.py ends: the reply reports it, the rest comes next
        self.outcome.last = finished

    def _one_step(self, rev: str, context: Any) -> list[Any]:
        """Alembic's steps from the database's heads now to `rev`: one, or none (applied). The
        plan's steps are worked out once (Alembic walks the whole history for each): one is
        used as planned while the database's heads are the ones it starts from, and never for
        a revision checked per operation (a step holds the upgrade() it was made with)."""
        heads = context.get_current_heads()
        if self._planned is None:
            self._planned = self._plan_steps(heads)
        planned = self._planned.get(rev)
        origin = getattr(planned, "from_revisions_no_deps", None)
        starts_here = planned is not None and set(heads) == set(origin or ())
        if starts_here and rev not in self.checks:
            return [planned]
        steps = list(self.script._upgrade_revs(rev, heads))
        if len(steps) > 1:
            ids = [str(getattr(getattr(s, "revision", None), "revision", "?")) for s in steps]
            raise StateError(
                f"upgrade to {rev} would apply {len(steps)} revisions ({', '.join(ids)}) from the "
                f"database heads {', '.join(heads) or 'base'}; the reconciler applies one revision "
                "per step: upgrade to the next one first"
            )
        return steps

    def _plan_steps(self, heads: Any) -> dict[str, Any]:
        """Alembic's steps from `heads` to the plan's last revision, by revision."""
        if not self.revisions:
            return {}
        try:
            steps = self.script._upgrade_revs(self.revisions[-1], heads)
        except Exception:  # e.g. a revision of another branch: each step is worked out alone
            return {}
        return {str(getattr(getattr(s, "revision", None), "revision", "")): s for s in steps}

    def _check(self, rev: str, stack: ExitStack) -> None:
        check = self.checks.get(rev)
        if check is not None:
            script = self.script.get_revision(rev)
            stack.enter_context(checking_operations(script.module, str(script.path), rev, check))
