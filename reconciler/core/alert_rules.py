"""The alert rules: what one run saw (`Observation`), and per event what to watch for and what to say.

Each rule's detector turns an `Observation` into a verdict: an episode (the condition is active;
the same fleet event gives the same episode on every replica), None (it is not), or `KEEP` (this
run cannot tell). `core.alerting.AlertPolicy` turns the verdicts into transitions.

Adding an event is one line in `RULES` (see `_condition` for a condition-driven one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from reconciler.settings import AlertingSettings

_HOLDER_IDENTITY = (
    "pid",
    "connection_id",
    "backend_start",
    "host",
    "client_addr",
    "application_name",
    "replica",
)


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
    # A tenant fleet's tick ([fleet]): the fleet rules judge it, a single target's rules do not.
    fleet: bool = False
    fleet_read: bool = False  # the fleet read succeeded: its tenants' states are known
    halted: str = ""  # the halted wave as "wave N:heads" (the same on every replica); "" when not
    halt_reason: str = ""
    tenants: int = 0
    failed_tenants: tuple[str, ...] = ()  # names of the tenants failed or blocked, sorted
    failed_causes: tuple[str, ...] = ()  # their failing revisions (or states), distinct, sorted

    @property
    def blind(self) -> bool:
        """The database was not read: nothing it holds may be judged from this run."""
        return self.outcome == "unreachable" or self.sync_state == "unknown"


class Keep:
    """A detector's verdict: this run cannot tell; leave the condition as it was."""


KEEP = Keep()
Verdict = Union[str, None, Keep]  # an episode (condition active), None (it is not), or KEEP
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


def _fleet_halted(obs: Observation, _a: AlertingSettings) -> Verdict:
    """The rollout's wave halted; over when it is lifted (`reconciler resume`) or complete."""
    if not obs.fleet_read:
        return KEEP
    return obs.halted or None


def _tenants_blocked(obs: Observation, _a: AlertingSettings) -> Verdict:
    """Tenants failed or blocked, one episode per set of causes (not per tenant): a thousand
    tenants failing on one revision are one alert; over when none is left."""
    if not obs.fleet_read:
        return KEEP
    return "tenants:" + _joined(obs.failed_causes or ("-",)) if obs.failed_tenants else None


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
    scope: str = "target"  # what it judges: one target's runs, a fleet's ticks ("fleet"), or "any"

    def judges(self, obs: Observation) -> bool:
        return self.scope == "any" or (self.scope == "fleet") == obs.fleet


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
    "revision_unreadable": Rule(_unreadable, "{error}", extras=("error", "unreadable"), scope="any"),
    "unreachable": Rule(
        _unreachable,
        "the database is unreachable ({runs} runs in a row): {error}",
        local=True,
        extras=("error", "runs"),
        min_runs=lambda a: a.unreachable_after,
        scope="any",
    ),
    "fleet_halted": Rule(
        _fleet_halted, "the rollout is halted: {halt_reason}", extras=("halt_reason",), scope="fleet"
    ),
    "tenants_blocked": Rule(
        _tenants_blocked,
        "{failed_count} of {tenants} tenants failed or are blocked ({causes}): {failed_names}; the "
        "others went on. `reconciler status --json` lists them; fix the revision or the tenant's "
        "data (`reconciler status --tenant NAME` shows one)",
        extras=("failed_count", "failed_tenants", "causes"),
        scope="fleet",
    ),
}
EVENTS: tuple[str, ...] = ("applied", *RULES, "recovered")
