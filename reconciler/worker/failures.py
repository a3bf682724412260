"""The worker's error replies: what a failed request answers, and its log lines."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reconciler.core.headers import parse_revision_source
from reconciler.errors import ReconcilerError
from reconciler.protocol import ErrorReply, Job
from reconciler.redact import redact
from reconciler.worker.connguard import IdentityCheck
from reconciler.worker.usercode import real_paths, user_error


def log(level: str, message: str) -> None:
    """One log line on stderr, in Alembic's default format."""
    sys.stderr.write(f"{level.upper():<5.5} [reconciler.worker] {redact(message)}\n")
    sys.stderr.flush()


_MAX_MESSAGE = 2000


class RevisionError(Exception):
    """A revision raised while it ran; carries the revision id and the original exception."""

    def __init__(self, revision: str, direction: str, original: BaseException) -> None:
        super().__init__(f"{direction} of revision {revision} failed")
        self.revision = revision
        self.direction = direction
        self.original = original


# --- errors ------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("(Background on this error")]
    out = real_paths(redact(" ".join(ln.strip() for ln in lines if ln.strip())))
    return out if len(out) <= _MAX_MESSAGE else out[:_MAX_MESSAGE] + "..."


_SQLITE_BUSY_TEXTS = {"database is locked": "SQLITE_BUSY", "database table is locked": "SQLITE_LOCKED"}


def _sqlite_busy(orig: BaseException) -> str | None:
    """SQLITE_BUSY / SQLITE_LOCKED (another connection's lock outlasted the busy timeout: an app
    reading its own file in a long transaction), the one SQLite error that is a lock timeout;
    by its name (Python >= 3.11) or its message (older interpreters). Other errors: None."""
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str):  # extended codes too: SQLITE_BUSY_TIMEOUT, SQLITE_LOCKED_SHAREDCACHE, ...
        return next((b for b in _SQLITE_BUSY_TEXTS.values() if name == b or name.startswith(b + "_")), None)
    text = str(orig).strip().lower()
    return _SQLITE_BUSY_TEXTS.get(text)


def sqlstate_of(exc: BaseException | None) -> str | None:
    """SQLSTATE (PostgreSQL), error number (MySQL) or SQLITE_BUSY / SQLITE_LOCKED (SQLite) from a
    DBAPI error anywhere in the chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        orig = getattr(exc, "orig", None) or exc
        module = type(orig).__module__
        args = getattr(orig, "args", ())
        if module.startswith(("pymysql", "MySQLdb")) and args and isinstance(args[0], int):
            return str(args[0])  # MySQL's error number says more than its SQLSTATE
        if module.startswith(("sqlite3", "pysqlite2")):
            busy = _sqlite_busy(orig)
            if busy is not None:
                return busy
        for attr in ("pgcode", "sqlstate"):
            value = getattr(orig, attr, None)
            if isinstance(value, str) and value:
                return value
        exc = exc.__cause__ or exc.__context__
    return None


def _is_disconnect(exc: BaseException) -> bool:
    return bool(getattr(exc, "connection_invalidated", False))


def _is_database_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError  # deferred: worker start-up time: imported when a job needs it

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
    identity: IdentityCheck | None,
    env_ran: bool = True,
    place: RevisionPlace | None = None,
) -> ErrorReply:
    """The `error` object of a failed reply.

    `env_ran` is False when env.py failed before reaching `context.run_migrations()`: its own
    code, or the models it imports, raised — a configuration error (exit 2) with file and line.
    `place`: where in a revision file it was raised; any exception raised by a revision's code
    (its upgrade, or its module while Alembic loads it, in any request) is exit 1 and names the
    file and line. A revision file that does not parse is exit 2, as the control plane says.
    """
    revision = exc.revision if isinstance(exc, RevisionError) else None
    original = exc.original if isinstance(exc, RevisionError) else exc
    if place is not None and isinstance(original, SyntaxError):
        place = None
    revision = revision or (place.revision if place is not None else None)
    name = type(original).__name__
    if identity is not None and identity.refusal:
        name, code, message = "ConfigError", 2, identity.refusal
    elif isinstance(original, ReconcilerError):
        code, message = original.exit_code, _clean(str(original))
    elif identity is not None and (identity.connecting or _is_disconnect(original)):
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
        root = Path(job.root) if job else Path.cwd()
        what = "starting the worker" if op == "init" else "running env.py"
        code, message = 2, str(user_error(original, f"{op}: {what}", root))
    elif type(original).__module__.startswith("alembic"):
        code, message = 2, _clean(f"{op}: Alembic: {original}")
    else:
        code = 1
        message = _clean(f"{op} failed outside any revision (env.py?): {name}: {original}")
    return ErrorReply(name, message, sqlstate_of(original), code, revision)


def debug_traceback(exc: BaseException, job: Job | None) -> None:
    if job is None or job.log_level != "debug":
        return
    text = real_paths("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    for line in text.splitlines():
        log("debug", line)
