"""The worker wire protocol: every message between the control plane and the worker, and one codec.

Standard library only: the worker imports this module in the project's interpreter, which may be
Python 3.9, and the annotations are evaluated at run time by `typing.get_type_hints` (so unions
are written `Optional[...]`, never `X | None`).

The wire is JSON lines. A request is `{"op": <its op>, **its fields}`; its reply is
`{"ok": true, **the reply's fields}` or `{"ok": false, "error": {ErrorReply's fields}}`; before an
upgrade's reply the worker sends events (`{"event": "step", ...}` before each revision it runs,
`{"event": "non_transactional", ...}` before one leaves its transaction), each answered by a
`proceed` request (or, for a step, `stop`). `reconciler.codec` maps each message to and from that
JSON over its declared fields. `init` carries `PROTOCOL_VERSION` both ways: both ends
refuse another one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, TypeVar

from reconciler.codec import ProtocolError as ProtocolError
from reconciler.codec import decode, encode

PROTOCOL_VERSION = 4  # 2: one upgrade request per plan, with step events; 3: a job's search_path; 4: stairway
DEFAULT_VERSION_TABLE = "alembic_version"
JOURNAL_TABLES = ("reconciler_journal", "reconciler_journal_flags")

T = TypeVar("T")


def check_version(control: Any, worker: Any) -> None:
    """Refuse two ends that speak different protocol versions, naming both."""
    if control != worker:
        raise ProtocolError(
            f"the control plane speaks worker protocol version {control} but the worker speaks "
            f"version {worker}: run the worker from the same reconciler release as the control "
            "plane (check [target] python and its PYTHONPATH)"
        )


# --- the job -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one target (the `init` request's `job`)."""

    url: str = field(repr=False)
    migrations_dir: str
    root: str
    alembic_ini: Optional[str] = None  # noqa: UP045 (evaluated at run time on Python 3.9)
    models: str = ""
    app: str = ""
    migrate: str = ""
    imports: Sequence[str] = ()
    x_args: Mapping[str, str] = field(default_factory=dict)
    version_table: str = DEFAULT_VERSION_TABLE
    version_table_schema: str = ""
    exclude_tables: Sequence[str] = JOURNAL_TABLES
    app_name: str = ""
    ddl_lock_timeout: float = 0.0
    statement_timeout: float = 0.0
    set_role: str = ""
    search_path: str = ""  # PostgreSQL: the tenant's schema, set on every connection (see sessions)
    connect_timeout: float = 0.0
    expected_identity: Optional[Mapping[str, str]] = None  # noqa: UP045
    secrets: Sequence[str] = field(default=(), repr=False)
    known_differences: str = ""
    log_level: str = "info"


# --- replies -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorReply:
    """The `error` object of a failed reply; `exit_code` says which exception the control plane raises."""

    error_class: str = field(default="", metadata={"wire": "class"})
    message: str = ""
    sqlstate: Optional[str] = None  # noqa: UP045
    exit_code: int = 1
    revision: Optional[str] = None  # noqa: UP045


@dataclass(frozen=True)
class EmptyReply:
    """A reply that says only that the request succeeded."""


@dataclass(frozen=True)
class InitReply:
    pid: int
    python: str
    versions: Mapping[str, str]
    flask_env: bool
    protocol: int = 0  # 0: a worker from before the protocol had a version


@dataclass(frozen=True)
class StepReply:  # an upgrade's or a downgrade's: how long it took, the revisions Alembic ran
    duration_ms: int = 0
    revisions: Sequence[str] = ()


@dataclass(frozen=True)
class StepDone:
    """One revision of an upgrade plan, committed: `ran` False when Alembic found it applied."""

    revision: str
    ran: bool = True
    duration_ms: int = 0


@dataclass(frozen=True)
class UpgradeReply:
    """An upgrade plan's end: its last step (None: none ran), and whether the control plane
    stopped it. The steps before the last were reported by `StepEvent`s."""

    last: Optional[StepDone] = None  # noqa: UP045
    stopped: bool = False
    duration_ms: int = 0


@dataclass(frozen=True)
class SqlReply:
    sql: str = ""


@dataclass(frozen=True)
class RecordReply:  # each revision's recorded upgrade operations: {revision, path, ops, error}
    revisions: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class CompareReply:  # the differences between models and database: {kind, key, text} by key
    differences: Sequence[Mapping[str, str]] = ()


@dataclass(frozen=True)
class HeadersReply:
    headers: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class BindReply:
    bound: bool = False


@dataclass(frozen=True)
class AppUrlReply:
    """The Flask app's database URL ({url, where}) with its password; None: no Flask app."""

    app_url: Optional[Mapping[str, str]] = None  # noqa: UP045


@dataclass(frozen=True)
class InitDirReply:
    template: str = ""
    alembic_ini: str = ""


@dataclass(frozen=True)
class GenerateReply:
    """A revision file written by generate, revision or merge (path None: nothing to write)."""

    path: Optional[str] = None  # noqa: UP045
    revision: Optional[str] = None  # noqa: UP045
    message: str = ""
    operations: Sequence[Mapping[str, str]] = ()  # {kind, table, name, text}, one per operation
    destructive: Sequence[str] = ()
    renames: Sequence[str] = ()
    compared: Optional[Sequence[str]] = None  # noqa: UP045 (the table scope; None: every table)
    hook_failures: Sequence[Mapping[str, str]] = ()
    duration_ms: int = 0


# --- events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NonTransactional:
    """Sent before an upgrade's reply: `revision` is about to leave its transaction."""

    name: ClassVar[str] = "non_transactional"
    revision: str = ""
    reason: str = ""


@dataclass(frozen=True)
class StepEvent:
    """Sent between two revisions of an upgrade plan: `finished` committed, `begins` is the next
    one (the first was journaled before the request). Answered `proceed` (run it) or `stop`."""

    name: ClassVar[str] = "step"
    begins: str = ""
    finished: Optional[StepDone] = None  # noqa: UP045


EVENTS: dict[str, type] = {NonTransactional.name: NonTransactional, StepEvent.name: StepEvent}


# --- requests ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InitRequest:
    """The first request: the job, and the protocol version the control plane speaks."""

    op: ClassVar[str] = "init"
    reply: ClassVar[type] = InitReply
    job: Job
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class ProbeRequest:
    op: ClassVar[str] = "probe"  # run env.py without applying or creating anything
    reply: ClassVar[type] = EmptyReply


@dataclass(frozen=True)
class UpgradeRequest:
    """Apply `revisions` in order in one run of env.py, one step and one transaction each;
    `checks`: the guard's per-operation check of some of them."""

    op: ClassVar[str] = "upgrade"
    reply: ClassVar[type] = UpgradeReply
    revisions: Sequence[str]
    checks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class DowngradeRequest:
    op: ClassVar[str] = "downgrade"
    reply: ClassVar[type] = StepReply
    revision: str


@dataclass(frozen=True)
class StampRequest:
    op: ClassVar[str] = "stamp"
    reply: ClassVar[type] = EmptyReply
    revisions: Sequence[str]
    purge: bool = False


@dataclass(frozen=True)
class SqlRequest:
    op: ClassVar[str] = "sql"  # offline SQL of the upgrade start:end through env.py
    reply: ClassVar[type] = SqlReply
    end: str
    start: Optional[str] = None  # noqa: UP045


@dataclass(frozen=True)
class RecordRequest:
    op: ClassVar[str] = "record"  # the revisions' upgrade operations, recorded (nothing runs)
    reply: ClassVar[type] = RecordReply
    revisions: Sequence[str] = ()


@dataclass(frozen=True)
class CompareRequest:
    op: ClassVar[str] = "compare"
    reply: ClassVar[type] = CompareReply


@dataclass(frozen=True)
class HeadersRequest:
    op: ClassVar[str] = "headers"  # the identifiers of revision files whose headers are not literal
    reply: ClassVar[type] = HeadersReply
    paths: Sequence[str] = ()


@dataclass(frozen=True)
class BindRequest:
    """Take on the control plane's database identity and journal tables (before any connection)."""

    op: ClassVar[str] = "bind"
    reply: ClassVar[type] = BindReply
    expected_identity: Optional[Mapping[str, str]] = None  # noqa: UP045
    exclude_tables: Sequence[str] = ()


@dataclass(frozen=True)
class InitDirRequest:
    """Create the migrations directory from a template (None: by the kind of models)."""

    op: ClassVar[str] = "init_dir"
    reply: ClassVar[type] = InitDirReply
    template: Optional[str] = None  # noqa: UP045


@dataclass(frozen=True)
class AppUrlRequest:
    op: ClassVar[str] = "app_url"
    reply: ClassVar[type] = AppUrlReply


@dataclass(frozen=True)
class KnownDifference:
    """A known difference to leave out of a generate: `detail` None matches the key alone."""

    key: str
    detail: Optional[str] = None  # noqa: UP045


@dataclass(frozen=True)
class GenerateRequest:
    """What `generate` is asked for.

    `message` None: derived from the operations. `rev_id` None: a new id. `tables` None: compare
    every table; else only these (bare or schema-qualified names) and their foreign-key
    neighbours are reflected, and tables the database does not have yet are always compared.
    `files`: changed model files (absolute, or relative to the project root); the tables they
    define, with `tables`, become the restriction, and database tables no model defines are
    compared too (so a model deleted from a file is dropped); when a file defines no table, every
    table is compared. `classes`: for some of `files`, the only classes of it that changed.
    `known`: known differences to leave out. `rescan`: read the versions directory again first.
    """

    op: ClassVar[str] = "generate"
    reply: ClassVar[type] = GenerateReply
    message: Optional[str] = None  # noqa: UP045
    draft: bool = False
    rev_id: Optional[str] = None  # noqa: UP045
    head: str = "head"
    tables: Optional[frozenset[str]] = None  # noqa: UP045
    files: Optional[frozenset[str]] = None  # noqa: UP045
    classes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    known: frozenset[KnownDifference] = frozenset()
    rescan: bool = False


@dataclass(frozen=True)
class RevisionRequest:
    """An empty revision from the template (`flask db revision`)."""

    op: ClassVar[str] = "revision"
    reply: ClassVar[type] = GenerateReply
    message: Optional[str] = None  # noqa: UP045
    head: str = "head"
    rev_id: Optional[str] = None  # noqa: UP045


@dataclass(frozen=True)
class MergeRequest:
    """A merge revision of `revisions` (`flask db merge`; `heads`: every head)."""

    op: ClassVar[str] = "merge"
    reply: ClassVar[type] = GenerateReply
    revisions: Sequence[str] = ("heads",)
    message: Optional[str] = None  # noqa: UP045
    rev_id: Optional[str] = None  # noqa: UP045


@dataclass(frozen=True)
class ProceedRequest:
    """The answer to an event: the step is journaled, go on."""

    op: ClassVar[str] = "proceed"
    reply: ClassVar[type] = EmptyReply


@dataclass(frozen=True)
class StopRequest:
    """The answer to a StepEvent: run no more revisions (a stop was asked for); end the plan."""

    op: ClassVar[str] = "stop"
    reply: ClassVar[type] = EmptyReply


@dataclass(frozen=True)
class ExitRequest:
    op: ClassVar[str] = "exit"
    reply: ClassVar[type] = EmptyReply


@dataclass(frozen=True)
class StairwayFailure:
    """One failing step of `reconciler test`: the revision, the step (upgrade, downgrade,
    upgrade again), and the error or the schema fingerprint's difference."""

    revision: str
    step: str
    error: str = ""
    difference: Sequence[str] = ()


@dataclass(frozen=True)
class StairwayReply:
    checked: Sequence[str] = ()  # the revisions whose three steps all passed, in order
    failures: Sequence[StairwayFailure] = ()
    duration_ms: int = 0


@dataclass(frozen=True)
class StairwayRequest:
    """Upgrade through `before` plainly, then step each of `revisions` (in order, each applicable
    after the previous): upgrade, fingerprint, downgrade (the fingerprint must equal the one
    before the upgrade), upgrade again (it must equal the first upgrade's); one run of env.py."""

    op: ClassVar[str] = "stairway"
    reply: ClassVar[type] = StairwayReply
    revisions: Sequence[str]
    before: Sequence[str] = ()


# every request class above, by its op
REQUESTS: dict[str, type] = {
    getattr(c, "op"): c  # noqa: B009 (a ClassVar that mypy cannot see on a bare `type`)
    for c in list(globals().values())
    if isinstance(c, type) and hasattr(c, "reply")
}


# --- lines -------------------------------------------------------------------------------------


def request_line(request: Any) -> str:
    """A request as its JSON line (without the newline)."""
    return json.dumps({"op": type(request).op, **encode(request)})


def parse_request(data: Mapping[str, Any]) -> Any:
    """The request a decoded line holds; the `init` request's protocol version is checked first."""
    cls = _class_of(data, "op", REQUESTS, "request")
    if cls is InitRequest:
        check_version(data.get("protocol"), PROTOCOL_VERSION)
    return decode(cls, {k: v for k, v in data.items() if k != "op"})


def ok_reply(reply: Any) -> dict[str, Any]:
    """A successful reply's object."""
    return {"ok": True, **encode(reply)}


def error_reply(error: ErrorReply) -> dict[str, Any]:
    return {"ok": False, "error": encode(error)}


def event_line(event: Any) -> str:
    return json.dumps({"event": type(event).name, **encode(event)})


def parse_event(data: Mapping[str, Any]) -> Any:
    """The event (a NonTransactional or a StepEvent) a decoded line holds."""
    cls = _class_of(data, "event", EVENTS, "event")
    return decode(cls, {k: v for k, v in data.items() if k != "event"})


def _class_of(data: Mapping[str, Any], key: str, classes: Mapping[str, type], kind: str) -> type:
    """The message class `data[key]` names, else ProtocolError ("unknown worker <kind>")."""
    name = data.get(key)
    cls = classes.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown worker {kind} {name!r}")
    return cls


def parse_reply(cls: type[T], data: Mapping[str, Any]) -> T:
    """A successful reply's fields as `cls` (the request's `reply`)."""
    return decode(cls, {k: v for k, v in data.items() if k != "ok"})
