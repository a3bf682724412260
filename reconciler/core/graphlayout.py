"""The revision graph laid out in lanes, newest first: one row per revision, its lane, and the lines
to its parents. `history --graph` draws it with characters; the status page with SVG.

Lanes work as `git log --graph`'s do: a lane waits for a revision (the parent of one already
drawn); a revision takes the first lane that waits for it, and every other lane waiting for it
ends there (its branch point); a merge revision's second and later parents get lanes of their
own (or join a lane already waiting for that parent).
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.graph import RevisionGraph


@dataclass(frozen=True)
class Row:
    revision: str
    lane: int
    before: tuple[bool, ...]  # the lanes in use above the node
    after: tuple[bool, ...]  # the lanes in use below it
    ends: tuple[int, ...]  # other lanes that waited for this revision: a branch point
    starts: tuple[int, ...]  # lanes a merge revision's other parents go down in

    @property
    def width(self) -> int:
        return max(len(self.before), len(self.after), self.lane + 1)


def layout(graph: RevisionGraph) -> list[Row]:
    lanes: list[str | None] = []
    rows: list[Row] = []
    for rev in graph.newest_first():
        before = tuple(w is not None for w in lanes)
        waiting = [n for n, w in enumerate(lanes) if w == rev]
        lane = waiting[0] if waiting else _free(lanes)
        for n in waiting[1:]:
            lanes[n] = None
        parents = list(graph.revisions[rev].down_revisions)
        lanes[lane] = parents[0] if parents else None
        starts = []
        for parent in parents[1:]:
            if parent in lanes:
                starts.append(lanes.index(parent))
                continue
            slot = _free(lanes)
            lanes[slot] = parent
            starts.append(slot)
        while lanes and lanes[-1] is None:
            lanes.pop()
        after = tuple(w is not None for w in lanes)
        rows.append(Row(rev, lane, before, after, tuple(waiting[1:]), tuple(starts)))
    return rows


def _free(lanes: list[str | None]) -> int:
    for n, waiting in enumerate(lanes):
        if waiting is None:
            return n
    lanes.append(None)
    return len(lanes) - 1


def text_rows(rows: list[Row]) -> list[tuple[str, str]]:
    """(graph characters, revision id or "") per line, as `git log --graph` draws: lanes two
    characters apart; a connector line where lanes end in a branch point (`|/`, above its
    node), the node line (`*`), a connector line where a merge revision's other parents go down
    (`|\\`, below it)."""
    width = max((r.width for r in rows), default=1)
    out: list[tuple[str, str]] = []
    for row in rows:
        if row.ends:
            link = _lanes(row.before, width, skip=row.ends)
            for n in row.ends:
                link[2 * n - 1] = "/"
            out.append((_text(link), ""))
        node = _lanes(row.before, width, skip=row.ends)
        node[2 * row.lane] = "*"
        out.append((_text(node), row.revision))
        if row.starts:
            link = _lanes(row.after, width, skip=row.starts)
            for n in row.starts:
                link[2 * n - 1] = "\\"
            out.append((_text(link), ""))
    return out


def _lanes(used: tuple[bool, ...], width: int, skip: tuple[int, ...] = ()) -> list[str]:
    cells = [" "] * (2 * width)
    for n, on in enumerate(used):
        if on and n not in skip:
            cells[2 * n] = "|"
    return cells


def _text(cells: list[str]) -> str:
    return "".join(cells).rstrip()
