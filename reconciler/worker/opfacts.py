"""An operation as the guard's input: its recorded dict, column type facts and the live schema's facts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from reconciler.worker.generated import columns_of, describe_operation, type_info


class LiveSchema:
    """What the database has now, for what a revision does not say (reflection, cached)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._inspector: Any = None

    def _reflect(self, method: str, table: str, schema: str | None) -> list[dict[str, Any]]:
        import sqlalchemy as sa  # deferred: worker start-up time: imported when a job needs it

        try:
            if self._inspector is None:
                self._inspector = sa.inspect(self._connection)
            return list(getattr(self._inspector, method)(table, schema=schema or None))
        except Exception:  # a table the plan creates, or one we may not read: not known
            return []

    def column_type(self, table: str, schema: str | None, column: str) -> Any:
        """The column's type as the database has it (None: no such table or column)."""
        columns = self._reflect("get_columns", table, schema)
        return next((c["type"] for c in columns if c["name"] == column), None)

    def foreign_key_columns(self, table: str, schema: str | None, name: str) -> list[str]:
        """The columns of the foreign key `name` on `table` ([] when there is none)."""
        keys = self._reflect("get_foreign_keys", table, schema)
        return next((list(k["constrained_columns"]) for k in keys if k.get("name") == name), [])


def add_live_facts(entry: dict[str, Any], live: LiveSchema) -> None:
    """Complete a recorded operation from the live schema: the old type of a type change that
    names no existing_type, the columns of a dropped foreign key."""
    table, schema = entry.get("table") or "", entry.get("schema") or None
    if entry.get("op") == "AlterColumnOp" and entry.get("new_type") and not entry.get("existing_type"):
        found = live.column_type(table, schema, str(entry.get("column")))
        if found is not None:
            entry["existing_type"] = type_info(found)
            entry["existing_type_from"] = "database"
    if entry.get("op") == "DropConstraintOp" and entry.get("name"):
        columns = live.foreign_key_columns(table, schema, str(entry["name"]))
        if columns:
            entry["columns"] = columns
            entry["constraint_type"] = entry.get("constraint_type") or "foreignkey"


def recorded_operation(op: Any, dialect: Any) -> dict[str, Any]:
    """One Alembic operation as plain data for safety.classify."""
    name = type(op).__name__
    entry: dict[str, Any] = {
        "op": name,
        "table": str(getattr(op, "table_name", None) or getattr(op, "source_table", None) or ""),
        "schema": str(getattr(op, "schema", None) or getattr(op, "source_schema", None) or ""),
        "text": describe_operation(op, dialect).text,
    }
    extra = _RECORDED.get(name)
    if extra is not None:
        with contextlib.suppress(Exception):  # a hand-made operation missing an attribute
            entry.update(extra(op))
    return entry


def _recorded_alter(op: Any) -> dict[str, Any]:
    return {
        "column": str(op.column_name),
        "existing_type": type_info(op.existing_type),
        "new_type": type_info(op.modify_type),
        "nullable": op.modify_nullable,
        "existing_server_default": op.existing_server_default not in (None, False),
        "new_name": getattr(op, "modify_name", None),
    }


def _recorded_add_column(op: Any) -> dict[str, Any]:
    column = op.column
    return {
        "column": str(column.name),
        "nullable": bool(column.nullable),
        "server_default": column.server_default is not None,
        "type": type_info(column.type),
    }


_RECORDED: dict[str, Callable[[Any], dict[str, Any]]] = {
    "CreateTableOp": lambda op: {"columns": [str(c.name) for c in columns_of(op.columns)]},
    "AddColumnOp": _recorded_add_column,
    "DropColumnOp": lambda op: {"column": str(op.column_name)},
    "AlterColumnOp": _recorded_alter,
    "CreateIndexOp": lambda op: {
        "name": str(op.index_name or ""),
        "unique": bool(op.unique),
        "concurrently": bool((op.kw or {}).get("postgresql_concurrently")),
    },
    "DropIndexOp": lambda op: {"name": str(op.index_name or "")},
    "DropConstraintOp": lambda op: {
        "name": str(op.constraint_name or ""),
        "constraint_type": str(op.constraint_type or ""),
    },
    "RenameTableOp": lambda op: {"new_table": str(op.new_table_name)},
    "ExecuteSQLOp": lambda op: {"sql_text": op.sqltext if isinstance(op.sqltext, str) else str(op.sqltext)},
    "BulkInsertOp": lambda op: {"table": str(getattr(op.table, "name", op.table))},
    "CreateForeignKeyOp": lambda op: {
        "name": str(op.constraint_name or ""),
        "constraint_type": "foreignkey",
        "columns": [str(c) for c in op.local_cols],
        "ondelete": (op.kw or {}).get("ondelete"),
    },
    "CreateUniqueConstraintOp": lambda op: {
        "name": str(op.constraint_name or ""),
        "constraint_type": "unique",
    },
    "CreateCheckConstraintOp": lambda op: {"name": str(op.constraint_name or ""), "constraint_type": "check"},
    "CreatePrimaryKeyOp": lambda op: {"name": str(op.constraint_name or ""), "constraint_type": "primary"},
}
