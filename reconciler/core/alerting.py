"""The alert policy: a pure state machine that turns what one run saw into alert transitions.

`AlertPolicy` turns what one run saw (an `Observation`) into transitions: one alert on entering a
bad condition, a reminder every `repeat_interval` while it lasts, one `recovered` when it ends;
never one per tick. Every transition carries an episode key that every replica computes alike for
the same fleet event, so the daemon can claim it in the database and only the first replica sends
it. `applied` and `unreachable` (with its reminders and recovery) are replica-local: their key is
`None` and they are sent without a claim. Sending is `runtime.delivery`'s job.

The rules (what each event watches for and says) are `core.alert_rules`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.core.alert_rules import RULES, Keep, Observation, Rule
from reconciler.redact import redact
from reconciler.settings import AlertingSettings
from reconciler.version import __version__

KEY_MAX = 120  # episode keys fit the journal's flags key column with room for a prefix
_EPISODE_MAX = 80

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
    "fleet_halted": "danger",
    "tenants_blocked": "danger",
}
_NAMES_SHOWN = 10  # tenants an alert names; the rest are counted


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


def _names(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN]) or "-"
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


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
            if rule.enabled(self.alerting) and rule.judges(obs):
                out.extend(self._step(event, rule, obs, now))
        return out

    def _step(self, event: str, rule: Rule, obs: Observation, now: float) -> list[tuple[Alert, str | None]]:
        verdict = rule.detect(obs, self.alerting)
        track = self._tracks.get(event)
        if isinstance(verdict, Keep):
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
            "halt_reason": obs.halt_reason or "-",
            "tenants": obs.tenants,
            "failed_count": len(obs.failed_tenants),
            "failed_tenants": list(obs.failed_tenants[:_NAMES_SHOWN]),
            "failed_names": _names(obs.failed_tenants),
            "causes": ", ".join(obs.failed_causes) or "-",
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
