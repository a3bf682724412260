"""Alerts: the transition policy (fake clock) and delivery to real local HTTP servers."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from structlog.testing import capture_logs

from reconciler.core.alert_rules import EVENTS, RULES, Observation
from reconciler.core.alerting import Alert, AlertPolicy
from reconciler.redact import register_secret
from reconciler.runtime.delivery import AlertDispatcher
from reconciler.settings import AlertingSettings, AlertSink
from tests import dbs

HOUR = 3600.0
T0 = 1_700_000_000 // 3600 * 3600.0  # the start of a reminder bucket
ALERTING = AlertingSettings(
    unreachable_after=1, repeat_interval=HOUR, ahead_alert=True, ahead_grace=0.0, lock_held_after=600.0
)
OK = Observation("noop", "in_sync", "in_sync", ())
HOLDER = {"pid": 4242, "application_name": "reconciler/app/replica-1", "since": "2024-01-01T00:00:00"}
BAD = {
    "failed": Observation(
        "failed",
        "behind",
        "behind",
        (),
        failed_revision="r2",
        failure_signature="s1",
        error="division by zero",
        consecutive_failures=1,
    ),
    "blocked": Observation(
        "blocked",
        "blocked",
        "behind",
        ("blocked",),
        failed_revision="r2",
        failure_signature="s1",
        error="division by zero",
        blocked="r2:s1",
    ),
    "multiple_heads": Observation("noop", "multiple_heads", "multiple_heads", (), heads=("h2", "h1")),
    "ahead": Observation("noop", "ahead", "ahead", (), unknown=("x9",)),
    "lock_held": Observation("lock_busy", "behind", "behind", (), lock_holder=HOLDER, lock_held_for=900.0),
    "unreachable": Observation("unreachable", "unknown", "unknown", (), error="connection refused"),
    "dirty": Observation("refused", "dirty", "behind", ("dirty",), dirty=("b1",)),
    "lock_timeout": Observation(
        "failed",
        "behind",
        "behind",
        (),
        failed_revision="r2",
        failure_signature="s2",
        error="canceling statement due to lock timeout",
        lock_timeout=True,
    ),
    "drift": Observation(
        "noop",
        "drift",
        "in_sync",
        ("drift",),
        drift=("remove_column user.legacy",),
        drift_texts=("column user.legacy INTEGER is only in the database",),
    ),
    "destructive_refused": Observation(
        "refused",
        "destructive_pending",
        "behind",
        ("destructive_pending",),
        error="r3 (r3.py:21) data-loss: drop column t.c",
    ),
    "checksum_mismatch": Observation(
        "refused", "checksum_mismatch", "behind", ("checksum_mismatch",), mismatched=("r1",)
    ),
    "foreign_writer": Observation("noop", "in_sync", "in_sync", (), foreign=("r3",)),
    "revision_unreadable": Observation(
        "failed",
        "revision_unreadable",
        "unknown",
        ("revision_unreadable",),
        error="revision file versions/r3.py has a syntax error at line 7",
        consecutive_failures=1,
        unreadable="versions/r3.py:7",
        unreadable_hash="ab" * 32,
    ),
}
LOCAL = {"unreachable"}
ONE_OFF = {"foreign_writer"}  # a finding, not a lasting condition: no recovery
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def feed(
    policy: AlertPolicy, obs: Observation, start: float, stop: float, step: float = 30.0
) -> list[tuple[Alert, str | None]]:
    out = []
    now = start
    while now < stop:
        out.extend(policy.observe(obs, now))
        now += step
    return out


def names(pairs: list[tuple[Alert, str | None]]) -> list[str]:
    return [alert.event for alert, _key in pairs]


# --------------------------------------------------------------------------- policy


def test_every_event_has_a_rule_and_the_list_is_complete() -> None:
    assert set(EVENTS) == {
        "fleet_halted",
        "tenants_blocked",
        "applied",
        "failed",
        "blocked",
        "ahead",
        "multiple_heads",
        "lock_held",
        "unreachable",
        "dirty",
        "lock_timeout",
        "drift",
        "destructive_refused",
        "checksum_mismatch",
        "foreign_writer",
        "revision_unreadable",
        "recovered",
    }
    # the fleet's rules judge a fleet tick, not a target's: tests/runtime/test_fleet_daemon.py has their table
    assert set(RULES) - {"fleet_halted", "tenants_blocked"} == set(BAD)


@pytest.mark.parametrize("event", sorted(set(BAD) - ONE_OFF))
def test_enter_repeat_recover(event: str) -> None:
    policy = AlertPolicy("app", ALERTING)
    entered = policy.observe(BAD[event], T0)
    assert names(entered) == [event]
    alert, key = entered[0]
    assert alert.target == "app" and alert.state == BAD[event].state and ISO_UTC.match(alert.timestamp)
    episode = (key or "").split(":", 2)[-1]
    assert (key is None) if event in LOCAL else (key == f"enter:{event}:{episode}")

    assert feed(policy, BAD[event], T0 + 30, T0 + HOUR) == []  # never one per tick
    reminder = policy.observe(BAD[event], T0 + HOUR + 5)
    assert names(reminder) == [event] and reminder[0][0].details["reminder"] is True
    assert "still" in reminder[0][0].message
    assert feed(policy, BAD[event], T0 + HOUR + 35, T0 + 2 * HOUR) == []

    recovered = policy.observe(OK, T0 + 2 * HOUR + 10)
    assert names(recovered) == ["recovered"]
    assert recovered[0][0].details["recovered_from"] == event
    assert policy.observe(OK, T0 + 2 * HOUR + 40) == []
    keys = [key, reminder[0][1], recovered[0][1]]
    if event in LOCAL:
        assert keys == [None, None, None]
    else:
        assert keys[1] == f"repeat:{event}:{episode}:{int((T0 + HOUR) // HOUR)}"
        assert keys[2] == f"recovered:{event}:{episode}"


@pytest.mark.parametrize("event", sorted(BAD))
def test_a_hundred_identical_observations_give_one_alert(event: str) -> None:
    policy = AlertPolicy("app", ALERTING)
    out = [pair for i in range(100) for pair in policy.observe(BAD[event], T0 + 30 * i)]
    assert names(out) == [event]


@pytest.mark.parametrize("event", sorted(set(BAD) - LOCAL - ONE_OFF))
def test_two_replicas_compute_the_same_keys(event: str) -> None:
    one, two = AlertPolicy("app", ALERTING), AlertPolicy("app", ALERTING)
    a = one.observe(BAD[event], T0 + 5) + feed(one, BAD[event], T0 + 35, T0 + HOUR + 40)
    b = two.observe(BAD[event], T0 + 17) + feed(two, BAD[event], T0 + 47, T0 + HOUR + 40)
    a += one.observe(OK, T0 + HOUR + 100)
    b += two.observe(OK, T0 + HOUR + 121)
    assert names(a) == names(b) == [event, event, "recovered"]
    assert [k for _a, k in a] == [k for _a, k in b]
    assert all(k and len(k) <= 120 for _a, k in a)


def test_a_foreign_writer_is_said_once_per_set_of_revisions() -> None:
    one, two = AlertPolicy("app", ALERTING), AlertPolicy("app", ALERTING)
    first = one.observe(BAD["foreign_writer"], T0)
    assert names(first) == ["foreign_writer"] and first[0][1] == "enter:foreign_writer:r3"
    assert "r3" in first[0][0].message and first[0][0].details["foreign"] == ["r3"]
    assert names(two.observe(BAD["foreign_writer"], T0 + 7)) == ["foreign_writer"]  # same key: claimed once
    assert feed(one, OK, T0 + 30, T0 + 3 * HOUR) == []  # no recovery, no reminder
    again = one.observe(replace(BAD["foreign_writer"], foreign=("r4", "r5")), T0 + 3 * HOUR)
    assert [k for _a, k in again] == ["enter:foreign_writer:r4,r5"]


def test_a_checksum_mismatch_names_the_revisions() -> None:
    policy = AlertPolicy("app", ALERTING)
    [(alert, key)] = policy.observe(BAD["checksum_mismatch"], T0)
    assert key == "enter:checksum_mismatch:r1" and "r1" in alert.message and "accept" in alert.message


def test_a_reminder_never_follows_the_entry_closely() -> None:
    policy = AlertPolicy("app", ALERTING)
    late = T0 + HOUR - 60  # enters a minute before the bucket changes
    out = feed(policy, BAD["failed"], late, T0 + 2 * HOUR)
    assert names(out) == ["failed"]  # the next bucket is skipped: too soon after the entry
    out = feed(policy, BAD["failed"], T0 + 2 * HOUR, T0 + 3 * HOUR)
    assert names(out) == ["failed"] and out[0][0].details["reminder"] is True


def test_unreachable_only_after_n_consecutive_runs() -> None:
    policy = AlertPolicy("app", replace(ALERTING, unreachable_after=3))
    down = BAD["unreachable"]
    assert policy.observe(down, T0) == [] and policy.observe(down, T0 + 30) == []
    assert policy.observe(OK, T0 + 60) == []  # the streak is broken: no alert, no recovery
    assert policy.observe(down, T0 + 90) == [] and policy.observe(down, T0 + 120) == []
    third = policy.observe(down, T0 + 150)
    assert names(third) == ["unreachable"] and third[0][1] is None
    assert "3 runs" in third[0][0].message and "connection refused" in third[0][0].message
    back = policy.observe(OK, T0 + 180)
    assert names(back) == ["recovered"] and back[0][1] is None


def test_ahead_is_a_metric_by_default() -> None:
    policy = AlertPolicy("app", AlertingSettings())
    assert feed(policy, BAD["ahead"], T0, T0 + 3 * 86400, step=300.0) == []


def test_ahead_alerts_only_after_its_grace_when_configured() -> None:
    policy = AlertPolicy("app", replace(ALERTING, ahead_grace=600.0))
    assert feed(policy, BAD["ahead"], T0, T0 + 300) == []
    assert policy.observe(OK, T0 + 300) == []  # back in step: the grace starts again
    assert feed(policy, BAD["ahead"], T0 + 330, T0 + 330 + 600) == []
    out = policy.observe(BAD["ahead"], T0 + 930)
    assert names(out) == ["ahead"] and out[0][0].details["unknown"] == ["x9"]
    assert names(policy.observe(OK, T0 + 960)) == ["recovered"]


def test_applied_once_per_revision_by_the_applier_only() -> None:
    policy = AlertPolicy("app", ALERTING)
    out = policy.observe(replace(OK, outcome="applied", applied=("r1", "r2")), T0)
    assert [(a.event, a.revision, k) for a, k in out] == [("applied", "r1", None), ("applied", "r2", None)]
    assert policy.observe(OK, T0 + 30) == []
    other = AlertPolicy("app", ALERTING)  # a replica that saw the database move: nothing to say
    assert other.observe(OK, T0) == []


def test_a_new_failure_is_a_new_episode_without_recovery() -> None:
    policy = AlertPolicy("app", ALERTING)
    first = policy.observe(BAD["failed"], T0)
    second = policy.observe(replace(BAD["failed"], failure_signature="s2"), T0 + 30)
    assert names(second) == ["failed"] and second[0][1] != first[0][1]
    fixed = policy.observe(replace(OK, outcome="applied", applied=("r2",)), T0 + 60)
    assert names(fixed) == ["applied", "recovered"]
    assert fixed[1][0].revision == "r2" and fixed[1][1] == "recovered:failed:r2:s2"


def test_a_blocked_run_that_cannot_say_which_revision_keeps_the_episode() -> None:
    policy = AlertPolicy("app", ALERTING)
    assert names(policy.observe(BAD["blocked"], T0)) == ["blocked"]
    unknown = replace(BAD["blocked"], failed_revision=None, failure_signature="", conditions=(), blocked="")
    assert policy.observe(unknown, T0 + 1) == []  # its status read failed: no second episode
    assert policy.observe(BAD["blocked"], T0 + 2) == []


def test_a_blocked_run_without_the_journals_record_starts_no_episode_of_its_own() -> None:
    """The replica whose own failure blocked the revision, or one whose status read missed the
    record, knows a failure of its own (another signature): keyed by it, the fleet's claim saw a
    new episode and a second `blocked` alert went out. Only the journal's record is the key."""
    policy = AlertPolicy("app", ALERTING)
    assert names(policy.observe(BAD["blocked"], T0)) == ["blocked"]
    own = replace(BAD["blocked"], outcome="failed", failure_signature="s9", blocked="")
    assert "blocked" not in names(policy.observe(own, T0 + 1))  # (its `failed` is another event)
    assert "blocked" not in names(policy.observe(BAD["blocked"], T0 + 2))
    fresh = AlertPolicy("app", ALERTING)
    assert "blocked" not in names(fresh.observe(own, T0))  # it waits for a run that read the record
    assert names(fresh.observe(BAD["blocked"], T0 + 1)) == ["blocked"]


def test_an_unreachable_database_neither_enters_nor_ends_other_conditions() -> None:
    policy = AlertPolicy("app", replace(ALERTING, unreachable_after=99))
    policy.observe(BAD["failed"], T0)
    assert names(policy.observe(BAD["blocked"], T0 + 30)) == ["blocked"]  # failed lasts
    assert feed(policy, BAD["unreachable"], T0 + 60, T0 + 600) == []
    back = policy.observe(OK, T0 + 630)
    assert sorted(a.details["recovered_from"] for a, _k in back) == ["blocked", "failed"]


def test_a_lock_timeout_is_its_own_alert_not_a_failure() -> None:
    policy = AlertPolicy("app", ALERTING)
    assert names(policy.observe(BAD["lock_timeout"], T0)) == ["lock_timeout"]
    assert policy.observe(BAD["lock_timeout"], T0 + 30) == []
    assert policy.observe(replace(BAD["lock_timeout"], outcome="lock_busy"), T0 + 60) == []  # cannot tell
    back = policy.observe(replace(OK, outcome="applied", applied=("r2",)), T0 + 90)
    assert names(back) == ["applied", "recovered"] and back[1][0].details["recovered_from"] == "lock_timeout"


def test_dirty_alert_names_the_revision_and_the_resolve_command() -> None:
    policy = AlertPolicy("app", ALERTING)
    alert, key = policy.observe(BAD["dirty"], T0)[0]
    assert key == "enter:dirty:b1" and alert.details["dirty"] == ["b1"]
    assert "reconciler resolve b1 --applied" in alert.message


def test_lock_held_follows_the_holder() -> None:
    policy = AlertPolicy("app", ALERTING)
    young = replace(BAD["lock_held"], lock_held_for=599.0)
    assert policy.observe(young, T0) == []
    first = policy.observe(BAD["lock_held"], T0 + 30)
    assert names(first) == ["lock_held"] and "pid=4242" in (first[0][1] or "")
    assert first[0][0].details["holder"]["pid"] == 4242
    unknown = replace(BAD["lock_held"], lock_holder=None)  # holder not readable: cannot tell
    assert policy.observe(unknown, T0 + 60) == []
    other = replace(BAD["lock_held"], lock_holder={**HOLDER, "pid": 4343, "since": "later"})
    assert names(policy.observe(other, T0 + 90)) == ["lock_held"]
    assert names(policy.observe(OK, T0 + 120)) == ["recovered"]


def test_alert_text_never_carries_the_password() -> None:
    register_secret(dbs.CANARY_PASSWORD)
    url = f"postgresql://{dbs.CANARY_USER}:{dbs.CANARY_ENCODED}@db.example/app"
    policy = AlertPolicy("app", ALERTING)
    obs = replace(BAD["failed"], error=f"could not connect to {url} ({dbs.CANARY_PASSWORD})")
    alert = policy.observe(obs, T0)[0][0]
    assert "could not connect" in alert.message
    dbs.assert_no_canary(
        alert.message, json.dumps(alert.as_webhook()), json.dumps(alert.as_slack()), repr(alert)
    )


# --------------------------------------------------------------------------- local HTTP servers


class Server:
    """A webhook endpoint on 127.0.0.1: record (200), hang (never answers), slow (30 s), flaky (500, 200),
    error (always 500)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.stop = threading.Event()
        self.cond = threading.Condition()
        self.bodies: list[tuple[str, Any]] = []
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server.cond:
                    server.hits += 1
                    hit = server.hits
                    server.cond.notify_all()
                if server.mode == "hang":
                    server.stop.wait(300)
                    return
                if server.mode == "slow":
                    server.stop.wait(30)
                status = 500 if server.mode == "error" or (server.mode == "flaky" and hit == 1) else 200
                if status == 200:
                    with server.cond:
                        server.bodies.append((self.path, json.loads(body)))
                        server.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str = "hook") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}/T0KEN-{self.mode}"

    def wait(self, what: str, count: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(
                lambda: len(self.bodies if what == "bodies" else range(self.hits)) >= count, timeout
            )


@contextmanager
def serve(mode: str = "record") -> Iterator[Server]:
    server = Server(mode)
    server.thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.httpd.shutdown()
        server.httpd.server_close()


def sink(url: str, name: str = "hook", kind: str = "webhook", events: tuple[str, ...] = ()) -> AlertSink:
    return AlertSink(kind=kind, url=url, name=name, events=list(events))


def alert(event: str = "failed", revision: str | None = "r2", **details: Any) -> Alert:
    return Alert(
        event=event,
        state="behind",
        target="app",
        message=f"{event} happened",
        revision=revision,
        timestamp="2024-01-01T00:00:00Z",
        details=details,
    )


FAST = AlertingSettings(send_timeout=1.0, retries=3, queue_size=100)


@contextmanager
def dispatching(
    sinks: list[AlertSink], alerting: AlertingSettings = FAST, start: bool = True, **kwargs: Any
) -> Iterator[AlertDispatcher]:
    dispatcher = AlertDispatcher(sinks, alerting, **kwargs)
    if start:
        dispatcher.start()
    try:
        yield dispatcher
    finally:
        dispatcher.close(timeout=2.0)
        _wait_for_sink_threads_to_end([s.name for s in sinks])


def _wait_for_sink_threads_to_end(names: list[str], within: float = 10.0) -> None:
    """`close()` cuts a hung delivery and returns; the cut attempt then logs its
    `alert_delivery_failed` ('timed out': the close deadline fired, not the send_timeout) from the
    sink's thread a moment later. Wait for those threads to end, so that no test's delivery
    thread logs into the next test's captured logs (a generous bound, not a timing)."""
    wanted = {f"reconciler-alerts-{name}" for name in names}
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(t.name in wanted for t in threading.enumerate()):
        time.sleep(0.02)
    assert not any(t.name in wanted for t in threading.enumerate()), "a sink thread outlived close()"


# --------------------------------------------------------------------------- delivery


def test_webhook_and_slack_bodies() -> None:
    register_secret(dbs.CANARY_PASSWORD)
    policy = AlertPolicy("app", ALERTING)
    obs = replace(BAD["failed"], error=f"password {dbs.CANARY_PASSWORD} rejected")
    failed = policy.observe(obs, T0)[0][0]
    with serve() as server, dispatching([sink(server.url("a")), sink(server.url("b"), "chat", "slack")]) as d:
        assert d.submit(failed)
        assert server.wait("bodies", 2)
    bodies = dict((path.split("/")[1], body) for path, body in server.bodies)
    hook = bodies["a"]
    assert {"event", "state", "target", "revision", "message", "timestamp"} <= set(hook)
    assert [hook[k] for k in ("event", "state", "target", "revision")] == ["failed", "behind", "app", "r2"]
    assert ISO_UTC.match(hook["timestamp"]) and "failed" in hook["message"]
    assert isinstance(bodies["b"]["text"], str) and "app" in bodies["b"]["text"]
    assert "failed" in bodies["b"]["text"]
    dbs.assert_no_canary(json.dumps(server.bodies))


def test_events_filter() -> None:
    sent: list[tuple[str, str]] = []
    with (
        serve() as server,
        dispatching(
            [sink(server.url("only"), "only", events=("failed",)), sink(server.url("all"), "all")],
            on_sent=lambda event, name: sent.append((event, name)),
        ) as d,
    ):
        for item in (
            alert("applied"),
            alert("failed"),
            alert("recovered", recovered_from="failed"),
            alert("recovered", recovered_from="blocked"),
        ):
            d.submit(item)
        assert server.wait("bodies", 6)
        time.sleep(0.2)  # nothing else may arrive
    by_path: dict[str, list[str]] = {}
    for path, body in server.bodies:
        by_path.setdefault(path.split("/")[1], []).append(body["event"])
    assert by_path["only"] == ["failed", "recovered"]
    assert by_path["all"] == ["applied", "failed", "recovered", "recovered"]
    assert sorted(set(sent)) == [
        ("applied", "all"),
        ("failed", "all"),
        ("failed", "only"),
        ("recovered", "all"),
        ("recovered", "only"),
    ]


def test_retry_after_500_then_success_and_on_sent() -> None:
    done = threading.Event()
    sent: list[tuple[str, str]] = []

    def on_sent(event: str, name: str) -> None:
        sent.append((event, name))
        done.set()

    with (
        serve("flaky") as server,
        dispatching(
            [sink(server.url(), "flaky-hook")], replace(FAST, send_timeout=5.0), on_sent=on_sent
        ) as d,
    ):
        d.submit(alert("blocked"))
        assert done.wait(5)
    assert server.hits == 2 and [b["event"] for _p, b in server.bodies] == ["blocked"]
    assert sent == [("blocked", "flaky-hook")]


def test_submit_never_blocks_on_a_hung_sink_with_a_full_queue() -> None:
    """200 submits return while the sink's first delivery is still in flight: a submit that waited
    on the sink could only return once that delivery gave up, a minute later (and logged it)."""
    with (
        capture_logs() as logged,
        serve("hang") as server,
        dispatching([sink(server.url(), "hung")], replace(FAST, send_timeout=60.0, queue_size=5)) as d,
    ):
        d.submit(alert(revision="first"))
        assert server.wait("hits", 1)  # the worker is stuck inside the first delivery
        results = [d.submit(alert(revision=f"r{i}")) for i in range(200)]
        assert server.hits == 1 and not _delivery_failures(logged)  # still in flight
        assert results[:5] == [True] * 5 and not any(results[5:])
        assert d.dropped == 195


def test_a_hung_sink_delays_no_other_sink() -> None:
    with (
        capture_logs() as logged,
        serve("hang") as hung,
        serve() as good,
        dispatching(
            [sink(hung.url(), "hung"), sink(good.url(), "good")], replace(FAST, send_timeout=60.0)
        ) as d,
    ):
        for i in range(3):
            d.submit(alert(revision=f"r{i}"))
        assert hung.wait("hits", 1, timeout=30.0)  # the hung sink's first delivery has begun
        assert good.wait("bodies", 3, timeout=30.0)
        # all three reached the good sink while the hung one's first delivery is still in flight
        assert hung.hits == 1 and not _delivery_failures(logged)
        assert [b["revision"] for _p, b in good.bodies] == ["r0", "r1", "r2"]


def _delivery_failures(logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logged if e["event"] == "alert_delivery_failed"]


@pytest.mark.parametrize("mode", ["hang", "slow"])
def test_one_delivery_takes_at_most_send_timeout(mode: str) -> None:
    with serve(mode) as server, capture_logs() as logged:
        dispatcher = AlertDispatcher([sink(server.url(), "pager")], replace(FAST, send_timeout=1.0))
        dispatcher.start()
        dispatcher.submit(alert("unreachable", revision=None))
        dispatcher.close(timeout=60.0)  # waits for the delivery to give up
        # the "slow" server answers after 30 s and the "hang" one never: a delivery that failed
        # with a timeout, once, gave up at its send_timeout and did not retry past it
        answered = len(server.bodies)
    assert answered == 0
    failures = [e for e in logged if e["event"] == "alert_delivery_failed" and e["sink"] == "pager"]
    assert len(failures) == 1 and failures[0]["log_level"] == "warning"
    assert failures[0]["alert_event"] == "unreachable" and "timed out" in failures[0]["error"]
    assert "T0KEN" not in repr(logged) and "127.0.0.1" not in repr(logged)


def test_queue_overflow_drops_the_oldest() -> None:
    with serve() as server:
        dispatcher = AlertDispatcher([sink(server.url())], replace(FAST, queue_size=3))
        results = [dispatcher.submit(alert(revision=f"r{i}")) for i in range(5)]  # not started yet
        assert results == [True, True, True, False, False] and dispatcher.dropped == 2
        dispatcher.start()
        assert server.wait("bodies", 3)
        dispatcher.close(timeout=2.0)
    assert [b["revision"] for _p, b in server.bodies] == ["r2", "r3", "r4"]
    assert dispatcher.dropped == 2


def test_close_returns_within_its_timeout_with_a_hung_sink() -> None:
    with serve("hang") as server:
        dispatcher = AlertDispatcher([sink(server.url(), "stuck")], replace(FAST, send_timeout=60.0))
        dispatcher.start()
        for i in range(3):
            dispatcher.submit(alert(revision=f"r{i}"))
        assert server.wait("hits", 1)
        # The delivery would give up only after its 60 s send_timeout; close(0.5) cuts it short:
        # it is done well within half of that (a generous deadline, not a timing).
        closing = threading.Thread(target=dispatcher.close, kwargs={"timeout": 0.5})
        closing.start()
        closing.join(30.0)
        assert not closing.is_alive(), "close waited on the hung delivery"
        assert server.hits == 1
        assert dispatcher.dropped == 2  # the two never started are counted as lost
        deadline = time.monotonic() + 3.0  # and the worker thread does not linger
        while time.monotonic() < deadline and any(
            t.name == "reconciler-alerts-stuck" for t in threading.enumerate()
        ):
            time.sleep(0.02)
        assert not any(t.name == "reconciler-alerts-stuck" for t in threading.enumerate())
        assert dispatcher.submit(alert()) is False  # closed: nothing more is accepted


# --------------------------------------------------------------------------- what became of each alert


class Tally:
    """The dispatcher's result callbacks, recorded, with an event per result to wait on."""

    def __init__(self) -> None:
        self.results: list[tuple[str, str, str]] = []
        self.cond = threading.Condition()

    def callbacks(self) -> dict[str, Any]:
        return {f"on_{result}": self._recorder(result) for result in ("sent", "failed", "dropped")}

    def _recorder(self, result: str) -> Any:
        def record(event: str, name: str) -> None:
            with self.cond:
                self.results.append((result, event, name))
                self.cond.notify_all()

        return record

    def wait(self, count: int, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.results) >= count, timeout)


def test_a_delivery_that_fails_on_every_attempt_is_counted_failed_not_sent() -> None:
    tally = Tally()
    # A deadline every attempt fits in, whatever the jittered backoff between them draws: with
    # FAST's 1 s a slow draw leaves room for two attempts, and the count would be luck.
    roomy = dataclasses.replace(FAST, send_timeout=10.0)
    with (
        serve("error") as server,
        dispatching([sink(server.url(), "broken")], roomy, **tally.callbacks()) as d,
    ):
        d.submit(alert("blocked"))
        assert tally.wait(1, timeout=20.0)
    assert server.hits == FAST.retries  # each attempt was answered 500
    assert tally.results == [("failed", "blocked", "broken")]


def test_alerts_pushed_out_of_a_full_queue_are_counted_dropped_by_their_event() -> None:
    tally = Tally()
    with serve() as server:
        dispatcher = AlertDispatcher(
            [sink(server.url(), "chat")], replace(FAST, queue_size=2), **tally.callbacks()
        )
        for event in ("failed", "blocked", "recovered", "applied"):  # not started: the queue fills
            dispatcher.submit(alert(event))
        dispatcher.start()
        assert tally.wait(4)
        dispatcher.close(timeout=2.0)
    assert sorted(tally.results) == [
        ("dropped", "blocked", "chat"),
        ("dropped", "failed", "chat"),
        ("sent", "applied", "chat"),
        ("sent", "recovered", "chat"),
    ]


def test_alerts_left_in_the_queue_at_close_are_counted_dropped() -> None:
    tally = Tally()
    with serve("hang") as server:
        dispatcher = AlertDispatcher(
            [sink(server.url(), "stuck")], replace(FAST, send_timeout=60.0), **tally.callbacks()
        )
        dispatcher.start()
        for i in range(3):
            dispatcher.submit(alert(revision=f"r{i}"))
        assert server.wait("hits", 1)
        dispatcher.close(timeout=0.2)
        assert tally.wait(3)
    assert sorted(r for r, _e, _n in tally.results) == ["dropped", "dropped", "failed"]


WORKER_ERROR = "revision r2 failed at versions/r2_add.py:14: ZeroDivisionError: division by zero"


def test_the_failed_alert_says_the_revision_failed_once() -> None:
    obs = replace(BAD["failed"], error=WORKER_ERROR)
    ((failed, _key),) = AlertPolicy("app", ALERTING).observe(obs, T0)
    assert failed.message == WORKER_ERROR
    assert failed.message.count("failed") == 1


def test_the_lock_timeout_alert_names_the_revision_once() -> None:
    error = "revision r2 failed: OperationalError: canceling statement due to lock timeout"
    ((alert_, _key),) = AlertPolicy("app", ALERTING).observe(replace(BAD["lock_timeout"], error=error), T0)
    assert alert_.message.count("r2") == 1 and "canceling statement due to lock timeout" in alert_.message


def test_a_failed_revision_is_reported_behind_even_when_the_last_compare_found_drift() -> None:
    """Drift is reported, never gating: beside a failed revision the state is the sync state."""
    obs = replace(BAD["failed"], state="drift", conditions=("drift",), error=WORKER_ERROR)
    alerts = {a.event: a for a, _key in AlertPolicy("app", ALERTING).observe(obs, T0)}
    assert alerts["failed"].state == "behind"
    assert alerts["drift"].state == "drift"


def test_an_unreadable_revision_file_is_its_own_alert_naming_file_and_line_not_a_failure() -> None:
    policy = AlertPolicy("app", ALERTING)
    ((entered, _key),) = policy.observe(BAD["revision_unreadable"], T0)
    assert entered.event == "revision_unreadable" and entered.details["unreadable"] == "versions/r3.py:7"
    assert "line 7" in entered.message
    # the same file broken anew (another hash) is a new episode; fixed, it recovers
    again = replace(BAD["revision_unreadable"], unreadable_hash="cd" * 32)
    assert names(policy.observe(again, T0 + 30)) == ["revision_unreadable"]
    assert names(policy.observe(OK, T0 + 60)) == ["recovered"]


def test_an_unreadable_file_neither_enters_nor_ends_what_needs_the_database() -> None:
    policy = AlertPolicy("app", ALERTING)
    assert names(policy.observe(BAD["unreachable"], T0)) == ["unreachable"]
    assert names(policy.observe(BAD["revision_unreadable"], T0 + 30)) == ["revision_unreadable"]
