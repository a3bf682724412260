"""The serving thread of the HTTP endpoints: one `selectors` loop that reads, dispatches and answers.

One thread accepts connections and reads requests for all of them (epoll on Linux), so a connection
that sends nothing, or half a request line, costs a file descriptor and a buffer, not a thread.
HTTP/1.0: one request per connection, closed after the answer. The deadlines and limits it keeps
are described in http.py; the routes it serves come from there too (`App`).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http.client
import io
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Protocol

from reconciler import logs

ALLOWED_METHODS = "GET, HEAD"
TEXT = "text/plain; charset=utf-8"
MAX_HEADER_BYTES = 16384
POOL_THREADS = 2
POOL_QUEUE = 64  # /status and /metrics requests waiting for the pool, at most
_ACCEPT_BATCH = 256
_WAKE_INTERVAL = 0.5  # the loop looks at its deadlines at least this often
_OVERLOAD_LOG_INTERVAL = 60.0

_log = logs.get("reconciler.http")

Response = tuple[int, str, bytes]
INLINE = frozenset({"/healthz", "/readyz"})  # answered on the loop thread, never queued


class App(Protocol):
    """What the loop serves: the routes by path, and which `Host` header values it answers."""

    routes: dict[str, Callable[[], Response]]

    def accepts(self, host: str | None) -> bool: ...


class _Request:
    """A parsed request line and headers."""

    def __init__(self, method: str, target: str, headers: http.client.HTTPMessage) -> None:
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0].split("#", 1)[0]
        self.headers = headers


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _parse(head: bytes) -> _Request:
    """The request in `head` (request line and headers, up to the blank line)."""
    line, _, rest = head.partition(b"\n")
    words = line.rstrip(b"\r").decode("latin-1").split()
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        raise _BadRequest(400, "bad request line")
    try:
        headers = http.client.parse_headers(io.BytesIO(rest))
    except http.client.HTTPException:
        raise _BadRequest(431, "too many headers") from None
    return _Request(words[0], words[1], headers)


def render(
    status: int, content_type: str, body: bytes, *, head: bool = False, extra: dict[str, str] | None = None
) -> bytes:
    """The bytes of a whole HTTP/1.0 answer (the connection closes after it)."""
    lines = [
        f"HTTP/1.0 {status} {HTTPStatus(status).phrase}",
        "Server: schema-reconciler",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
    ]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    top = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return top if head else top + body


_BUSY = render(503, TEXT, b"busy\n")


class _Conn:
    """One client connection: its request bytes, then the answer waiting to be sent."""

    __slots__ = ("client", "deadline", "inbox", "outbox", "sock")

    def __init__(self, sock: socket.socket, client: str, deadline: float) -> None:
        self.sock = sock
        self.client = client
        self.deadline = deadline  # header deadline, then send deadline
        self.inbox = bytearray()
        self.outbox = memoryview(b"")


class ServeLoop:
    """The serving thread's state: listener, connections by phase, the handler pool."""

    def __init__(
        self,
        listener: socket.socket,
        app: App,
        *,
        header_timeout: float,
        send_timeout: float,
        max_connections: int,
        shed: bool,
    ) -> None:
        self.listener = listener
        self.app = app
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.shed = shed
        self.selector = selectors.DefaultSelector()
        # Why three dicts: each is in deadline order (insertion order, one timeout per phase), so
        # expiry and oldest-first eviction look only at the front.
        self.reading: dict[int, _Conn] = {}
        self.waiting: dict[int, _Conn] = {}  # request handed to the pool
        self.sending: dict[int, _Conn] = {}
        self.pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="reconciler-http-pool")
        self.done: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.stopping = threading.Event()
        self.accept_paused_until = 0.0
        self.shed_count = 0
        self.last_overload_log = 0.0

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping.is_set():
                for key, events in self.selector.select(self._select_timeout()):
                    self._on_event(key, events)
                self._collect_answers()
                now = time.monotonic()
                self._expire(now)
                self._resume_accepting(now)
        finally:
            self._close_all()

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (the loop is awake anyway) or closed (stopping)
            self.wake_w.send(b"\0")

    def _select_timeout(self) -> float:
        now = time.monotonic()
        first = [conns[next(iter(conns))].deadline for conns in (self.reading, self.sending) if conns]
        if self.accept_paused_until > now:
            first.append(self.accept_paused_until)
        return max(0.0, min([now + _WAKE_INTERVAL, *first]) - now)

    def _on_event(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            self._handle(key, events)
        except Exception as exc:  # one bad connection must not end the thread that answers /healthz
            _log.warning("http_connection_failed", error=type(exc).__name__, detail=str(exc))
            if isinstance(key.data, _Conn):
                self._close(key.data)

    def _handle(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "accept":
            self._accept()
        elif key.data == "wake":
            self._drain_wake()
        elif events & selectors.EVENT_READ:
            self._read(key.data)
        elif events & selectors.EVENT_WRITE:
            self._send(key.data)

    def _drain_wake(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:
            pass

    # --- accept -----------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self._open_count() >= self.max_connections and not self._make_room():
                self._refuse_one()
                return
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._make_room():
                        self._pause_accepting(reason=errno.errorcode.get(exc.errno or 0, "accept"))
                        return
                    continue
                return  # ECONNABORTED and kin: that client is gone
            self._open(sock, str(address[0]))

    def _pause_accepting(self, reason: str) -> None:
        """Out of descriptors with nothing to shed: stop watching the listener for a moment."""
        self.accept_paused_until = time.monotonic() + 0.1
        self.selector.unregister(self.listener)  # else a readable listener spins the loop
        self._overloaded(reason=reason)

    def _resume_accepting(self, now: float) -> None:
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, "accept")

    def _open(self, sock: socket.socket, client: str) -> None:
        sock.setblocking(False)
        conn = _Conn(sock, client, time.monotonic() + self.header_timeout)
        self.reading[sock.fileno()] = conn
        self.selector.register(sock, selectors.EVENT_READ, conn)

    def _open_count(self) -> int:
        return len(self.reading) + len(self.waiting) + len(self.sending)

    def _make_room(self) -> bool:
        """Close the oldest connection still sending its request; False when there is none."""
        if not self.shed or not self.reading:
            return False
        oldest = self.reading[next(iter(self.reading))]
        self.shed_count += 1
        self._overloaded(reason="max_connections")
        self._close(oldest)
        return True

    def _refuse_one(self) -> None:
        """At the cap with nothing to shed: answer the next client 503 and close it."""
        try:
            sock, address = self.listener.accept()
        except OSError:
            return
        _log.debug("http_busy", client=str(address[0]))
        try:
            sock.setblocking(False)
            sock.send(_BUSY)
        except OSError:
            pass
        sock.close()

    def _overloaded(self, reason: str) -> None:
        now = time.monotonic()
        if now - self.last_overload_log >= _OVERLOAD_LOG_INTERVAL:
            self.last_overload_log = now
            _log.warning(
                "http_connections_shed",
                reason=reason,
                shed=self.shed_count,
                open=self._open_count(),
                max_connections=self.max_connections,
                hint="many idle or slow clients: the oldest incomplete requests are closed",
            )

    # --- read and answer ------------------------------------------------------------------------
    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbox += data
        end = _end_of_head(conn.inbox)
        if end < 0:
            if len(conn.inbox) > MAX_HEADER_BYTES:
                self._answer(conn, render(431, TEXT, b"request header too large\n"))
            return
        self._dispatch(conn, bytes(conn.inbox[:end]))

    def _dispatch(self, conn: _Conn, head: bytes) -> None:
        try:
            request = _parse(head)
        except _BadRequest as exc:
            self._answer(conn, render(exc.status, TEXT, f"{exc}\n".encode()))
            return
        early = self._early_answer(request)
        if early is not None:
            self._answer(conn, early)
            return
        route = self.app.routes[request.path]
        is_head = request.method == "HEAD"
        if request.path in INLINE:
            self._answer(conn, _run(route, request, conn.client, is_head))
        elif self.pool_depth() >= POOL_QUEUE:
            self._answer(conn, _BUSY)
        else:
            self._hand_to_pool(conn, route, request, is_head)

    def _early_answer(self, request: _Request) -> bytes | None:
        """403 / 404 / 405, decided from the request alone; None when a route should answer."""
        is_head = request.method == "HEAD"
        if not self.app.accepts(request.headers.get("Host")):
            return render(403, TEXT, b"forbidden host\n", head=is_head)
        if request.path not in self.app.routes:
            return render(404, TEXT, b"not found\n", head=is_head)
        if request.method not in ("GET", "HEAD"):
            return render(405, TEXT, b"method not allowed\n", extra={"Allow": ALLOWED_METHODS})
        return None

    def pool_depth(self) -> int:
        return len(self.waiting)

    def _hand_to_pool(
        self, conn: _Conn, route: Callable[[], Response], request: _Request, head: bool
    ) -> None:
        fd = conn.sock.fileno()
        del self.reading[fd]
        self.selector.unregister(conn.sock)
        self.waiting[fd] = conn

        def work() -> None:
            self.done.put((conn, _run(route, request, conn.client, head)))
            self.wake()

        self.pool.submit(work)

    def _collect_answers(self) -> None:
        while True:
            try:
                conn, answer = self.done.get_nowait()
            except queue.Empty:
                return
            fd = conn.sock.fileno()
            if self.waiting.pop(fd, None) is None:
                continue  # closed meanwhile (stopping)
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
            self.reading[fd] = conn  # _answer moves it on
            self._answer(conn, answer)

    def _answer(self, conn: _Conn, answer: bytes) -> None:
        fd = conn.sock.fileno()
        self.reading.pop(fd, None)
        conn.outbox = memoryview(answer)
        conn.deadline = time.monotonic() + self.send_timeout
        self.sending[fd] = conn
        self._send(conn)
        if fd in self.sending:
            self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _send(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if not conn.outbox:
            self._close(conn, finished=True)

    # --- deadlines and closing ----------------------------------------------------------------
    def _expire(self, now: float) -> None:
        for conns in (self.reading, self.sending):
            while conns:
                conn = conns[next(iter(conns))]
                if conn.deadline > now:
                    break
                phase = "send" if conns is self.sending else "header"
                _log.debug("http_deadline", client=conn.client, phase=phase)
                self._close(conn)

    def _close(self, conn: _Conn, finished: bool = False) -> None:
        fd = conn.sock.fileno()
        for conns in (self.reading, self.waiting, self.sending):
            conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        if finished:
            _drain(conn.sock)
        conn.sock.close()

    def _close_all(self) -> None:
        for conns in (self.reading, self.waiting, self.sending):
            for conn in list(conns.values()):
                self._close(conn)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()


def _end_of_head(buffer: bytearray) -> int:
    """The offset just past the blank line that ends the headers, or -1."""
    crlf = buffer.find(b"\r\n\r\n")
    if crlf >= 0:
        return crlf + 4
    lf = buffer.find(b"\n\n")
    return lf + 2 if lf >= 0 else -1


def _run(route: Callable[[], Response], request: _Request, client: str, head: bool) -> bytes:
    try:
        status, content_type, body = route()
    except Exception as exc:
        _log.warning("http handler failed", path=request.path, error=type(exc).__name__, detail=str(exc))
        status, content_type, body = 500, TEXT, b"internal error\n"
    _log.debug("http request", method=request.method, path=request.target, status=status, client=client)
    return render(status, content_type, body, head=head)


def _drain(sock: socket.socket) -> None:
    """Read what the client sent beyond its headers, so closing does not reset the answer away."""
    try:
        sock.shutdown(socket.SHUT_WR)
        for _ in range(4):
            if not sock.recv(65536):
                return
    except OSError:
        pass
