"""The guard's per-operation check of a revision while it really runs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from alembic.operations import Operations

from reconciler.core.safety import OperationCheck
from reconciler.errors import Refused
from reconciler.worker.generated import describe_operation
from reconciler.worker.opfacts import LiveSchema, add_live_facts, recorded_operation

# with the live schema at hand; a data loss raises Refused there and the transaction rolls back.
# Statements sent through the bind itself are checked for raw SQL that drops or deletes.


@contextlib.contextmanager
def checking_operations(module: Any, path: str, revision: str, check: Mapping[str, Any]) -> Iterator[None]:
    import alembic.operations.base  # deferred: worker start-up time (a warm spare preloads it)
    import sqlalchemy as sa  # deferred: worker start-up time: imported when a job needs it
    from sqlalchemy import event  # deferred: worker start-up time: imported when a job needs it

    rules = OperationCheck([str(t) for t in check.get("created") or ()])
    state = {"inside": False, "depth": 0}
    real_path = os.path.realpath(path)
    # Operations and BatchOperations share invoke: AbstractOperations' from Alembic 1.11 on
    base: Any = getattr(alembic.operations.base, "AbstractOperations", Operations)
    original_invoke = base.invoke
    original_upgrade = module.upgrade

    def refuse(reasons: list[str], line: int, why: str = "as it ran it would have lost data") -> None:
        where = f"{Path(path).name}:{line}" if line else Path(path).name
        raise Refused(
            f"revision {revision} ({where}) was rolled back, nothing of it applied: its upgrade() "
            f"could not be analysed ahead, and {why}: {'; '.join(reasons)} — check the revision "
            "and add `allow_destructive = True` to its file, or set [safety] allow_destructive = "
            "true"
        )

    def invoke(self: Any, operation: Any) -> Any:
        if state["inside"] and state["depth"] == 0:
            if not self.migration_context.impl.transactional_ddl:  # env.py turned it off
                refuse(
                    [f"{describe_operation(operation, self.migration_context.dialect).text}"],
                    _caller_line(real_path),
                    "env.py turned transactional_ddl off, so its DDL could not be rolled back",
                )
            entry = recorded_operation(operation, self.migration_context.dialect)
            add_live_facts(entry, LiveSchema(self.migration_context.bind))
            reasons = rules.before(entry)
            if reasons:
                refuse(reasons, _caller_line(real_path))
        state["depth"] += 1
        try:
            return original_invoke(self, operation)
        finally:
            state["depth"] -= 1

    def upgrade(*args: Any, **kwargs: Any) -> Any:
        state["inside"] = True
        try:
            result = original_upgrade(*args, **kwargs)
        finally:
            state["inside"] = False
        left = rules.at_end()
        if left:
            refuse([r for op in left for r in OperationCheck.reasons(op)], int(left[0].get("line") or 0))
        return result

    def statement(conn: Any, cursor: Any, text: str, *rest: Any) -> None:
        if state["inside"] and state["depth"] == 0:
            reasons = OperationCheck.reasons({"op": "ExecuteSQLOp", "sql_text": text})
            if reasons:
                refuse(reasons, _caller_line(real_path))

    base.invoke = invoke
    module.upgrade = upgrade
    event.listen(sa.engine.Engine, "before_cursor_execute", statement)
    try:
        yield
    finally:
        event.remove(sa.engine.Engine, "before_cursor_execute", statement)
        module.upgrade = original_upgrade
        base.invoke = original_invoke


def _caller_line(path: str) -> int:
    frame = sys._getframe(1)
    while frame is not None:
        if os.path.realpath(frame.f_code.co_filename) == path:
            return frame.f_lineno
        frame = frame.f_back  # type: ignore[assignment]
    return 0
