"""Drift rules: `[drift] ignore` patterns, and the fleet's drift report as the journal flag holds it. Pure.

Ignore rules are `KIND:GLOB`, matched case-insensitively against a difference's object name:
`table:audit_*` (a table), `column:users.legacy_*` (TABLE.COLUMN), `index:*` (TABLE.NAME, or
TABLE(COLUMNS) when unnamed), `constraint:...`, `fk:...` (TABLE(COLUMNS)->TABLE(COLUMNS)), or one of
autogenerate's own kinds (`remove_table:tmp_*`; `modify_fk` is ours: a foreign key dropped and
re-created with other options, such as `ondelete`); `*:GLOB` matches any kind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from reconciler.errors import ConfigError

KINDS: dict[str, tuple[str, ...]] = {
    "table": ("add_table", "remove_table", "add_table_comment", "remove_table_comment"),
    "column": (
        "add_column",
        "remove_column",
        "modify_type",
        "modify_nullable",
        "modify_default",
        "modify_comment",
    ),
    "index": ("add_index", "remove_index"),
    "constraint": ("add_constraint", "remove_constraint"),
    "fk": ("add_fk", "remove_fk", "modify_fk"),
}
_RAW_KINDS = frozenset(kind for kinds in KINDS.values() for kind in kinds)
STORED_MAX = 200  # differences kept in the flag (and shown); the count is always exact
UNSAFE_SWITCH = "drift_once"  # RECONCILER_UNSAFE_DISABLE: every replica compares on its own timer

Difference = Mapping[str, str]


# --- ignore rules ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    kinds: frozenset[str]  # autogenerate kinds; empty: any
    glob: str


def parse_rule(pattern: str, where: str = "[drift] ignore") -> Rule:
    kind, sep, glob = pattern.partition(":")
    kind, glob = kind.strip().lower(), glob.strip()
    if not sep or not kind or not glob:
        raise ConfigError(
            f"{where}: ignore rule {pattern!r} must be KIND:GLOB, e.g. 'table:audit_*', "
            "'column:users.legacy_*' or 'index:*'"
        )
    if kind == "*":
        return Rule(frozenset(), glob.lower())
    if kind in KINDS:
        return Rule(frozenset(KINDS[kind]), glob.lower())
    if kind in _RAW_KINDS:
        return Rule(frozenset({kind}), glob.lower())
    raise ConfigError(
        f"{where}: ignore rule {pattern!r} names an unknown kind {kind!r}; kinds are "
        f"{', '.join(KINDS)}, '*', or one of autogenerate's ({', '.join(sorted(_RAW_KINDS))})"
    )


def object_name(difference: Difference) -> str:
    """What a rule's glob is matched against: the difference's key without its kind."""
    key = str(difference.get("key", ""))
    return key.split(" ", 1)[1] if " " in key else key


def ignored(difference: Difference, rules: Sequence[Rule]) -> bool:
    kind = str(difference.get("kind", ""))
    name = object_name(difference).lower()
    return any((not r.kinds or kind in r.kinds) and fnmatchcase(name, r.glob) for r in rules)


def without_ignored(found: Iterable[Difference], patterns: Sequence[str]) -> list[Difference]:
    rules = [parse_rule(p) for p in patterns]
    return [d for d in found if not ignored(d, rules)]


# --- the fleet's report ----------------------------------------------------------------------------
def flag_key(target: str) -> str:
    return f"drift/{target}"


@dataclass(frozen=True)
class DriftReport:
    """The last compare of the fleet: when, at which db heads, by whom, and what differed."""

    checked_at: float
    heads: tuple[str, ...]
    differences: tuple[Difference, ...] = ()
    count: int = 0  # all differences found; `differences` keeps the first STORED_MAX
    checked_by: str = ""
    duration_ms: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(str(d["key"]) for d in self.differences)

    @property
    def whole(self) -> frozenset[tuple[str, str]]:
        """Each difference as (key, detail): the same object with other values is another one."""
        return frozenset((str(d["key"]), str(d.get("detail", ""))) for d in self.differences)

    @property
    def drifted(self) -> bool:
        return self.count > 0

    def message(self) -> str:
        shown = "; ".join(str(d.get("text", d["key"])) for d in self.differences[:5])
        more = f" and {self.count - 5} more" if self.count > 5 else ""
        return (
            f"the database schema differs from the models ({self.count}): {shown}{more}. Fix it "
            "by hand or with a revision, accept it with `reconciler baseline`, or add a [drift] "
            "ignore rule"
        )

    def filtered(self, patterns: Sequence[str]) -> DriftReport:
        if not patterns:
            return self
        kept = tuple(without_ignored(self.differences, patterns))
        return replace(self, differences=kept, count=self.count - (len(self.differences) - len(kept)))

    def dumps(self) -> str:
        return json.dumps(
            {
                "checked_at": self.checked_at,
                "heads": list(self.heads),
                "count": self.count,
                "differences": [dict(d) for d in self.differences],
                "checked_by": self.checked_by,
                "duration_ms": self.duration_ms,
            },
            sort_keys=True,
        )

    @classmethod
    def loads(cls, text: str | None) -> DriftReport | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            diffs = tuple({str(k): str(v) for k, v in d.items()} for d in data["differences"])
            return cls(
                float(data["checked_at"]),
                tuple(str(h) for h in data["heads"]),
                diffs,
                int(data.get("count", len(diffs))),
                str(data.get("checked_by", "")),
                int(data.get("duration_ms", 0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def as_dict(self) -> dict[str, Any]:
        """The `drift` object of `/status` and `status --json`."""
        return {
            "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.checked_at)),
            "checked_by": self.checked_by,
            "heads": list(self.heads),
            "count": self.count,
            "differences": [dict(d) for d in self.differences],
        }


def report_of(
    found: Sequence[Difference], heads: Iterable[str], checked_by: str, seconds: float
) -> DriftReport:
    kept = tuple(dict(d) for d in found[:STORED_MAX])
    return DriftReport(time.time(), tuple(sorted(heads)), kept, len(found), checked_by, int(seconds * 1000))
