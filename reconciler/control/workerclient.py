"""The control plane's side of the worker: start it, send requests, map its errors.

The worker (`python -m reconciler.worker`) runs in the project's interpreter with the project root
as its working directory; only our `reconciler` package is put on its path (through a private
folder holding a link to it), never the rest of our environment. The database URL travels over
stdin, never argv or the environment, so it does not show in `ps`.

The worker dies with its parent. On Linux that is the kernel's parent-death signal, which fires
when the *thread* that started the worker exits: start workers from a thread that outlives them.
`WarmWorker` keeps one spare worker started and initialised (dev mode: each generation gets a
fresh interpreter without paying for the imports), starting the next when the last one taken is
closed; its own long-lived thread starts them all.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import reconciler
from reconciler import sessions
from reconciler.config.load import process_environment
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
_STDERR_KEPT = 40
_shim_lock = threading.Lock()
_shim_dir: list[str] = []


@dataclass(frozen=True)
class StepResult:
    """One upgrade step: seconds it took and the revisions Alembic really ran (empty: none)."""

    seconds: float
    revisions: tuple[str, ...]


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
class WorkerJob:
    """Everything a worker needs for one target. `python` and `timeout` stay on this side."""

    url: str = field(repr=False)
    migrations_dir: str
    root: str
    alembic_ini: str | None = None
    models: str = ""
    app: str = ""
    migrate: str = ""
    imports: Sequence[str] = ()
    x_args: Mapping[str, str] = field(default_factory=dict)
    version_table: str = "alembic_version"
    version_table_schema: str = ""
    exclude_tables: Sequence[str] = ("reconciler_journal", "reconciler_journal_flags")
    app_name: str = ""
    ddl_lock_timeout: float = 0.0
    statement_timeout: float = 0.0
    set_role: str = ""
    connect_timeout: float = 0.0
    expected_identity: Mapping[str, str] | None = None
    secrets: Sequence[str] = field(default=(), repr=False)
    known_differences: str = ""
    log_level: str = "info"
    python: str = ""
    timeout: float = DEFAULT_TIMEOUT

    def payload(self) -> dict[str, Any]:
        """The `job` object of the init request."""
        return {
            "url": self.url,
            "migrations_dir": self.migrations_dir,
            "root": self.root,
            "alembic_ini": self.alembic_ini,
            "models": self.models,
            "app": self.app,
            "migrate": self.migrate,
            "imports": list(self.imports),
            "x_args": dict(self.x_args),
            "version_table": self.version_table,
            "version_table_schema": self.version_table_schema,
            "exclude_tables": list(self.exclude_tables),
            "app_name": self.app_name,
            "ddl_lock_timeout": self.ddl_lock_timeout,
            "statement_timeout": self.statement_timeout,
            "set_role": self.set_role,
            "connect_timeout": self.connect_timeout,
            "expected_identity": dict(self.expected_identity) if self.expected_identity else None,
            "secrets": list(self.secrets),
            "known_differences": self.known_differences,
            "log_level": self.log_level,
        }

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
            alembic_ini=_alembic_ini(settings),
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
            connect_timeout=settings.apply.connect_timeout,
            expected_identity=dict(expected_identity) if expected_identity else None,
            secrets=tuple(p for p in (_password(the_url), _password(t.lock_url)) if p),
            known_differences=_known_differences(settings),
            log_level=settings.logging.level,
            python=t.python or sys.executable,
            timeout=t.worker_timeout or DEFAULT_TIMEOUT,
        )


def _password(url: str) -> str | None:
    if not url:
        return None
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # config.py validated the URL; nothing more to find here
        return None
    return str(password) if password else None


def _alembic_ini(settings: Settings) -> str | None:
    path = alembic_ini_path(settings)
    return str(path) if path else None


def _known_differences(settings: Settings) -> str:
    path = differences.path_for(settings)
    return str(path) if path.is_file() else ""


def _package_path() -> str:
    """A private folder whose only entry is our `reconciler` package (for PYTHONPATH)."""
    with _shim_lock:
        if _shim_dir and Path(_shim_dir[0]).is_dir():
            return _shim_dir[0]
        folder = tempfile.mkdtemp(prefix="reconciler-worker-")
        package = Path(reconciler.__file__).resolve().parent
        try:
            os.symlink(package, Path(folder) / "reconciler", target_is_directory=True)
        except OSError:  # no symlinks (Windows without privilege): copy the sources
            shutil.copytree(
                package, Path(folder) / "reconciler", ignore=shutil.ignore_patterns("__pycache__")
            )
        atexit.register(shutil.rmtree, folder, True)
        _shim_dir[:] = [folder]
        return folder


def _child_env(interpreter: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment (or `environ`, the one the settings were resolved in) minus RECONCILER_*
    (the URL may be there), our package on PYTHONPATH, and the interpreter's directory first on
    PATH, as an activated virtualenv has it: alembic.ini's post-write hooks (`ruff`, `black`) and
    env.py's subprocesses find the project's tools."""
    base = process_environment() if environ is None else environ
    env = {k: v for k, v in base.items() if not k.startswith("RECONCILER_")}
    located = interpreter if os.sep in interpreter else shutil.which(interpreter)
    if located:  # not resolved: a virtualenv's python is a link to the base interpreter
        bin_dir = os.path.dirname(os.path.abspath(located))
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
        env["PATH"] = os.pathsep.join([bin_dir, *path])
    existing = env.get("PYTHONPATH")
    shim = _package_path()
    env["PYTHONPATH"] = os.pathsep.join([shim, existing]) if existing else shim
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def error_from_reply(error: Mapping[str, Any]) -> ReconcilerError:
    """The exception for a worker's error reply, by its exit code."""
    code = int(error.get("exit_code") or EXIT_REVISION_FAILED)
    message = redact(str(error.get("message") or "the worker reported an error"))
    revision = error.get("revision")
    if code == EXIT_CONFIG:
        return ConfigError(message)
    if code == EXIT_UNREACHABLE:
        return UnreachableError(message)
    if code == EXIT_STATE:
        return StateError(message)
    if code == EXIT_REFUSED:
        return Refused(message)
    if code == EXIT_REVISION_FAILED and revision:
        sqlstate = error.get("sqlstate")
        return RevisionFailed(
            message, str(revision), str(error.get("class") or ""), str(sqlstate) if sqlstate else None
        )
    return WorkerError(message)


def _written(reply: Mapping[str, Any]) -> Generated:
    """A reply naming a written revision file (no operations: nothing was compared)."""
    path, revision = reply.get("path"), reply.get("revision")
    return Generated(
        path=str(path) if path else None,
        revision=str(revision) if revision else None,
        message=str(reply.get("message") or ""),
        operations=[],
        destructive=[],
        renames=[],
        hook_failures=[{str(k): str(v) for k, v in f.items()} for f in reply.get("hook_failures") or ()],
    )


class Worker:
    """A running worker process for one job; use as a context manager. Not thread-safe."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        on_log: Callable[[str], None] | None,
        timeout: float,
    ) -> None:
        self._process = process
        self._on_log = on_log
        self._timeout = timeout
        self._checks: dict[str, dict[str, Any]] = {}  # revision: the guard's per-operation check
        self._replies: queue.Queue[bytes | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_KEPT)
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True, name="worker-stdout"),
            threading.Thread(target=self._read_stderr, daemon=True, name="worker-stderr"),
        ]
        for thread in self._threads:
            thread.start()
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
        for secret in job.secrets:
            register_secret(secret)
        register_url(job.url)
        interpreter = python or job.python or sys.executable
        command = [interpreter, "-m", "reconciler.worker", "--parent", str(os.getpid())]
        if preload:
            command.append("--preload")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=job.root,
                env=_child_env(interpreter, environ),
                close_fds=True,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot start the worker with interpreter {interpreter} in {job.root}: "
                f"{exc.strerror or exc}; check [target] python and [target] root"
            ) from None
        worker = cls(process, on_log, timeout or job.timeout)
        worker.job = job
        try:
            worker.info = worker._request("init", job=job.payload())
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
        self._request("probe")

    def upgrade(
        self, revision: str, on_non_transactional: Callable[[str, str], None] | None = None
    ) -> StepResult:
        """Apply one revision (one step from the database's heads): what ran, and how long.

        `on_non_transactional(revision, reason)` is called when the revision is about to leave
        its transaction (worker.section_reporter); the worker goes on only once it returned. When
        it raises, the worker (still inside the transaction) is killed and the error raised."""
        check = self._checks.get(revision)
        fields: dict[str, Any] = {"check": check} if check is not None else {}
        reply = self._request("upgrade", on_event=on_non_transactional, revision=revision, **fields)
        ran = tuple(str(r) for r in reply.get("revisions") or ())
        return StepResult(float(reply.get("duration_ms", 0)) / 1000.0, ran)

    def downgrade(self, revision: str) -> float:
        reply = self._request("downgrade", revision=revision)
        return float(reply.get("duration_ms", 0)) / 1000.0

    def stamp(self, revision: str | list[str], purge: bool = False) -> None:
        self._request("stamp", revision=revision, purge=purge)

    def sql(self, start: str | None, end: str) -> str:
        """Offline SQL of the upgrade start:end through env.py."""
        return str(self._request("sql", start=start, end=end).get("sql", ""))

    def record(self, revisions: Sequence[str]) -> list[dict[str, Any]]:
        """Each revision's upgrade operations, recorded without running them (safety.classify's
        input): [{revision, path, ops, error}]."""
        reply = self._request("record", revisions=list(revisions))
        return list(reply.get("revisions") or [])

    def compare(self) -> list[dict[str, str]]:
        """Differences between the models and the database: [{kind, key, text}] sorted by key."""
        differences = self._request("compare").get("differences") or []
        return [{str(k): str(v) for k, v in d.items()} for d in differences]

    def bind(
        self,
        expected_identity: dict[str, str] | None,
        exclude_tables: Sequence[str],
        on_log: Callable[[str], None] | None,
        timeout: float,
    ) -> bool:
        """Give a worker started for the headers the apply's identity and journal tables (and
        log sink and timeout); False when it cannot take them (it connected already)."""
        reply = self._request(
            "bind", expected_identity=expected_identity, exclude_tables=list(exclude_tables)
        )
        if not reply.get("bound"):
            return False
        if self.job is not None:
            self.job = dataclasses.replace(
                self.job, expected_identity=expected_identity, exclude_tables=list(exclude_tables)
            )
        self._on_log, self._timeout = on_log, timeout or self._timeout
        return True

    def headers(self, paths: list[Path]) -> list[dict[str, Any]]:
        """Revision identifiers of files whose headers are not literal (executes them)."""
        reply = self._request("headers", paths=[str(p) for p in paths])
        return list(reply.get("headers") or [])

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
        wire = known.wire() if isinstance(known, differences.Known) else list(known)
        reply = self._request(
            "generate",
            message=message,
            draft=draft,
            rev_id=rev_id,
            head=head,
            tables=list(tables) if tables is not None else None,
            known=wire,
            files=[os.path.abspath(f) for f in files] if files is not None else None,
            classes={os.path.abspath(f): sorted(names) for f, names in (classes or {}).items()},
            rescan=rescan,
        )
        compared = reply.get("compared")
        path, revision = reply.get("path"), reply.get("revision")
        return Generated(
            path=str(path) if path else None,
            revision=str(revision) if revision else None,
            message=str(reply.get("message") or ""),
            operations=[{str(k): str(v) for k, v in op.items()} for op in reply.get("operations") or ()],
            destructive=[str(line) for line in reply.get("destructive") or ()],
            renames=[str(line) for line in reply.get("renames") or ()],
            seconds=float(reply.get("duration_ms", 0)) / 1000.0,
            compared=[str(t) for t in compared] if compared is not None else None,
            hook_failures=[{str(k): str(v) for k, v in f.items()} for f in reply.get("hook_failures") or ()],
        )

    def revision(
        self, message: str | None = None, head: str = "head", rev_id: str | None = None
    ) -> Generated:
        """An empty revision from the migrations directory's template (`flask db revision`)."""
        return _written(self._request("revision", message=message, head=head, rev_id=rev_id))

    def merge(
        self, revisions: Sequence[str] = ("heads",), message: str | None = None, rev_id: str | None = None
    ) -> Generated:
        """A merge revision of `revisions` (`flask db merge`; `heads`: every head)."""
        return _written(self._request("merge", revisions=list(revisions), message=message, rev_id=rev_id))

    def _known_keys(self) -> differences.Known:
        if self.job is None or not self.job.known_differences:
            return differences.Known()
        return differences.load(Path(self.job.known_differences), differences.dialect_of(self.job.url))

    def app_url(self) -> AppUrl | None:
        """The Flask app's database URL as the app resolves it; None when there is no app."""
        found = self._request("app_url").get("app_url")
        if not isinstance(found, dict) or not found.get("url"):
            return None
        url = str(found["url"])
        register_url(url)
        return AppUrl(url, str(found.get("where") or "the Flask app"))

    def init_dir(self, template: str | None = None) -> dict[str, Any]:
        """Create the migrations directory (default: Flask-Migrate's template for a Flask-SQLAlchemy
        db, else Alembic's generic one); the reply names the template and the alembic.ini."""
        return self._request("init_dir", template=template)

    def close(self) -> None:
        """Send exit, wait briefly, kill if needed."""
        if self._process.poll() is None:
            with contextlib.suppress(ReconcilerError, OSError, queue.Empty):
                self._send({"op": "exit"})
                self._replies.get(timeout=_CLOSE_WAIT)
            with contextlib.suppress(OSError):
                self._close_stdin()
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
        with contextlib.suppress(OSError):
            self._close_stdin()
        for thread in self._threads:
            thread.join(timeout=_CLOSE_WAIT)
        for stream in (self._process.stdout, self._process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        callbacks, self.after_close = self.after_close, []
        for callback in callbacks:
            callback()

    def _close_stdin(self) -> None:
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()

    def _read_stdout(self) -> None:
        stream: IO[bytes] | None = self._process.stdout
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in stream:
                    self._replies.put(line)
        self._replies.put(None)

    def _read_stderr(self) -> None:
        stream: IO[bytes] | None = self._process.stderr
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                line = redact(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._stderr.append(line)
                if self._on_log is not None:
                    with contextlib.suppress(Exception):
                        self._on_log(line)

    def _send(self, request: dict[str, Any]) -> None:
        stdin = self._process.stdin
        if stdin is None or stdin.closed:
            raise WorkerError("the worker's input is closed; start a new worker")
        stdin.write((json.dumps(request) + "\n").encode("utf-8"))
        stdin.flush()

    def _request(
        self, op: str, on_event: Callable[[str, str], None] | None = None, **fields: Any
    ) -> dict[str, Any]:
        with self._lock:
            try:
                self._send({"op": op, **fields})
            except OSError:
                raise self._died(op) from None
            while True:
                reply = self._next_line(op)
                if "event" not in reply:
                    break
                self._answer_event(reply, on_event)
            if reply.get("ok"):
                return dict(reply)
            raise error_from_reply(reply.get("error") or {})

    def _answer_event(self, event: Mapping[str, Any], on_event: Callable[[str, str], None] | None) -> None:
        """A revision is about to leave its transaction: record it (on_event), then let it go on."""
        try:
            if on_event is not None:
                on_event(str(event.get("revision") or ""), str(event.get("reason") or ""))
        except BaseException:
            self.kill()  # it waits inside its transaction: dying there rolls it back
            raise
        try:
            self._send({"op": "proceed"})
        except OSError:
            raise self._died("upgrade") from None

    def _next_line(self, op: str) -> dict[str, Any]:
        """The next line the worker sent: a reply, or an event before the reply."""
        try:
            raw = self._replies.get(timeout=self._timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(
                f"the worker (pid {self.pid}) did not finish {op} within {self._timeout:g}s "
                "and was killed; raise [target] worker_timeout if the job needs longer"
            ) from None
        if raw is None:
            raise self._died(op)
        try:
            reply = json.loads(raw.decode("utf-8"))
        except ValueError:
            raise WorkerError(
                f"the worker sent a line that is not JSON during {op}: "
                f"{redact(raw.decode('utf-8', 'replace'))[:500]}"
            ) from None
        return dict(reply)

    def _died(self, op: str) -> WorkerError:
        try:
            code = self._process.wait(timeout=_CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            code = None
        self._threads[1].join(timeout=_CLOSE_WAIT)
        tail = "\n".join(list(self._stderr)[-15:]) or "(nothing on stderr)"
        return WorkerError(
            redact(
                f"the worker (pid {self.pid}) exited with code {code} during {op} without a "
                f"reply; its last log lines:\n{tail}"
            )
        )


def start_headers_worker(settings: Settings) -> Worker:
    """A worker that reads the headers of revision files that must be executed (`Project`'s
    `start_worker`)."""
    return Worker.start(WorkerJob.from_settings(settings), python=settings.target.python or None)


class WarmWorker:
    """Keeps one spare worker started and initialised so that the next job starts at once.

    Each `take()` hands out a fresh interpreter (the project's modules are imported anew by every
    job) and starts the next spare in the background. All workers are started by this object's own
    thread, which lives until `close()` and until every worker it started has exited, so the
    kernel's parent-death signal never fires early. A spare whose alembic.ini or env.py changed
    since it started is replaced. Thread-safe.
    """

    def __init__(
        self,
        job: WorkerJob,
        python: str | None = None,
        on_log: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._job = job
        self._python = python
        self._on_log = on_log
        self._timeout = timeout
        self._lock = threading.Lock()
        self._orders: queue.Queue[Future[Worker] | None] = queue.Queue()
        self._started: list[Worker] = []
        self._closed = False
        self._thread = threading.Thread(target=self._starter, daemon=True, name="warm-worker")
        self._thread.start()
        self._spare: tuple[Future[Worker], tuple[Any, ...]] | None = self._order()

    @property
    def spare_pid(self) -> int | None:
        """The spare's pid once it is started (None while it starts or when there is none)."""
        with self._lock:
            spare = self._spare
        if spare is None or not spare[0].done() or spare[0].exception() is not None:
            return None
        return spare[0].result().pid

    def take(self) -> Worker:
        """A started, initialised worker: the spare (waited for if still starting), else a new one.

        The next spare is started when the taken worker is closed, not before: on a small
        machine its start-up (an interpreter importing SQLAlchemy, Alembic, Flask) would take CPU
        from the generation it was taken for. Raises what starting a worker raises (ConfigError
        for a missing interpreter, ...); the next take() tries again. The caller closes the worker.
        """
        with self._lock:
            if self._closed:
                raise WorkerError("the warm worker pool is closed")
            order, self._spare = self._spare, None
        try:
            worker = self._usable(order) or self._wait(self._order()[0])
        except BaseException:
            self._replenish()
            raise
        worker.after_close.append(self._replenish)
        return worker

    def _replenish(self) -> None:
        with self._lock:
            if not self._closed and self._spare is None:
                self._spare = self._order()

    def close(self) -> None:
        """Stop the spare (waiting for it if it is starting) and the starting thread.

        Workers already taken are the caller's: the thread waits for them to exit before it ends.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            order, self._spare = self._spare, None
        self._orders.put(None)
        if order is not None and not order[0].cancel():
            with contextlib.suppress(BaseException):
                order[0].result().close()

    def __enter__(self) -> WarmWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # plumbing

    def _order(self) -> tuple[Future[Worker], tuple[Any, ...]]:
        future: Future[Worker] = Future()
        stamp = self._stamp()
        self._orders.put(future)
        return future, stamp

    def _usable(self, order: tuple[Future[Worker], tuple[Any, ...]] | None) -> Worker | None:
        if order is None:
            return None
        future, stamp = order
        try:
            worker = future.result()
        except (ReconcilerError, CancelledError):
            return None  # start a new one: the error, if it persists, is raised from there
        if worker._process.poll() is None and stamp == self._stamp():
            return worker
        worker.close()
        return None

    @staticmethod
    def _wait(future: Future[Worker]) -> Worker:
        return future.result()

    def _stamp(self) -> tuple[Any, ...]:
        """What a worker reads at init (alembic.ini, env.py): their size and mtime."""
        migrations = Path(self._job.migrations_dir)
        paths = [migrations / "env.py", migrations / "alembic.ini"]
        if self._job.alembic_ini:
            paths.append(Path(self._job.alembic_ini))
        out: list[Any] = []
        for path in paths:
            try:
                stat = path.stat()
                out.append((str(path), stat.st_size, stat.st_mtime_ns))
            except OSError:
                out.append((str(path), None))
        return tuple(out)

    def _starter(self) -> None:
        while True:
            future = self._orders.get()
            if future is None:
                break
            if not future.set_running_or_notify_cancel():
                continue
            try:
                worker = Worker.start(
                    self._job, python=self._python, on_log=self._on_log, timeout=self._timeout, preload=True
                )
            except BaseException as exc:
                future.set_exception(exc)
            else:
                self._started = [w for w in self._started if w._process.poll() is None]
                self._started.append(worker)
                future.set_result(worker)
        for worker in self._started:  # they die with this thread: outlive them
            with contextlib.suppress(OSError):
                worker._process.wait()


_app_urls: dict[tuple[Any, ...], AppUrl | None] = {}
_app_urls_lock = threading.Lock()


def resolve_app_url(settings: Settings, environ: Mapping[str, str] | None = None) -> AppUrl | None:
    """The project's Flask app's database URL, asked of a worker once per process and setting.

    Cached per process, not on disk: an app's URI often comes from its environment or from files
    anywhere in the project, and a stale answer would migrate the wrong database. A one-shot
    command asks once; the daemon asks once at start. The worker gets no database URL (an
    in-memory SQLite one satisfies its job) and nothing connects. The app runs in `environ` (the
    environment the settings were resolved in; default: ours): its URI may come from there.
    """
    t = settings.target
    env = dict(process_environment() if environ is None else environ)
    key = (
        t.python,
        str(settings.root_dir),
        str(settings.migrations_dir),
        t.models,
        t.app,
        tuple(t.imports),
        tuple(sorted(env.items())),
    )
    with _app_urls_lock:
        if key in _app_urls:
            return _app_urls[key]
        job = WorkerJob.from_settings(settings, url="sqlite://", role="config")
        job = dataclasses.replace(job, alembic_ini=None, known_differences="")
        with Worker.start(job, python=t.python or None, environ=env) as worker:
            found = worker.app_url()
        _app_urls[key] = found
        return found
