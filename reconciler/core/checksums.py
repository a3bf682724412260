"""Checksums of applied revisions: which changed, vanished, or were never recorded. Pure, no I/O.

The journal holds, per revision, the file hash of the newest row that says it is applied
(`db.hashes.recorded_hashes`). Against the revision graph that gives:

- **mismatch**: an applied revision whose file hash differs from the recorded one, or a recorded
  revision whose file is gone while the database does not hold it as `ahead` (an old replica or
  an app rollback sees newer revisions it has no file for: that is normal, not a mismatch);
- **unrecorded**: applied (per the version table) with no recorded hash: revisions applied before
  the journal existed (recorded on first sight), or by something that does not write our journal
  (a foreign writer, e.g. an app that upgrades itself at start-up);
- **sealed**: applied as a dev-mode draft and sealed since: its sealed hash is recorded as is.

Dev mode's drafts are exempt while they are drafts: they are rewritten on every save.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.core.graph import RevisionGraph

DRAFT_TRIGGER = "draft"  # the journal trigger dev mode applies its draft revisions with


@dataclass(frozen=True)
class HashRecord:
    """The newest journal row that says a revision is applied: its file hash, operation and trigger."""

    revision: str
    file_hash: str
    operation: str
    trigger: str


@dataclass(frozen=True)
class Mismatch:
    revision: str
    file: str  # "" when the file is gone
    recorded: str
    current: str  # "" when the file is gone

    @property
    def vanished(self) -> bool:
        return not self.file

    def as_dict(self) -> dict[str, str | bool]:
        return {
            "revision": self.revision,
            "file": self.file,
            "recorded_hash": self.recorded,
            "current_hash": self.current,
            "vanished": self.vanished,
        }

    def describe(self) -> str:
        if self.vanished:
            return f"{self.revision} (file gone; recorded {self.recorded[:12]})"
        return f"{self.file} ({self.revision}: recorded {self.recorded[:12]}, now {self.current[:12]})"


@dataclass(frozen=True)
class Audit:
    mismatches: tuple[Mismatch, ...] = ()
    unrecorded: tuple[str, ...] = ()
    sealed: tuple[str, ...] = ()


def audit(
    graph: RevisionGraph,
    db_heads: Iterable[str],
    held: Mapping[str, HashRecord],
    ancestry: Mapping[str, tuple[str, ...]],
) -> Audit:
    heads = frozenset(db_heads)
    applied = graph.closure(h for h in heads if h in graph.revisions)
    mismatches: list[Mismatch] = []
    unrecorded: list[str] = []
    sealed: list[str] = []
    for rev in graph.topological(applied):
        revision = graph.revisions[rev]
        record = held.get(rev)
        if record is None or not record.file_hash:
            unrecorded.append(rev)
        elif revision.draft or record.file_hash == revision.file_hash:
            continue
        elif record.trigger == DRAFT_TRIGGER:  # applied as a draft, sealed since
            sealed.append(rev)
        else:
            mismatches.append(Mismatch(rev, str(revision.path), record.file_hash, revision.file_hash))
    ahead = _ahead_part(heads - set(graph.revisions), ancestry, graph)
    for rev in sorted(set(held) - set(graph.revisions) - ahead):
        record = held[rev]
        if record.file_hash and record.trigger != DRAFT_TRIGGER:
            mismatches.append(Mismatch(rev, "", record.file_hash, ""))
    return Audit(tuple(mismatches), tuple(unrecorded), tuple(sealed))


def _ahead_part(
    unknown: Iterable[str], ancestry: Mapping[str, tuple[str, ...]], graph: RevisionGraph
) -> frozenset[str]:
    """The revisions the database holds beyond the repository: unknown heads and, through the
    journal's ancestry, their unknown ancestors."""
    seen: set[str] = set()
    stack = list(unknown)
    while stack:
        rev = stack.pop()
        if rev in seen or rev in graph.revisions:
            continue
        seen.add(rev)
        stack.extend(ancestry.get(rev, ()))
    return frozenset(seen)
