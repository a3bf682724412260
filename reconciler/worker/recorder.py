"""Recording the pending revisions' operations without running them (the destructive-change guard's input)."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from alembic.operations import BatchOperations, Operations
from alembic.runtime.environment import EnvironmentContext

from reconciler.redact import redact
from reconciler.sessions import driver_sql
from reconciler.worker import handover
from reconciler.worker.generated import short_text
from reconciler.worker.opfacts import LiveSchema, add_live_facts, recorded_operation

# --- recording the pending revisions' operations (the destructive-change guard) ----------------
#
# Each pending revision's upgrade() runs with `op` bound to a recorder: every operation is kept
# (with the line of the revision file that made it) and rendered to offline SQL for the target's
# dialect; `op.get_context()` has the project's real Alembic Config. env.py does not run.
# `op.get_bind()` is a real connection to the target in a read-only transaction that is rolled
# back (`RecordingConnection`): what reads (SELECT, reflection, `sa.inspect`, ORM queries) gets
# the database's real answers; what would write (DDL, DML, `Enum.create`, an ORM flush) is
# recorded and not run, and returns no rows. Code that needs a write's result fails, and the
# revision is unanalysable. Without a connection (unit tests) a stand-in bind answers nothing.

_READ_STATEMENT = re.compile(
    r"(SELECT|SHOW|PRAGMA|EXPLAIN|DESCRIBE|DESC|VALUES|WITH|SET|BEGIN|SAVEPOINT|RELEASE|ROLLBACK)\b",
    re.IGNORECASE,
)
_WRITES_INSIDE = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE|INTO)\b", re.IGNORECASE)
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*\n?|/\*.*?\*/)+", re.DOTALL)


def is_read(statement: str) -> bool:
    """Whether a statement only reads (or sets the session up); anything else is recorded."""
    text = _LEADING_COMMENTS.sub("", statement)
    match = _READ_STATEMENT.match(text)
    if match is None:
        return False
    # SELECT ... INTO and a data-modifying WITH write
    return not (match.group(1).upper() in ("SELECT", "WITH") and _WRITES_INSIDE.search(text))


class _EmptyResult:
    """What the stand-in bind's execute() returns: no rows."""

    rowcount = 0

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def fetchall(self) -> list[Any]:
        return []

    def all(self) -> list[Any]:
        return []

    def fetchone(self) -> None:
        return None

    def first(self) -> None:
        return None

    def scalar(self) -> None:
        return None

    def scalars(self) -> _EmptyResult:
        return self

    def mappings(self) -> _EmptyResult:
        return self


class _RecordingBind:
    """`op.get_bind()` when recording without a connection: the target's dialect; execute() is
    recorded, not run."""

    def __init__(self, recorder: _Recorder, url: Any) -> None:
        self._recorder = recorder
        self.dialect = recorder.context.dialect
        self.engine = self
        self.url = url

    @property
    def name(self) -> str:
        return str(self.dialect.name)

    def execute(self, statement: Any, *args: Any, **kwargs: Any) -> _EmptyResult:
        self._recorder.record_sql(statement)
        return _EmptyResult()

    exec_driver_sql = execute


class RecordingConnection:
    """A real connection to the target for recording: one read-only transaction, rolled back at
    the end; statements that would write are handed to the current recorder and not run."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa  # deferred: worker start-up time: imported when a job needs it
        from sqlalchemy import event  # deferred: worker start-up time: imported when a job needs it

        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self._handed_over: Any = None  # the DBAPI connection `handover` keeps: not to be closed
        self._close_dbapi = self.engine.dialect.do_close
        self.engine.dialect.do_close = self._do_close  # type: ignore[method-assign]
        self.connection = self.engine.connect()
        self.transaction = self._read_only()
        self.recorder: _Recorder | None = None
        self.live = LiveSchema(self.connection)
        for name in ("do_execute", "do_execute_no_params", "do_executemany"):
            event.listen(self.engine, name, self._intercept)

    def _read_only(self) -> Any:
        """The transaction, read-only where the database can say so: a write that slips past
        the interception (a raw DB-API cursor) fails instead of running."""
        conn, dialect = self.connection, self.engine.dialect.name
        run = driver_sql(conn)
        transaction = conn.begin()
        if dialect == "postgresql":
            run("SET TRANSACTION READ ONLY")
        elif dialect == "sqlite":
            run("PRAGMA query_only = ON")
        elif dialect in ("mysql", "mariadb"):
            run("SET SESSION TRANSACTION READ ONLY")
            transaction.rollback()  # it applies from the next transaction on
            transaction = conn.begin()
        return transaction

    def _intercept(self, cursor: Any, statement: str, *rest: Any) -> bool:
        """DialectEvents.do_execute*: True (the statement is recorded, not run) unless it reads."""
        if self.recorder is None or is_read(statement):
            return False
        self.recorder.record_sql(statement)
        return True

    def close(self) -> None:
        """Roll back; offer the session to env.py's next connection (`handover`), else close it."""
        self.recorder = None
        try:
            if self.transaction.is_active:  # an ORM session's failed flush may have ended it
                self.transaction.rollback()
            self._hand_over()
        finally:
            self.connection.close()
            self.engine.dispose()

    def _hand_over(self) -> None:
        if self.connection.closed or self.connection.invalidated or self.connection.in_transaction():
            return  # lost, or something began another transaction: not ours to pass on
        fairy = self.connection.connection
        dbapi_connection = getattr(fairy, "dbapi_connection", None) or fairy.connection  # 1.3: .connection
        key = self.connection.info.get(handover.CONNECT_KEY)
        if handover.offer(key, dbapi_connection):
            self._handed_over = dbapi_connection

    def _do_close(self, dbapi_connection: Any) -> None:
        if dbapi_connection is not self._handed_over:
            self._close_dbapi(dbapi_connection)


@dataclass
class _BatchTarget:
    """The `impl` a batch operation reads its table from."""

    table_name: str
    schema: str | None


class _RecordingOperations(Operations):
    def __init__(self, context: Any, recorder: _Recorder) -> None:
        super().__init__(context)
        self._recorder = recorder

    def invoke(self, operation: Any) -> Any:  # type: ignore[override]
        return self._recorder.record(operation, batch=False)

    def get_bind(self) -> Any:
        self._recorder.bind_used = True
        return self._recorder.bind

    @contextlib.contextmanager
    def batch_alter_table(  # type: ignore[override]
        self, table_name: str, schema: str | None = None, *args: Any, **kwargs: Any
    ) -> Iterator[Any]:
        yield _RecordingBatch(self.migration_context, self._recorder, _BatchTarget(table_name, schema))


class _RecordingBatch(BatchOperations):
    def __init__(self, context: Any, recorder: _Recorder, target: _BatchTarget) -> None:
        super().__init__(context, impl=target)  # type: ignore[arg-type]
        self._recorder = recorder

    def invoke(self, operation: Any) -> Any:  # type: ignore[override]
        return self._recorder.record(operation, batch=True)

    def get_bind(self) -> Any:
        self._recorder.bind_used = True
        return self._recorder.bind


class _Recorder:
    """Runs one revision's upgrade() against recording operations."""

    def __init__(
        self,
        url: str,
        path: str,
        recording: RecordingConnection | None = None,
        environment: EnvironmentContext | None = None,
    ) -> None:
        from alembic.runtime.migration import (
            MigrationContext,  # deferred: worker start-up time (a warm spare preloads it)
        )
        from sqlalchemy.engine.url import (
            make_url,  # deferred: worker start-up time: imported when a job needs it
        )

        self.context = MigrationContext.configure(
            url=make_url(url),
            opts={"as_sql": True, "output_buffer": io.StringIO()},
            environment_context=environment,
        )
        self.renderer = Operations(self.context)
        self.operations = _RecordingOperations(self.context, self)
        self.path = os.path.realpath(path)
        self.ops: list[dict[str, Any]] = []
        self.recording = recording
        self.bind: Any = recording.connection if recording else _RecordingBind(self, make_url(url))
        self.bind_used = False

    def line(self) -> int:
        frame = sys._getframe(1)
        while frame is not None:
            if os.path.realpath(frame.f_code.co_filename) == self.path:
                return frame.f_lineno
            frame = frame.f_back  # type: ignore[assignment]
        return 0

    def record(self, operation: Any, batch: bool) -> Any:
        entry = recorded_operation(operation, self.context.dialect)
        entry.update(line=self.line(), batch=batch)
        if self.recording is not None:
            add_live_facts(entry, self.recording.live)
        buffer = self.context.impl.output_buffer = io.StringIO()
        try:
            result = self.renderer.invoke(operation)
        except Exception:  # a dialect that cannot render it offline (SQLite ALTERs): no SQL
            result = operation.to_table() if type(operation).__name__ == "CreateTableOp" else None
        entry["sql"] = buffer.getvalue().strip()
        self.ops.append(entry)
        return result

    def record_sql(self, statement: Any) -> None:
        text = statement if isinstance(statement, str) else str(statement)
        self.ops.append(
            {
                "op": "ExecuteSQLOp",
                "table": "",
                "schema": "",
                "sql": text,
                "text": f"execute {short_text(text)}",
                "line": self.line(),
                "batch": False,
                "via_bind": True,
            }
        )


# The per-operation check: a revision the recording could not follow runs for real (one
# transaction, where DDL is transactional) and each operation is checked just before it runs,


def record_revision(
    module: Any,
    path: str,
    revision: str,
    url: str,
    recording: RecordingConnection | None = None,
    environment: EnvironmentContext | None = None,
) -> dict[str, Any]:
    """Run `module.upgrade()` with `op` recording, for the database of `url`: through
    `recording`'s read-only connection when given, else never connected.

    {revision, path, ops, error, error_line, error_kind}. `error_kind` "fails": the revision's
    own code raised in its file without having asked for the bind, so running it fails the same
    way (the guard lets the run report it); "unanalysable": anything else (library code choking on
    the recording bind, a write's missing result, reflection of what the plan creates)."""
    recorder = _Recorder(url, path, recording, environment)
    _proxy_to(recorder.operations)
    if recording is not None:
        recording.recorder = recorder
    error, line, kind = None, 0, ""
    try:
        for upgrade in _upgrade_functions(module):
            upgrade()
    except Exception as exc:  # user code: anything
        line, raised_here = _error_line(exc, recorder.path)
        error = redact(f"{type(exc).__name__}: {exc}")
        own = raised_here and not (recorder.bind_used and _from_the_bind(exc))
        kind = "fails" if own else "unanalysable"
    finally:
        _proxy_to(None)
        if recording is not None:
            recording.recorder = None
    return {
        "revision": revision,
        "path": path,
        "ops": recorder.ops,
        "error": error,
        "error_line": line,
        "error_kind": kind,
    }


_DATABASE_MODULES = frozenset(
    {
        "sqlalchemy",
        "sqlite3",
        "_sqlite3",
        "psycopg",
        "psycopg2",
        "pymysql",
        "MySQLdb",
        "mysql",
        "mariadb",
        "asyncpg",
        "pg8000",
    }
)


def _from_the_bind(exc: BaseException) -> bool:
    """Whether an error may come from the recording bind (a database's refusal of a write, an
    empty result's missing row) rather than from the revision's own logic."""
    root = type(exc).__module__.split(".")[0]
    return isinstance(exc, (TypeError, AttributeError, LookupError)) or root in _DATABASE_MODULES


def _upgrade_functions(module: Any) -> list[Callable[[], Any]]:
    """`upgrade`, or for a multi-database revision (`upgrade(engine_name)` dispatching to
    `upgrade_<name>()`, Flask-Migrate's multidb template) each of those."""

    upgrade = module.upgrade
    if not inspect.signature(upgrade).parameters:
        return [upgrade]
    per_engine = [
        f for name, f in sorted(vars(module).items()) if name.startswith("upgrade_") and callable(f)
    ]
    return per_engine or [upgrade]


def _proxy_to(operations: Operations | None) -> None:
    """Point `alembic.op` at `operations` (None: unset), as Operations.context() does for its own
    instances; its registry is keyed by class, so a subclass instance is installed by hand."""
    attr_names, modules = Operations._setups[Operations]
    for globals_, _locals in modules:
        globals_["_proxy"] = operations
        for name in attr_names:
            if operations is not None:
                globals_[name] = getattr(operations, name)
            else:
                globals_.pop(name, None)


def _error_line(exc: BaseException, path: str) -> tuple[int, bool]:
    """The last line of the revision file in the traceback, and whether the error was raised there."""
    line, last_file = 0, ""
    tb = exc.__traceback__
    while tb is not None:
        last_file = os.path.realpath(tb.tb_frame.f_code.co_filename)
        if last_file == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line, last_file == path
