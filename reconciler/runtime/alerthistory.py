"""The alerts this daemon delivered, failed to deliver or dropped, newest first (the status page's
alert history): a bounded list in memory, written from the sink threads, read by the HTTP thread.
Only the event, the sink's name and the outcome: never a URL or a payload."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from reconciler.core.alerting import iso_utc

KEPT = 50


class AlertHistory:
    def __init__(self, kept: int = KEPT, clock: Callable[[], float] = time.time) -> None:
        self._rows: deque[dict[str, Any]] = deque(maxlen=kept)
        self._lock = threading.Lock()
        self._clock = clock

    def record(self, delivery: str, event: str, sink: str) -> None:
        with self._lock:
            row = {"event": event, "sink": sink, "delivery": delivery, "at": iso_utc(self._clock())}
            self._rows.appendleft(row)

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._rows)

    def counting(self, delivery: str, then: Callable[[str, str], None]) -> Callable[[str, str], None]:
        """A dispatcher callback (event, sink) that records `delivery` and calls `then` (the metrics')."""

        def callback(event: str, sink: str) -> None:
            self.record(delivery, event, sink)
            then(event, sink)

        return callback
