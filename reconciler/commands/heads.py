"""The HEADS marker as the commands use it: kept after every revision our commands write, checked
by `check` before anything connects, rewritten by `heads --write` (the file: project/heads.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.control.workers import start_headers_worker
from reconciler.core.graph import RevisionGraph
from reconciler.errors import DifferencesFound
from reconciler.project import heads as marker
from reconciler.project.repository import Project
from reconciler.settings import Settings


@dataclass(frozen=True)
class HeadsReport:
    """The graph's heads, what the marker lists (None: no file), and why they disagree (None: agree)."""

    path: Path
    heads: tuple[str, ...]
    listed: tuple[str, ...] | None
    problem: str | None
    written: bool = False


def repository_graph(settings: Settings) -> RevisionGraph:
    """The revision files' graph, read afresh (a writer has just changed them); connects to nothing."""
    project = Project(settings, start_worker=start_headers_worker)
    try:
        return project.graph()
    finally:
        project.close_worker()


def keep(settings: Settings) -> bool:
    """After one of our commands wrote, moved or removed a revision: the marker equals the heads."""
    return marker.keep(settings, repository_graph(settings).heads)


def report(settings: Settings, write: bool = False) -> HeadsReport:
    """`reconciler heads [--write]`."""
    graph = repository_graph(settings)
    path = marker.path_for(settings)
    written = marker.keep(settings, graph.heads) if write else False
    found = marker.read(path)
    problem = marker.disagreement(found, graph.heads)
    return HeadsReport(path, tuple(sorted(graph.heads)), found.listed, problem, written)


def check(settings: Settings) -> None:
    """`check`'s first step, before any database: the marker must equal the graph's heads (a
    project without the file has not adopted it and passes)."""
    graph = repository_graph(settings)
    problem = marker.disagreement(marker.read(marker.path_for(settings)), graph.heads)
    if problem is not None:
        raise DifferencesFound(problem)
