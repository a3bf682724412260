"""The control plane's side of the fork server (`python -m reconciler.worker --zygote`, Linux):
its start, a fresh worker forked from it, and that worker's process object.

The zygote is spawned like a worker (same interpreter, environment, working directory:
`workerprocess.spawn`), imports SQLAlchemy, Alembic and Flask once, and forks one child per
`fork()`: a fresh interpreter that never imported the project's code, in milliseconds. Its wire
is described in the worker's `zygote` module. Like a worker, the zygote dies with the thread
that started it: start it from a thread that outlives it and its children.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any

from reconciler.control.workerprocess import spawn
from reconciler.errors import WorkerError
from reconciler.redact import redact

_READY_WAIT = 120.0  # an interpreter importing SQLAlchemy, Alembic and Flask on a loaded machine
_REPLY_WAIT = 30.0
_EXIT_WAIT = 5.0
_PACKET = 65536
_KILLED = -int(signal.SIGKILL)


class ZygoteUnavailable(WorkerError):
    """The fork server could not start, or stopped answering: spawn workers instead."""


class ZygoteStale(WorkerError):
    """A library the zygote preloaded changed on disk: start a new zygote."""


def supported() -> bool:
    """Fork is safe here (Linux; not macOS, where a forked child of a process that imported
    system frameworks may crash) and the tools exist (pidfds, descriptor passing)."""
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds")


class Zygote:
    """A running fork server. `fork()` is thread-safe; `close()` ends it (and so its children)."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self._sock = sock
        self._send_lock = threading.Lock()
        self._replies: queue.Queue[tuple[dict[str, Any], list[int]] | None] = queue.Queue()
        self._exits: dict[int, int] = {}
        self._changed = threading.Condition()
        self._gone = False
        self.stale = False
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._threads = [
            threading.Thread(target=self._read_socket, daemon=True, name="zygote-socket"),
            threading.Thread(target=self._read_stderr, daemon=True, name="zygote-stderr"),
        ]
        for thread in self._threads:
            thread.start()

    @classmethod
    def start(cls, interpreter: str, root: str, environ: Mapping[str, str] | None = None) -> Zygote:
        """Spawn the zygote and wait until it has preloaded; ZygoteUnavailable when it cannot
        serve here (it exited), ConfigError when the interpreter cannot be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = spawn(interpreter, root, False, environ, zygote=theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        zygote = cls(process, ours)
        try:
            zygote._reply(_READY_WAIT, "ready")
        except BaseException:
            zygote.close()
            raise
        return zygote

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return not self._gone and self.process.poll() is None

    def fork(self, url: str = "", prefault: bool = True) -> ForkedProcess:
        """A fresh child: its stdin, stdout and stderr are pipes to us. `url`: the job's (only
        its scheme is sent: the zygote imports that dialect and driver once). `prefault`: the
        child copies the preloaded pages before it answers (see `worker.zygote.own_pages`).
        ZygoteStale when the preloaded libraries changed on disk, ZygoteUnavailable when the
        zygote is gone."""
        driver = url.split(":", 1)[0] if "://" in url else ""
        request = {"op": "fork", "driver": driver, "prefault": prefault}
        if self.stale:
            raise ZygoteStale(f"the zygote (pid {self.pid}) is stale; start a new one")
        ends = [os.pipe() for _ in range(3)]
        theirs = [ends[0][0], ends[1][1], ends[2][1]]
        ours = [ends[0][1], ends[1][0], ends[2][0]]
        try:
            with self._send_lock:
                try:
                    socket.send_fds(self._sock, [json.dumps(request).encode()], theirs)
                except OSError as exc:
                    raise self._unavailable(f"its socket failed: {exc}") from None
                reply, fds = self._reply(_REPLY_WAIT, "pid")
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise self._unavailable(f"it sent {len(fds)} descriptors with a child, not its pidfd")
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        return ForkedProcess(
            self,
            int(reply["pid"]),
            fds[0],
            os.fdopen(ends[0][1], "wb"),
            os.fdopen(ends[1][0], "rb"),
            os.fdopen(ends[2][0], "rb"),
        )

    def close(self) -> None:
        """Close the socket (the zygote exits, its children with it) and wait for it."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        try:
            self.process.wait(timeout=_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for thread in self._threads:
            thread.join(timeout=_EXIT_WAIT)
        with contextlib.suppress(OSError):
            self._sock.close()
        if self.process.stderr is not None:
            with contextlib.suppress(OSError):
                self.process.stderr.close()

    # what ForkedProcess asks

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """`pid`'s exit code once the zygote reaped it (waiting up to `timeout`); _KILLED when the
        zygote is gone (its children die with it); None while it runs."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._gone, timeout)
            if pid in self._exits:
                return self._exits[pid]
        if self._gone or self.process.poll() is not None:
            return _KILLED  # the socket may not have shown the end yet
        return None

    # plumbing

    def _reply(self, timeout: float, key: str) -> tuple[dict[str, Any], list[int]]:
        try:
            got = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            raise self._unavailable(f"it did not answer within {timeout:g}s and was killed") from None
        if got is None:
            try:
                code: int | None = self.process.wait(timeout=_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                code = None
            raise self._unavailable(f"it exited with code {code}")
        reply, fds = got
        if "stale" in reply:
            self.stale = True
            raise ZygoteStale(f"the zygote (pid {self.pid}) is stale: {reply['stale']}; start a new one")
        if key not in reply:
            for fd in fds:
                os.close(fd)
            raise self._unavailable(f"it answered {redact(json.dumps(reply))[:300]}")
        return reply, fds

    def _unavailable(self, why: str) -> ZygoteUnavailable:
        self._threads[1].join(timeout=_EXIT_WAIT if self.process.poll() is not None else 0)
        tail = "\n".join(self._stderr) or "(nothing on stderr)"
        return ZygoteUnavailable(
            redact(f"the fork server (pid {self.pid}) cannot fork workers: {why}; its log:\n{tail}")
        )

    def _read_socket(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):  # garbage ends it too
            while True:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _PACKET, 1)
                if not data:
                    break
                message = json.loads(data)
                if "exited" in message:
                    with self._changed:
                        self._exits[int(message["exited"])] = int(message["code"])
                        self._changed.notify_all()
                else:
                    self._replies.put((message, fds))
        with self._changed:
            self._gone = True
            self._changed.notify_all()
        self._replies.put(None)

    def _read_stderr(self) -> None:
        stream: IO[bytes] | None = self.process.stderr
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                for raw in stream:
                    self._stderr.append(redact(raw.decode("utf-8", "replace").rstrip("\r\n")))


class ForkedProcess:
    """A worker forked by the zygote, as the control plane uses a `subprocess.Popen`: its pid,
    pipes, `poll`, `wait`, `kill`. Signals go through its pidfd (no pid reuse race); its exit code
    comes from the zygote, which reaps it."""

    def __init__(
        self,
        zygote: Zygote,
        pid: int,
        pidfd: int,
        stdin: IO[bytes],
        stdout: IO[bytes],
        stderr: IO[bytes],
    ) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.zygote = zygote  # the fork server it came from
        self._pidfd: int | None = pidfd
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._result(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._result(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout or 0)
        return code

    def kill(self) -> None:
        with self._lock:
            if self._pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._pidfd is not None:
                os.close(self._pidfd)

    def _result(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        code = self.zygote.exit_code(self.pid, timeout)
        if code == _KILLED and self._pidfd is not None:
            self._await_death(timeout)  # the zygote is gone: its parent-death signal kills the child
        with self._lock:
            if code is not None and self.returncode is None:
                self.returncode = code
            self._close_pidfd_locked()
            return self.returncode

    def _await_death(self, timeout: float | None) -> None:
        with self._lock:
            if self._pidfd is not None:
                select.select([self._pidfd], [], [], _EXIT_WAIT if timeout is None else timeout)

    def _close_pidfd_locked(self) -> None:
        if self.returncode is not None and self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
