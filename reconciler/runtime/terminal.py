"""What a person at a terminal sees: colour, and the one updating progress line of `apply`.

The escapes come from `logs.paint`, which colours log lines too. Colour is decided by the caller
(`cli`: a terminal, and neither `NO_COLOR` nor `--no-color`); every function here takes that
decision as an argument, so piped output never carries an escape sequence.
"""

from __future__ import annotations

import re
import shutil
from typing import TextIO

from reconciler.logs import paint

_ERASE = "\r\x1b[K"  # back to the line's start, erase to its end

# A state or condition, by how much it asks of the reader: fine, wait for it, act on it.
STATE_STYLES = {
    "in_sync": "green",
    "behind": "yellow",
    "ahead": "cyan",
    "unknown": "red",
    "diverged": "red",
    "multiple_heads": "red",
    "dirty": "red",
    "checksum_mismatch": "red",
    "blocked": "red",
    "suspended": "yellow",
    "drift": "yellow",
    "destructive_pending": "red",
}
OUTCOME_STYLES = {
    "applied": "green",
    "resolved_applied": "green",
    "skipped": "yellow",
    "lock_timeout": "yellow",
    "resolved_rolled_back": "yellow",
    "failed": "red",
    "dirty": "red",
    "refused": "red",
    "running": "cyan",
}
_HISTORY_MARKS = {"[applied]": "green", "[pending]": "yellow"}
_HISTORY_TAGS = re.compile(r"\((?:[^()]*\b(?:head|current)\b[^()]*)\)")


def state(text: str, on: bool) -> str:
    """A state or condition name in its colour."""
    return paint(text, STATE_STYLES.get(text), on)


def history_line(line: str, on: bool) -> str:
    """One `history` line with its applied / pending mark and its head / current tags coloured."""
    if not on:
        return line
    for mark, style in _HISTORY_MARKS.items():
        if line.endswith(mark):
            line = line[: -len(mark)] + paint(mark, style, on)
    return _HISTORY_TAGS.sub(lambda m: paint(m.group(0), "bold", on), line, count=1)


def column(lines: list[str], name: str, styles: dict[str, str], on: bool) -> list[str]:
    """Aligned table `lines` (a header first) with the cells of column `name` coloured by value;
    the padding is kept outside the escapes, so the columns stay aligned."""
    if not on or not lines:
        return lines
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    names = lines[0].split()
    if name not in names:
        return lines
    index = names.index(name)
    begin = starts[index]
    end = starts[index + 1] if index + 1 < len(starts) else None
    out = [lines[0]]
    for line in lines[1:]:
        cell = line[begin:end]
        value = cell.strip()
        coloured = cell.replace(value, paint(value, styles.get(value), on), 1) if value else cell
        out.append(line[:begin] + coloured + (line[end:] if end is not None else ""))
    return out


class ProgressLine:
    """`n of N, current revision` as one line rewritten in place (a `reconcile.ProgressFn`).

    Log lines written meanwhile call `clear()` before and `redraw()` after themselves (see
    `logs.set_status_line`), so they scroll above it instead of being overwritten.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._text = ""
        self._shown = False

    def __call__(self, index: int, total: int, revision: str, message: str) -> None:
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        text = f"applying {index} of {total}: {revision}" + (f" {message}" if message else "")
        self._text = text if len(text) <= width else text[: width - 1] + "…"
        self.redraw()

    def clear(self) -> None:
        if self._shown:
            self._stream.write(_ERASE)
            self._shown = False

    def redraw(self) -> None:
        if self._text:
            self._stream.write(_ERASE + self._text)
            self._stream.flush()
            self._shown = True

    def close(self) -> None:
        """Erase the line for good (the summary replaces it)."""
        self.clear()
        self._text = ""
        self._stream.flush()
