"""The worker: `python -m reconciler.worker --parent PID`, one short-lived process per job.

It runs everything that executes user code (env.py, revisions, models, Flask) in the project's own
interpreter, so it imports only the standard library, SQLAlchemy and Alembic (Flask lazily). With
`--preload` (a pre-warmed spare for dev mode) it imports Flask, Flask-SQLAlchemy and Flask-Migrate
at start too, when installed; the project's own modules are imported only when a request needs them.

Protocol: JSON lines. Requests arrive on stdin, one reply per request goes to the original stdout;
fd 1 is pointed at stderr first, so `print()` in user code and Alembic's own output cannot corrupt
the protocol. stderr carries logs. The first request is `init` with the job; the worker exits on
`exit`, when stdin closes, or when its parent dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from reconciler import hooks, sessions
from reconciler.core.headers import parse_revision_source
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.redact import is_ambiguous, redact, register_secret, register_url
from reconciler.worker import migrations, target

_PR_SET_PDEATHSIG = 1
_DRIVER_MODULES = {
    "psycopg2": "postgresql",
    "psycopg": "postgresql",
    "pg8000": "postgresql",
    "pymysql": "mysql",
    "MySQLdb": "mysql",
    "mysql": "mysql",
    "mariadb": "mysql",
    "sqlite3": "sqlite",
    "pysqlite2": "sqlite",
}
_MAX_MESSAGE = 2000
_SQLITE_BEGIN = "reconciler_sqlite_begin"


def log(level: str, message: str) -> None:
    """One log line on stderr, in Alembic's default format."""
    sys.stderr.write(f"{level.upper():<5.5} [reconciler.worker] {redact(message)}\n")
    sys.stderr.flush()


# --- the job -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    url: str
    migrations_dir: Path
    root: Path
    alembic_ini: Path | None
    models: str = ""
    app: str = ""
    migrate: str = ""
    imports: tuple[str, ...] = ()
    x_args: tuple[tuple[str, str], ...] = ()
    version_table: str = migrations.DEFAULT_VERSION_TABLE
    version_table_schema: str = ""
    exclude_tables: frozenset[str] = frozenset()
    app_name: str = ""
    ddl_lock_timeout: float = 0.0
    statement_timeout: float = 0.0
    set_role: str = ""
    connect_timeout: float = 0.0
    expected_identity: tuple[tuple[str, str], ...] | None = None
    known_differences: str = ""
    log_level: str = "info"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        for secret in data.get("secrets") or ():
            register_secret(str(secret))
        url = str(data.get("url") or "")
        if not url:
            raise ConfigError("the worker job has no database URL")
        register_url(url)
        if is_ambiguous(url):
            raise ConfigError(
                f"the worker job's database URL {redact(url)!r} has more than one '@' before its "
                "host; URL-encode the password (an '@' in it is written %40)"
            )
        if not data.get("migrations_dir"):
            raise ConfigError("the worker job has no migrations directory")
        migrations_dir = Path(data["migrations_dir"]).resolve()
        root = Path(data.get("root") or ".").resolve()
        expected = data.get("expected_identity")
        return cls(
            url=url,
            migrations_dir=migrations_dir,
            root=root,
            alembic_ini=_alembic_ini(data.get("alembic_ini"), migrations_dir),
            models=str(data.get("models") or ""),
            app=str(data.get("app") or ""),
            migrate=str(data.get("migrate") or ""),
            imports=tuple(str(m) for m in data.get("imports") or ()),
            x_args=tuple((str(k), str(v)) for k, v in (data.get("x_args") or {}).items()),
            version_table=str(data.get("version_table") or migrations.DEFAULT_VERSION_TABLE),
            version_table_schema=str(data.get("version_table_schema") or ""),
            exclude_tables=frozenset(str(t) for t in data.get("exclude_tables") or ()),
            app_name=str(data.get("app_name") or ""),
            ddl_lock_timeout=float(data.get("ddl_lock_timeout") or 0.0),
            statement_timeout=float(data.get("statement_timeout") or 0.0),
            set_role=str(data.get("set_role") or ""),
            connect_timeout=float(data.get("connect_timeout") or 0.0),
            expected_identity=tuple(sorted(expected.items())) if expected else None,
            known_differences=str(data.get("known_differences") or ""),
            log_level=str(data.get("log_level") or "info"),
        )


def _alembic_ini(value: Any, migrations_dir: Path) -> Path | None:
    if value:
        path = Path(value).resolve()
        if not path.is_file():
            raise ConfigError(f"alembic.ini {path} does not exist; fix [target] alembic_ini")
        return path
    default = migrations_dir / "alembic.ini"
    return default if default.is_file() else None


# --- connections -------------------------------------------------------------------------------


def _normal_dialect(name: str) -> str:
    return "mysql" if name == "mariadb" else name


def expected_identity(job: Job) -> dict[str, str]:
    """The identity to insist on: the control plane's, else what the URL itself says."""
    if job.expected_identity is not None:
        return dict(job.expected_identity)
    from sqlalchemy.engine.url import make_url

    url = make_url(job.url)
    dialect = _normal_dialect(url.get_backend_name())
    database = url.database or ""
    if dialect == "sqlite":
        memory = not database or database == ":memory:" or database.startswith("file:")
        return {"dialect": "sqlite", "database": ":memory:" if memory else os.path.realpath(database)}
    return {"dialect": dialect, "database": database}


class ConnectionGuard:
    """Process-wide SQLAlchemy listeners: session settings and the wrong-database refusal."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.expected = expected_identity(job)
        self.refusal: str | None = None
        self.connecting = False
        self.connections = 0  # opened so far (a worker that connected cannot be re-bound)

    def install(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Dialect, Engine
        from sqlalchemy.pool import Pool

        event.listen(Dialect, "do_connect", self._do_connect)
        event.listen(Pool, "connect", self._on_connect)
        event.listen(Engine, "begin", self._on_begin)

    def reset(self) -> None:
        self.refusal = None
        self.connecting = False

    def _do_connect(self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        self.connecting = True
        timeout = self.job.connect_timeout
        driver = getattr(dialect, "driver", "")
        if driver in ("psycopg2", "psycopg", "psycopg2cffi"):
            if timeout > 0:
                cparams.setdefault("connect_timeout", max(1, math.ceil(timeout)))
            for key, value in (
                ("keepalives", 1),
                ("keepalives_idle", 30),
                ("keepalives_interval", 10),
                ("keepalives_count", 3),
            ):
                cparams.setdefault(key, value)
            if driver == "psycopg":  # no server-side prepared statements behind a pooler
                cparams.setdefault("prepare_threshold", None)
        elif driver in ("pymysql", "mysqldb") and timeout > 0:
            cparams.setdefault("connect_timeout", max(1, math.ceil(timeout)))

    def _dialect_of(self, dbapi_connection: Any, record: Any) -> str:
        pool = getattr(record, "_ConnectionRecord__pool", None)
        name = getattr(getattr(pool, "_dialect", None), "name", None)
        if isinstance(name, str) and name:
            return _normal_dialect(name)
        module = type(dbapi_connection).__module__.split(".")[0]
        return _DRIVER_MODULES.get(module, sessions.backend_name(self.job.url))

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.connecting = False
        self.connections += 1
        dialect = self._dialect_of(dbapi_connection, record)
        self._check_identity(dbapi_connection, dialect)
        if dialect == "sqlite" and type(dbapi_connection).__module__.startswith("sqlite3"):
            dbapi_connection.isolation_level = None  # we emit BEGIN ourselves: transactional DDL
            record.info[_SQLITE_BEGIN] = True
        statements = sessions.session_statements(
            dialect,
            self.job.app_name,
            self.job.ddl_lock_timeout,
            self.job.statement_timeout,
            self.job.set_role,
        )
        sessions.run_session_statements(dbapi_connection, statements)

    def _check_identity(self, dbapi_connection: Any, dialect: str) -> None:
        actual = sessions.identity_from_dbapi(dbapi_connection, dialect)
        actual["dialect"] = _normal_dialect(actual.get("dialect", dialect))
        rollback = getattr(dbapi_connection, "rollback", None)
        if rollback is not None:  # end the transaction the identity query may have opened
            rollback()
        expected = {k: _normal_dialect(v) if k == "dialect" else v for k, v in self.expected.items()}
        if all(actual.get(key) == value for key, value in expected.items()):
            return
        self.refusal = redact(
            f"env.py connected to the {actual.get('dialect')} database "
            f"{sessions.describe_identity(actual)}, but the target is the "
            f"{expected.get('dialect')} database {sessions.describe_identity(expected)}: env.py "
            "connects somewhere else than the target; make env.py use the URL it is given "
            "(config.get_main_option('sqlalchemy.url') or Flask-Migrate's db) or fix [target] url"
        )
        raise ConfigError(self.refusal)

    def _on_begin(self, connection: Any) -> None:
        info = getattr(connection.connection, "info", {})
        if info.get(_SQLITE_BEGIN):
            # foreign keys off before BEGIN: the pragma is a no-op inside a transaction, and
            # batch-mode table copies would cascade-delete
            run = sessions.driver_sql(connection)
            run("PRAGMA foreign_keys=OFF")
            run("BEGIN")


def lossless_url_rendering() -> None:
    """SQLAlchemy 1.3 and 1.4 render a password containing '%' so that parsing it back changes it.

    Flask-Migrate 2.x's env.py does exactly that round trip (`str(db.engine.url)` into
    `sqlalchemy.url`); escape '%' too, as SQLAlchemy 2 does, so such env.py files connect. The
    quoting function is `_sqla_url_quote` in 1.4, `_rfc_1738_quote` in 1.3.
    """
    import re

    import sqlalchemy
    from sqlalchemy.engine import url as url_module

    if not sqlalchemy.__version__.startswith("1."):
        return

    def quote(text: str) -> str:
        return re.sub(r"[:@/%]", lambda m: f"%{ord(m.group(0)):X}", text)

    for name in ("_sqla_url_quote", "_rfc_1738_quote"):
        if hasattr(url_module, name):
            setattr(url_module, name, quote)
            return


# --- errors ------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("(Background on this error")]
    out = target.real_paths(redact(" ".join(ln.strip() for ln in lines if ln.strip())))
    return out if len(out) <= _MAX_MESSAGE else out[:_MAX_MESSAGE] + "..."


def sqlstate_of(exc: BaseException | None) -> str | None:
    """SQLSTATE (PostgreSQL) or error number (MySQL) from a DBAPI error anywhere in the chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        orig = getattr(exc, "orig", None) or exc
        module = type(orig).__module__
        args = getattr(orig, "args", ())
        if module.startswith(("pymysql", "MySQLdb")) and args and isinstance(args[0], int):
            return str(args[0])  # MySQL's error number says more than its SQLSTATE
        for attr in ("pgcode", "sqlstate"):
            value = getattr(orig, attr, None)
            if isinstance(value, str) and value:
                return value
        exc = exc.__cause__ or exc.__context__
    return None


def _is_disconnect(exc: BaseException) -> bool:
    return bool(getattr(exc, "connection_invalidated", False))


def _is_database_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError

    return isinstance(exc, DBAPIError)


@dataclass(frozen=True)
class RevisionPlace:
    """Where in a revision file an exception was raised: the file, the line, and its id."""

    path: str
    line: int
    revision: str | None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def revision_place(exc: BaseException, files: Callable[[], set[str]]) -> RevisionPlace | None:
    """The deepest frame in a revision file of `exc`'s traceback (or of the exceptions it was
    raised from); `files` gives the revision files' real paths."""
    frames = [f for e in _chain(exc) for f in reversed(traceback.extract_tb(e.__traceback__))]
    if not frames:
        return None
    known = files()
    for frame in frames:
        if os.path.realpath(frame.filename) in known:
            return RevisionPlace(frame.filename, frame.lineno or 0, _revision_id_of(frame.filename))
    return None


def _revision_id_of(path: str) -> str | None:
    try:  # reads the header, runs nothing
        parsed = parse_revision_source(Path(path).read_bytes(), Path(path))
    except Exception:  # not readable or not a literal header: the file still names the place
        return None
    return parsed.revision if parsed is not None else None


def error_payload(
    exc: BaseException,
    op: str,
    job: Job | None,
    guard: ConnectionGuard | None,
    env_ran: bool = True,
    place: RevisionPlace | None = None,
) -> dict[str, Any]:
    """The `error` object of a failed reply.

    `env_ran` is False when env.py failed before reaching `context.run_migrations()`: its own
    code, or the models it imports, raised — a configuration error (exit 2) with file and line.
    `place`: where in a revision file it was raised; any exception raised by a revision's code
    (its upgrade, or its module while Alembic loads it, in any request) is exit 1 and names the
    file and line. A revision file that does not parse is exit 2, as the control plane says.
    """
    revision = exc.revision if isinstance(exc, migrations.RevisionError) else None
    original = exc.original if isinstance(exc, migrations.RevisionError) else exc
    if place is not None and isinstance(original, SyntaxError):
        place = None
    revision = revision or (place.revision if place is not None else None)
    name = type(original).__name__
    if guard is not None and guard.refusal:
        name, code, message = "ConfigError", 2, guard.refusal
    elif isinstance(original, ReconcilerError):
        code, message = original.exit_code, _clean(str(original))
    elif guard is not None and (guard.connecting or _is_disconnect(original)):
        code = 5
        message = _clean(f"cannot reach the database: {name}: {original}")
    elif revision is not None or place is not None:
        code = 1
        which = f"revision {revision}" if revision else f"revision file {place.path}"  # type: ignore[union-attr]
        where = f" at {place}" if place is not None else ""
        message = _clean(f"{which} failed{where}: {name}: {original}")
    elif isinstance(original, (SyntaxError, ImportError)) or (
        not env_ran and not _is_database_error(original)
    ):
        root = job.root if job else Path.cwd()
        what = "starting the worker" if op == "init" else "running env.py"
        code, message = 2, str(target.user_error(original, f"{op}: {what}", root))
    elif type(original).__module__.startswith("alembic"):
        code, message = 2, _clean(f"{op}: Alembic: {original}")
    else:
        code = 1
        message = _clean(f"{op} failed outside any revision (env.py?): {name}: {original}")
    return {
        "class": name,
        "message": message,
        "sqlstate": sqlstate_of(original),
        "exit_code": code,
        "revision": revision,
    }


def _debug_traceback(exc: BaseException, job: Job | None) -> None:
    if job is None or job.log_level != "debug":
        return
    text = target.real_paths("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for line in text.splitlines():
        log("debug", line)


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

    def __init__(self) -> None:
        self.job: Job | None = None
        self.guard: ConnectionGuard | None = None
        self.migrations: migrations.Migrations | None = None
        self.project: target.Project | None = None
        self.flask_env = False
        self.ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "init": self.op_init,
            "probe": self.op_probe,
            "upgrade": self.op_upgrade,
            "downgrade": self.op_downgrade,
            "stamp": self.op_stamp,
            "sql": self.op_sql,
            "record": self.op_record,
            "compare": self.op_compare,
            "headers": self.op_headers,
            "bind": self.op_bind,
            "init_dir": self.op_init_dir,
            "app_url": self.op_app_url,
            "generate": self.op_generate,
            "revision": self.op_revision,
            "merge": self.op_merge,
            "exit": lambda _r: {},
        }

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = str(request.get("op", ""))
        if self.guard is not None:
            self.guard.reset()
        if self.migrations is not None:
            self.migrations.env_ran = True
        try:
            handler = self.ops.get(op)
            if handler is None:
                raise ConfigError(f"unknown worker request {op!r}")
            if op not in ("init", "exit") and self.job is None:
                raise ConfigError(f"worker request {op!r} before init")
            reply: dict[str, Any] = {"ok": True, **handler(request)}
        except BaseException as exc:  # user code may raise anything, SystemExit included
            _debug_traceback(exc, self.job)
            env_ran = self.migrations.env_ran if self.migrations is not None else True
            place = revision_place(exc, self._revision_files)
            reply = {"ok": False, "error": error_payload(exc, op, self.job, self.guard, env_ran, place)}
        return dict(_redact_all(reply))

    # init and lazy loading

    def op_init(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.job is not None:
            raise ConfigError("the worker was already initialised; start a new one per job")
        require_supported_sqlalchemy()
        job = Job.from_dict(dict(request.get("job") or {}))
        self.job = job
        try:
            self._build_migrations()
        except BaseException:
            self.job = None
            raise
        self.guard = ConnectionGuard(job)
        self.guard.install()
        lossless_url_rendering()
        _load_driver(job.url)
        migrations.install_configure_guard(
            migrations.Guard(job.exclude_tables, job.version_table, job.version_table_schema)
        )
        migrations.CONFIGURED_TABLES.install()  # before any user code: tables made at configuration
        return {
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "versions": _versions(),
            "flask_env": self.flask_env,
        }

    def _build_migrations(self) -> None:
        job = self._job()
        if job.alembic_ini is None:
            job = dataclasses.replace(job, alembic_ini=_alembic_ini(None, job.migrations_dir))
            self.job = job
        self.migrations = migrations.Migrations(
            job.migrations_dir, job.alembic_ini, job.url, dict(job.x_args)
        )
        target.put_first_on_sys_path([job.root, *self.migrations.extra_sys_paths()])
        target.distrust_stale_bytecode([job.root, job.migrations_dir])
        warning = self.migrations.script_location_warning()
        if warning:
            log("warning", warning)
        self.flask_env = target.uses_flask(self.migrations.env_py)

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

    def _migrations(self) -> migrations.Migrations:
        assert self.migrations is not None
        return self.migrations

    def _load_project(self, flask_env: bool) -> target.Project:
        if self.project is None:
            job = self._job()
            spec = target.ProjectSpec(
                root=job.root,
                url=job.url,
                migrations_dir=job.migrations_dir,
                models=job.models,
                app=job.app,
                migrate=job.migrate,
                imports=job.imports,
            )
            project = target.load_project(spec, flask_env)
            self._migrations().use_callbacks(lambda c: target.configure_callbacks(project, c))
            self.project = project
        return self.project

    def _prepare_env(self) -> None:
        """Flask-Migrate env.py needs the app (and so the models) before it runs."""
        if self.flask_env:
            self._load_project(True)

    # operations

    def op_probe(self, _request: dict[str, Any]) -> dict[str, Any]:
        self._prepare_env()
        self._migrations().probe()
        return {}

    def op_upgrade(self, request: dict[str, Any]) -> dict[str, Any]:
        self._prepare_env()
        started = time.monotonic()
        check = request.get("check")  # the guard's per-operation check of this revision
        applied = self._migrations().upgrade(
            str(request["revision"]), dict(check) if isinstance(check, dict) else None
        )
        return {"duration_ms": _ms_since(started), "revisions": applied}

    def op_downgrade(self, request: dict[str, Any]) -> dict[str, Any]:
        self._prepare_env()
        started = time.monotonic()
        reverted = self._migrations().downgrade(str(request["revision"]))
        return {"duration_ms": _ms_since(started), "revisions": reverted}

    def op_stamp(self, request: dict[str, Any]) -> dict[str, Any]:
        self._prepare_env()
        revision = request["revision"]
        revisions = [revision] if isinstance(revision, str) else [str(r) for r in revision]
        self._migrations().stamp(revisions, bool(request.get("purge")))
        return {}

    def op_sql(self, request: dict[str, Any]) -> dict[str, Any]:
        self._prepare_env()
        start = request.get("start")
        text = self._migrations().sql(str(start) if start else None, str(request["end"]))
        return {"sql": text}

    def op_record(self, request: dict[str, Any]) -> dict[str, Any]:
        """The pending revisions' upgrade operations, recorded (nothing runs on the database)."""
        revisions = [str(r) for r in request.get("revisions") or ()]
        return {"revisions": self._migrations().record(revisions, self._job().url)}

    def op_compare(self, request: dict[str, Any]) -> dict[str, Any]:
        project = self._load_project(self.flask_env)
        job = self._job()
        raw = self._migrations().compare(project.metadata)
        return {"differences": migrations.describe_differences(raw, job.exclude_tables)}

    def op_generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """`tables` / `files` (paths relative to the project root or absolute): the scope;
        `rescan`: read the versions directory again (the draft's file was moved away)."""
        project = self._load_project(self.flask_env)
        tables, files = request.get("tables"), request.get("files")
        root = self._job().root
        if request.get("rescan"):
            self._migrations().rescan()
        generate = migrations.GenerateRequest(
            message=str(request["message"]) if request.get("message") else None,
            draft=bool(request.get("draft")),
            rev_id=str(request["rev_id"]) if request.get("rev_id") else None,
            head=str(request.get("head") or "head"),
            tables=frozenset(str(t) for t in tables) if tables is not None else None,
            files=frozenset(str(root / str(f)) for f in files) if files is not None else None,
            classes={
                str(root / str(f)): frozenset(str(n) for n in names)
                for f, names in (request.get("classes") or {}).items()
            },
            known=migrations.known_of(request.get("known") or ()),
        )
        started = time.monotonic()
        outcome = self._migrations().generate(generate, project.metadata)
        return {**dataclasses.asdict(outcome), "duration_ms": _ms_since(started)}

    def op_revision(self, request: dict[str, Any]) -> dict[str, Any]:
        """An empty revision (`flask db revision`): no models, no database, unless alembic.ini
        sets `revision_environment` (env.py runs then, so a Flask env.py gets its app)."""
        self._prepare_revision_env()
        outcome = self._migrations().empty_revision(
            _text_or_none(request.get("message")),
            str(request.get("head") or "head"),
            _text_or_none(request.get("rev_id")),
        )
        return dataclasses.asdict(outcome)

    def op_merge(self, request: dict[str, Any]) -> dict[str, Any]:
        """A merge revision of the named revisions (`flask db merge`)."""
        self._prepare_revision_env()
        revisions = [str(r) for r in request.get("revisions") or ("heads",)]
        outcome = self._migrations().merge(
            revisions, _text_or_none(request.get("message")), _text_or_none(request.get("rev_id"))
        )
        return dataclasses.asdict(outcome)

    def _prepare_revision_env(self) -> None:
        value = self._migrations().config.get_main_option("revision_environment") or ""
        if value.strip().lower() in ("true", "1", "yes", "on"):
            self._prepare_env()

    def op_headers(self, request: dict[str, Any]) -> dict[str, Any]:
        job = self._job()

        def on_error(exc: BaseException, path: Path) -> BaseException:
            if isinstance(exc, SyntaxError):
                return target.user_error(exc, f"reading revision file {path}", job.root)
            return exc  # raised again with its traceback: the reply names the revision's line

        paths = [Path(p) for p in request.get("paths") or ()]
        return {"headers": self._migrations().headers(paths, on_error)}

    def op_bind(self, request: dict[str, Any]) -> dict[str, Any]:
        """Take on the control plane's database identity and journal tables: a worker started to
        read headers is then the one that analyses and applies (one interpreter start). Refused
        (`bound` False) once anything connected, as those connections were checked against the
        URL's identity only."""
        job, guard = self._job(), self.guard
        if guard is None or guard.connections:
            return {"bound": False}
        expected = request.get("expected_identity")
        job = dataclasses.replace(
            job,
            expected_identity=tuple(sorted(expected.items())) if expected else job.expected_identity,
            exclude_tables=frozenset(str(t) for t in request.get("exclude_tables") or ()),
        )
        self.job = guard.job = job
        guard.expected = expected_identity(job)
        migrations.install_configure_guard(
            migrations.Guard(job.exclude_tables, job.version_table, job.version_table_schema)
        )
        return {"bound": True}

    def op_app_url(self, _request: dict[str, Any]) -> dict[str, Any]:
        """The Flask app's database URL as the app resolves it (None: no Flask app found).
        The URL keeps its password: the control plane registers it as a secret on receipt."""
        job = self._job()
        spec = target.ProjectSpec(
            root=job.root,
            url=job.url,
            migrations_dir=job.migrations_dir,
            models=job.models,
            app=job.app,
            migrate=job.migrate,
            imports=job.imports,
        )
        project = self._load_project(False)
        return {"app_url": target.app_database_url(spec, project)}

    def op_init_dir(self, request: dict[str, Any]) -> dict[str, Any]:
        job = self._job()
        project = self._load_project(False)
        template = str(request.get("template") or ("flask" if project.is_flask_db else "generic"))
        if template.startswith("flask"):
            template_dir: Path | None = _flask_migrate_templates()
            ini = job.migrations_dir / "alembic.ini"
            lines = None
        else:
            template_dir = None
            ini = job.alembic_ini or job.root / "alembic.ini"
            from sqlalchemy import MetaData

            is_metadata = isinstance(project.models_obj, MetaData)
            lines = migrations.metadata_lines(job.models, is_metadata) if job.models else None
        self._migrations().init_dir(template, template_dir, ini, lines)
        self.job = dataclasses.replace(job, alembic_ini=ini if ini.is_file() else None)
        self.project = None
        self._build_migrations()
        return {"template": template, "alembic_ini": str(ini)}


def _text_or_none(value: Any) -> str | None:
    return str(value) if value else None


def _load_driver(url: str) -> None:
    """Import the URL's dialect and DBAPI driver now, so the first request does not pay for it."""
    with contextlib.suppress(Exception):  # a missing driver is reported when connecting
        from sqlalchemy.engine.url import make_url

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
    import importlib

    for name in _PRELOAD:
        with contextlib.suppress(Exception):  # Flask is optional
            importlib.import_module(name)


def _flask_migrate_templates() -> Path:
    try:
        import flask_migrate
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
    import sqlalchemy

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
    import alembic
    import sqlalchemy

    return {"sqlalchemy": sqlalchemy.__version__, "alembic": alembic.__version__}


# --- process -----------------------------------------------------------------------------------


def die_with_parent(parent: int | None) -> None:
    """Never outlive the control plane: a worker must not go on migrating without the lock."""
    installed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            installed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            installed = False
    if parent is None:
        return
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    if not installed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def claim_stdio() -> tuple[IO[str], IO[str]]:
    """Keep the real stdin/stdout for the protocol; fd 1 becomes stderr, fd 0 /dev/null."""
    sys.stdout.flush()
    out_fd, in_fd = os.dup(1), os.dup(0)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    proto_out = os.fdopen(out_fd, "w", encoding="utf-8", newline="\n")
    proto_in = os.fdopen(in_fd, "r", encoding="utf-8")
    return proto_in, proto_out


def section_reporter(proto_in: IO[str], proto_out: IO[str]) -> Callable[[str, str], None]:
    """Tell the control plane that `revision` leaves its transaction (an event line before the
    reply), and wait for its `proceed`: the journal marks the step first, so a kill from here on
    leaves a step that is judged `dirty`, never rolled back and run again."""

    def report(revision: str, reason: str) -> None:
        proto_out.write(
            json.dumps({"event": "non_transactional", "revision": revision, "reason": reason}) + "\n"
        )
        proto_out.flush()
        line = proto_in.readline()
        try:
            answer = json.loads(line) if line.strip() else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict) or answer.get("op") != "proceed":
            raise ReconcilerError(
                f"revision {revision} was stopped before {reason}: the control plane did not "
                "confirm it journaled the step; it is retried on the next run"
            )

    return report


def serve(proto_in: IO[str], proto_out: IO[str]) -> None:
    runner = Runner()
    migrations.watch_sections()
    migrations.SECTIONS.report = section_reporter(proto_in, proto_out)
    for line in iter(proto_in.readline, ""):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            reply: dict[str, Any] = {
                "ok": False,
                "error": {
                    "class": "ProtocolError",
                    "message": f"bad request line: {exc}",
                    "sqlstate": None,
                    "exit_code": 2,
                    "revision": None,
                },
            }
            request = {}
        else:
            reply = runner.handle(request)
        proto_out.write(json.dumps(reply, default=str) + "\n")
        proto_out.flush()
        if request.get("op") == "exit":
            break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reconciler.worker")
    parser.add_argument("--parent", type=int, default=None, help="pid of the control plane")
    parser.add_argument(
        "--preload", action="store_true", help="import Flask and friends at start (a pre-warmed spare)"
    )
    args = parser.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; its death kills us
    hooks.inside_reconciler_worker()  # an env.py using migration_lock must not wait for our own lock
    proto_in, proto_out = claim_stdio()
    if args.preload:
        preload()
    try:
        serve(proto_in, proto_out)
    finally:
        with contextlib.suppress(Exception):
            proto_out.flush()
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(0)  # user code may have left non-daemon threads behind
