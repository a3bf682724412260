"""Tenant fleets' decisions, table-driven: waves parsed and sized, the current wave, halts, names."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from reconciler.core.fleet import (
    ALL,
    DONE_STATES,
    FAILED_STATES,
    PENDING_STATES,
    SOURCES,
    Wave,
    check_tenant_name,
    counts,
    decide_wave,
    matches,
    parse_wave,
    parse_waves,
    wave_sizes,
)
from reconciler.core.state import CONDITIONS, SYNC_STATES

CANARY = ("1", "10%", "100%")
EXAMPLES = 'e.g. "1", "10%", "100%"'
# every state a tenant can be in: the tool's vocabulary, `failed`, and `held`
STATES = tuple(dict.fromkeys((*SYNC_STATES, *CONDITIONS, "failed", "held")))


def names(total: int) -> list[str]:
    """Tenant names that sort in number order."""
    return [f"t{i:04d}" for i in range(total)]


def fleet(total: int, state: str = "behind", **overrides: str) -> dict[str, str]:
    """`total` tenants in `state`, with some (by name) in another."""
    states = dict.fromkeys(names(total), state)
    assert set(overrides) <= set(states)
    return {**states, **overrides}


def span(start: int, stop: int, skip: tuple[str, ...] = ()) -> frozenset[str]:
    return frozenset(name for name in names(stop)[start:] if name not in skip)


# --- parse_wave ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "wave"),
    [
        ("1", Wave("1", 1, None)),
        ("25", Wave("25", 25, None)),
        ("007", Wave("007", 7, None)),
        ("10%", Wave("10%", None, 10.0)),
        ("100%", Wave("100%", None, 100.0)),
        ("2.5%", Wave("2.5%", None, 2.5)),
        ("100.0%", Wave("100.0%", None, 100.0)),
        (".5%", Wave(".5%", None, 0.5)),
        ("1.%", Wave("1.%", None, 1.0)),
        ("0.001%", Wave("0.001%", None, 0.001)),
        ("  10% ", Wave("10%", None, 10.0)),
        ("\t3\n", Wave("3", 3, None)),
    ],
)
def test_parse_wave_reads_a_count_or_a_share_without_surrounding_whitespace(text: str, wave: Wave) -> None:
    assert parse_wave(text) == wave


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "neither a count"),
        ("   ", "neither a count"),
        ("0", "zero tenants"),
        ("00", "zero tenants"),
        ("0%", "0%"),
        ("0.0%", "0%"),
        ("-1", "neither a count"),
        ("-5%", "neither a count"),
        ("101%", "over 100%"),
        ("100.01%", "over 100%"),
        ("abc", "neither a count"),
        ("10 %", "neither a count"),
        ("1 0", "neither a count"),
        ("1.5", "neither a count"),
        ("1e2", "neither a count"),
        ("1e2%", "neither a count"),
        ("nan%", "neither a count"),
        ("inf", "neither a count"),
        ("%", "neither a count"),
        ("10%%", "neither a count"),
        ("+3", "neither a count"),
        ("1_000", "neither a count"),
        ("1,5%", "neither a count"),
        ("\uff15", "neither a count"),  # a fullwidth digit: int() would take it
        ("\u0661%", "neither a count"),  # an Arabic-Indic digit
    ],
)
def test_parse_wave_refuses_a_bad_value_naming_it_and_the_accepted_forms(text: str, says: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_wave(text)
    message = str(raised.value)
    assert repr(text) in message
    assert says in message
    assert EXAMPLES in message


def test_parse_wave_refuses_a_number_that_is_not_a_string() -> None:
    with pytest.raises(ValueError, match="not a string; quote it"):
        parse_wave(5)  # type: ignore[arg-type]


# --- parse_waves -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "waves"),
    [
        ([], ALL),
        ((), ALL),
        (["100%"], (Wave("100%", None, 100.0),)),
        (list(CANARY), (Wave("1", 1, None), Wave("10%", None, 10.0), Wave("100%", None, 100.0))),
        (["50%", "10"], (Wave("50%", None, 50.0), Wave("10", 10, None))),  # sizes fix the order
    ],
)
def test_parse_waves_parses_each_entry_and_an_empty_list_is_one_wave_of_everything(
    texts: list[str], waves: tuple[Wave, ...]
) -> None:
    assert parse_waves(texts) == waves


@pytest.mark.parametrize(
    ("texts", "says"),
    [
        (["1", "ten"], "entry 2: fleet wave 'ten'"),
        (["0", "100%"], "entry 1: fleet wave '0'"),
        ("10%", "is one string; write a list"),
    ],
)
def test_parse_waves_names_the_bad_entry(texts: list[str], says: str) -> None:
    with pytest.raises(ValueError, match="waves") as raised:
        parse_waves(texts)
    assert says in str(raised.value)
    assert EXAMPLES in str(raised.value)


# --- wave_sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "total", "sizes"),
    [
        (CANARY, 1000, (1, 100, 1000)),
        (CANARY, 0, (0, 0, 0)),
        (CANARY, 1, (1, 1, 1)),
        (CANARY, 3, (1, 1, 3)),
        (CANARY, 25, (1, 3, 25)),
        ((), 5, (5,)),
        ((), 0, (0,)),
        (("25",), 10, (10,)),  # a count past the fleet is the fleet
        (("1",), 0, (0,)),
        (("2.5%",), 1000, (25,)),
        (("7%",), 100, (7,)),  # exact decimals: 7 / 100 * 100 is 7, not 7.000000000000001
        (("33.3%",), 1000, (333,)),
        (("0.1%",), 1000, (1,)),
        (("0.1%",), 10, (1,)),  # a share is at least one tenant
        (("0.001%",), 1, (1,)),
        (("1%",), 101, (2,)),  # rounded up
        (("50%",), 3, (2,)),
        (("100%",), 1, (1,)),
        (("100%",), 7, (7,)),
        (("50%", "10"), 100, (50, 50)),  # never smaller than the wave before
        (("10", "5%", "1"), 100, (10, 10, 10)),
        (("1", "1", "2"), 5, (1, 1, 2)),
        (("1", "50%"), 4, (1, 2)),  # the last wave below 100% leaves tenants out
    ],
)
def test_wave_sizes_are_cumulative_capped_and_non_decreasing(
    texts: tuple[str, ...], total: int, sizes: tuple[int, ...]
) -> None:
    assert wave_sizes(parse_waves(texts), total) == sizes


def test_wave_sizes_of_no_waves_is_one_wave_of_everything() -> None:
    assert wave_sizes((), 4) == (4,)


def test_wave_sizes_refuses_a_negative_fleet() -> None:
    with pytest.raises(ValueError, match="-1 tenants"):
        wave_sizes(parse_waves(CANARY), -1)


# --- decide_wave -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    states: Mapping[str, str]
    index: int
    size: int
    allowed: frozenset[str]
    waves: tuple[str, ...] = CANARY
    halt_after: int = 1
    lifted: int = -1
    halted: bool = False
    complete: bool = False
    says: tuple[str, ...] = ()  # fragments the reason must contain
    names_failed: tuple[str, ...] = field(default=())  # exactly the tenants the reason names


T0, T1, T2, T5 = "t0000", "t0001", "t0002", "t0005"

CASES: dict[str, Case] = {
    "no-tenants": Case({}, -1, 0, frozenset(), complete=True),
    "no-tenants-no-waves": Case({}, -1, 0, frozenset(), waves=(), complete=True),
    "one-tenant-behind": Case(fleet(1), 0, 1, span(0, 1)),
    "one-tenant-in-sync": Case(fleet(1, "in_sync"), 2, 1, frozenset(), complete=True),
    "three-first-wave-is-the-canary": Case(fleet(3), 0, 1, span(0, 1)),
    # wave 1 (10% of 3 = 1) is the canary again and done: the rollout is in wave 2
    "three-canary-done": Case(fleet(3, **{T0: "in_sync"}), 2, 3, span(1, 3)),
    "three-all-in-sync": Case(fleet(3, "in_sync"), 2, 3, frozenset(), complete=True),
    "thousand-canary": Case(fleet(1000), 0, 1, span(0, 1)),
    "thousand-canary-done": Case(fleet(1000, **{T0: "in_sync"}), 1, 100, span(1, 100)),
    "thousand-second-wave-done": Case(
        {**fleet(1000), **dict.fromkeys(names(100), "in_sync")}, 2, 1000, span(100, 1000)
    ),
    "thousand-all-in-sync": Case(fleet(1000, "in_sync"), 2, 1000, frozenset(), complete=True),
    "unsorted-input-is-sorted-by-name": Case({"b": "behind", "a": "behind"}, 0, 1, frozenset({"a"})),
    "no-waves-is-everything-at-once": Case(fleet(3), 0, 3, span(0, 3), waves=()),
    "uninitialized-empty-is-pending": Case(fleet(2, "uninitialized_empty"), 0, 2, span(0, 2), waves=()),
    # ahead and drift are done: nothing to apply, and they do not hold the wave open
    "ahead-is-done": Case(fleet(3, **{T0: "ahead"}), 2, 3, span(1, 3)),
    "drift-is-done": Case(fleet(3, **{T0: "drift"}), 2, 3, span(1, 3)),
    "ahead-is-never-applied": Case(fleet(2, "ahead"), 0, 2, frozenset(), waves=(), complete=True),
    # held (another replica applies it), unknown, suspended: not done, so the wave stays open
    "held-keeps-the-wave-open": Case(fleet(3, **{T0: "held"}), 0, 1, frozenset()),
    "unknown-keeps-the-wave-open": Case(fleet(3, **{T0: "unknown"}), 0, 1, frozenset()),
    "suspended-keeps-the-wave-open": Case(fleet(3, **{T0: "suspended"}), 0, 1, frozenset()),
    "a-state-this-module-does-not-know-keeps-the-wave-open": Case(
        fleet(3, **{T0: "something_new"}), 0, 1, frozenset()
    ),
    "held-in-a-later-wave-keeps-that-wave-open": Case(
        {**fleet(1000, "in_sync"), "t0050": "held", "t0060": "behind"}, 1, 100, frozenset({"t0060"})
    ),
    "held-in-the-last-wave-with-everyone-else-done": Case(
        fleet(3, "in_sync", **{T2: "held"}), 2, 3, frozenset()
    ),
    # a halt
    "failed-canary-halts": Case(
        fleet(3, **{T0: "failed"}),
        0,
        1,
        frozenset(),
        halted=True,
        says=("1 failed tenant in wave 1 of 3 (halt_after = 1)", "`reconciler resume` lifts the halt"),
        names_failed=(T0,),
    ),
    "blocked-canary-halts": Case(
        fleet(3, **{T0: "blocked"}), 0, 1, frozenset(), halted=True, names_failed=(T0,)
    ),
    "failed-canary-lifted-goes-on": Case(fleet(3, **{T0: "failed"}), 2, 3, span(1, 3), lifted=0),
    "failed-canary-never-halts-with-halt-after-0": Case(
        fleet(3, **{T0: "failed"}), 2, 3, span(1, 3), halt_after=0
    ),
    "failed-canary-under-halt-after-2-does-not-halt": Case(
        fleet(1000, **{T0: "failed"}), 1, 100, span(1, 100), halt_after=2
    ),
    "second-failure-in-wave-2-reaches-halt-after-2": Case(
        fleet(1000, **{T0: "failed", T5: "failed"}),
        1,
        100,
        span(1, 100, skip=(T5,)),
        halt_after=2,
        halted=True,
        says=("2 failed tenants in wave 2 of 3 (halt_after = 2)",),
        names_failed=(T0, T5),
    ),
    # the halted wave's other tenants still run; later waves do not start
    "halted-wave-still-runs-its-tenants": Case(
        fleet(4, **{T0: "failed"}),
        0,
        2,
        frozenset({T1}),
        waves=("2", "100%"),
        halted=True,
        names_failed=(T0,),
    ),
    "halted-wave-done-stops-there": Case(
        fleet(4, **{T0: "failed", T1: "in_sync"}),
        0,
        2,
        frozenset(),
        waves=("2", "100%"),
        halted=True,
        names_failed=(T0,),
    ),
    # lifting wave 1 acknowledges its failures: wave 2 halts on its own new ones only
    "lifted-wave-failures-are-not-counted-again": Case(
        fleet(1000, **{T0: "failed", T5: "failed"}),
        1,
        100,
        span(1, 100, skip=(T5,)),
        lifted=0,
        halted=True,
        says=("1 failed tenant in wave 2 of 3",),
        names_failed=(T5,),
    ),
    "lifted-wave-2-lets-wave-3-start": Case(
        {**fleet(1000), **dict.fromkeys(names(100), "in_sync"), T0: "failed", T5: "failed"},
        2,
        1000,
        span(100, 1000),
        lifted=1,
    ),
    "lifted-past-the-last-wave-never-halts": Case(
        fleet(3, "failed"), 2, 3, frozenset(), lifted=7, complete=True
    ),
    "halt-in-the-last-wave-is-reported-beside-complete": Case(
        fleet(2, "in_sync", **{T1: "dirty"}),
        0,
        2,
        frozenset(),
        waves=("100%",),
        halted=True,
        complete=True,
        names_failed=(T1,),
    ),
    "failed-tenants-do-not-hold-the-wave-open": Case(
        fleet(3, "failed", **{T2: "behind"}), 1, 3, frozenset({T2}), waves=("2", "100%"), halt_after=0
    ),
    "every-failed-with-halt-after-0-is-complete": Case(
        fleet(3, "failed"), 2, 3, frozenset(), halt_after=0, complete=True
    ),
    # the last wave below 100%: the rollout ends there, the rest are never applied
    "last-wave-below-100-ends-the-rollout": Case(
        fleet(4, **{T0: "in_sync", T1: "in_sync"}), 1, 2, frozenset(), waves=("1", "50%"), complete=True
    ),
    "last-wave-below-100-allows-only-its-tenants": Case(
        fleet(4, **{T0: "in_sync"}), 1, 2, frozenset({T1}), waves=("1", "50%")
    ),
    "failure-past-the-last-wave-is-not-counted": Case(
        fleet(4, "in_sync", **{"t0003": "failed"}), 0, 2, frozenset(), waves=("50%",), complete=True
    ),
    "many-failures-are-named-ten-and-counted": Case(
        fleet(20, "failed"),
        0,
        20,
        frozenset(),
        waves=(),
        halted=True,
        complete=True,
        says=("20 failed tenants in wave 1 of 1", "t0009 and 10 more;"),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_decide_wave(case: Case) -> None:
    decision = decide_wave(case.states, parse_waves(case.waves), case.halt_after, case.lifted)
    assert (decision.index, decision.size) == (case.index, case.size)
    assert decision.allowed == case.allowed
    assert (decision.halted, decision.complete) == (case.halted, case.complete)
    assert decision.count == len(parse_waves(case.waves))
    if not case.halted:
        assert decision.reason == ""
    for fragment in case.says:
        assert fragment in decision.reason
    if case.names_failed:
        assert decision.reason.split("): ")[1].split(";")[0] == ", ".join(case.names_failed)


@pytest.mark.parametrize("state", sorted(FAILED_STATES))
def test_decide_wave_counts_every_failed_like_state_toward_the_halt(state: str) -> None:
    decision = decide_wave(fleet(3, **{T0: state}), parse_waves(CANARY), halt_after=1)
    assert decision.halted
    assert decision.index == 0
    assert T0 in decision.reason


@pytest.mark.parametrize("state", STATES)
def test_decide_wave_allows_exactly_the_pending_states(state: str) -> None:
    decision = decide_wave({"acme": state}, (), halt_after=0)
    assert (decision.allowed == {"acme"}) == (state in ("behind", "uninitialized_empty"))


def test_state_sets_cover_the_vocabulary_as_specified() -> None:
    assert {"behind", "uninitialized_empty"} == PENDING_STATES
    assert {"in_sync", "ahead", "drift"} == DONE_STATES - FAILED_STATES
    assert not PENDING_STATES & DONE_STATES
    assert set(STATES) - DONE_STATES - PENDING_STATES == {
        "unknown",
        "held",
        "suspended",
        "revision_unreadable",
    }
    assert set(STATES) >= FAILED_STATES


def test_decide_wave_refuses_a_negative_halt_after() -> None:
    with pytest.raises(ValueError, match="halt_after = -1"):
        decide_wave(fleet(1), (), halt_after=-1)


@pytest.mark.parametrize("waves", [(), CANARY, ("1", "50%"), ("2", "2", "100%")])
@pytest.mark.parametrize("halt_after", [0, 1, 2])
@pytest.mark.parametrize("lifted", [-1, 0, 1])
def test_decide_wave_invariants_over_every_three_tenant_fleet(
    waves: tuple[str, ...], halt_after: int, lifted: int
) -> None:
    parsed = parse_waves(waves)
    kinds = ("in_sync", "behind", "failed", "held")  # one of each class of state
    for combo in itertools.product(kinds, repeat=3):
        states = dict(zip(names(3), combo))
        decision = decide_wave(states, parsed, halt_after, lifted)
        sizes = wave_sizes(parsed, 3)
        covered = names(3)[: decision.size]
        assert decision.size == sizes[decision.index]
        assert decision.allowed == {n for n in covered if states[n] == "behind"}
        assert decision.halted == bool(decision.reason)
        assert not decision.halted or (halt_after > 0 and decision.index > lifted)
        assert decision.complete == all(
            states[n] != "behind" and states[n] != "held" for n in names(3)[: sizes[-1]]
        )
        # every wave before the current one is done and did not halt
        for earlier in range(decision.index):
            assert all(states[n] in ("in_sync", "failed") for n in names(3)[: sizes[earlier]])


def test_wave_decision_as_dict_is_json_and_leaves_the_names_out() -> None:
    decision = decide_wave(fleet(1000, **{T0: "failed"}), parse_waves(CANARY), halt_after=1)
    document = decision.as_dict()
    assert json.loads(json.dumps(document)) == document
    assert document == {
        "index": 0,
        "size": 1,
        "count": 3,
        "halted": True,
        "reason": decision.reason,
        "complete": False,
    }


# --- counts, matches, names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({}, {}),
        ({"a": "behind"}, {"behind": 1}),
        (
            {"c": "in_sync", "a": "failed", "b": "in_sync", "d": "behind"},
            {"behind": 1, "failed": 1, "in_sync": 2},
        ),
    ],
)
def test_counts_are_tenants_per_state_with_sorted_keys(
    states: dict[str, str], expected: dict[str, int]
) -> None:
    result = counts(states)
    assert result == expected
    assert list(result) == sorted(expected)


def test_sources_are_the_five_ways_to_list_tenants() -> None:
    assert SOURCES == ("schemas", "databases", "files", "query", "list")


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("acme", "", True),
        ("acme", "*", True),
        ("", "", True),
        ("acme", "ac*", True),
        ("acme", "acme", True),
        ("acme", "b*", False),
        ("Acme", "acme", False),  # case-sensitive everywhere
        ("acme", "ACME", False),
        ("tenant_1", "tenant_?", True),
        ("tenant_10", "tenant_?", False),
        ("t3", "t[0-4]", True),
        ("t7", "t[0-4]", False),
        ("a.b", "a?b", True),
        ("ab", "a.b", False),  # a glob, not a regular expression
    ],
)
def test_matches_is_a_case_sensitive_glob_where_empty_matches_all(
    name: str, pattern: str, expected: bool
) -> None:
    assert matches(name, pattern) is expected


@pytest.mark.parametrize(
    "name", ["acme", "a", "x" * 63, "tenant-1", "tenant_1", "Tenant.One", "two words", "über", "ü" * 31]
)
def test_check_tenant_name_accepts_a_usable_name(name: str) -> None:
    assert check_tenant_name(name) is None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "is empty"),
        ("x" * 64, "64 characters"),
        ("ü" * 32, "64 bytes"),  # 32 characters, but PostgreSQL would truncate it
        ("a\x00b", "control character '\\x00'"),
        ("a\nb", "control character '\\n'"),
        ("\x7f", "control character"),
        (" acme", "whitespace"),
        ("acme ", "whitespace"),
        ("\tacme", "control character"),
        ("acme\u00a0", "whitespace"),  # a no-break space
        ('a"b', "contains '\"'"),
        ("a\\b", "contains '\\\\'"),
    ],
)
def test_check_tenant_name_refuses_an_unsafe_name_naming_it(name: str, says: str) -> None:
    message = check_tenant_name(name)
    assert message is not None
    assert repr(name) in message
    assert says in message
