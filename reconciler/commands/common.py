"""Helpers shared by several commands modules: difference listings, revision ids."""

from __future__ import annotations

from typing import Any

from reconciler.control.reading import read_graph
from reconciler.control.target import TargetHandle
from reconciler.errors import ConfigError


def listing(found: list[Any]) -> str:
    """Differences as the indented `  - text` lines the errors list."""
    return "\n".join(f"  - {d['text']}" for d in found)


def revision_id(handle: TargetHandle, revision: str) -> str:
    """A full id, a label or a prefix of a known revision; any other text as it is (the journal
    also holds revisions whose files are gone)."""
    try:
        return read_graph(handle).resolve(revision)
    except ConfigError:
        return revision
