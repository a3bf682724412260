"""The revision graph: revisions (from their headers) and the validated, immutable graph over them.

Pure: the revisions come from `core.headers` (files read by `project.revisions`); nothing here
touches the file system.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from reconciler.errors import ConfigError


class GraphError(ConfigError):
    """The revisions do not form a valid graph: duplicate ids or labels, a cycle."""


class MissingRevision(GraphError):
    """A down_revision / depends_on names a revision that is not there (maybe not written yet)."""

    def __init__(self, message: str, path: Path, revision: str, missing: str) -> None:
        super().__init__(message)
        self.path = path
        self.revision = revision
        self.missing = missing


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revisions: tuple[str, ...]
    branch_labels: tuple[str, ...]
    depends_on: tuple[str, ...]  # as written: revision ids or branch labels
    path: Path
    message: str
    file_hash: str
    allow_destructive: bool = False
    draft: bool = False


# --- the graph --------------------------------------------------------------------------------


class RevisionGraph:
    """An immutable revision graph. Build it with `build_graph` (which validates it).

    Edges run from a revision to its parents: its down_revisions and its depends_on (resolved to
    revision ids), so ancestry includes dependencies and they are ordered first.
    """

    __slots__ = (
        "_ancestors",
        "_bases",
        "_complete",
        "_depth",
        "_fingerprint",
        "_heads",
        "_labels",
        "_order",
        "_parents",
        "_revisions",
        "_version_heads",
    )

    def __init__(
        self,
        revisions: Mapping[str, Revision],
        parents: Mapping[str, tuple[str, ...]],
        labels: Mapping[str, str],
        complete: bool = True,
    ) -> None:
        self._revisions = MappingProxyType(dict(revisions))
        self._parents = dict(parents)
        self._labels = dict(labels)
        self._complete = complete
        named = {d for rev in self._revisions.values() for d in rev.down_revisions}
        reached = {p for ps in self._parents.values() for p in ps}
        self._heads = tuple(sorted(r for r in self._revisions if r not in named))
        self._version_heads = tuple(sorted(r for r in self._revisions if r not in reached))
        self._bases = tuple(sorted(r for r, v in self._revisions.items() if not v.down_revisions))
        self._depth = _depths(self._parents)
        self._order = sorted(self._revisions, key=lambda r: (self._depth[r], r))
        self._ancestors: dict[str, frozenset[str]] = {}
        self._fingerprint = _graph_fingerprint(self._revisions.values())

    @property
    def revisions(self) -> Mapping[str, Revision]:
        return self._revisions

    @property
    def complete(self) -> bool:
        """False when built `partial`: files awaiting the worker may hold referenced revisions."""
        return self._complete

    @property
    def heads(self) -> tuple[str, ...]:
        """Alembic's heads: revisions no other revision names as down_revision (sorted)."""
        return self._heads

    @property
    def version_heads(self) -> tuple[str, ...]:
        """The rows a fully upgraded version table holds: heads no other revision depends on.

        Alembic never keeps a row for a revision that another row reaches through depends_on, so
        this, not `heads`, is what "in sync" compares against.
        """
        return self._version_heads

    @property
    def bases(self) -> tuple[str, ...]:
        """Revisions without a down_revision (sorted)."""
        return self._bases

    @property
    def fingerprint(self) -> str:
        """A stable hash of every revision's header and file hash."""
        return self._fingerprint

    def __contains__(self, rev: object) -> bool:
        return rev in self._revisions

    def __len__(self) -> int:
        return len(self._revisions)

    def depth(self, rev: str) -> int:
        """Length of the longest ancestor chain below `rev` (a base has 0)."""
        self._known(rev)
        return self._depth[rev]

    def ancestors(self, rev: str) -> frozenset[str]:
        """`rev` and everything below it, through down_revisions and depends_on."""
        cached = self._ancestors.get(rev)
        if cached is None:
            cached = self.closure([rev])
            self._ancestors[rev] = cached
        return cached

    def closure(self, revs: Iterable[str]) -> frozenset[str]:
        """The union of the ancestors of `revs`."""
        seen: set[str] = set()
        stack = [self._known(r) for r in revs]
        while stack:
            rev = stack.pop()
            if rev not in seen:
                seen.add(rev)
                stack.extend(self._parents[rev])
        return frozenset(seen)

    def topological(self, revs: Iterable[str]) -> list[str]:
        """`revs` ordered ancestors (and dependencies) first; ties by depth, then id."""
        wanted = {self._known(r) for r in revs}
        return [r for r in self._order if r in wanted]

    def newest_first(self) -> list[str]:
        """Every revision, descendants before their ancestors (for `history`)."""
        return self._order[::-1]

    def branch_labels_of(self, rev: str) -> tuple[str, ...]:
        """Labels declared by `rev` or by a revision below it along down_revisions (sorted)."""
        labels: set[str] = set()
        seen: set[str] = set()
        stack = [self._known(rev)]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            revision = self._revisions[current]
            labels.update(revision.branch_labels)
            stack.extend(d for d in revision.down_revisions if d in self._revisions)
        return tuple(sorted(labels))

    def resolve(self, ident: str) -> str:
        """The full id for a revision id, a branch label or an unambiguous id prefix.

        `head`, `heads` and `base` are the caller's to handle.
        """
        if ident in self._revisions:
            return ident
        if ident in self._labels:
            return self._labels[ident]
        candidates = sorted(r for r in self._revisions if len(r) > 3 and r.startswith(ident))
        if len(candidates) == 1 and ident:
            return candidates[0]
        if len(candidates) > 1 and ident:
            raise ConfigError(
                f"revision prefix {ident!r} is ambiguous: {', '.join(candidates[:5])}"
                f"{' ...' if len(candidates) > 5 else ''}; give more characters"
            )
        hint = " (give at least 4 characters of an id)" if len(ident) < 4 else ""
        raise ConfigError(
            f"no revision or branch label {ident!r} among {len(self._revisions)} revisions"
            f"{hint}; `reconciler history` lists them"
        )

    def _known(self, rev: str) -> str:
        if rev not in self._revisions:
            raise ConfigError(
                f"revision {rev!r} is not in the migrations directory; `reconciler history` "
                "lists the known revisions"
            )
        return rev


def _depths(parents: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for rev in _kahn(parents):
        depth[rev] = 1 + max((depth[p] for p in parents[rev]), default=-1)
    return depth


def _kahn(parents: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Parents-first order; the revisions left over (on or above a cycle) are missing from it."""
    waiting = {rev: len(ps) for rev, ps in parents.items()}
    children: dict[str, list[str]] = {rev: [] for rev in parents}
    for rev, ps in parents.items():
        for parent in ps:
            children[parent].append(rev)
    ready = deque(sorted(rev for rev, n in waiting.items() if n == 0))
    order: list[str] = []
    while ready:
        rev = ready.popleft()
        order.append(rev)
        for child in children[rev]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return order


def _graph_fingerprint(revisions: Iterable[Revision]) -> str:
    lines = sorted(
        "|".join(
            (
                rev.revision,
                ",".join(rev.down_revisions),
                ",".join(rev.depends_on),
                ",".join(rev.branch_labels),
                rev.file_hash,
                str(int(rev.allow_destructive)),
                str(int(rev.draft)),
            )
        )
        for rev in revisions
    )
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _cycle_error(
    parents: Mapping[str, tuple[str, ...]], left: set[str], revisions: Mapping[str, Revision]
) -> GraphError:
    path: list[str] = []
    rev = min(left)
    while rev not in path:
        path.append(rev)
        rev = min(p for p in parents[rev] if p in left)
    cycle = [*path[path.index(rev) :], rev]
    files = ", ".join(str(revisions[r].path) for r in cycle[:-1])
    return GraphError(
        f"revision cycle {' -> '.join(cycle)} (each names the next as down_revision or "
        f"depends_on; files: {files}); fix the down_revision of one of them"
    )


def _index(revisions: Iterable[Revision]) -> dict[str, Revision]:
    by_id: dict[str, Revision] = {}
    for rev in sorted(revisions, key=lambda r: (r.revision, str(r.path))):
        other = by_id.get(rev.revision)
        if other is not None:
            raise GraphError(
                f"revision id {rev.revision!r} is declared twice: in {other.path} and in "
                f"{rev.path}; give one of them a new id (and fix the down_revision pointing at it)"
            )
        by_id[rev.revision] = rev
    return by_id


def _label_owners(by_id: Mapping[str, Revision]) -> dict[str, str]:
    owners: dict[str, str] = {}
    for rev in by_id.values():
        for label in rev.branch_labels:
            if label in owners or label in by_id:
                other = owners.get(label, label)
                raise GraphError(
                    f"branch label {label!r} of revision {rev.revision} ({rev.path}) is already "
                    f"used by revision {other} ({by_id[other].path}); rename the label"
                )
            owners[label] = rev.revision
    return owners


def build_graph(revisions: Iterable[Revision], partial: bool = False) -> RevisionGraph:
    """Validate the revisions and build their graph.

    Raises `GraphError` for duplicate ids, clashing branch labels and cycles, and
    `MissingRevision` when a down_revision / depends_on names a revision that is not there.
    With `partial` (some files still await the worker), references to absent revisions are
    dropped instead and the graph's `complete` is False.
    """
    by_id = _index(revisions)
    labels = _label_owners(by_id)
    parents: dict[str, tuple[str, ...]] = {}
    for rev in sorted(by_id.values(), key=lambda r: str(r.path)):
        found: list[str] = []
        refs = [("down_revision", d, d) for d in rev.down_revisions]
        refs += [("depends_on", d, labels.get(d, d)) for d in rev.depends_on]
        for field_name, written, target in refs:
            if target in by_id:
                if target not in found:
                    found.append(target)
            elif not partial:
                raise MissingRevision(
                    f"revision file {rev.path} ({rev.revision}) names {field_name} {written!r}, "
                    "which is not in the versions directories; if that file is still being "
                    "written this clears itself, otherwise add the file or fix the header",
                    rev.path,
                    rev.revision,
                    written,
                )
        parents[rev.revision] = tuple(found)
    ordered = _kahn(parents)
    if len(ordered) != len(parents):
        raise _cycle_error(parents, set(parents) - set(ordered), by_id)
    return RevisionGraph(by_id, parents, labels, complete=not partial)
