"""The normalised-AST hash of a revision file's source."""

from __future__ import annotations

from reconciler.core import headers
from tests.builders import revision_source


def test_hash_ignores_what_formatters_do_to_docstrings() -> None:
    """black / ruff format strip trailing spaces in docstrings and re-indent them; the docstring's
    text still counts, and every other string counts exactly."""
    source = revision_source("a0", None, "pass", "pass", "create things", None, None)
    assert "Revises: \n" in source  # as Alembic's template writes a base revision
    with_doc = source.replace(
        "def upgrade():\n", 'def upgrade():\n    """Create.\n\n       Indented.   \n    """\n'
    )
    formatted = with_doc.replace("Revises: \n", "Revises:\n").replace("       Indented.   ", "    Indented.")
    assert formatted != with_doc
    assert headers.source_hash(formatted.encode()) == headers.source_hash(with_doc.encode())
    reworded = formatted.replace("Indented.", "Indented differently.")
    assert headers.source_hash(reworded.encode()) != headers.source_hash(formatted.encode())
    sql = [
        revision_source("a0", None, body, "pass", "m", None, None)
        for body in ('op.execute("SELECT 1 ")', 'op.execute("SELECT 1")')
    ]
    assert headers.source_hash(sql[0].encode()) != headers.source_hash(sql[1].encode())
