"""Non-transactional sections: telling the control plane when a revision leaves its transaction."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

_DML = frozenset(
    {
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "REPLACE",
        "WITH",
        "SHOW",
        "DESCRIBE",
        "DESC",
        "EXPLAIN",
        "VALUES",
        "TABLE",
        "SAVEPOINT",
        "RELEASE",
        "DO",
        "CALL",
    }
)
_FIRST_WORD = re.compile(r"^[\s(]*([A-Za-z]+)")
_ENDS_TRANSACTION = frozenset({"COMMIT", "END"})  # PostgreSQL, SQLite: `op.execute("COMMIT")`


# --- non-transactional sections -------------------------------------------------------------------
class SectionWatch:
    """Reports, once per revision being upgraded, the moment it leaves its transaction: entering
    `autocommit_block()` (which commits what ran before it), DDL that commits implicitly (every
    statement but plain DML on MySQL / MariaDB), a `COMMIT` of its own, or a statement on a
    PostgreSQL connection in autocommit mode. `report(revision, reason)` runs before that
    statement (the worker waits there until the control plane has journaled it); an exception
    from it fails the revision while it can still be rolled back. A raw DB-API cursor of the
    revision's own is not seen."""

    def __init__(self) -> None:
        self.report: Callable[[str, str], None] | None = None
        self.revision: str | None = None
        self.reported = False

    def begin(self, revision: str | None) -> None:
        self.revision, self.reported = revision, False

    def end(self) -> None:
        self.revision, self.reported = None, False

    def note(self, reason: str) -> None:
        if self.revision is None or self.reported or self.report is None:
            return
        self.reported = True
        self.report(self.revision, reason)

    def before_execute(self, conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.revision is None or self.reported:
            return
        reason = non_transactional_reason(conn, statement)
        if reason:
            self.note(reason)


def non_transactional_reason(conn: Any, statement: str) -> str:
    """Why `statement` on `conn` cannot be rolled back with its revision ("" when it can)."""
    match = _FIRST_WORD.match(statement or "")
    word = match.group(1).upper() if match else ""
    dialect = conn.dialect.name
    if dialect in ("mysql", "mariadb"):
        if word in _DML or (word == "SET" and "AUTOCOMMIT" not in statement.upper()):
            return ""
        return f"{word or 'a statement'} commits implicitly on {dialect}"
    if word in _ENDS_TRANSACTION:
        return f"the revision runs {word}"
    raw = getattr(conn.connection, "dbapi_connection", None) or getattr(conn.connection, "connection", None)
    if dialect == "postgresql" and getattr(raw, "autocommit", False) is True:
        return "a statement in autocommit mode"
    return ""


SECTIONS = SectionWatch()  # the worker runs one revision at a time


def watch_sections() -> None:
    """Install SECTIONS' listeners (once per worker process)."""
    from alembic.runtime.migration import (
        MigrationContext,  # deferred: worker start-up time (a warm spare preloads it)
    )
    from sqlalchemy import event  # deferred: worker start-up time: imported when a job needs it
    from sqlalchemy.engine import Engine  # deferred: worker start-up time: imported when a job needs it

    if getattr(MigrationContext.autocommit_block, "_watched", False):
        return
    original = MigrationContext.autocommit_block

    @contextlib.contextmanager
    def autocommit_block(self: Any) -> Iterator[Any]:
        SECTIONS.note("an autocommit block (it commits what ran before it)")
        with original(self) as value:
            yield value

    autocommit_block._watched = True  # type: ignore[attr-defined]
    MigrationContext.autocommit_block = autocommit_block  # type: ignore[method-assign,assignment]
    event.listen(Engine, "before_cursor_execute", SECTIONS.before_execute)
