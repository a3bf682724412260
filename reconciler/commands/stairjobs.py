"""`reconciler test --jobs N` on PostgreSQL: the stepped revisions cut into N ranges, each stepped
at once on its own scratch database, made from a template snapshot of the history before it.

Range 1 starts on an empty database while a builder database is upgraded plainly (no fingerprints,
no downgrades) to the start of range 2, copied (`CREATE DATABASE ... TEMPLATE`, nobody connected
to it), upgraded on to the start of range 3, copied, and so on; the builder itself becomes the
last range's database. A plain upgrade costs a fraction of a stepped one, so the ranges overlap
nearly whole. Each range stops at its own first failure; the others go on. The models are
compared at head on the last range's database, when every range passed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa

from reconciler import logs
from reconciler.commands import authoring
from reconciler.commands.stairsteps import Failure, TestReport, add_reply, models_at_head, stairway_worker
from reconciler.db import connection
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.settings import Settings

log = logs.get("reconciler.test")


def ranges(revisions: list[str], jobs: int) -> list[list[str]]:
    """`revisions` in at most `jobs` contiguous ranges of near-equal length, in order."""
    count = max(1, min(jobs, len(revisions)))
    size, extra = divmod(len(revisions), count)
    out, start = [], 0
    for n in range(count):
        end = start + size + (1 if n < extra else 0)
        out.append(revisions[start:end])
        start = end
    return out


def run_ranges(settings: Settings, report: TestReport, jobs: int) -> None:
    if sa.engine.make_url(settings.target.url).get_backend_name() != "postgresql":
        raise ConfigError(
            f"--jobs {jobs}: parallel ranges start from template databases, which only PostgreSQL "
            "has; run with --jobs 1 on this database"
        )
    parts = ranges(report.stepped, jobs)
    token = uuid.uuid4().hex[:8]
    names = [f"reconciler_test_{token}_{n}" for n in range(len(parts))]
    admin = connection.make_engine(settings.target.url, settings.target.name, 10.0)
    made: list[str] = []
    started = time.monotonic()
    try:
        for part in _run(settings, admin, report, parts, names, made):
            report.checked.extend(part.checked)
            report.failures.extend(part.failures)
        if not report.failures:  # the last range's database is at head
            with stairway_worker(authoring.scratch_copy(settings, names[-1])) as worker:
                report.failures.extend(models_at_head(settings, worker))
    finally:
        for name in made:
            authoring.drop_database(admin, name)
        admin.dispose()
    report.seconds = time.monotonic() - started
    log.info("test_ranges", ranges=[len(p) for p in parts], seconds=round(report.seconds, 3))


def _run(
    settings: Settings,
    admin: sa.engine.Engine,
    report: TestReport,
    parts: list[list[str]],
    names: list[str],
    made: list[str],
) -> list[TestReport]:
    results = [TestReport(stepped=part) for part in parts]
    threads: list[threading.Thread] = []

    def start(n: int, before: list[str]) -> None:
        scratch = authoring.scratch_copy(settings, names[n])
        thread = threading.Thread(target=_guarded(results[n], lambda: _step(scratch, results[n], before)))
        thread.start()
        threads.append(thread)

    for name in (names[0], names[-1]):
        if name not in made:
            authoring.create_database(admin, name)
            made.append(name)
    start(0, list(report.before))
    builder = authoring.scratch_copy(settings, names[-1])
    plain = list(report.before)
    try:
        for n in range(1, len(parts)):
            plain += parts[n - 1]
            if not _upgrade_plainly(builder, plain):
                break
            plain = []
            if n < len(parts) - 1:  # the snapshot of the history before range n
                authoring.create_database(admin, names[n], template=names[-1])
                made.append(names[n])
            start(n, [])
    finally:  # the ranges started finish before their databases are dropped
        for thread in threads:
            thread.join()
    return results


def _upgrade_plainly(builder: Settings, revisions: list[str]) -> bool:
    """The builder database upgraded through `revisions` (no checks); False when one of them
    fails: the later ranges are not reached (the range that steps it reports the failure)."""
    if not revisions:
        return True
    with stairway_worker(builder) as worker:
        reply = worker.stairway(revisions, [])
    return not reply.failures


def _step(scratch: Settings, result: TestReport, before: list[str]) -> None:
    with stairway_worker(scratch) as worker:
        add_reply(result, worker.stairway(before, result.stepped))


def _guarded(result: TestReport, body: Callable[[], None]) -> Callable[[], None]:
    """A range's thread: an error of ours is that range's failure, not a lost thread."""

    def run() -> None:
        try:
            body()
        except ReconcilerError as exc:
            first = result.stepped[0] if result.stepped else ""
            result.failures.append(Failure(first, "range", str(exc)))

    return run
