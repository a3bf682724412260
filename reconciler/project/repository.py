"""The repository side of a target: where its revision files are, and their graph, cached.

The graph is read from the files' headers (never executing them) and kept until the versions
directories change (a stat fingerprint), so a no-op run costs no file parsing. Files whose headers
are not literal are read by a worker, once per change; that worker is kept (`take_worker`) so
the guard and the apply that follow need no second interpreter start. The caller (control/)
says how to start that worker: the repository side knows no worker client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from reconciler.core.graph import Revision, RevisionGraph, build_graph
from reconciler.core.headers import check_id_lengths
from reconciler.project.alembic_ini import alembic_ini_path, versions_dirs
from reconciler.project.revisions import (
    ParseCache,
    graph_fingerprint_of_dir,
    load_graph,
    revision_from_headers,
)
from reconciler.settings import Settings

REVISION_ID_SWITCH = "revision_id_length"  # RECONCILER_UNSAFE_DISABLE name of that check
# A worker that read headers is kept this long for the apply that follows, then closed.
KEEP_HEADERS_WORKER = 60.0


class HeadersWorker(Protocol):
    """What the project needs of a worker: read the headers of files it must execute; close."""

    def headers(self, paths: list[Path]) -> Sequence[Mapping[str, object]]: ...

    def close(self) -> None: ...


W = TypeVar("W", bound=HeadersWorker)


@dataclass
class Project(Generic[W]):
    """`start_worker(settings)` starts the worker that reads non-literal headers (control/ passes it)."""

    settings: Settings
    start_worker: Callable[[Settings], W]
    _graph: RevisionGraph | None = field(default=None, init=False)
    _fingerprint: str = field(default="", init=False)
    _generation: int = field(default=0, init=False)  # counts invalidate() calls
    _dirs: tuple[list[Path], bool] | None = field(default=None, init=False)
    _cache: ParseCache = field(default_factory=ParseCache, init=False)
    _kept: tuple[W, float, int] | None = field(default=None, init=False)  # (worker, since, thread)

    @property
    def version_dirs(self) -> tuple[list[Path], bool]:
        if self._dirs is None:
            self._dirs = versions_dirs(
                self.settings.migrations_dir, alembic_ini_path(self.settings), self.settings.root_dir
            )
        return self._dirs

    def graph(self, check: bool = True) -> RevisionGraph:
        """The revision graph; re-read only when a revision file changed.

        With `check` False the files are not even stat'ed: the caller (the daemon, watching the
        directory) calls `invalidate()` when they change."""
        dirs, recursive = self.version_dirs
        if self._graph is not None and not check and self._fingerprint:
            return self._graph
        generation = self._generation
        fingerprint = graph_fingerprint_of_dir(dirs, recursive)
        if self._graph is None or fingerprint != self._fingerprint:
            self._graph = self._load(dirs, recursive)
        # An invalidate() from the watcher's thread while this read ran may be about a file
        # written after the listing: then the graph is not trusted as current.
        self._fingerprint = fingerprint if self._generation == generation else ""
        return self._graph

    @property
    def cached_graph(self) -> RevisionGraph | None:
        """The graph the last `graph()` read (None before the first): reads no file, safe from
        another thread (the status page's)."""
        return self._graph

    def invalidate(self) -> None:
        """Forget the graph's fingerprint: the next `graph()` re-reads what changed. Safe to call
        from another thread while `graph()` runs."""
        self._generation += 1
        self._fingerprint = ""

    def _load(self, dirs: list[Path], recursive: bool) -> RevisionGraph:
        graph, fallback = load_graph(dirs, recursive, cache=self._cache)
        if fallback:
            extra = self._headers_from_worker(fallback)
            graph = build_graph([*graph.revisions.values(), *extra])
        # Before any connection: an id wider than the version column fails only at the version
        # insert, after the revision's DDL ran (MariaDB: half applied) or on every run (PostgreSQL).
        if REVISION_ID_SWITCH not in self.settings.unsafe:
            check_id_lengths(graph.revisions.values(), self.settings.target.revision_id_length)
        return graph

    def _headers_from_worker(self, paths: list[Path]) -> list[Revision]:
        self.close_worker()
        worker = self.start_worker(self.settings)
        try:
            found = worker.headers(paths)
        except BaseException:
            worker.close()
            raise
        # kept for the guard and the apply that usually follow: one interpreter start per load
        self._kept = (worker, time.monotonic(), threading.get_ident())
        return [revision_from_headers(item) for item in found]

    def take_worker(self) -> W | None:
        """The worker that read this graph's headers, if one is still fresh; the caller owns it.

        Only on the thread that started it: a worker dies with its starting thread
        (PR_SET_PDEATHSIG), so one started on a short-lived thread must never apply."""
        kept, self._kept = self._kept, None
        if kept is None:
            return None
        worker, since, thread = kept
        if time.monotonic() - since > KEEP_HEADERS_WORKER or thread != threading.get_ident():
            worker.close()
            return None
        return worker

    def close_worker(self) -> None:
        """Close a worker kept after reading headers that nobody took."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept[0].close()
