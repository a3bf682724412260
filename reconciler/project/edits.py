"""Edits to the files of the user's project: the journal filter written into a new env.py, and the
rewrites of revision files (a draft sealed, re-parented or confirmed)."""

from __future__ import annotations

import re
from pathlib import Path

from reconciler import logs
from reconciler.errors import ConfigError
from reconciler.project.alembic_ini import alembic_ini_path, read_option
from reconciler.redact import redact
from reconciler.settings import Settings

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


# --- revision files ----------------------------------------------------------------------------
# the marker line alone: `[ \t]*` not `\s*`, which would eat the blank lines after it (E302)
DRAFT_LINE = re.compile(r"(?m)^draft[ \t]*(:[ \t]*bool)?[ \t]*=[ \t]*True[ \t]*(#[^\n]*)?\r?\n")
_WORDS = re.compile(r"\w+")
_DOWN_REVISION = re.compile(r"(?m)^(down_revision\s*(?::[^=\n]*)?=[ \t]*)([^\n]*?)([ \t]*#[^\n]*)?$")
_REVISES = re.compile(r"(?m)^Revises:[^\n]*$")


def sealed_text(text: str, old: str, new: str) -> str:
    """A draft's text sealed: its `draft = True` line gone (never the blank lines around it), the
    message `new` in place of `old` as the docstring's first line (the template's `\"\"\"${message}`)."""
    text = DRAFT_LINE.sub("", text, count=1)
    for quote in ('"""', "'''"):
        if old and text.startswith(quote + old):
            return quote + new + text[len(quote + old) :]
    if old and old in text:
        return text.replace(old, new, 1)
    return text


def confirmed_text(text: str) -> str:
    """A held-back revision's text with `allow_destructive = True` (the marker prod honours too)."""
    if re.search(r"(?m)^allow_destructive\s*=\s*True", text):
        return text
    return re.sub(r"(?m)^(depends_on\s*=.*)$", r"\1\nallow_destructive = True", text, count=1)


def reparented(text: str, head: str, fix: str = "seal it and run `reconciler merge`") -> str:
    """A revision file's text with its parent set to `head`: the `down_revision` assignment (in
    the quotes it had) and the docstring's "Revises:" line, as the template renders them; nothing
    else. `fix` ends the error when there is no such line."""

    def parent(m: re.Match[str]) -> str:
        quote = '"' if m.group(2).startswith('"') else "'"
        return f"{m.group(1)}{quote}{head}{quote}{m.group(3) or ''}"

    text, count = _DOWN_REVISION.subn(parent, text, count=1)
    if count != 1:
        raise ConfigError(f"the revision has no literal `down_revision = ...` line to re-parent; {fix}")
    return _REVISES.sub(f"Revises: {head}", text, count=1)


def alembic_slug(message: str, length: int = 40) -> str:
    """The slug Alembic puts in a revision's file name (`ScriptDirectory._rev_path`)."""
    slug = "_".join(_WORDS.findall(message or "")).lower()
    if len(slug) > length:
        slug = slug[:length].rsplit("_", 1)[0] + "_"
    return slug


def sealed_name(name: str, revision: str, old: str, new: str, length: int = 40) -> str:
    """The draft's file name with its slug for the new message; the rest of the name (alembic.ini's
    `file_template`: dates, epoch) is kept. A name without the old slug becomes `REV_SLUG.py`."""
    old_slug, new_slug = alembic_slug(old, length), alembic_slug(new, length)
    stem = name[:-3] if name.endswith(".py") else name
    if old_slug and stem.endswith(old_slug):
        return f"{stem[: len(stem) - len(old_slug)]}{new_slug}.py"
    return f"{revision}_{new_slug}.py"


def slug_length(settings: Settings) -> int:
    """alembic.ini's `truncate_slug_length` (Alembic's default 40)."""
    ini = alembic_ini_path(settings)
    value = read_option(ini, "truncate_slug_length") if ini is not None else None
    try:
        return int(value) if value else 40
    except ValueError:
        return 40


def write_replacing(old: Path, target: Path, text: str) -> None:
    """Write `text` as `target` through a temporary file (never half a file), then remove `old`
    if it was another file. Newlines are written as they are in `text`."""
    tmp = target.with_suffix(".py.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as out:  # write_text(newline=) is 3.10+
        out.write(text)
    tmp.replace(target)
    if target != old:
        old.unlink()
