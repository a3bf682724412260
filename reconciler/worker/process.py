"""The worker process, `python -m reconciler.worker --parent PID`: its stdin/stdout loop, signals
and parent-death signal; one short-lived process per job.

It runs everything that executes user code (env.py, revisions, models, Flask) in the project's own
interpreter, so it imports only the standard library, SQLAlchemy and Alembic (Flask lazily). With
`--preload` (a pre-warmed spare for dev mode) it imports Flask, Flask-SQLAlchemy and Flask-Migrate
at start too, when installed; the project's own modules are imported only when a request needs them.
With `--zygote` (Linux) it is a fork server instead (`zygote`): preloaded once, it forks one fresh
worker per request, which then runs the same loop as a spawned one.

Protocol (`reconciler.protocol`): JSON lines. Requests arrive on stdin, one reply per request goes
to the original stdout; fd 1 is pointed at stderr first, so `print()` in user code and Alembic's
own output cannot corrupt the protocol. stderr carries logs. The first request is `init` with the
job; the worker exits on `exit`, when stdin closes, or when its parent dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from reconciler import protocol
from reconciler.errors import ReconcilerError
from reconciler.sessions import inside_reconciler_worker
from reconciler.worker import zygote
from reconciler.worker.runner import Runner, preload
from reconciler.worker.sections import SECTIONS, watch_sections

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None) -> None:
    """Never outlive the control plane: a worker must not go on migrating without the lock."""
    installed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            installed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            installed = False
    if parent is None:
        return
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    if not installed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def claim_stdio() -> tuple[IO[str], IO[str]]:
    """Keep the real stdin/stdout for the protocol; fd 1 becomes stderr, fd 0 /dev/null."""
    sys.stdout.flush()
    out_fd, in_fd = os.dup(1), os.dup(0)
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    proto_out = os.fdopen(out_fd, "w", encoding="utf-8", newline="\n")
    proto_in = os.fdopen(in_fd, "r", encoding="utf-8")
    return proto_in, proto_out


def event_asker(proto_in: IO[str], proto_out: IO[str]) -> Callable[[Any], str]:
    """Send an event line before the reply and wait for the control plane's answer: its op
    ("" when the line is no request)."""

    def ask(event: Any) -> str:
        proto_out.write(protocol.event_line(event) + "\n")
        proto_out.flush()
        line = proto_in.readline()
        try:
            answer = json.loads(line) if line.strip() else {}
        except ValueError:
            answer = {}
        return str(answer.get("op", "")) if isinstance(answer, dict) else ""

    return ask


def section_reporter(ask: Callable[[Any], str]) -> Callable[[str, str], None]:
    """Tell the control plane that `revision` leaves its transaction, and wait for its
    `proceed`: the journal marks the step first, so a kill from here on leaves a step that is
    judged `dirty`, never rolled back and run again."""

    def report(revision: str, reason: str) -> None:
        if ask(protocol.NonTransactional(revision, reason)) != protocol.ProceedRequest.op:
            raise ReconcilerError(
                f"revision {revision} was stopped before {reason}: the control plane did not "
                "confirm it journaled the step; it is retried on the next run"
            )

    return report


def serve(proto_in: IO[str], proto_out: IO[str]) -> None:
    ask = event_asker(proto_in, proto_out)
    runner = Runner(ask)
    watch_sections()
    SECTIONS.report = section_reporter(ask)
    for line in iter(proto_in.readline, ""):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            error = protocol.ErrorReply("ProtocolError", f"bad request line: {exc}", exit_code=2)
            reply: dict[str, Any] = protocol.error_reply(error)
            request = {}
        else:
            reply = runner.handle(request)
        proto_out.write(json.dumps(reply, default=str) + "\n")
        proto_out.flush()
        if request.get("op") == protocol.ExitRequest.op:
            break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reconciler.worker")
    parser.add_argument("--parent", type=int, default=None, help="pid of the control plane")
    parser.add_argument(
        "--preload", action="store_true", help="import Flask and friends at start (a pre-warmed spare)"
    )
    parser.add_argument("--zygote", action="store_true", help="a fork server of fresh workers (Linux)")
    args = parser.parse_args(argv)
    if args.zygote:
        zygote.run(args.parent or 0, lambda zygote_pid: run_worker(zygote_pid, preload_first=False))
    run_worker(args.parent, preload_first=args.preload)


def run_worker(parent: int | None, preload_first: bool) -> None:
    """A worker's life after its start (spawned, or forked by the zygote): serve, then exit."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; its death kills us
    inside_reconciler_worker()  # an env.py using migration_lock must not wait for our own lock
    proto_in, proto_out = claim_stdio()
    if preload_first:
        preload()
    try:
        serve(proto_in, proto_out)
    finally:
        with contextlib.suppress(Exception):
            proto_out.flush()
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(0)  # user code may have left non-daemon threads behind
