"""Hooks a project's own env.py can use so Alembic leaves our bookkeeping tables alone.

Standard library only: a project's env.py may import this without anything else of ours.
The worker already excludes these tables on its own; use these when you run `alembic` or
`flask db` yourself:

    from reconciler.hooks import exclude_reconciler_tables
    context.configure(..., include_object=exclude_reconciler_tables)
"""

from __future__ import annotations

from typing import Any

RECONCILER_TABLES = frozenset({"reconciler_journal", "reconciler_journal_flags"})


def exclude_reconciler_tables(
    object: Any,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: Any,
) -> bool:
    """Alembic `include_object` hook: False for our journal tables, True for everything else."""
    return not (type_ == "table" and name in RECONCILER_TABLES)


def exclude_reconciler_table_names(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic `include_name` hook: skip reflecting our journal tables at all."""
    return not (type_ == "table" and name in RECONCILER_TABLES)
