"""The prod loop: interval runs, run-now triggers, one follow-up, backoff, shutdown; real threads."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from reconciler.core.backoff import backoff, retry_window
from reconciler.errors import ConfigError
from reconciler.runtime.scheduler import Loop

DEADLINE = 5.0


class Runs:
    """A run function that records (reason, start, end) and can be told what to do per call."""

    def __init__(self, body: Callable[[int, str], float | None] | None = None) -> None:
        self.calls: list[tuple[str, float, float]] = []
        self.cond = threading.Condition()
        self.body = body
        self.active = 0
        self.max_active = 0

    def __call__(self, reason: str) -> float | None:
        start = time.monotonic()
        with self.cond:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            index = len(self.calls)
        try:
            return self.body(index, reason) if self.body else None
        finally:
            with self.cond:
                self.active -= 1
                self.calls.append((reason, start, time.monotonic()))
                self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), ("condition not met in time", self.calls)

    def wait_count(self, count: int, timeout: float = DEADLINE) -> None:
        self.wait_for(lambda: len(self.calls) >= count, timeout)

    def wait_reason(self, reason: str) -> None:
        self.wait_for(lambda: any(call[0] == reason for call in self.calls))

    @property
    def reasons(self) -> list[str]:
        with self.cond:
            return [reason for reason, _, _ in self.calls]


@pytest.fixture
def loops() -> Iterator[list[Loop]]:
    made: list[Loop] = []
    yield made
    for loop in made:
        loop.stop(wait=True, timeout=DEADLINE)


def make(loops: list[Loop], run: Runs, interval: float, jitter: float = 0.0, start: bool = True) -> Loop:
    loop = Loop(run, interval=interval, jitter=jitter, name="test")
    loops.append(loop)
    if start:
        loop.start()
    return loop


def wait_idle(loop: Loop) -> None:
    deadline = time.monotonic() + DEADLINE
    while loop.running:
        assert time.monotonic() < deadline, "the loop stayed busy"
        time.sleep(0.001)


def test_first_run_at_start(loops: list[Loop]) -> None:
    runs = Runs()
    make(loops, runs, interval=60)
    runs.wait_count(1)  # within DEADLINE, long before the first 60 s interval
    assert runs.reasons == ["startup"]


def test_interval_runs_repeat(loops: list[Loop]) -> None:
    runs = Runs()
    make(loops, runs, interval=0.05)
    runs.wait_count(4)
    assert runs.reasons[:4] == ["startup", "interval", "interval", "interval"]


def test_jittered_interval_runs_repeat(loops: list[Loop]) -> None:
    runs = Runs()
    make(loops, runs, interval=0.02, jitter=0.02)
    runs.wait_count(4)


def test_trigger_while_idle_runs_promptly(loops: list[Loop]) -> None:
    runs = Runs()
    loop = make(loops, runs, interval=60)
    runs.wait_count(1)
    wait_idle(loop)
    loop.trigger("watch")
    runs.wait_count(2)
    assert runs.reasons == ["startup", "watch"]  # the trigger's run, not the 60 s interval's


def test_triggers_during_a_run_give_exactly_one_follow_up(loops: list[Loop]) -> None:
    inside, release = threading.Event(), threading.Event()

    def body(index: int, reason: str) -> None:
        if index == 0:
            inside.set()
            release.wait(DEADLINE)

    runs = Runs(body)
    loop = make(loops, runs, interval=60)
    assert inside.wait(DEADLINE)
    for n in range(5):
        loop.trigger(f"t{n}")  # returns while the run is held: never blocks the caller
    assert not release.is_set() and len(runs.calls) == 0  # the first run is still in progress
    release.set()
    runs.wait_count(2)
    assert runs.calls[1][1] >= runs.calls[0][2]  # after the slow run, not beside it
    wait_idle(loop)
    loop.trigger("probe")  # anything left pending would run before (or instead of) the probe
    runs.wait_count(3)
    assert runs.reasons == ["startup", "t0", "probe"]


def test_run_is_never_concurrent(loops: list[Loop]) -> None:
    runs = Runs(lambda index, reason: time.sleep(0.005))
    loop = make(loops, runs, interval=0.01)
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            loop.trigger("hammer")
            time.sleep(0.0005)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        runs.wait_count(30)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert runs.max_active == 1
    assert "hammer" in runs.reasons


def test_backoff_delays_the_next_run_then_the_interval_resumes(loops: list[Loop]) -> None:
    runs = Runs(lambda index, reason: 0.5 if index == 0 else None)
    make(loops, runs, interval=0.1)
    runs.wait_count(3)
    (r0, _, end0), (r1, start1, _end1), (r2, _, _) = runs.calls[:3]
    assert (r0, r1, r2) == ("startup", "backoff", "interval")
    assert start1 - end0 >= 0.5 - 0.01  # the scheduler's clock is the wall clock; allow its rounding


def test_a_short_delay_runs_sooner_than_the_interval(loops: list[Loop]) -> None:
    runs = Runs(lambda index, reason: 0.05 if index == 0 else None)
    make(loops, runs, interval=60)
    runs.wait_count(2)
    assert runs.reasons == ["startup", "backoff"]


def test_an_exception_in_run_does_not_stop_the_loop(loops: list[Loop]) -> None:
    def body(index: int, reason: str) -> None:
        if index < 2:
            raise RuntimeError("boom")

    runs = Runs(body)
    loop = make(loops, runs, interval=0.05)
    runs.wait_count(4)
    wait_idle(loop)
    loop.trigger("after-errors")
    runs.wait_reason("after-errors")


def test_stop_waits_for_the_run_in_progress(loops: list[Loop]) -> None:
    inside = threading.Event()
    finished = threading.Event()

    def body(index: int, reason: str) -> None:
        inside.set()
        time.sleep(0.3)
        finished.set()

    runs = Runs(body)
    loop = make(loops, runs, interval=60)
    assert inside.wait(DEADLINE)
    loop.trigger("dropped")  # a follow-up asked for before stop is not run after it
    assert loop.stop(wait=True, timeout=DEADLINE) is True
    assert finished.is_set()
    assert not loop.running
    assert runs.reasons == ["startup"]


def test_stop_with_a_timeout_returns_false_when_the_run_outlasts_it(loops: list[Loop]) -> None:
    inside = threading.Event()
    release = threading.Event()

    def body(index: int, reason: str) -> None:
        inside.set()
        release.wait(DEADLINE)

    runs = Runs(body)
    loop = make(loops, runs, interval=0.01)
    assert inside.wait(DEADLINE)
    assert loop.stop(wait=True, timeout=0.1) is False
    # it gave up while the run was still inside its body (nothing has released it yet)
    assert not release.is_set() and runs.active == 1 and len(runs.calls) == 0
    assert loop.running
    release.set()
    runs.wait_count(1)
    wait_idle(loop)
    loop.trigger("after-stop")
    assert loop.stop(wait=True, timeout=DEADLINE) is True
    assert runs.reasons == ["startup"]  # no runs after stop, neither ticks nor triggers


def test_stop_from_inside_the_run_does_not_wait_for_itself(loops: list[Loop]) -> None:
    results: list[bool] = []
    holder: list[Loop] = []

    def body(index: int, reason: str) -> None:
        results.append(holder[0].stop(wait=True, timeout=DEADLINE))

    runs = Runs(body)
    holder.append(make(loops, runs, interval=60, start=False))
    holder[0].start()
    runs.wait_count(1)
    assert results == [False]


def test_stop_before_start_and_twice_is_harmless() -> None:
    loop = Loop(lambda reason: None, interval=1)
    assert loop.stop() is True
    assert loop.stop() is True


def test_heartbeat(loops: list[Loop]) -> None:
    inside = threading.Event()
    release = threading.Event()
    beats: list[float] = []
    holder: list[Loop] = []

    def body(index: int, reason: str) -> None:
        if index == 0:
            beats.append(holder[0].last_beat)
            inside.set()
            release.wait(DEADLINE)

    runs = Runs(body)
    holder.append(make(loops, runs, interval=60, start=False))
    loop = holder[0]
    loop.start()
    assert inside.wait(DEADLINE)
    assert loop.running
    before = loop.last_beat
    time.sleep(0.01)  # let the monotonic clock move on
    loop.beat()
    assert loop.last_beat > before >= beats[0]
    release.set()
    runs.wait_count(1)
    wait_idle(loop)
    assert loop.last_beat >= runs.calls[0][2]


@pytest.mark.parametrize(("interval", "jitter"), [(0, 0.0), (-1, 0.0), (float("nan"), 0.0), (1, -1.0)])
def test_bad_interval_or_jitter_is_a_config_error(interval: float, jitter: float) -> None:
    with pytest.raises(ConfigError, match="daemon"):
        Loop(lambda reason: None, interval=interval, jitter=jitter)


class _Top:
    """Always draws the top of the range, to read the ceiling off."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _Bottom:
    """Always draws the bottom of the range, to read the floor off."""

    def uniform(self, a: float, b: float) -> float:
        return a


# attempt, base (the daemon's interval), cap (backoff_max) -> the range the delay is drawn from
RETRY_WINDOWS = [
    (1, 30.0, 300.0, (30.0, 60.0)),  # the defaults: the first retry waits 1-2 intervals
    (2, 30.0, 300.0, (60.0, 120.0)),
    (3, 30.0, 300.0, (120.0, 240.0)),
    (4, 30.0, 300.0, (150.0, 300.0)),  # capped, still jittered over the cap's upper half
    (50, 30.0, 300.0, (150.0, 300.0)),
    (10_000, 30.0, 300.0, (150.0, 300.0)),  # no overflow
    (1, 2.0, 300.0, (2.0, 4.0)),  # interval 2: never the 1 s retries of a half-interval mean
    (1, 30.0, 5.0, (30.0, 30.0)),  # a cap below the interval: the interval, never less
    (3, 30.0, 40.0, (30.0, 40.0)),  # half the cap is below the interval: the floor is the interval
    (0, 1.0, 10.0, (1.0, 2.0)),  # attempt 0 reads as the first
]


@pytest.mark.parametrize(("attempt", "base", "cap", "window"), RETRY_WINDOWS)
def test_retry_window_table(attempt: int, base: float, cap: float, window: tuple[float, float]) -> None:
    assert retry_window(attempt, base, cap) == window
    assert backoff(attempt, base, cap, rng=_Bottom()) == window[0]
    assert backoff(attempt, base, cap, rng=_Top()) == window[1]


def test_backoff_is_never_below_the_base_capped_and_jittered() -> None:
    rng = random.Random(7)
    for base, cap in ((0.3, 2.4), (2.0, 300.0), (30.0, 300.0), (30.0, 5.0)):
        samples = [backoff(attempt, base, cap, rng=rng) for attempt in range(1, 200)]
        assert all(base <= s <= max(base, cap) for s in samples), (base, cap)
    late = [backoff(50, base=2.0, cap=300.0, rng=rng) for _ in range(200)]
    assert len(set(late)) == len(late)  # jittered: replicas that failed together retry apart
    assert min(late) < 200.0 < max(late)  # spread over the cap's upper half
    assert 2.0 <= backoff(1, base=2.0, cap=10.0) <= 4.0  # the module's random by default


def test_no_trigger_is_lost_at_the_end_of_a_run(loops: list[Loop]) -> None:
    """Each trigger, however close to a run's end, is followed by a run that starts after it."""
    ended = threading.Event()
    runs = Runs(lambda index, reason: ended.set())
    loop = make(loops, runs, interval=60)
    rng = random.Random(3)
    for n in range(300):
        assert ended.wait(DEADLINE)
        ended.clear()
        spin_until = time.perf_counter() + rng.random() * 0.0003
        while time.perf_counter() < spin_until:
            pass
        loop.trigger(f"t{n}")
        runs.wait_reason(f"t{n}")
