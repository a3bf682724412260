"""The steps of `reconciler test` on one scratch database, and the report they fill: a worker's
stairway reply taken in, the models at head compared (the orchestration: `stairway.py`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from reconciler.control.starting import start_worker
from reconciler.control.target import open_target, release_target
from reconciler.control.workers import Worker
from reconciler.core import stairway as rules
from reconciler.db import connection
from reconciler.project import differences
from reconciler.protocol import StairwayReply
from reconciler.redact import redact
from reconciler.settings import Settings


@dataclass(frozen=True)
class Failure:
    revision: str  # "" for a check of the whole history (heads, models)
    step: str
    error: str = ""
    difference: tuple[str, ...] = ()

    @property
    def line(self) -> str:
        return rules.failure_line(self.revision or "history", self.step, self.error, self.difference)


@dataclass
class TestReport:
    stepped: list[str]  # the revisions to step, in order
    checked: list[str] = field(default_factory=list)  # those whose three steps passed
    failures: list[Failure] = field(default_factory=list)
    before: list[str] = field(default_factory=list)  # applied plainly first (--since)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures


def step_one(scratch: Settings, report: TestReport) -> None:
    with stairway_worker(scratch) as worker:
        took = add_reply(report, worker.stairway(report.before, report.stepped))
        report.seconds = took
        if not report.failures:
            report.failures.extend(models_at_head(scratch, worker))


@contextmanager
def stairway_worker(scratch: Settings) -> Iterator[Worker]:
    """A worker on the scratch database of `scratch`; every connection of ours closed after."""
    handle = open_target(scratch)
    try:
        with connection.connect(handle.engine) as conn, start_worker(handle, conn) as worker:
            yield worker
    finally:
        release_target(handle)


def add_reply(report: TestReport, reply: StairwayReply) -> float:
    """A stairway reply's revisions and failures into `report`; its seconds."""
    report.checked.extend(reply.checked)
    for f in reply.failures:
        report.failures.append(Failure(f.revision, f.step, redact(f.error), tuple(f.difference)))
    return reply.duration_ms / 1000.0


def models_at_head(scratch: Settings, worker: Worker) -> list[Failure]:
    """The history's last checks on a database at head: the models against its schema."""
    found = list(worker.compare())
    return _model_failures(differences.unknown(found, differences.load_for(scratch)))


def _model_failures(found: Iterable[Mapping[str, str]]) -> list[Failure]:
    """The models at head against the schema: a table only in the database is a model module
    no import reached (autogenerate would drop it); anything else, a revision nobody wrote."""
    found = list(found)
    dropped = [d for d in found if d.get("kind") == "remove_table"]
    rest = [d for d in found if d.get("kind") != "remove_table"]
    out = []
    if dropped:
        tables = ", ".join(sorted(d.get("key", "").partition(" ")[2] or "?" for d in dropped))
        out.append(
            Failure(
                "",
                "model modules imported",
                f"no imported model declares table(s) {tables}: "
                "autogenerate would drop them; import their module where [target] models is "
                "defined (or in env.py)",
            )
        )
    if rest:
        out.append(Failure("", "models match the schema", "", tuple(d["text"] for d in rest)))
    return out
