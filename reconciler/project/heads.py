"""The HEADS marker: `migrations/HEADS`, a committed text file, one head revision id per line, sorted.

Every writer of ours keeps it equal to the graph's heads, so two branches that each add a revision
change the same line of it and conflict in git before they merge, instead of making two heads
that only main's CI finds. `check` compares it with the graph; `heads --write` rewrites it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reconciler import logs
from reconciler.redact import redact
from reconciler.settings import Settings

log = logs.get("reconciler.admin")

FILE_NAME = "HEADS"
CONFLICT_MARKS = ("<<<<<<<", "=======", ">>>>>>>", "|||||||")


@dataclass(frozen=True)
class Marker:
    """What the file says: `listed` None when there is no file; `conflicted` when git left its
    merge markers in it."""

    path: Path
    listed: tuple[str, ...] | None
    conflicted: bool = False


def path_for(settings: Settings) -> Path:
    return settings.migrations_dir / FILE_NAME


def render(heads: Iterable[str]) -> str:
    return "".join(f"{head}\n" for head in sorted(set(heads)))


def read(path: Path) -> Marker:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Marker(path, None)
    lines = [line.strip() for line in text.splitlines()]
    conflicted = any(line.startswith(CONFLICT_MARKS) for line in lines)
    listed = tuple(line for line in lines if line and not line.startswith(CONFLICT_MARKS))
    return Marker(path, listed, conflicted)


def keep(settings: Settings, heads: Iterable[str]) -> bool:
    """Write the marker for `heads` unless it already says exactly that; True when written."""
    path = path_for(settings)
    if not settings.migrations_dir.is_dir():
        return False
    text = render(heads)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{FILE_NAME}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # never half a file
    log.info("heads_written", path=redact(str(path)), heads=sorted(set(heads)))
    return True


def disagreement(marker: Marker, heads: Iterable[str]) -> str | None:
    """Why the marker does not match the graph's `heads`, and the exact fix; None when it does
    (or when there is no marker: a project that has not adopted it)."""
    wanted = tuple(sorted(set(heads)))
    if marker.listed is None:
        return None
    name = marker.path.name
    if marker.conflicted:
        return (
            f"{marker.path} has git's merge-conflict markers: two branches each added a revision. "
            f"Run `reconciler rebase` (one linear history; it rewrites {name}), then commit"
        )
    if tuple(sorted(set(marker.listed))) == wanted:
        return None
    said = ", ".join(marker.listed) or "no head"
    if len(wanted) > 1:
        return (
            f"{marker.path} lists {said}, but the revision graph has {len(wanted)} heads "
            f"({', '.join(wanted)}): run `reconciler rebase` (one linear history) or "
            f"`reconciler merge` (a merge revision); either rewrites {name}, then commit it"
        )
    return (
        f"{marker.path} lists {said}, but the revision graph's head is {', '.join(wanted) or 'none'} "
        f"(a revision written or removed without reconciler, e.g. by `flask db migrate`): run "
        f"`reconciler heads --write` and commit {name}"
    )
