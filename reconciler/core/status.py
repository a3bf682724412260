"""What a read of one target found, and what a run did: the typed status every report is made of.

Pure data and decisions over it (standard library only): the control plane builds a `Status`
per read, `/status`, `status --json`, the metrics and the alerts are all made from its fields.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from reconciler.core import checksums, failures
from reconciler.core import drift as drift_rules
from reconciler.core.alerting import iso_utc
from reconciler.core.graph import RevisionGraph
from reconciler.core.state import CONDITIONS, Decision
from reconciler.errors import Blocked, Refused, RevisionFailed, StateError, Suspended, UnreachableError
from reconciler.settings import MAIN_CHAIN

APPLICABLE = ("behind", "uninitialized_empty")
CONDITION_ORDER = CONDITIONS
# The worst first: the overall sync state of several chains is the first one of them in this list.
SYNC_SEVERITY = (
    "unknown",
    "diverged",
    "multiple_heads",
    "ahead",
    "uninitialized_with_tables",
    "behind",
    "uninitialized_empty",
    "in_sync",
)
# A revision that hit our DDL lock timeout is retried with backoff, never counted toward
# `blocked` (PostgreSQL lock_not_available; MySQL / MariaDB ER_LOCK_WAIT_TIMEOUT; SQLite's busy
# timeout, SQLITE_BUSY / SQLITE_LOCKED: an app's connection held the file's lock longer).
LOCK_TIMEOUT_CODES = frozenset({"55P03", "1205", "SQLITE_BUSY", "SQLITE_LOCKED"})


CONDITIONS_TTL = 10.0  # seconds the in-sync fast path may reuse the flags it read last


@dataclass(frozen=True)
class Conditions:
    """What the journal says beside the version table: dirty steps, fleet flags, checksums."""

    names: tuple[str, ...] = ()
    dirty: tuple[str, ...] = ()
    blocked: failures.Failure | None = None
    messages: dict[str, str] = field(default_factory=dict)
    read_at: float = 0.0
    drift: drift_rules.DriftReport | None = None
    audit: checksums.Audit = field(default_factory=checksums.Audit)
    baseline: bool = False  # hashes were recorded once: an unrecorded applied revision is foreign
    inputs: tuple[object, ...] = ()  # (db heads, graph fingerprint) they were read for
    settle: tuple[str, ...] = ()  # interrupted, not dirty: settled under a one-try lock

    def fresh_for(self, inputs: tuple[object, ...]) -> bool:
        """Read for these inputs, recently enough for the in-sync fast path."""
        return self.inputs == inputs and time.monotonic() - self.read_at <= CONDITIONS_TTL


@dataclass(frozen=True)
class Status:
    target: str
    url: str
    decision: Decision
    conditions: tuple[str, ...] = ()
    dirty: tuple[str, ...] = ()
    messages: dict[str, str] = field(default_factory=dict)
    blocked: failures.Failure | None = None
    drift: drift_rules.DriftReport | None = None  # the fleet's last drift compare, when enabled
    audit: checksums.Audit = field(default_factory=checksums.Audit)
    baseline: bool = False
    guard: dict[str, Any] | None = None  # the guard's last analysis of these pending revisions
    chain: str = ""  # "" for [target]'s own migrations directory, else a [[target.chains]] name
    version_table: str = ""
    chains: tuple[Status, ...] = ()  # the statuses of the other chains, in config order
    settle: tuple[str, ...] = ()  # interrupted steps that are not dirty (see Conditions)

    @property
    def every_chain(self) -> tuple[Status, ...]:
        return (self, *self.chains)

    @property
    def chain_name(self) -> str:
        return self.chain or MAIN_CHAIN

    @property
    def foreign(self) -> tuple[str, ...]:
        """Applied revisions without a journal row, after hashes were first recorded."""
        own = self.audit.unrecorded if self.baseline else ()
        return tuple(dict.fromkeys((*own, *(r for c in self.chains for r in c.foreign))))

    @property
    def needs_recording(self) -> bool:
        """Hashes to record under the lock, or the checksum baseline still to set."""
        own = bool(self.audit.unrecorded or self.audit.sealed) or not self.baseline
        return own or any(c.needs_recording for c in self.chains)

    @property
    def sync_state(self) -> str:
        """The worst sync state of every chain (the only one's, with a single chain)."""
        return self._worst_chain().decision.sync_state

    def _worst_chain(self) -> Status:
        states = [c.decision.sync_state for c in self.every_chain]
        worst = min(states, key=lambda s: SYNC_SEVERITY.index(s) if s in SYNC_SEVERITY else 0)
        return self.every_chain[states.index(worst)]

    @property
    def pending(self) -> tuple[str, ...]:
        """The revisions to apply, every chain's, in the order apply takes them."""
        return tuple(r for c in self.every_chain for r in c.decision.pending)

    @property
    def state(self) -> str:
        worst = [c for c in CONDITION_ORDER if c in self.conditions]
        return worst[0] if worst else self.sync_state

    @property
    def message(self) -> str:
        for condition in CONDITION_ORDER:
            if condition in self.conditions and condition in self.messages:
                return self.messages[condition]
        worst = self._worst_chain()
        if worst is self:
            return self.decision.message
        return f"chain {worst.chain_name}: {worst.decision.message}"

    def chain_dict(self) -> dict[str, Any]:
        """This chain alone: what `status --json` lists under `chains`."""
        own = [c for c in CONDITION_ORDER if c in self.conditions]
        return {
            "chain": self.chain_name,
            "version_table": self.version_table,
            "state": own[0] if own else self.decision.sync_state,
            "sync_state": self.decision.sync_state,
            "conditions": own,
            "db_heads": sorted(self.decision.db_heads),
            "repo_heads": sorted(self.decision.repo_heads),
            "pending": list(self.decision.pending),
            "message": self.messages.get(own[0], self.decision.message) if own else self.decision.message,
        }

    def as_dict(self, graph: RevisionGraph | None = None) -> dict[str, Any]:
        pending = list(self.pending)
        out: dict[str, Any] = {
            "target": self.target,
            "url": self.url,
            "state": self.state,
            "sync_state": self.sync_state,
            "conditions": list(self.conditions),
            "db_heads": sorted(self.decision.db_heads),
            "repo_heads": sorted(self.decision.repo_heads),
            "pending": pending,
            "unknown": list(self.decision.unknown),
            "message": self.message,
        }
        if self.decision.fork:
            out["fork"] = list(self.decision.fork)
            out["branch_point"] = self.decision.branch_point
        if self.dirty:
            out["dirty"] = list(self.dirty)
        if self.blocked:
            out["blocked"] = {
                "revision": self.blocked.revision,
                "failures": self.blocked.count,
                "error_class": self.blocked.error_class,
                "signature": self.blocked.signature,
            }
        if self.drift:
            out["drift"] = self.drift.as_dict()
        if self.audit.mismatches:
            out["checksum_mismatch"] = [m.as_dict() for m in self.audit.mismatches]
        if self.foreign:
            out["foreign_writes"] = list(self.foreign)
        if self.guard:
            out["guard"] = self.guard
        if self.chains:  # several chains: each one's state (the top-level heads are [target]'s)
            out["chains"] = [c.chain_dict() for c in self.every_chain]
        return out


def with_chains(main: Status, others: tuple[Status, ...]) -> Status:
    """[target]'s status with the other chains': conditions and messages of them all (a chain's
    message says its name), so refusals, `wait` and the overall state see every chain."""
    if not others:
        return main
    every = (main, *others)
    names = tuple(c for c in CONDITION_ORDER if any(c in s.conditions for s in every))
    messages: dict[str, str] = {}
    for one in every:
        for key, text in one.messages.items():
            messages.setdefault(key, text if one is main else f"chain {one.chain_name}: {text}")
    dirty = tuple(dict.fromkeys(r for s in every for r in s.dirty))
    blocked = next((s.blocked for s in every if s.blocked), None)
    settle = tuple(dict.fromkeys(r for s in every for r in s.settle))
    return dataclasses.replace(
        main, conditions=names, messages=messages, dirty=dirty, blocked=blocked, chains=others, settle=settle
    )


@dataclass(frozen=True)
class Progress:
    """The revision an apply in progress is running: `n` of `total` in this run."""

    revision: str
    message: str
    n: int
    total: int
    started_at: float  # wall-clock seconds, when this revision began
    run_started_at: float  # when the run's first revision began
    plan: Status | None = None  # what the run read under the lock before its first revision

    def as_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "message": self.message,
            "n": self.n,
            "total": self.total,
            "started_at": iso_utc(self.started_at),
            "run_started_at": iso_utc(self.run_started_at),
        }

    @property
    def remaining(self) -> tuple[str, ...]:
        """The plan's pending revisions not applied yet in this run (the current one first)."""
        pending = self.plan.pending if self.plan is not None else (self.revision,)
        done = set(pending[: self.n - 1])
        return tuple(r for r in pending if r not in done)


@dataclass(frozen=True)
class ApplyResult:
    outcome: str  # noop | applied
    applied: tuple[tuple[str, float], ...]
    status: Status
    lock_wait: float = 0.0
    duration: float = 0.0
    foreign: tuple[str, ...] = ()  # revisions found applied by something else in this run


def refuse_unless_applicable(status: Status) -> None:
    """Raise the error that says why nothing can be applied; return when applying may go on."""
    if "dirty" in status.conditions:
        raise Refused(status.messages["dirty"])
    if "checksum_mismatch" in status.conditions:
        raise Refused(status.messages["checksum_mismatch"])
    if status.sync_state in APPLICABLE:
        if "blocked" in status.conditions:
            raise Blocked(status.messages["blocked"])
        if "suspended" in status.conditions:
            raise Suspended(status.messages["suspended"])
    state = status.sync_state
    if state == "unknown":
        raise UnreachableError(status.message)
    if state in ("in_sync", *APPLICABLE):
        return
    raise StateError(status.message)


def is_lock_timeout(exc: RevisionFailed) -> bool:
    """The revision waited longer than `ddl_lock_timeout` for a table lock (nothing is wrong with it)."""
    return (exc.sqlstate or "") in LOCK_TIMEOUT_CODES


def verify(status: Status) -> None:
    if status.sync_state != "in_sync":
        raise RevisionFailed(
            f"after applying, the database heads are {sorted(status.decision.db_heads)} but the "
            f"repository's heads are {sorted(status.decision.repo_heads)}; check env.py's "
            "version_table and run `reconciler status`"
        )


def still_blocked(blocked: failures.Failure, graph: RevisionGraph) -> bool:
    """A block holds while the revision's file is unchanged (a checkout without the revision
    has nothing blocked to show, but see `block_lifted`)."""
    revision = graph.revisions.get(blocked.revision)
    return revision is not None and revision.file_hash == blocked.file_hash


def block_lifted(blocked: failures.Failure, graph: RevisionGraph) -> bool:
    """The blocked revision's file changed in this checkout: the block goes. A checkout without
    the revision says nothing about its file (a replica whose watcher has not seen it yet, or
    one of the previous release mid-deploy): the fleet's block stays."""
    revision = graph.revisions.get(blocked.revision)
    return revision is not None and revision.file_hash != blocked.file_hash


def applied_revisions(graph: RevisionGraph, status: Status) -> frozenset[str]:
    """The revisions of `graph` the database heads of `status` include."""
    return graph.closure(h for h in status.decision.db_heads if h in graph.revisions)
