"""Alerts: a pure state machine that decides what to say, and delivery that never blocks the loop.

`AlertPolicy` turns what one run saw (an `Observation`) into transitions: one alert on entering a
bad condition, a reminder every `repeat_interval` while it lasts, one `recovered` when it ends;
never one per tick. Every transition carries an episode key that every replica computes alike for
the same fleet event, so the daemon can claim it in the database and only the first replica sends
it. `applied` and `unreachable` (with its reminders and recovery) are replica-local: their key is
`None` and they are sent without a claim.

`AlertDispatcher` delivers off the loop: one worker thread per sink, each with a bounded queue
(the oldest alert is dropped when full), retries inside a total deadline per alert and sink.
Webhook URLs carry tokens: logs name the sink, never its URL.

Adding an event is one line in `RULES` (see `_condition` for a condition-driven one).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Union

from reconciler import __version__, logs
from reconciler.core import urlcheck
from reconciler.redact import redact
from reconciler.settings import AlertingSettings, AlertSink

log = logs.get("reconciler.alerts")

KEY_MAX = 120  # episode keys fit the journal's flags key column with room for a prefix
_EPISODE_MAX = 80
_HOLDER_IDENTITY = (
    "pid",
    "connection_id",
    "backend_start",
    "host",
    "client_addr",
    "application_name",
    "replica",
)


# --------------------------------------------------------------------------- the alert


def iso_utc(when: float) -> str:
    """Wall-clock seconds → ISO 8601 UTC, e.g. `2024-05-01T12:00:00Z`."""
    return dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Alert:
    event: str
    state: str
    target: str
    message: str
    revision: str | None = None
    timestamp: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_webhook(self) -> dict[str, Any]:
        """The generic JSON webhook body."""
        return {
            "event": self.event,
            "state": self.state,
            "target": redact(self.target),
            "revision": self.revision,
            "message": redact(self.message),
            "timestamp": self.timestamp,
            "details": _redacted(dict(self.details)),
            "source": f"schema-reconciler {__version__}",
        }

    def as_slack(self) -> dict[str, Any]:
        """A Slack incoming-webhook body: a readable one-liner plus the fields as an attachment."""
        fields = [{"title": "state", "value": self.state, "short": True}]
        if self.revision:
            fields.append({"title": "revision", "value": self.revision, "short": True})
        fields.append({"title": "time", "value": self.timestamp, "short": True})
        icon = _ICONS.get(self.event, ":warning:")
        return {
            "text": redact(f"{icon} [{self.target}] {self.event}: {self.message}"),
            "attachments": [{"color": _COLORS.get(self.event, "warning"), "fields": fields}],
        }


_ICONS = {"applied": ":white_check_mark:", "recovered": ":white_check_mark:", "ahead": ":information_source:"}
_COLORS = {
    "applied": "good",
    "recovered": "good",
    "failed": "danger",
    "blocked": "danger",
    "unreachable": "danger",
    "dirty": "danger",
    "destructive_refused": "danger",
}


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Observation:
    """What one run saw; built by the daemon after each run."""

    # noop | applied | lock_busy | failed | unreachable | refused | blocked | suspended | deferred
    outcome: str
    state: str
    sync_state: str
    conditions: tuple[str, ...]
    applied: tuple[str, ...] = ()  # revisions THIS replica applied in this run
    failed_revision: str | None = None  # for blocked too (from the journal), so keys agree
    failure_signature: str = ""
    blocked: str = ""  # the journal's blocked record as "revision:signature": the same on every replica
    error: str = ""
    consecutive_failures: int = 0
    lock_holder: Mapping[str, Any] | None = None
    lock_held_for: float = 0.0
    unknown: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    dirty: tuple[str, ...] = ()  # revisions that may be half-applied (the journal's, as on every replica)
    lock_timeout: bool = False  # the failure was our DDL waiting longer than ddl_lock_timeout
    drift: tuple[str, ...] = ()  # keys of the drift differences (the episode)
    drift_texts: tuple[str, ...] = ()  # and what they say, for the message
    mismatched: tuple[str, ...] = ()  # applied revisions whose file changed or vanished
    foreign: tuple[str, ...] = ()  # revisions found applied without our journal in this run
    unreadable: str = ""  # `path:line` of a revision file that does not parse (nothing was decided)
    unreadable_hash: str = ""  # that file's hash: breaking it anew is a new episode

    @property
    def blind(self) -> bool:
        """The database was not read: nothing it holds may be judged from this run."""
        return self.outcome == "unreachable" or self.sync_state == "unknown"


class _Keep:
    """A detector's verdict: this run cannot tell; leave the condition as it was."""


KEEP = _Keep()
Verdict = Union[str, None, _Keep]  # an episode (condition active), None (it is not), or KEEP
Detector = Callable[[Observation, AlertingSettings], Verdict]


def _failure_episode(obs: Observation) -> str:
    return f"{obs.failed_revision or '-'}:{obs.failure_signature}"


def _blocked(obs: Observation, _a: AlertingSettings) -> Verdict:
    """Blocked until the revision's file changes. The episode is the journal's blocked record
    only, never the run's own failure: a run that did not read the record (its status read
    failed) cannot tell, and must not start a second episode under a key of its own."""
    if "blocked" in obs.conditions or obs.outcome == "blocked":
        return obs.blocked or KEEP
    return KEEP if obs.blind else None


def _failed(obs: Observation, _a: AlertingSettings) -> Verdict:
    """A failure lasts until a run succeeds; lock_busy, blocked, refused... cannot tell (nor a
    run that could not read the revision files: that is `revision_unreadable`'s)."""
    if obs.unreadable:
        return KEEP
    if obs.outcome == "failed" and not obs.lock_timeout:
        return _failure_episode(obs)
    return None if obs.outcome in ("noop", "applied") else KEEP


def _lock_timeout(obs: Observation, _a: AlertingSettings) -> Verdict:
    """Our DDL gave up waiting for a table lock (after its retries) until a run succeeds."""
    if obs.outcome == "failed" and obs.lock_timeout:
        return obs.failed_revision or "-"
    return None if obs.outcome in ("noop", "applied") else KEEP


def _condition(name: str, episode: Callable[[Observation], str] = lambda _o: "") -> Detector:
    """A detector for a condition of the target (`blocked`, `dirty`, `drift`, ...)."""

    def detect(obs: Observation, _a: AlertingSettings) -> Verdict:
        if name in obs.conditions or obs.outcome == name:
            return episode(obs) or name
        return KEEP if obs.blind else None

    return detect


def _sync_state(name: str, episode: Callable[[Observation], str]) -> Detector:
    def detect(obs: Observation, _a: AlertingSettings) -> Verdict:
        if obs.sync_state == name:
            return episode(obs) or name
        return KEEP if obs.blind else None

    return detect


def _lock_held(obs: Observation, alerting: AlertingSettings) -> Verdict:
    if obs.lock_holder is not None and obs.lock_held_for >= alerting.lock_held_after:
        holder = obs.lock_holder
        return ",".join(f"{k}={holder[k]}" for k in _HOLDER_IDENTITY if k in holder) or "unknown-holder"
    if obs.blind or (obs.outcome == "lock_busy" and obs.lock_holder is None):
        return KEEP
    return None


def _foreign_writer(obs: Observation, _a: AlertingSettings) -> Verdict:
    """A one-off finding, not a lasting condition: one alert per set of revisions, no recovery."""
    return _joined(obs.foreign) if obs.foreign else KEEP


def _unreachable(obs: Observation, _a: AlertingSettings) -> Verdict:
    if obs.unreadable:
        return KEEP  # the database was not tried
    return "database" if obs.outcome == "unreachable" else None


def _unreadable(obs: Observation, _a: AlertingSettings) -> Verdict:
    """Lasts while a revision file does not parse; any run that read the files ends it."""
    if not obs.unreadable:
        return None
    return f"{obs.unreadable}@{obs.unreadable_hash[:16]}" if obs.unreadable_hash else obs.unreadable


def _joined(values: Sequence[str]) -> str:
    return ",".join(sorted(values))


@dataclass(frozen=True)
class Rule:
    detect: Detector
    text: str  # the message; `{name}` fields come from `_fields`
    local: bool = False  # replica-local: no episode key, sent without a fleet claim
    revision: bool = False  # the alert names `failed_revision`
    extras: tuple[str, ...] = ()  # `_fields` copied into details
    enabled: Callable[[AlertingSettings], bool] = lambda _a: True
    min_runs: Callable[[AlertingSettings], int] = lambda _a: 1
    grace: Callable[[AlertingSettings], float] = lambda _a: 0.0


RULES: dict[str, Rule] = {
    "failed": Rule(
        _failed, "{failure}", revision=True, extras=("error", "signature", "consecutive_failures")
    ),
    "blocked": Rule(
        _blocked,
        "revision {revision} is blocked after failing the same way repeatedly: {error}; "
        "fix the revision file (changing it unblocks it)",
        revision=True,
        extras=("error", "signature"),
    ),
    "ahead": Rule(
        _sync_state("ahead", lambda o: _joined(o.unknown)),
        "the database holds revisions the repository does not know ({unknown}) for {lasted}; "
        "deploy the newer code or check for a rollback",
        extras=("unknown",),
        enabled=lambda a: a.ahead_alert,
        grace=lambda a: a.ahead_grace,
    ),
    "dirty": Rule(
        _condition("dirty", lambda o: _joined(o.dirty)),
        "revision {dirty} started and did not complete after it left its transaction (DDL "
        "that commits as it goes, or an autocommit block): it may be half-applied and is not "
        "retried. `reconciler status` says what to check; finish or undo it by hand, then run "
        "`reconciler resolve {first_dirty} --applied` or `--rolled-back`",
        extras=("dirty",),
    ),
    "lock_timeout": Rule(
        _lock_timeout,
        "revision {revision} gave up waiting for a table lock "
        "(ddl_lock_timeout) on every retry: {cause}; it is retried with backoff. Look for "
        "long transactions on the tables it alters",
        revision=True,
        extras=("error",),
    ),
    "multiple_heads": Rule(
        _sync_state("multiple_heads", lambda o: _joined(o.heads)),
        "the repository has unmerged heads ({heads}); merge them with `alembic merge` (or `flask db merge`)",
        extras=("heads",),
    ),
    "destructive_refused": Rule(
        _condition("destructive_pending"),
        "a pending revision would lose data and was not applied: {error}",
        extras=("error",),
    ),
    "checksum_mismatch": Rule(
        _condition("checksum_mismatch", lambda o: _joined(o.mismatched)),
        "applied revision(s) {mismatched} changed or vanished since they were "
        "applied; applying stops until the change is reviewed and accepted "
        "(`reconciler accept REV`)",
        extras=("mismatched",),
    ),
    "foreign_writer": Rule(
        _foreign_writer,
        "revision(s) {foreign} were applied without reconciler (an app upgrading "
        "itself at start-up?); switch that off, or take our lock with "
        "reconciler.hooks.migration_lock",
        extras=("foreign",),
    ),
    "lock_held": Rule(
        _lock_held,
        "the migration lock has been held for {held_for} by {holder}",
        extras=("holder", "held_for_seconds"),
    ),
    "drift": Rule(
        _condition("drift", lambda o: "drift:" + _joined(o.drift)),
        "the database schema differs from the models ({drift_count}): {drift}; fix it, "
        "accept it with `reconciler baseline`, or add a [drift] ignore rule",
        extras=("drift",),
    ),
    "revision_unreadable": Rule(_unreadable, "{error}", extras=("error", "unreadable")),
    "unreachable": Rule(
        _unreachable,
        "the database is unreachable ({runs} runs in a row): {error}",
        local=True,
        extras=("error", "runs"),
        min_runs=lambda a: a.unreachable_after,
    ),
}
EVENTS: tuple[str, ...] = ("applied", *RULES, "recovered")


def _cause(revision: str, error: str) -> str:
    """The worker's error without its own `revision R failed[ at file:line]` prefix."""
    if not error:
        return "no error text"
    prefix = f"revision {revision} failed"
    if error.startswith(prefix):
        rest = error[len(prefix) :]
        where, sep, cause = rest.partition(": ")
        if sep and (not where or where.startswith(" at ")):
            return cause
    return error


def _failure_text(revision: str, error: str) -> str:
    """`revision R failed[ at file:line]: cause`, said once whoever wrote the prefix."""
    if error.startswith(f"revision {revision} failed"):
        return error
    return f"revision {revision} failed: {_cause(revision, error)}"


def _state_for(event: str, obs: Observation) -> str:
    """The state an alert reports. Drift is reported, never gating: it names the state only in
    its own alert (and its recovery), so a failed revision reads `behind`, not `drift`."""
    return obs.sync_state if obs.state == "drift" and event != "drift" else obs.state


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def _episode_id(episode: str) -> str:
    if len(episode) <= _EPISODE_MAX:
        return episode
    return "sha256-" + hashlib.sha256(episode.encode("utf-8")).hexdigest()[:32]


@dataclass
class _Track:
    """One event's condition as this replica has seen it."""

    episode: str
    since: float  # when the condition (in any episode) was first seen, continuously
    runs: int = 0  # consecutive runs it has been seen
    entered: bool = False  # the entry alert was emitted
    entered_at: float = 0.0
    last_sent: float = 0.0
    last_bucket: int = 0
    revision: str | None = None


class AlertPolicy:
    """Pure (no I/O, no clock of its own): observations in, (alert, episode key) pairs out.

    `now` is wall-clock seconds (`time.time()`): reminder buckets are `int(now // repeat_interval)`,
    the same on every replica. Not thread-safe: call it from the loop only.
    """

    def __init__(self, target: str, alerting: AlertingSettings) -> None:
        self.target = target
        self.alerting = alerting
        self._tracks: dict[str, _Track] = {}

    def observe(self, obs: Observation, now: float) -> list[tuple[Alert, str | None]]:
        out: list[tuple[Alert, str | None]] = [
            (self._alert("applied", obs, now, f"revision {rev} applied", revision=rev), None)
            for rev in obs.applied
        ]
        for event, rule in RULES.items():
            if rule.enabled(self.alerting):
                out.extend(self._step(event, rule, obs, now))
        return out

    def _step(self, event: str, rule: Rule, obs: Observation, now: float) -> list[tuple[Alert, str | None]]:
        verdict = rule.detect(obs, self.alerting)
        track = self._tracks.get(event)
        if isinstance(verdict, _Keep):
            return []
        if verdict is None:
            self._tracks.pop(event, None)
            return [self._recovered(event, rule, track, obs, now)] if track and track.entered else []
        episode = _episode_id(verdict)
        if track is None:
            track = self._tracks[event] = _Track(episode, since=now)
        elif track.episode != episode:  # a new episode of a lasting condition: say it, no recovery
            track.episode, track.entered = episode, False
        track.runs += 1
        if not track.entered:
            return self._enter(event, rule, track, obs, now)
        return self._remind(event, rule, track, obs, now)

    def _enter(
        self, event: str, rule: Rule, track: _Track, obs: Observation, now: float
    ) -> list[tuple[Alert, str | None]]:
        if track.runs < max(1, rule.min_runs(self.alerting)) or now - track.since < rule.grace(self.alerting):
            return []
        track.entered, track.entered_at, track.last_sent = True, now, now
        track.last_bucket = self._bucket(now)
        track.revision = obs.failed_revision if rule.revision else None
        alert = self._alert(
            event,
            obs,
            now,
            self._text(rule, track, obs, now),
            track.revision,
            self._extras(rule, track, obs, now),
        )
        return [(alert, self._key(rule, f"enter:{event}:{track.episode}"))]

    def _remind(
        self, event: str, rule: Rule, track: _Track, obs: Observation, now: float
    ) -> list[tuple[Alert, str | None]]:
        interval = self.alerting.repeat_interval
        bucket = self._bucket(now)
        # Reminders fall on wall-clock multiples of the interval so that replicas name the same one.
        # A bucket that begins less than half an interval after the previous alert is skipped whole.
        if interval <= 0 or bucket <= track.last_bucket:
            return []
        track.last_bucket = bucket
        if now - track.last_sent < interval / 2:
            return []
        track.last_sent = now
        text = f"still: {self._text(rule, track, obs, now)} (since {iso_utc(track.entered_at)})"
        details = {**self._extras(rule, track, obs, now), "reminder": True, "since": iso_utc(track.since)}
        alert = self._alert(event, obs, now, text, track.revision, details)
        return [(alert, self._key(rule, f"repeat:{event}:{track.episode}:{bucket}"))]

    def _recovered(
        self, event: str, rule: Rule, track: _Track, obs: Observation, now: float
    ) -> tuple[Alert, str | None]:
        what = f"revision {track.revision}: " if track.revision else ""
        text = f"{what}{event} is over after {_duration(now - track.since)}"
        details = {"recovered_from": event, "episode": track.episode, "since": iso_utc(track.since)}
        alert = self._alert("recovered", obs, now, text, track.revision, details)
        return alert, self._key(rule, f"recovered:{event}:{track.episode}")

    def _bucket(self, now: float) -> int:
        interval = self.alerting.repeat_interval
        return int(now // interval) if interval > 0 else 0

    @staticmethod
    def _key(rule: Rule, key: str) -> str | None:
        return None if rule.local else key[:KEY_MAX]

    def _alert(
        self,
        event: str,
        obs: Observation,
        now: float,
        message: str,
        revision: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Alert:
        base = {"sync_state": obs.sync_state, "conditions": list(obs.conditions), "outcome": obs.outcome}
        return Alert(
            event=event,
            state=_state_for(event, obs),
            target=redact(self.target),
            message=redact(message),
            revision=revision,
            timestamp=iso_utc(now),
            details=_redacted({**base, **(details or {})}),
        )

    @staticmethod
    def _fields(track: _Track, obs: Observation, now: float) -> dict[str, Any]:
        holder = dict(obs.lock_holder or {})
        revision = obs.failed_revision or "-"
        return {
            "revision": revision,
            "error": obs.error or "no error text",
            "failure": _failure_text(revision, obs.error),
            "cause": _cause(revision, obs.error),
            "signature": obs.failure_signature,
            "consecutive_failures": obs.consecutive_failures,
            "heads": ", ".join(sorted(obs.heads)) or "-",
            "unknown": ", ".join(sorted(obs.unknown)) or "-",
            "dirty": ", ".join(obs.dirty) or "-",
            "first_dirty": obs.dirty[0] if obs.dirty else "REVISION",
            "mismatched": ", ".join(sorted(obs.mismatched)) or "-",
            "foreign": ", ".join(sorted(obs.foreign)) or "-",
            "unreadable": obs.unreadable or "-",
            "holder": ", ".join(f"{k}={v}" for k, v in holder.items()) or "an unknown session",
            "held_for": _duration(obs.lock_held_for),
            "held_for_seconds": round(obs.lock_held_for, 1),
            "runs": track.runs,
            "lasted": _duration(now - track.since),
            "drift": "; ".join(obs.drift_texts[:10]) + ("; ..." if len(obs.drift_texts) > 10 else ""),
            "drift_count": len(obs.drift),
        }

    def _text(self, rule: Rule, track: _Track, obs: Observation, now: float) -> str:
        return rule.text.format_map(self._fields(track, obs, now))

    def _extras(self, rule: Rule, track: _Track, obs: Observation, now: float) -> dict[str, Any]:
        fields = self._fields(track, obs, now)
        values: dict[str, Any] = {name: fields[name] for name in rule.extras}
        if "holder" in values:
            values["holder"] = dict(obs.lock_holder or {})
        for name in ("heads", "unknown", "dirty", "mismatched", "foreign"):
            if name in values:
                values[name] = sorted(getattr(obs, name))
        if "drift" in values:
            values["drift"] = list(obs.drift_texts)
        return values


# --------------------------------------------------------------------------- delivery

_BACKOFF = 0.2  # seconds before the second attempt; doubles, always inside the deadline
_MIN_ATTEMPT = 0.05  # no attempt is started with less time than this left


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: following it would resend the body (and token) elsewhere, as a GET."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


class _InFlight:
    """The connection of the attempt in flight, so that it can be cut at its deadline or at close.

    Per-attempt socket timeouts bound each connect and read; cutting the socket also bounds an
    endpoint that answers a byte at a time, and lets `close()` release a hung delivery.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.cut = False

    def track(
        self, cls: type[http.client.HTTPConnection], allow_link_local: bool = False
    ) -> Callable[..., http.client.HTTPConnection]:
        def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
            conn = cls(*args, **kwargs)
            conn._create_connection = _checked_connect(allow_link_local)  # type: ignore[attr-defined]
            with self._lock:
                self._conn, self.cut = conn, False
            return conn

        return make

    def abort(self) -> None:
        with self._lock:
            sock = self._conn.sock if self._conn is not None else None
            self.cut = True
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def opener(self, allow_link_local: bool = False) -> urllib.request.OpenerDirector:
        """HTTP and HTTPS only: not `build_opener`'s defaults, which also open file://, ftp:// and
        data: URLs. Each connection's peer address is checked (`_checked_connect`)."""
        tracker = self

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(tracker.track(http.client.HTTPConnection, allow_link_local), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(
                    tracker.track(http.client.HTTPSConnection, allow_link_local),
                    req,
                    context=ssl.create_default_context(),
                )

        opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler(),
            urllib.request.UnknownHandler(),
            Http(),
            Https(),
            _NoRedirect(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ):
            opener.add_handler(handler)
        return opener


def _checked_connect(allow_link_local: bool) -> Callable[..., socket.socket]:
    """`socket.create_connection`, refusing a peer on a link-local or metadata address once
    connected and before a byte is sent: a host name may resolve there (DNS is not checked at
    configuration time)."""

    def connect(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.create_connection(address, *args, **kwargs)
        why = urlcheck.peer_refusal(str(sock.getpeername()[0]), allow_link_local)
        if why:
            sock.close()
            raise OSError(why)
        return sock

    return connect


def wants(sink: AlertSink, alert: Alert) -> bool:
    """A sink's `events` filter (empty: all). `recovered` passes when the event it ends is listed."""
    if not sink.events:
        return True
    return alert.event in sink.events or (
        alert.event == "recovered" and alert.details.get("recovered_from") in sink.events
    )


def _failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return f"connection failed: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class Counts:
    """Where delivery results go (the metrics): each callback gets (event, sink name)."""

    on_sent: Callable[[str, str], None] | None = None
    on_failed: Callable[[str, str], None] | None = None
    on_dropped: Callable[[str, str], None] | None = None


class _SinkWorker:
    """One sink: a bounded queue and the thread that drains it."""

    def __init__(self, sink: AlertSink, alerting: AlertingSettings, counts: Counts) -> None:
        self.sink = sink
        self.alerting = alerting
        self.counts = counts
        self.queue: deque[Alert] = deque()
        self.size = max(1, alerting.queue_size)
        self.cond = threading.Condition()
        self.dropped = 0
        self.closing = False
        self.close_deadline = float("inf")
        self.in_flight = _InFlight()
        self.opener = self.in_flight.opener(alerting.allow_link_local)
        self.thread = threading.Thread(target=self._run, name=f"reconciler-alerts-{sink.name}", daemon=True)

    def put(self, alert: Alert) -> bool:
        with self.cond:
            if self.closing:
                self.dropped += 1
                lost: Alert | None = alert
            else:
                lost = self.queue.popleft() if len(self.queue) >= self.size else None
                if lost is not None:
                    self.dropped += 1
                self.queue.append(alert)
                self.cond.notify()
        if lost is not None:
            self._count(self.counts.on_dropped, lost)
        return lost is None

    def _next(self) -> Alert | None:
        with self.cond:
            while not self.queue and not self.closing:
                self.cond.wait()
            if not self.queue or time.monotonic() >= self.close_deadline:
                return None
            return self.queue.popleft()

    def _run(self) -> None:
        while (alert := self._next()) is not None:
            try:
                self._deliver(alert)
            except Exception as exc:  # the worker must outlive any surprise
                log.warning(
                    "alert_worker_error",
                    sink=self.sink.name,
                    alert_event=alert.event,
                    error=redact(f"{type(exc).__name__}: {exc}"),
                )

    def _deliver(self, alert: Alert) -> None:
        payload = alert.as_slack() if self.sink.kind == "slack" else alert.as_webhook()
        body = json.dumps(payload).encode("utf-8")
        send_deadline = time.monotonic() + self.alerting.send_timeout
        attempts = max(1, self.alerting.retries)
        error, tried = "no attempt fit in the deadline", 0
        for attempt in range(1, attempts + 1):
            left = min(send_deadline, self.close_deadline) - time.monotonic()
            if left < _MIN_ATTEMPT:
                break
            tried = attempt
            error = self._attempt(body, left)
            if not error:
                self._sent(alert)
                return
            pause = min(
                _BACKOFF * 2 ** (attempt - 1),
                min(send_deadline, self.close_deadline) - time.monotonic() - _MIN_ATTEMPT,
            )
            if attempt < attempts and pause > 0:
                time.sleep(pause)
        log.warning(
            "alert_delivery_failed",
            sink=self.sink.name,
            alert_event=alert.event,
            attempts=tried,
            error=redact(error),
            timeout=self.alerting.send_timeout,
        )
        self._count(self.counts.on_failed, alert)

    def _attempt(self, body: bytes, timeout: float) -> str:
        """One POST cut at `timeout`; returns "" on a 2xx answer, else what went wrong (never the URL)."""
        refused = urlcheck.refusal(self.sink.url, self.alerting.allow_link_local)
        if refused:  # the configuration refuses it too; a sink built in code is checked here
            return f"refused: {refused}"
        request = urllib.request.Request(
            self.sink.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"schema-reconciler/{__version__}"},
        )
        timer = threading.Timer(timeout, self.in_flight.abort)
        timer.daemon = True
        timer.start()
        try:
            with self.opener.open(request, timeout=timeout) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code}"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return "timed out" if self.in_flight.cut else _failure(exc)
        finally:
            timer.cancel()
        return "" if 200 <= status < 300 else f"HTTP {status}"

    def _sent(self, alert: Alert) -> None:
        log.debug("alert_sent", sink=self.sink.name, alert_event=alert.event)
        self._count(self.counts.on_sent, alert)

    def _count(self, callback: Callable[[str, str], None] | None, alert: Alert) -> None:
        """Tell the metrics what became of `alert`; a failing callback never stops delivery."""
        if callback is None:
            return
        try:
            callback(alert.event, self.sink.name)
        except Exception as exc:
            log.warning(
                "alert_on_sent_error", sink=self.sink.name, error=redact(f"{type(exc).__name__}: {exc}")
            )

    def stop(self) -> None:
        """Past the close deadline: cut a delivery still in flight."""
        if self.thread.is_alive():
            self.in_flight.abort()

    def begin_close(self, deadline: float) -> None:
        with self.cond:
            self.closing = True
            self.close_deadline = deadline
            self.cond.notify_all()

    def abandon(self) -> int:
        with self.cond:
            left = list(self.queue)
            self.queue.clear()
            self.dropped += len(left)
        for alert in left:
            self._count(self.counts.on_dropped, alert)
        return len(left)


class AlertDispatcher:
    """Delivery off the loop: `submit` never blocks; each sink has its own queue and thread."""

    def __init__(
        self,
        sinks: Sequence[AlertSink],
        alerting: AlertingSettings,
        on_sent: Callable[[str, str], None] | None = None,
        on_failed: Callable[[str, str], None] | None = None,
        on_dropped: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_sent`, `on_failed` (every attempt within the deadline failed) and `on_dropped`
        (pushed out of a full queue, submitted after close, left at close) get (event, sink)."""
        counts = Counts(on_sent, on_failed, on_dropped)
        self._workers = [_SinkWorker(sink, alerting, counts) for sink in sinks]
        self._started = False

    @property
    def dropped(self) -> int:
        """Alerts lost: pushed out of a full queue, submitted after close, or left at close."""
        return sum(w.dropped for w in self._workers)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for worker in self._workers:
            worker.thread.start()

    def submit(self, alert: Alert) -> bool:
        """Queue `alert` for every sink that wants it; False when an alert had to be dropped."""
        kept = True
        for worker in self._workers:
            if wants(worker.sink, alert) and not worker.put(alert):
                kept = False
                log.warning(
                    "alert_dropped",
                    sink=worker.sink.name,
                    alert_event=alert.event,
                    queue_size=worker.size,
                    dropped=worker.dropped,
                )
        return kept

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what fits in `timeout` seconds, then stop; a hung sink cannot hold it longer."""
        deadline = time.monotonic() + max(0.0, timeout)
        for worker in self._workers:
            worker.begin_close(deadline)
        for worker in self._workers:
            if worker.thread.is_alive():
                worker.thread.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            worker.stop()
        left = sum(worker.abandon() for worker in self._workers)
        if left:
            log.warning("alerts_abandoned", count=left, timeout=timeout)
