"""The fork server, `python -m reconciler.worker --zygote --parent PID`: it imports what any job
needs once and forks one fresh worker per request (Linux only).

The zygote has imported SQLAlchemy, Alembic and Flask (`runner.preload`), never the project's
code; it holds no threads and no database connection, so a fork of it is a worker that imported
no user module yet, made in milliseconds. It dies with the control plane (the parent-death
signal) and each child dies with it, so the chain holds.

Its wire (control.zygote is the other side) is a SOCK_SEQPACKET Unix socket on fd 0, one JSON
object a packet. The zygote sends `{"ready": pid}` once. Each request `{"op": "fork", "driver":
scheme, "prefault": bool}` (the job URL's scheme: that dialect and driver are imported once,
here; `prefault` false: the child skips `own_pages`) carries the
child's stdin, stdout and stderr (SCM_RIGHTS); the answer is `{"pid": N}` with the child's pidfd
attached, `{"error": text}`, or `{"stale": why}` (a preloaded library changed on disk: start a
new zygote; this one forks no more but keeps reaping). `{"exited": pid, "code": c}` (as
`Popen.returncode`) follows when a child has exited and been reaped. A closed socket ends it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import re
import select
import signal
import site
import socket
import sys
from collections.abc import Callable
from typing import Any

from reconciler.worker.runner import load_driver, preload

EXIT_UNAVAILABLE = 3  # no fork server here: the control plane spawns workers instead
_PR_SET_PDEATHSIG = 1
_STAMPED = ("sqlalchemy", "alembic", "mako", "flask", "flask_sqlalchemy", "flask_migrate")
_PACKET = 65536
_SCHEME = re.compile(r"[A-Za-z0-9_+]+")


def available() -> bool:
    """Fork is safe and the tools exist: Linux, pidfds, descriptor passing."""
    return (
        sys.platform.startswith("linux")
        and hasattr(os, "pidfd_open")
        and hasattr(socket, "send_fds")
        and hasattr(os, "waitstatus_to_exitcode")
    )


def arm_parent_death(parent: int) -> bool:
    """SIGKILL when the parent (its starting thread) dies; False when it cannot be armed or the
    parent is gone already. No watcher thread: a zygote must hold none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    return armed and os.getppid() == parent


def stamp() -> tuple[Any, ...]:
    """What the preloaded code came from: the site-packages folders (an install or upgrade
    changes their listing) and the preloaded packages' files."""
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    for name in _STAMPED:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            paths.append(str(module.__file__))
    out: list[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((path, None))
    return tuple(out)


def run(parent: int, worker: Callable[[int], None]) -> None:
    """Serve fork requests until the socket closes; `worker(zygote_pid)` is a child's whole life."""
    if not available() or not arm_parent_death(parent):
        os._exit(EXIT_UNAVAILABLE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; its death kills us
    sock = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # a print in a preloaded library goes to our log, not to the socket
    preload()
    server = _Server(sock, worker)
    _send(sock, {"ready": os.getpid()})
    while True:
        readable, _, _ = select.select([sock, *server.children], [], [])
        for pidfd in readable:
            if pidfd in server.children:
                _reap(sock, server.children.pop(pidfd), pidfd)
        if sock in readable and not server.answer():
            os._exit(0)  # the children die with us (their parent-death signal)


class _Server:
    """The zygote's state: its socket, its running children, what it preloaded."""

    def __init__(self, sock: socket.socket, worker: Callable[[int], None]) -> None:
        self.sock = sock
        self.worker = worker
        self.children: dict[int, int] = {}  # pidfd: pid
        self.loaded = stamp()
        self.drivers: set[str] = set()

    def answer(self) -> bool:
        """Answer one packet; False when the control plane closed the socket."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _PACKET, 3)
        except OSError:
            return False
        if not data:
            return False
        try:
            request = json.loads(data)
            if not isinstance(request, dict) or request.get("op") != "fork" or len(fds) != 3:
                raise ValueError(f"not a fork request with 3 descriptors: {data[:200]!r}")
            self.preload_driver(str(request.get("driver") or ""))
            if stamp() != self.loaded:
                _send(self.sock, {"stale": "a preloaded library changed on disk"})  # our children go on
                return True
            pid = self.fork(fds, prefault=request.get("prefault") is not False)
            pidfd = os.pidfd_open(pid)
            self.children[pidfd] = pid
            socket.send_fds(self.sock, [json.dumps({"pid": pid}).encode()], [pidfd])
            return True
        except (OSError, ValueError) as exc:
            _send(self.sock, {"error": f"{exc.__class__.__name__}: {exc}"})
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def preload_driver(self, scheme: str) -> None:
        """Import the job's dialect and DBAPI driver (`sqlite`, `postgresql+psycopg2`: a URL's
        scheme, never the URL) once, for every later child; nothing connects."""
        if scheme and scheme not in self.drivers and _SCHEME.fullmatch(scheme):
            self.drivers.add(scheme)
            load_driver(f"{scheme}://")

    def fork(self, fds: list[int], prefault: bool = True) -> int:
        """A child with `fds` as its stdin, stdout, stderr, running `worker` (never returning);
        `prefault`: it copies the preloaded pages first (`own_pages`)."""
        me = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        try:  # the child: never return into the zygote's loop
            self.sock.close()
            for pidfd in self.children:
                os.close(pidfd)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            importlib.invalidate_caches()  # a file the zygote's finders did not list yet is seen
            if prefault:
                own_pages()
            self.worker(me)
        finally:
            os._exit(1)


def own_pages() -> None:
    """In a fresh child: touch every object the collector tracks (the preloaded modules'
    functions, classes, dicts), so that the pages a generation would copy on write one fault at
    a time are copied now, before init is answered (measured: a generation in a forked child
    ran about 20 ms slower than in a spawned worker without this, the same with it). A fleet's
    tenant workers skip it: they touch a fraction of those pages, and copying all of them cost
    each tenant ~10 ms of system time (200 schemas, one replica: 6.7 -> 4.4 s)."""
    objects = gc.get_objects()
    del objects


def _reap(sock: socket.socket, pid: int, pidfd: int) -> None:
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    with contextlib.suppress(OSError):
        _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.send(json.dumps(message).encode())
