"""Proof of session affinity before a session-level advisory lock is trusted (invariant 5).

A PostgreSQL advisory lock belongs to a server session. Behind a transaction-pooling PgBouncer a
client's statements run on whichever server connection is free, so the lock stays on a server
connection that other clients then use (and `pg_try_advisory_lock` is reentrant for the same
session: they "get" it too), or it goes with a session our client no longer talks to.

The proof is positive: on the connection that will hold the lock, set a session-local marker
(`set_config(..., false)`, a custom setting that lives as long as the session), then check in
separate statements (separate transactions: the control plane is autocommit) that

- a second client connection through the same URL does not see the marker (a pooler with one
  server connection hands both clients the same session, same backend pid and all), and
- the lock connection still sees its own marker after the second client set its own.

A changing backend pid alone is only a hint; the markers are the proof. PostgreSQL only: MySQL /
MariaDB `GET_LOCK` behind a multiplexing proxy is not checked here (not tested either).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import sqlalchemy as sa

from reconciler import logs
from reconciler.errors import Refused
from reconciler.redact import redact

log = logs.get("reconciler.affinity")

MARKER = "reconciler.affinity"
ROUNDS = 3

ProbeFactory = Callable[[], AbstractContextManager[sa.engine.Connection]]


@dataclass(frozen=True)
class Finding:
    """Why affinity could not be proven: a sentence for the error message, and the pids seen."""

    reason: str
    lock_pid: int
    probe_pid: int


def _set(conn: sa.engine.Connection, token: str) -> int:
    row = conn.execute(
        sa.text("SELECT set_config(:m, :t, false), pg_backend_pid()"), {"m": MARKER, "t": token}
    ).one()
    _end_transaction(conn)
    return int(row[1])


def _read(conn: sa.engine.Connection) -> tuple[str, int]:
    row = conn.execute(sa.text("SELECT current_setting(:m, true), pg_backend_pid()"), {"m": MARKER}).one()
    _end_transaction(conn)
    return str(row[0] or ""), int(row[1])


def _end_transaction(conn: sa.engine.Connection) -> None:
    """Each step is its own transaction: commit one SQLAlchemy began on a non-autocommit engine."""
    if conn.in_transaction():
        conn.commit()


def check(lock_conn: sa.engine.Connection, probe: ProbeFactory, rounds: int = ROUNDS) -> Finding | None:
    """None when `lock_conn` provably keeps its own server session; else what went wrong.

    `probe` opens another client connection through the same URL (same pooler, if any)."""
    with probe() as other:
        for _ in range(rounds):
            mine, theirs = secrets.token_hex(8), secrets.token_hex(8)
            lock_pid = _set(lock_conn, mine)
            seen, probe_pid = _read(other)
            if seen == mine:
                return Finding(
                    "another client connection through the same URL sees this connection's "
                    "session marker, so both share one server session",
                    lock_pid,
                    probe_pid,
                )
            _set(other, theirs)
            kept, lock_pid = _read(lock_conn)
            if kept != mine:
                what = "the other client's" if kept == theirs else "no" if not kept else "a foreign"
                return Finding(
                    f"this connection's session marker did not survive to its next statement "
                    f"(it found {what} marker), so its statements run in different server sessions",
                    lock_pid,
                    probe_pid,
                )
    log.debug("session_affinity_proven", lock_pid=lock_pid, probe_pid=probe_pid, rounds=rounds)
    return None


def require(lock_conn: sa.engine.Connection, probe: ProbeFactory, where: str, lock_url_set: bool) -> None:
    """Raise `Refused` (exit 6) unless `lock_conn` provably keeps its own server session.

    Proven again before every lock, never cached: a transaction pooler that by chance handed out
    private server sessions once must not be trusted for good."""
    finding = check(lock_conn, probe)
    if finding is None:
        return
    log.warning(
        "session_affinity_missing",
        where=where,
        lock_pid=finding.lock_pid,
        probe_pid=finding.probe_pid,
        reason=finding.reason,
    )
    if lock_url_set:
        step = (
            "[target] lock_url goes through a pooler too: point it straight at PostgreSQL "
            "(or at a session-mode pool), bypassing the transaction-pooling PgBouncer"
        )
    else:
        step = (
            "set [target] lock_url (or lock_url_env) to a direct connection to PostgreSQL that "
            "bypasses the pooler; the revisions still run through [target] url"
        )
    raise Refused(
        redact(
            f"refusing to rely on an advisory lock over {where}: {finding.reason} (backend pids "
            f"{finding.lock_pid} and {finding.probe_pid}). This looks like a transaction-pooling "
            f"PgBouncer, where a session lock does not keep other replicas out; {step}"
        )
    )


__all__ = ["MARKER", "ROUNDS", "Finding", "check", "require"]
