"""The worker's request dispatch: one job's state across requests, and one handler per request.

Each handler takes its request (a `reconciler.protocol` dataclass) and returns its reply; the
process loop (`process`) reads and writes the lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler import protocol
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.protocol import Job
from reconciler.redact import redact
from reconciler.worker.autogenerate import CONFIGURED_TABLES
from reconciler.worker.connguard import (
    ConfigureWrapper,
    IdentityCheck,
    expected_identity,
    install_configure_wrapper,
    lossless_url_rendering,
)
from reconciler.worker.describe import describe_differences
from reconciler.worker.environment import Migrations
from reconciler.worker.failures import debug_traceback, error_payload, log, revision_place
from reconciler.worker.job import alembic_ini_of, checked_job
from reconciler.worker.models import (
    Project,
    ProjectSpec,
    app_database_url,
    configure_callbacks,
    load_project,
    uses_flask,
)
from reconciler.worker.scaffold import metadata_lines
from reconciler.worker.usercode import distrust_stale_bytecode, put_first_on_sys_path, user_error

# --- operations --------------------------------------------------------------------------------


def _redact_all(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_all(v) for v in value]
    return value


class Runner:
    """Holds one job's state across requests and answers each request."""

    def __init__(self, ask: Callable[[Any], str] | None = None) -> None:
        self.ask = ask or _no_control_plane  # an event out, its answer's op back (process.ask)
        self.job: Job | None = None
        self.identity: IdentityCheck | None = None
        self.migrations: Migrations | None = None
        self.project: Project | None = None
        self.flask_env = False
        self.ops: dict[type, Callable[[Any], Any]] = {
            protocol.InitRequest: self.op_init,
            protocol.ProbeRequest: self.op_probe,
            protocol.UpgradeRequest: self.op_upgrade,
            protocol.DowngradeRequest: self.op_downgrade,
            protocol.StampRequest: self.op_stamp,
            protocol.StairwayRequest: self.op_stairway,
            protocol.SqlRequest: self.op_sql,
            protocol.RecordRequest: self.op_record,
            protocol.CompareRequest: self.op_compare,
            protocol.HeadersRequest: self.op_headers,
            protocol.BindRequest: self.op_bind,
            protocol.InitDirRequest: self.op_init_dir,
            protocol.AppUrlRequest: self.op_app_url,
            protocol.GenerateRequest: self.op_generate,
            protocol.RevisionRequest: self.op_revision,
            protocol.MergeRequest: self.op_merge,
            protocol.ExitRequest: lambda _r: protocol.EmptyReply(),
        }

    def handle(self, data: dict[str, Any]) -> dict[str, Any]:
        """The reply (a JSON object) to one request line's object."""
        op = str(data.get("op", ""))
        if self.identity is not None:
            self.identity.reset()
        if self.migrations is not None:
            self.migrations.env_ran = True
        try:
            try:
                request = protocol.parse_request(data)
            except protocol.ProtocolError as exc:
                raise ConfigError(str(exc)) from None
            handler = self.ops.get(type(request))
            if handler is None:
                raise ConfigError(f"unknown worker request {op!r}")
            if op not in ("init", "exit") and self.job is None:
                raise ConfigError(f"worker request {op!r} before init")
            reply = protocol.ok_reply(handler(request))
        except BaseException as exc:  # user code may raise anything, SystemExit included
            debug_traceback(exc, self.job)
            env_ran = self.migrations.env_ran if self.migrations is not None else True
            place = revision_place(exc, self._revision_files)
            error = error_payload(exc, op, self.job, self.identity, env_ran, place)
            reply = protocol.error_reply(error)
        return dict(_redact_all(reply))

    # init and lazy loading

    def op_init(self, request: protocol.InitRequest) -> protocol.InitReply:
        if self.job is not None:
            raise ConfigError("the worker was already initialised; start a new one per job")
        require_supported_sqlalchemy()
        job = checked_job(request.job)
        self.job = job
        try:
            self._build_migrations()
        except BaseException:
            self.job = None
            raise
        self.identity = IdentityCheck(job)
        self.identity.install()
        lossless_url_rendering()
        load_driver(job.url)
        install_configure_wrapper(_configure_wrapper(job))
        CONFIGURED_TABLES.install()  # before any user code: tables made at configuration
        return protocol.InitReply(
            pid=os.getpid(),
            python=sys.version.split()[0],
            versions=_versions(),
            flask_env=self.flask_env,
            protocol=protocol.PROTOCOL_VERSION,
        )

    def _build_migrations(self) -> None:
        job = self._job()
        if job.alembic_ini is None:
            ini = alembic_ini_of(None, Path(job.migrations_dir))
            job = dataclasses.replace(job, alembic_ini=str(ini) if ini else None)
            self.job = job
        self.migrations = Migrations(
            Path(job.migrations_dir),
            Path(job.alembic_ini) if job.alembic_ini else None,
            job.url,
            dict(job.x_args),
        )
        put_first_on_sys_path([job.root, *self.migrations.extra_sys_paths()])
        distrust_stale_bytecode([job.root, job.migrations_dir])
        warning = self.migrations.script_location_warning()
        if warning:
            log("warning", warning)
        self.flask_env = uses_flask(self.migrations.env_py)

    def _job(self) -> Job:
        assert self.job is not None
        return self.job

    def _revision_files(self) -> set[str]:
        """The real paths of the revision files (to name the one an exception came from)."""
        if self.migrations is None:
            return set()
        try:
            return {os.path.realpath(p) for p in self.migrations.revision_files()}
        except Exception:  # a missing versions directory: no revision to name
            return set()

    def _migrations(self) -> Migrations:
        assert self.migrations is not None
        return self.migrations

    def _load_project(self, flask_env: bool) -> Project:
        if self.project is None:
            project = load_project(_project_spec(self._job()), flask_env)
            self._migrations().use_callbacks(lambda c: configure_callbacks(project, c))
            self.project = project
        return self.project

    def _prepare_env(self) -> None:
        """Flask-Migrate env.py needs the app (and so the models) before it runs."""
        if self.flask_env:
            self._load_project(True)

    # operations

    def op_probe(self, _request: protocol.ProbeRequest) -> protocol.EmptyReply:
        self._prepare_env()
        self._migrations().probe()
        return protocol.EmptyReply()

    def op_upgrade(self, request: protocol.UpgradeRequest) -> protocol.UpgradeReply:
        self._prepare_env()
        started = time.monotonic()
        checks = {rev: dict(check) for rev, check in request.checks.items()}
        outcome = self._migrations().upgrade(list(request.revisions), checks, self._step)
        return protocol.UpgradeReply(outcome.last, outcome.stopped, _ms_since(started))

    def _step(self, begins: str, finished: protocol.StepDone | None) -> bool:
        """Announce the next revision of a plan (and the previous one, committed): True to run
        it, False when the control plane says stop."""
        answer = self.ask(protocol.StepEvent(begins, finished))
        if answer == protocol.StopRequest.op:
            return False
        if answer != protocol.ProceedRequest.op:
            raise ReconcilerError(
                f"revision {begins} was not started: the control plane did not confirm it "
                "journaled the step; it is applied on the next run"
            )
        return True

    def op_downgrade(self, request: protocol.DowngradeRequest) -> protocol.StepReply:
        self._prepare_env()
        started = time.monotonic()
        reverted = self._migrations().downgrade(request.revision)
        return protocol.StepReply(_ms_since(started), tuple(reverted))

    def op_stairway(self, request: protocol.StairwayRequest) -> protocol.StairwayReply:
        self._prepare_env()
        reply: protocol.StairwayReply = self._migrations().stairway(request.before, request.revisions)
        return reply

    def op_stamp(self, request: protocol.StampRequest) -> protocol.EmptyReply:
        self._prepare_env()
        self._migrations().stamp(list(request.revisions), request.purge)
        return protocol.EmptyReply()

    def op_sql(self, request: protocol.SqlRequest) -> protocol.SqlReply:
        self._prepare_env()
        return protocol.SqlReply(self._migrations().sql(request.start or None, request.end))

    def op_record(self, request: protocol.RecordRequest) -> protocol.RecordReply:
        """The pending revisions' upgrade operations, recorded (nothing runs on the database)."""
        revisions = list(request.revisions)
        return protocol.RecordReply(tuple(self._migrations().record(revisions, self._job().url)))

    def op_compare(self, _request: protocol.CompareRequest) -> protocol.CompareReply:
        project = self._load_project(self.flask_env)
        job = self._job()
        raw = self._migrations().compare(project.metadata)
        return protocol.CompareReply(tuple(describe_differences(raw, frozenset(job.exclude_tables))))

    def op_generate(self, request: protocol.GenerateRequest) -> protocol.GenerateReply:
        """`tables` / `files` (paths relative to the project root or absolute): the scope;
        `rescan`: read the versions directory again (the draft's file was moved away)."""
        project = self._load_project(self.flask_env)
        root = Path(self._job().root)
        if request.rescan:
            self._migrations().rescan()
        files = request.files
        request = dataclasses.replace(
            request,
            files=frozenset(str(root / f) for f in files) if files is not None else None,
            classes={str(root / f): names for f, names in request.classes.items()},
        )
        started = time.monotonic()
        outcome = self._migrations().generate(request, project.metadata)
        return protocol.GenerateReply(**dataclasses.asdict(outcome), duration_ms=_ms_since(started))

    def op_revision(self, request: protocol.RevisionRequest) -> protocol.GenerateReply:
        """An empty revision (`flask db revision`): no models, no database, unless alembic.ini
        sets `revision_environment` (env.py runs then, so a Flask env.py gets its app)."""
        self._prepare_revision_env()
        outcome = self._migrations().empty_revision(
            _text_or_none(request.message), request.head or "head", _text_or_none(request.rev_id)
        )
        return protocol.GenerateReply(**dataclasses.asdict(outcome))

    def op_merge(self, request: protocol.MergeRequest) -> protocol.GenerateReply:
        """A merge revision of the named revisions (`flask db merge`)."""
        self._prepare_revision_env()
        revisions = list(request.revisions or ("heads",))
        outcome = self._migrations().merge(
            revisions, _text_or_none(request.message), _text_or_none(request.rev_id)
        )
        return protocol.GenerateReply(**dataclasses.asdict(outcome))

    def _prepare_revision_env(self) -> None:
        value = self._migrations().config.get_main_option("revision_environment") or ""
        if value.strip().lower() in ("true", "1", "yes", "on"):
            self._prepare_env()

    def op_headers(self, request: protocol.HeadersRequest) -> protocol.HeadersReply:
        job = self._job()

        def on_error(exc: BaseException, path: Path) -> BaseException:
            if isinstance(exc, SyntaxError):
                return user_error(exc, f"reading revision file {path}", Path(job.root))
            return exc  # raised again with its traceback: the reply names the revision's line

        paths = [Path(p) for p in request.paths]
        return protocol.HeadersReply(tuple(self._migrations().headers(paths, on_error)))

    def op_bind(self, request: protocol.BindRequest) -> protocol.BindReply:
        """Take on the control plane's database identity and journal tables: a worker started to
        read headers is then the one that analyses and applies (one interpreter start). Refused
        (`bound` False) once anything connected, as those connections were checked against the
        URL's identity only."""
        job, identity = self._job(), self.identity
        if identity is None or identity.connections:
            return protocol.BindReply(False)
        expected = request.expected_identity
        job = dataclasses.replace(
            job,
            expected_identity=dict(expected) if expected else job.expected_identity,
            exclude_tables=tuple(request.exclude_tables),
        )
        self.job = identity.job = job
        identity.expected = expected_identity(job)
        install_configure_wrapper(_configure_wrapper(job))
        return protocol.BindReply(True)

    def op_app_url(self, _request: protocol.AppUrlRequest) -> protocol.AppUrlReply:
        """The Flask app's database URL as the app resolves it (None: no Flask app found).
        The URL keeps its password: the control plane registers it as a secret on receipt."""
        project = self._load_project(False)
        return protocol.AppUrlReply(app_database_url(_project_spec(self._job()), project))

    def op_init_dir(self, request: protocol.InitDirRequest) -> protocol.InitDirReply:
        job = self._job()
        project = self._load_project(False)
        template = str(request.template or ("flask" if project.is_flask_db else "generic"))
        if template.startswith("flask"):
            template_dir: Path | None = _flask_migrate_templates()
            ini = Path(job.migrations_dir) / "alembic.ini"
            lines = None
        else:
            template_dir = None
            ini = Path(job.alembic_ini) if job.alembic_ini else Path(job.root) / "alembic.ini"
            from sqlalchemy import MetaData  # deferred: the worker imports SQLAlchemy only when asked

            is_metadata = isinstance(project.models_obj, MetaData)
            lines = metadata_lines(job.models, is_metadata) if job.models else None
        self._migrations().init_dir(template, template_dir, ini, lines)
        self.job = dataclasses.replace(job, alembic_ini=str(ini) if ini.is_file() else None)
        self.project = None
        self._build_migrations()
        return protocol.InitDirReply(template, str(ini))


def _no_control_plane(_event: Any) -> str:
    return protocol.ProceedRequest.op


def _configure_wrapper(job: Job) -> ConfigureWrapper:
    return ConfigureWrapper(
        frozenset(job.exclude_tables), job.version_table, job.version_table_schema, job.search_path
    )


def _project_spec(job: Job) -> ProjectSpec:
    return ProjectSpec(
        root=Path(job.root),
        url=job.url,
        migrations_dir=Path(job.migrations_dir),
        models=job.models,
        app=job.app,
        migrate=job.migrate,
        imports=tuple(job.imports),
    )


def _text_or_none(value: Any) -> str | None:
    return str(value) if value else None


def load_driver(url: str) -> None:
    """Import the URL's dialect and DBAPI driver now, so the first request does not pay for it."""
    with contextlib.suppress(Exception):  # a missing driver is reported when connecting
        from sqlalchemy.engine.url import (
            make_url,  # deferred: worker start-up time: imported when a job needs it
        )

        dialect = make_url(url).get_dialect()
        loader = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
        if callable(loader):
            loader()


_PRELOAD = (
    "sqlalchemy.orm",
    "sqlalchemy.ext.declarative",
    "alembic.autogenerate",
    "alembic.operations",
    "alembic.command",
    "mako.template",
    "flask",
    "flask_sqlalchemy",
    "flask_migrate",
)


def preload() -> None:
    """Import what any job needs (never the project's code), for a pre-warmed spare worker."""

    for name in _PRELOAD:
        with contextlib.suppress(Exception):  # Flask is optional
            importlib.import_module(name)


def _flask_migrate_templates() -> Path:
    try:
        import flask_migrate  # deferred: Flask only when the project uses it
    except ImportError:
        raise ConfigError(
            f"the Flask-Migrate template needs flask_migrate, which is not installed in "
            f"{sys.executable}; install Flask-Migrate or pass template 'generic'"
        ) from None
    return Path(flask_migrate.__file__).resolve().parent / "templates"


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


MINIMUM_SQLALCHEMY = (1, 3)


def require_supported_sqlalchemy() -> None:
    """Refuse, naming both versions, an interpreter whose SQLAlchemy is older than we support."""
    import sqlalchemy  # deferred: worker start-up time: imported when a job needs it

    version = str(sqlalchemy.__version__)
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if numbers < MINIMUM_SQLALCHEMY:
        minimum = ".".join(map(str, MINIMUM_SQLALCHEMY))
        raise ConfigError(
            f"SQLAlchemy {version} in {sys.executable} is older than the oldest the worker "
            f"supports ({minimum}); upgrade SQLAlchemy there to {minimum} or later, or point "
            "[target] python at another interpreter"
        )


def _versions() -> dict[str, str]:
    import alembic  # deferred: worker start-up time (a warm spare preloads it)
    import sqlalchemy  # deferred: worker start-up time: imported when a job needs it

    return {"sqlalchemy": sqlalchemy.__version__, "alembic": alembic.__version__}
