"""`reconciler test`'s steps in one run of env.py: for each revision, upgrade, downgrade, upgrade
again, with the schema's fingerprint taken after each on env.py's own connection.

The steps are a generator handed to Alembic as env.py's `fn` (as `upgrading.UpgradePlan` does):
Alembic runs one, commits it (one transaction per step), and asks for the next, so the
fingerprint between two steps sees what the last one committed. A revision's own `RevisionStep`
(up or down) is yielded, never a walk to a destination: on a branched history a downgrade to the
parent would also undo the other branch. The first failing step ends the run: after it, the
database is in no state the next revision was written for.

On PostgreSQL the steps' commits are not flushed to disk one by one (`synchronous_commit` off for
the session, said in the first step's transaction): the database is a scratch one, dropped
after the run, and a commit that waits for the disk costs more than most steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from alembic.runtime.migration import RevisionStep

from reconciler.core.stairway import difference
from reconciler.protocol import StairwayFailure, StairwayReply
from reconciler.redact import redact
from reconciler.worker.fingerprint import Fingerprints
from reconciler.worker.upgrading import defer_flushes


class Stairway:
    """The steps of one `reconciler test` run, for `Migrations._run`."""

    def __init__(self, script: Any, before: Sequence[str], revisions: Sequence[str]) -> None:
        self.script = script
        self.before = list(before)
        self.revisions = list(revisions)
        self.running: tuple[str, str] | None = None  # (revision, step) in progress
        self.checked: list[str] = []
        self.failures: list[StairwayFailure] = []
        self._started = time.monotonic()
        self._deferred = False

    def steps(self, _heads: Any, context: Any) -> Iterator[Any]:
        return self._generate(context)

    def _step(self, context: Any, rev: str, up: bool) -> Any:
        """Alembic's step of `rev`; before the first, the session stops waiting for flushes."""
        step = RevisionStep(self.script.revision_map, self.script.get_revision(rev), up)
        if not self._deferred:
            self._deferred = defer_flushes(context, False, last=False)
        return step

    def _generate(self, context: Any) -> Iterator[Any]:
        schema = Fingerprints(context.connection, context.version_table)
        for rev in self.before:
            self.running = (rev, "upgrade")
            yield self._step(context, rev, True)
        below = schema.take()
        for rev in self.revisions:
            self.running = (rev, "upgrade")
            yield self._step(context, rev, True)
            upgraded = schema.take()
            self.running = (rev, "downgrade")
            yield self._step(context, rev, False)
            if self._differs(rev, "downgrade", below, schema.take()):
                return
            self.running = (rev, "upgrade again")
            yield self._step(context, rev, True)
            again = schema.take()
            if self._differs(rev, "upgrade again", upgraded, again):
                return
            self.checked.append(rev)
            below = again
        self.running = None

    def _differs(self, rev: str, step: str, expected: frozenset[str], found: frozenset[str]) -> bool:
        diff = difference(expected, found)
        if diff:
            self.failures.append(StairwayFailure(rev, step, "", tuple(diff)))
        return bool(diff)

    def failed(self, exc: BaseException) -> None:
        """A step raised: it is the run's failure (None running: env.py's own error, raised on)."""
        assert self.running is not None
        rev, step = self.running
        lines = str(exc).strip().splitlines()
        error = redact(f"{type(exc).__name__}: {lines[0] if lines else ''}")
        self.failures.append(StairwayFailure(rev, step, error))

    def reply(self) -> StairwayReply:
        ms = int((time.monotonic() - self._started) * 1000)
        return StairwayReply(tuple(self.checked), tuple(self.failures), ms)
