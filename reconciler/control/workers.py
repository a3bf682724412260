"""The control plane's side of the worker: a running worker's requests, and its errors mapped.

Each request and reply is a `reconciler.protocol` message; the process and its pipes are
`control.workerprocess`'s, the pre-warmed spare `control.workerpool`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from reconciler import codec, protocol, sessions
from reconciler.control import prestart
from reconciler.control.workerprocess import Pipes, WorkerProcess, child_env, spawn_process
from reconciler.db import journal
from reconciler.errors import (
    EXIT_CONFIG,
    EXIT_REFUSED,
    EXIT_REVISION_FAILED,
    EXIT_STATE,
    EXIT_UNREACHABLE,
    ConfigError,
    ReconcilerError,
    Refused,
    RevisionFailed,
    StateError,
    UnreachableError,
    WorkerError,
)
from reconciler.project import differences
from reconciler.project.alembic_ini import alembic_ini_path
from reconciler.redact import redact, register_secret, register_url
from reconciler.settings import AppUrl, Settings

DEFAULT_TIMEOUT = 3600.0
_CLOSE_WAIT = 5.0
R = TypeVar("R")


@dataclass(frozen=True)
class StepResult:
    """An upgrade: seconds it took, the revisions Alembic really ran (empty: none), each step
    committed in order, and whether it was told to stop."""

    seconds: float
    revisions: tuple[str, ...]
    steps: tuple[protocol.StepDone, ...] = ()
    stopped: bool = False


@dataclass(frozen=True)
class Generated:
    """One autogenerate run: the revision file written (None: no differences, no file)."""

    path: str | None
    revision: str | None
    message: str
    operations: list[dict[str, str]]  # {kind, table, name, text}, one per upgrade operation
    destructive: list[str]  # what the upgrade would lose: dropped tables and columns, narrowed types
    renames: list[str]  # a drop and an add that may be a rename
    seconds: float = 0.0
    compared: list[str] | None = None  # the tables the compare was restricted to; None: all
    hook_failures: list[dict[str, str]] = field(default_factory=list)  # post-write hooks that exited non-zero


@dataclass(frozen=True)
class WorkerJob(protocol.Job):
    """Everything a worker needs for one target: the protocol's job, and `python` and `timeout`,
    which stay on this side."""

    python: str = ""
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        url: str | None = None,
        role: str = "apply",
        expected_identity: Mapping[str, str] | None = None,
    ) -> WorkerJob:
        """A job for the settings' target (`url` overrides the target's URL)."""
        t = settings.target
        the_url = url or t.url
        if not the_url:
            raise ConfigError("no database URL for the worker; give [target] url")
        return cls(
            url=the_url,
            migrations_dir=str(settings.migrations_dir),
            root=str(settings.root_dir),
            alembic_ini=str(ini) if (ini := alembic_ini_path(settings)) else None,
            models=t.models,
            app=t.app,
            migrate=t.migrate,
            imports=tuple(t.imports),
            x_args=dict(t.x_args),
            version_table=t.version_table,
            version_table_schema=t.version_table_schema,
            exclude_tables=journal.tables(settings.journal.table).names,
            app_name=sessions.application_name(t.name or "db", role),
            ddl_lock_timeout=settings.apply.ddl_lock_timeout,
            statement_timeout=settings.apply.statement_timeout,
            set_role=settings.apply.role,
            search_path=t.search_path,
            connect_timeout=settings.apply.connect_timeout,
            expected_identity=dict(expected_identity) if expected_identity else None,
            secrets=tuple(p for p in (_password(the_url), _password(t.lock_url)) if p),
            known_differences=str(known) if (known := differences.path_for(settings)).is_file() else "",
            log_level=settings.logging.level,
            python=t.python or sys.executable,
            timeout=t.worker_timeout or DEFAULT_TIMEOUT,
        )


def _password(url: str) -> str | None:
    if not url:
        return None
    from sqlalchemy.engine import make_url  # deferred: CLI start-up time (SQLAlchemy's import)

    try:
        password = make_url(url).password
    except Exception:  # config.py validated the URL; nothing more to find here
        return None
    return str(password) if password else None


def error_from_reply(error: Mapping[str, Any]) -> ReconcilerError:
    """The exception for a worker's error reply (its `error` object), by its exit code."""
    try:
        reply = codec.decode(protocol.ErrorReply, dict(error))
    except protocol.ProtocolError as exc:
        return WorkerError(redact(f"the worker sent an error reply this side cannot read: {exc}"))
    code = reply.exit_code or EXIT_REVISION_FAILED
    message = redact(reply.message or "the worker reported an error")
    if code == EXIT_REVISION_FAILED and reply.revision:
        return RevisionFailed(message, reply.revision, reply.error_class, reply.sqlstate or None)
    return _ERRORS.get(code, WorkerError)(message)


_ERRORS: dict[int, type[ReconcilerError]] = {
    EXIT_CONFIG: ConfigError,
    EXIT_UNREACHABLE: UnreachableError,
    EXIT_STATE: StateError,
    EXIT_REFUSED: Refused,
}


def _generated(reply: protocol.GenerateReply) -> Generated:
    """The revision file a generate, revision or merge reply names (path None: none written)."""
    return Generated(
        path=reply.path or None,
        revision=reply.revision or None,
        message=reply.message,
        operations=[dict(op) for op in reply.operations],
        destructive=list(reply.destructive),
        renames=list(reply.renames),
        seconds=reply.duration_ms / 1000.0,
        compared=list(reply.compared) if reply.compared is not None else None,
        hook_failures=[dict(f) for f in reply.hook_failures],
    )


class Worker:
    """A running worker process for one job; use as a context manager. Not thread-safe."""

    def __init__(
        self,
        process: WorkerProcess,
        on_log: Callable[[str], None] | None,
        timeout: float,
    ) -> None:
        self._process = process
        self._pipes = Pipes(process, on_log)
        self._timeout = timeout
        self._checks: dict[str, dict[str, Any]] = {}  # revision: the guard's per-operation check
        self._lock = threading.Lock()
        self.info: dict[str, Any] = {}
        self.job: WorkerJob | None = None
        self.after_close: list[Callable[[], None]] = []  # run once, when the worker has exited

    @classmethod
    def start(
        cls,
        job: WorkerJob,
        python: str | None = None,
        on_log: Callable[[str], None] | None = None,
        timeout: float | None = None,
        preload: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> Worker:
        """Start a worker in `python` (default: the job's, else ours) and send it the job.

        `preload`: the worker imports Flask and friends before the job arrives (a warm spare).
        `environ`: the worker's environment instead of ours (the one the settings came from).
        """
        interpreter = python or job.python or sys.executable
        env = child_env(interpreter, environ)
        early = prestart.take(interpreter, job.root, env)  # started before the CLI's imports
        process = early or spawn_process(interpreter, job.root, preload, env)
        return cls.adopt(process, job, on_log, timeout)

    @classmethod
    def adopt(
        cls,
        process: WorkerProcess,
        job: WorkerJob,
        on_log: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> Worker:
        """A worker for `process`, just started (spawned, or forked by `control.zygote`): send
        it the job; it is killed when the init fails."""
        for secret in job.secrets:
            register_secret(secret)
        register_url(job.url)
        worker = cls(process, on_log, timeout or job.timeout)
        worker.job = job
        try:
            worker.info = worker._request_raw(protocol.InitRequest(job=job))
            reply = protocol.parse_reply(protocol.InitReply, worker.info)
            protocol.check_version(protocol.PROTOCOL_VERSION, reply.protocol)
        except protocol.ProtocolError as exc:
            worker.kill()
            raise WorkerError(str(exc)) from None
        except BaseException:
            worker.kill()
            raise
        return worker

    @property
    def pid(self) -> int:
        return self._process.pid

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # requests

    def check_operations(self, checks: Mapping[str, Mapping[str, Any]]) -> None:
        """Upgrade these revisions with the guard's per-operation check (its input per revision)."""
        self._checks = {rev: dict(check) for rev, check in checks.items()}

    def probe(self) -> None:
        """Run env.py without applying or creating anything: a ConfigError when it connects to
        another database than the target or configures another version table."""
        self._request(protocol.ProbeRequest())

    def upgrade(
        self,
        revisions: str | Sequence[str],
        on_step: Callable[[protocol.StepEvent], bool] | None = None,
        on_non_transactional: Callable[[str, str], None] | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> StepResult:
        """Apply `revisions` in order in one run of env.py, one step (one transaction) each, as
        far as it goes: what ran, and how long.

        `on_step(event)` is called before each revision runs (`event.finished`: the previous
        one, committed); it returns False to stop there; `after_step()` once the answer is sent,
        while the worker goes on (work that must not hold it up). `on_non_transactional(revision,
        reason)` is called when a revision is about to leave its transaction
        (worker.process.section_reporter). The worker goes on only once they returned; when one
        raises, the worker (still inside the transaction) is killed and the error raised. A run
        may end early without being stopped (env.py's own transaction: one revision per run):
        `StepResult.steps` says how far it got."""
        plan = (revisions,) if isinstance(revisions, str) else tuple(revisions)
        request = protocol.UpgradeRequest(plan, {r: self._checks[r] for r in plan if r in self._checks})
        done: list[protocol.StepDone] = []

        def answer(event: Any) -> Any:
            if isinstance(event, protocol.NonTransactional):
                if on_non_transactional is not None:
                    on_non_transactional(event.revision, event.reason)
                return None
            if event.finished is not None:
                done.append(event.finished)
            go_on = on_step(event) if on_step is not None else True
            return None if go_on else protocol.StopRequest()

        def answered(event: Any) -> None:
            if after_step is not None and isinstance(event, protocol.StepEvent):
                after_step()

        reply = self._request(request, on_event=answer, after_event=answered)
        if reply.last is not None:
            done.append(reply.last)
        ran = tuple(step.revision for step in done if step.ran)
        return StepResult(reply.duration_ms / 1000.0, ran, tuple(done), reply.stopped)

    def downgrade(self, revision: str) -> float:
        reply = self._request(protocol.DowngradeRequest(revision))
        return float(reply.duration_ms) / 1000.0

    def stairway(self, before: list[str], revisions: list[str]) -> protocol.StairwayReply:
        reply: protocol.StairwayReply = self._request(protocol.StairwayRequest(revisions, before))
        return reply

    def stamp(self, revision: str | list[str], purge: bool = False) -> None:
        revisions = (revision,) if isinstance(revision, str) else tuple(revision)
        self._request(protocol.StampRequest(revisions, purge))

    def sql(self, start: str | None, end: str) -> str:
        """Offline SQL of the upgrade start:end through env.py."""
        return str(self._request(protocol.SqlRequest(end=end, start=start)).sql)

    def record(self, revisions: Sequence[str]) -> list[dict[str, Any]]:
        """Each revision's upgrade operations, recorded without running them (safety.classify's
        input): [{revision, path, ops, error}]."""
        reply = self._request(protocol.RecordRequest(tuple(revisions)))
        return [dict(entry) for entry in reply.revisions]

    def compare(self) -> list[dict[str, str]]:
        """Differences between the models and the database: [{kind, key, text}] sorted by key."""
        reply = self._request(protocol.CompareRequest())
        return [{str(k): str(v) for k, v in d.items()} for d in reply.differences]

    def bind(
        self,
        expected_identity: dict[str, str] | None,
        exclude_tables: Sequence[str],
        on_log: Callable[[str], None] | None,
        timeout: float,
    ) -> bool:
        """Give a worker started for the headers the apply's identity and journal tables (and
        log sink and timeout); False when it cannot take them (it connected already)."""
        reply = self._request(protocol.BindRequest(expected_identity, tuple(exclude_tables)))
        if not reply.bound:
            return False
        if self.job is not None:
            self.job = dataclasses.replace(
                self.job, expected_identity=expected_identity, exclude_tables=list(exclude_tables)
            )
        self._pipes.on_log, self._timeout = on_log, timeout or self._timeout
        return True

    def headers(self, paths: list[Path]) -> list[dict[str, Any]]:
        """Revision identifiers of files whose headers are not literal (executes them)."""
        reply = self._request(protocol.HeadersRequest(tuple(str(p) for p in paths)))
        return [dict(entry) for entry in reply.headers]

    def generate(
        self,
        message: str | None = None,
        draft: bool = False,
        rev_id: str | None = None,
        head: str = "head",
        tables: list[str] | None = None,
        known: list[str] | differences.Known | None = None,
        files: list[str] | None = None,
        classes: dict[str, list[str]] | None = None,
        rescan: bool = False,
    ) -> Generated:
        """Autogenerate a revision file from the models, as `flask db migrate` does.

        No differences (after leaving out `known`) means no file. `message` None: derived from
        the operations. `draft`: the file gets `draft = True`. `rev_id`: the id to use (it must
        not exist yet: remove an old draft's file first). `tables`: reflect only these and their
        foreign-key neighbours (tables only in the models are always compared); None: all.
        `files`: changed model files (relative to our working directory or absolute); the worker
        maps them to the tables their models define and adds those to `tables`, and compares the
        database tables no model defines too (a model deleted from a file is dropped). When a
        file defines no table (a deleted model's file, a helper module, not a models module), or
        `files` is empty, every table is compared. `Generated.compared` names the tables the
        compare was restricted to (the requested ones, their foreign-key neighbours, orphans
        found), None for a full compare. `classes`: for some of `files`, the only classes of
        it that changed: that file adds just their tables (a changed class that maps no table,
        such as a type decorator, means every table is compared).
        `known`: known differences to leave out (bare keys match whatever their values); None:
        those of the job's known-differences file for the job's dialect, [] for none.
        `rescan`: read the versions directory again first (a file this worker already saw was
        moved or removed meanwhile). The database must be at the repository's heads (else
        StateError).
        """
        if known is None:
            known = self._known_keys()
        if isinstance(known, differences.Known):
            wanted = frozenset(protocol.KnownDifference(k, d) for k, d in known.entries)
        else:
            wanted = frozenset(protocol.KnownDifference(str(k)) for k in known)
        request = protocol.GenerateRequest(
            message=message,
            draft=draft,
            rev_id=rev_id,
            head=head,
            tables=frozenset(tables) if tables is not None else None,
            files=frozenset(os.path.abspath(f) for f in files) if files is not None else None,
            classes={os.path.abspath(f): frozenset(names) for f, names in (classes or {}).items()},
            known=wanted,
            rescan=rescan,
        )
        return _generated(self._request(request))

    def revision(
        self, message: str | None = None, head: str = "head", rev_id: str | None = None
    ) -> Generated:
        """An empty revision from the migrations directory's template (`flask db revision`)."""
        return _generated(self._request(protocol.RevisionRequest(message, head, rev_id)))

    def merge(
        self, revisions: Sequence[str] = ("heads",), message: str | None = None, rev_id: str | None = None
    ) -> Generated:
        """A merge revision of `revisions` (`flask db merge`; `heads`: every head)."""
        return _generated(self._request(protocol.MergeRequest(tuple(revisions), message, rev_id)))

    def _known_keys(self) -> differences.Known:
        if self.job is None or not self.job.known_differences:
            return differences.Known()
        return differences.load(Path(self.job.known_differences), differences.dialect_of(self.job.url))

    def app_url(self) -> AppUrl | None:
        """The Flask app's database URL as the app resolves it; None when there is no app."""
        found = self._request(protocol.AppUrlRequest()).app_url
        if not found or not found.get("url"):
            return None
        url = str(found["url"])
        register_url(url)
        return AppUrl(url, str(found.get("where") or "the Flask app"))

    def init_dir(self, template: str | None = None) -> dict[str, Any]:
        """Create the migrations directory (default: Flask-Migrate's template for a Flask-SQLAlchemy
        db, else Alembic's generic one); the reply names the template and the alembic.ini."""
        return self._request_raw(protocol.InitDirRequest(template))

    def close(self) -> None:
        """Send exit, wait briefly, kill if needed."""
        if self._process.poll() is None:
            with contextlib.suppress(ReconcilerError, OSError, queue.Empty):
                self._pipes.send(protocol.request_line(protocol.ExitRequest()))
                self._pipes.wait_reply(_CLOSE_WAIT)
            with contextlib.suppress(OSError):
                self._pipes.close_stdin()
            try:
                self._process.wait(timeout=_CLOSE_WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._finish()

    def kill(self) -> None:
        """Kill the worker now (SIGKILL)."""
        with contextlib.suppress(OSError):
            self._process.kill()
        self._process.wait()
        self._finish()

    # plumbing

    def _finish(self) -> None:
        self._pipes.finish()
        callbacks, self.after_close = self.after_close, []
        for callback in callbacks:
            callback()

    def _request(
        self,
        request: Any,
        on_event: Callable[[Any], Any] | None = None,
        after_event: Callable[[Any], None] | None = None,
    ) -> Any:
        """Send `request`; its reply, as the request's reply class."""
        raw = self._request_raw(request, on_event, after_event)
        try:
            return protocol.parse_reply(type(request).reply, raw)
        except protocol.ProtocolError as exc:
            raise WorkerError(f"the worker's reply to {type(request).op} is not understood: {exc}") from None

    def _request_raw(
        self,
        request: Any,
        on_event: Callable[[Any], Any] | None = None,
        after_event: Callable[[Any], None] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            reply = self._pipes.exchange(request, self._timeout, on_event, self.kill, after_event)
            if reply.get("ok"):
                return reply
            raise error_from_reply(reply.get("error") or {})


def start_headers_worker(settings: Settings) -> Worker:
    """A worker that reads the headers of revision files that must be executed (`Project`'s
    `start_worker`)."""
    return Worker.start(WorkerJob.from_settings(settings), python=settings.target.python or None)
