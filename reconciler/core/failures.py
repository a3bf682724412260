"""Failure signatures: a revision failing "the same way", and the fleet's retry gate. Pure.

A failure is the same when its revision, file hash, exception class and SQLSTATE are; the
journal's flags table (db.flags) stores one per target as JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Failure:
    """A revision failing 'the same way': same revision, file hash, exception class and SQLSTATE."""

    revision: str
    file_hash: str
    error_class: str
    sqlstate: str
    count: int = 1
    message: str = ""
    # The retry gate, in epoch seconds of the database's clock (`db_time`): when this failure was
    # counted, and when the fleet may try the revision again. 0: not known (an older release's
    # record, or the blocked record): no gate.
    failed_at: float = 0.0
    retry_after: float = 0.0

    @property
    def signature(self) -> str:
        return f"{self.revision}:{self.file_hash[:12]}:{self.error_class}:{self.sqlstate}"

    def dumps(self) -> str:
        data = dataclasses.asdict(self)
        for name in _GATE_FIELDS:
            if not data[name]:
                del data[name]  # the shape an older release reads (it refuses unknown keys)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def loads(cls, text: str | None) -> Failure | None:
        if not text:
            return None
        try:
            data: dict[str, Any] = json.loads(text)
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})  # a later release's keys: ignored
        except (ValueError, TypeError, AttributeError):
            return None


_GATE_FIELDS = ("failed_at", "retry_after")


def retry_deferred(failure: Failure | None, pending: Mapping[str, str], now: float) -> bool:
    """The retry gate's decision: True when a run must not try its revisions yet.

    `pending` maps the revisions the run would apply to their file hashes; `now` is the
    database's clock. Deferred while the recorded failure is one of them, its file unchanged
    (a new file hash lifts the gate, as it lifts `blocked`), and `now` is before its
    `retry_after`. A record without `retry_after` (an older release's) never defers."""
    if failure is None or failure.retry_after <= 0:
        return False
    if pending.get(failure.revision) != failure.file_hash:
        return False
    return now < failure.retry_after
