"""Tenant fleets: which tenants a rollout may apply now (waves, halts), tenant names and filters.

One migrations directory applied to many tenants (schemas or databases). Pure: states in,
decision out; the caller reads the states and applies.

- Waves (`[fleet] waves = ["1", "10%", "100%"]`): a count ("1", "25") or a share ("10%",
  "2.5%"). They are cumulative thresholds over the tenants sorted by name: wave i covers the
  first size_i tenants. A count's size is min(count, total); a share's is ceil(share / 100 *
  total) (exact decimal arithmetic), at least 1 when there are tenants; each size is at least the
  one before. No waves means one wave of 100%. A last wave below 100% ends the rollout there:
  tenants past it are never applied.
- Tenant states (the tool's state vocabulary plus `held`: another replica is applying it):
  pending (needs applying) = behind, uninitialized_empty; failed = failed, blocked, dirty,
  checksum_mismatch, destructive_pending, diverged, multiple_heads, uninitialized_with_tables;
  done = in_sync, ahead, drift, or failed (a failed tenant does not hold its wave open, it counts
  toward the halt). Everything else (unknown, held, suspended, a state this module does not
  know) is neither done nor failed: it holds its wave open.
- The current wave is the first one covering a tenant that is not done; when every wave is
  done it is the last one and the rollout is `complete`.
- Halt (`halt_after` >= 1; 0 never halts): the rollout halts in wave k when the failed tenants
  wave k covers reach `halt_after`; later waves do not start, the tenants of wave k still run.
  Waves are checked in order, so a halt is found before the rollout moves past its wave.
  `lifted` is the highest wave index an operator lifted (`reconciler resume`, -1: none): a halt
  in wave k <= lifted is ignored, and the failed tenants the lifted waves cover are not counted
  again in later waves (else lifting wave 0 would halt wave 1 at once on the same failures).
- The tenants allowed now are the pending ones the current wave covers (so none past it).

Indexes are 0-based in the API, wave numbers 1-based in text ("wave 1 of 3").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from fractions import Fraction

PENDING_STATES = frozenset({"behind", "uninitialized_empty"})
FAILED_STATES = frozenset(
    {
        "failed",
        "blocked",
        "dirty",
        "checksum_mismatch",
        "destructive_pending",
        "diverged",
        "multiple_heads",
        "uninitialized_with_tables",
    }
)
DONE_STATES = frozenset({"in_sync", "ahead", "drift"}) | FAILED_STATES
# Where tenants are listed from (`[fleet] source`).
SOURCES = ("schemas", "databases", "files", "query", "list")
MAX_NAME = 63  # PostgreSQL's identifier limit (bytes); MySQL's is 64 characters
_NAMES_SHOWN = 10  # failed tenants named in a halt's reason; the rest are counted

_COUNT = re.compile(r"[0-9]+")
_SHARE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)%")
_EXAMPLES = 'e.g. "1", "10%", "100%"'


@dataclass(frozen=True)
class Wave:
    text: str  # as written, without surrounding whitespace
    count: int | None  # tenants, when the wave is a count
    share: float | None  # percent (0 < share <= 100), when the wave is a share


ALL = (Wave("100%", None, 100.0),)  # what an empty waves list means


def parse_wave(text: str) -> Wave:
    """One wave: a positive whole number of tenants or a percentage in (0, 100]."""
    if not isinstance(text, str):
        raise ValueError(f"fleet wave {text!r} is not a string; quote it, {_EXAMPLES}")
    value = text.strip()
    if _COUNT.fullmatch(value):
        count = int(value)
        if count == 0:
            raise ValueError(f"fleet wave {text!r} is zero tenants; use at least 1, {_EXAMPLES}")
        return Wave(value, count, None)
    if _SHARE.fullmatch(value):
        share = Fraction(value[:-1])
        if share == 0:
            raise ValueError(f"fleet wave {text!r} is 0%; use a share above 0%, {_EXAMPLES}")
        if share > 100:
            raise ValueError(f"fleet wave {text!r} is over 100%; use a share up to 100%, {_EXAMPLES}")
        return Wave(value, None, float(share))
    raise ValueError(
        f"fleet wave {text!r} is neither a count of tenants nor a share; "
        f"write a positive whole number or a percentage up to 100%, {_EXAMPLES}"
    )


def parse_waves(texts: Sequence[str]) -> tuple[Wave, ...]:
    """`[fleet] waves` parsed; an empty list is one wave of 100%."""
    if isinstance(texts, str):
        raise ValueError(f"[fleet] waves {texts!r} is one string; write a list, {_EXAMPLES}")
    waves = []
    for number, text in enumerate(texts, 1):
        try:
            waves.append(parse_wave(text))
        except ValueError as error:
            raise ValueError(f"[fleet] waves, entry {number}: {error}") from None
    return tuple(waves) or ALL


def _share_size(share: float, total: int) -> int:
    # Fraction(str(...)): the decimal the user wrote, so 7% of 100 is 7, never 8
    return math.ceil(Fraction(str(share)) * total / 100)


def wave_sizes(waves: Sequence[Wave], total: int) -> tuple[int, ...]:
    """How many tenants (the first, by name) each wave covers: cumulative, non-decreasing."""
    if total < 0:
        raise ValueError(f"a fleet of {total} tenants; the count cannot be negative")
    sizes: list[int] = []
    previous = 0
    for wave in waves or ALL:
        if wave.count is not None:
            size = min(wave.count, total)
        elif wave.share is not None:
            size = min(total, max(1, _share_size(wave.share, total))) if total else 0
        else:
            raise ValueError(f"fleet wave {wave.text!r} has neither a count nor a share")
        previous = max(previous, size)
        sizes.append(previous)
    return tuple(sizes)


@dataclass(frozen=True)
class WaveDecision:
    index: int  # the current wave (0-based); -1 when there are no tenants
    size: int  # tenants the current wave covers (cumulative)
    halted: bool  # later waves do not start
    reason: str  # why it halted, with the next step; "" when not halted
    complete: bool  # every tenant the waves cover is done
    allowed: frozenset[str]  # tenants that may be applied now
    count: int = 1  # waves in the rollout

    def as_dict(self) -> dict[str, object]:
        """JSON-able, for `/status` and the CLI (the allowed names are left out: a fleet is big)."""
        return {
            "index": self.index,
            "size": self.size,
            "count": self.count,
            "halted": self.halted,
            "reason": self.reason,
            "complete": self.complete,
        }


def _halt_reason(failed: Sequence[str], index: int, count: int, halt_after: int) -> str:
    shown = ", ".join(failed[:_NAMES_SHOWN])
    if len(failed) > _NAMES_SHOWN:
        shown += f" and {len(failed) - _NAMES_SHOWN} more"
    noun = "tenant" if len(failed) == 1 else "tenants"
    return (
        f"{len(failed)} failed {noun} in wave {index + 1} of {count} (halt_after = {halt_after}): "
        f"{shown}; `reconciler resume` lifts the halt"
    )


def decide_wave(
    states: Mapping[str, str], waves: Sequence[Wave], halt_after: int, lifted: int = -1
) -> WaveDecision:
    """The rollout's current wave, whether it is halted, and the tenants to apply now.

    `states`: tenant name -> state. `waves`: parsed (empty: one wave of 100%). `halt_after`:
    failed tenants that halt a wave (0: never). `lifted`: the highest wave index lifted by
    `reconciler resume` (-1: none).
    """
    if halt_after < 0:
        raise ValueError(f"[fleet] halt_after = {halt_after}; use 0 (never halt) or a positive count")
    waves = tuple(waves) or ALL
    names = sorted(states)
    if not names:
        return WaveDecision(-1, 0, False, "", True, frozenset(), len(waves))
    sizes = wave_sizes(waves, len(names))
    done = [states[name] in DONE_STATES for name in names]
    # the failures a lifted wave covers were acknowledged: later waves count only the rest
    counted_from = sizes[min(lifted, len(sizes) - 1)] if lifted >= 0 else 0
    index, halted, reason = len(sizes) - 1, False, ""
    for i, size in enumerate(sizes):
        if halt_after and i > lifted:
            failed = [name for name in names[counted_from:size] if states[name] in FAILED_STATES]
            if len(failed) >= halt_after:
                index, halted = i, True
                reason = _halt_reason(failed, i, len(sizes), halt_after)
                break
        if not all(done[:size]):
            index = i
            break
    size = sizes[index]
    allowed = frozenset(name for name in names[:size] if states[name] in PENDING_STATES)
    return WaveDecision(index, size, halted, reason, all(done[: sizes[-1]]), allowed, len(sizes))


def counts(states: Mapping[str, str]) -> dict[str, int]:
    """Tenants per state, keys sorted."""
    return dict(sorted(Counter(states.values()).items()))


def matches(name: str, pattern: str) -> bool:
    """Does a tenant name match a glob (case-sensitive, `fnmatchcase`)? "" and "*" match all."""
    return pattern in ("", "*") or fnmatchcase(name, pattern)


def check_tenant_name(name: str) -> str | None:
    """None when `name` is usable as a tenant (a schema or database name), else why not.

    1 to 63 characters and at most 63 bytes in UTF-8 (PostgreSQL truncates longer identifiers,
    so two tenants could become one); no control characters (NUL among them), no surrounding
    whitespace, and for safety in quoted identifiers and file paths no `"` and no backslash.
    """
    fix = "rename it, or leave it out of the fleet"
    if not name:
        return f"tenant name {name!r} is empty; tenant names are 1 to {MAX_NAME} characters"
    size = len(name.encode("utf-8", "surrogatepass"))
    if len(name) > MAX_NAME or size > MAX_NAME:
        return (
            f"tenant name {name!r} is {len(name)} characters ({size} bytes in UTF-8); tenant names"
            f" are at most {MAX_NAME} characters and {MAX_NAME} bytes: {fix}"
        )
    bad = next((c for c in name if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"tenant name {name!r} contains the control character {bad!r}: {fix}"
    if name != name.strip():
        return f"tenant name {name!r} begins or ends with whitespace: {fix}"
    for char in ('"', "\\"):
        if char in name:
            return f"tenant name {name!r} contains {char!r}, refused for safety: {fix}"
    return None
