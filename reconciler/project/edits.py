"""Edits to the files of the user's project: the journal filter written into a new env.py."""

from __future__ import annotations

from pathlib import Path

from reconciler import logs
from reconciler.redact import redact

log = logs.get("reconciler.admin")

JOURNAL_FILTER = """

RECONCILER_TABLES = {{{tables}}}


def exclude_reconciler_tables(object, name, type_, reflected, compare_to):
    # schema-reconciler keeps its journal beside the models' tables
    # ([journal] placement = "default"): autogenerate must leave it alone
    return not (type_ == "table" and name in RECONCILER_TABLES)

"""
# (the template's text, the same with the filter) for Flask-Migrate's and Alembic's env.py
_FILTER_EDITS = (
    (
        """        conf_args["process_revision_directives"] = process_revision_directives
""",
        """        conf_args["process_revision_directives"] = process_revision_directives
    conf_args.setdefault("include_object", exclude_reconciler_tables)
""",
    ),
    (
        "connection=connection, target_metadata=target_metadata\n",
        "connection=connection, target_metadata=target_metadata,\n"
        "            include_object=exclude_reconciler_tables,\n",
    ),
)


def write_journal_filter(env_py: Path, table: str) -> None:
    """A new env.py gets the journal filter when the journal's placement cannot hide it from
    autogenerate (`[journal] placement = "default"`): a function of its own, so env.py does not
    import reconciler (an app image may not have it)."""
    text = env_py.read_text(encoding="utf-8")
    for old, new in _FILTER_EDITS:
        if old in text and "def run_migrations_offline" in text:
            names = ", ".join(repr(n) for n in (table, f"{table}_flags"))
            text = text.replace(old, new, 1).replace(
                "\n\ndef run_migrations_offline",
                JOURNAL_FILTER.format(tables=names).rstrip("\n") + "\n\n\ndef run_migrations_offline",
                1,
            )
            env_py.write_text(text, encoding="utf-8")
            log.info(
                "journal_filter_written",
                env_py=redact(str(env_py)),
                reason="[journal] placement = default keeps the journal beside the models' tables",
            )
            return
    log.warning(
        "journal_filter_not_written",
        env_py=redact(str(env_py)),
        hint="add include_object=exclude_reconciler_tables (reconciler.hooks) to env.py's "
        "context.configure: this env.py has an unknown layout",
    )
