"""When the next dev generation starts: at once after a lone save, after a burst of saves goes quiet.

The watcher delivers a save after `[dev] debounce` seconds of quiet (an editor's several events
for one save). Saves that come faster than a generation (a formatter on save, "save all", typing
with autosave, a checkout) are a burst: a save that lands while a generation runs, or within
BURST_GAP of the previous one. After a save of a burst the next generation waits until the saves
have been quiet for 1.5 times their spacing (the widest of the last few: one save can reach us as
two deliveries when its events straddle the debounce; at least BURST_GAP, as a loaded machine delivers
saves unevenly; at most MAX_QUIET; never longer than MAX_HOLD since
the first save it waits for, so saves that never stop still get generated), so a burst becomes one
generation, not one per save. A generation that a newer save overtook before it was applied is
superseded (see `DevLoop`); a lone save, however soon after the last change was applied, waits for
nothing more than the debounce.

What makes a burst, and its spacing, is when the saves were written (the files' modification
time), not when they were delivered: a loaded machine delivers them late and unevenly, so saves
written 0.1 s apart can be delivered 0.3 s apart (two lone saves), and a save written while a
generation ran can be delivered after it ended. The quiet is still counted from the last delivery:
the next save's delivery trails its write as much. A modification time more than MAX_LATENCY
before the delivery (a file copied with its old time, a coarse filesystem clock) or after it is not
the save's: the delivery time stands in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

BURST_GAP = 0.25  # seconds between two saves (with no generation in between) that make a burst
MAX_QUIET = 0.5  # the longest quiet a burst waits for
MAX_HOLD = 3.0  # the longest a generation is held back by saves that keep coming
QUIET_FACTOR = 1.5  # a burst is over after this many of its gaps without a save
GAPS_KEPT = 3  # the spacing of a burst: the widest of its last few gaps
MAX_LATENCY = 1.0  # the most a delivery trails its save's write for the write time to be believed


def written_at(paths: Iterable[Path], delivered: float) -> float:
    """When the saves in `paths` were written, on the monotonic clock `delivered` is read on:
    the newest modification time, or `delivered` itself (a removed file, an unbelievable time)."""
    now_wall = time.time()
    ages = []
    for path in paths:
        try:
            ages.append(now_wall - path.stat().st_mtime)
        except OSError:  # removed (or unreadable): its delivery is its time
            return delivered
    age = min(ages, default=0.0)
    return delivered - age if 0.0 <= age <= MAX_LATENCY else delivered


class SavePace:
    """The saves' timing, told by the dev loop (`saved`, `generating`, `generated`); thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._last: float | None = None  # the last save's delivery
        self._last_written: float | None = None  # the newest save's write
        self._gaps: list[float] = []  # seconds between the last saves (the newest last)
        self._burst = False  # the last save was one of a burst
        self._waiting_since: float | None = None  # the first save no generation has taken yet
        self._running = False
        self._ended: float | None = None  # when the last generation ended
        self._saves = 0  # saves delivered so far (a generation remembers the count it started at)

    def saved(self, written: float | None = None) -> None:
        """A save was delivered (after the watcher's debounce); `written`: when it was written
        (`written_at`; None: now)."""
        with self._cond:
            now = self._clock()
            written = now if written is None else min(written, now)
            gap = None if self._last_written is None else max(written - self._last_written, 0.0)
            during = self._running or (self._ended is not None and written < self._ended)
            self._burst = during or (gap is not None and gap < BURST_GAP)
            if not self._burst:
                self._gaps = []
            elif gap is not None and gap < MAX_QUIET:  # a lone save during a long run: no spacing
                self._gaps = [*self._gaps[1 - GAPS_KEPT :], gap]
            self._last = now  # the quiet counts from the delivery: the next save's trails as much
            if self._last_written is None or written > self._last_written:
                self._last_written = written
            if self._waiting_since is None:
                self._waiting_since = now
            self._saves += 1
            self._cond.notify_all()

    @property
    def saves(self) -> int:
        """Saves delivered so far."""
        with self._cond:
            return self._saves

    @property
    def in_burst(self) -> bool:
        """The last save was one of a burst."""
        with self._cond:
            return self._burst

    @property
    def spacing(self) -> float | None:
        """The burst's spacing the quiet is measured by (None: the last save was not in a burst)."""
        with self._cond:
            return max(self._gaps) if self._burst and self._gaps else None

    def quiet_left(self) -> float:
        """Seconds the next generation should still wait for the saves to go quiet (0: start)."""
        with self._cond:
            return self._quiet_left(self._clock())

    def _quiet_left(self, now: float) -> float:
        if not self._burst or self._last is None:
            return 0.0
        # No gap known (the first save, landed during a generation): the burst's shortest quiet.
        spacing = max(self._gaps, default=0.0)  # deliveries are `spacing` apart too, unevenly
        quiet = min(max(QUIET_FACTOR * spacing, BURST_GAP), MAX_QUIET)
        left = self._last + quiet - now
        if self._waiting_since is not None:
            left = min(left, self._waiting_since + MAX_HOLD - now)
        return max(left, 0.0)

    def wait_for_quiet(self, stopping: threading.Event) -> float:
        """Block until `quiet_left()` is 0 (or `stopping` is set); the seconds waited."""
        started = self._clock()
        with self._cond:
            while not stopping.is_set():
                left = self._quiet_left(self._clock())
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))  # a save moves the deadline; a stop is seen soon
        return self._clock() - started

    def generating(self) -> int:
        """A generation starts: it takes every save delivered so far. Returns their count."""
        with self._cond:
            self._running = True
            self._waiting_since = None
            self._gaps = []  # the saves it took; the spacing of those after it is theirs
            return self._saves

    def generated(self) -> None:
        """The generation ended (applied, discarded or failed)."""
        with self._cond:
            self._running = False
            self._ended = self._clock()

    def saved_since(self, count: int) -> bool:
        """A save was delivered after the generation that started at `count` took its saves."""
        with self._cond:
            return self._saves > count
