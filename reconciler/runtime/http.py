"""`/healthz`, `/readyz`, `/status` and `/metrics` on a small standard-library event loop.

One thread accepts connections and reads requests for all of them (`selectors`: epoll on Linux),
so a connection that sends nothing, or half a request line, costs a file descriptor and a buffer,
not a thread. HTTP/1.0: one request per connection, closed after the answer.

Deadlines and limits, so that slow or idle clients (slowloris) cannot fail the liveness probe:
- **header deadline** (`[daemon] http_header_timeout`, default 2 s from accept): a connection that
  has not sent its whole request line and headers by then is closed;
- **send deadline** (`request_timeout`, 10 s): a client that reads the answer too slowly is cut off;
- **open connections** at most `max_connections` (default: 1024, less under a low file limit); at
  the cap the oldest connection still sending its request is closed to make room, so a new probe
  is always read;
- `/healthz` and `/readyz` are answered on the loop thread the moment their request is complete;
  `/status` and `/metrics` are computed in a pool of two threads with a bounded queue (503 when
  full), so they never delay the probes.

`RECONCILER_UNSAFE_DISABLE=http_shed` (negative-control tests only) restores the limits of before:
a header deadline equal to the send deadline, 32 connections, and 503 for the newest at the cap.

DNS-rebinding guard: on a loopback bind, a request whose `Host` is neither a loopback name, an IP
literal nor one of `allowed_hosts` is refused (403), so a web page a developer visits cannot read
`/status` through a rebound name. Kubernetes probes and Prometheus use the pod IP (an IP literal),
and non-loopback binds accept any Host.

Handlers only read values the loop has cached (`HealthSource`); none of them touches the database.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http.client
import io
import ipaddress
import json
import queue
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Protocol

from reconciler import logs
from reconciler.errors import ConfigError
from reconciler.redact import redact
from reconciler.runtime.metrics import Metrics

ALLOWED_METHODS = "GET, HEAD"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
SHED_SWITCH = "http_shed"  # RECONCILER_UNSAFE_DISABLE: the limits of before (slowloris fails /healthz)
HEADER_TIMEOUT = 2.0  # seconds from accept to the end of the headers
REQUEST_TIMEOUT = 10.0  # seconds to send the answer
MAX_CONNECTIONS = 1024
UNSHED_MAX_CONNECTIONS = 32  # the thread-per-connection server's cap
MAX_HEADER_BYTES = 16384
POOL_THREADS = 2
POOL_QUEUE = 64  # /status and /metrics requests waiting for the pool, at most
_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
_ACCEPT_BATCH = 256
_WAKE_INTERVAL = 0.5  # the loop looks at its deadlines at least this often
_OVERLOAD_LOG_INTERVAL = 60.0
_FD_RESERVE = 128  # descriptors left for the database, the worker, the watcher and logs

_log = logs.get("reconciler.http")

Response = tuple[int, str, bytes]
_INLINE = frozenset({"/healthz", "/readyz"})  # answered on the loop thread, never queued


class HealthSource(Protocol):
    def alive(self) -> bool:
        """The loop heartbeat is fresh. Never depends on the database."""

    def ready(self) -> bool:
        """Readiness as configured (`[daemon] ready_when`)."""

    def status(self) -> dict[str, Any]:
        """The JSON-able status document, already redacted."""


def host_name(header: str) -> str:
    """The name or address of a `Host` header value, lower-cased, without port or brackets."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback_address(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address.lower() == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


class HostGuard:
    """Decides which `Host` header values a server bound to `bind_address` accepts."""

    def __init__(self, bind_address: str, allowed_hosts: Sequence[str]) -> None:
        self.enforcing = is_loopback_address(bind_address)
        self._names = {"localhost"} | {host_name(h) for h in allowed_hosts if h.strip()}

    def accepts(self, header: str | None) -> bool:
        if not self.enforcing or header is None:  # browsers always send a Host header
            return True
        name = host_name(header)
        return name in self._names or is_ip_literal(name)


def default_max_connections() -> int:
    """`MAX_CONNECTIONS`, or fewer when the process's file limit would not leave room for them."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - _FD_RESERVE))


class _App:
    """What the handlers need: the routes' data sources and the Host guard."""

    def __init__(self, source: HealthSource, metrics: Metrics, guard: HostGuard) -> None:
        self.source = source
        self.metrics = metrics
        self.guard = guard
        self.routes: dict[str, Callable[[], Response]] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/status": self.status,
            "/metrics": self.metrics_page,
        }

    def healthz(self) -> Response:
        if self.source.alive():
            return 200, TEXT, b"ok\n"
        return 503, TEXT, b"stale\n"

    def readyz(self) -> Response:
        if self.source.ready():
            return 200, TEXT, b"ready\n"
        return 503, TEXT, b"not ready\n"

    def status(self) -> Response:
        body = json.dumps(self.source.status(), default=str, sort_keys=True)
        return 200, JSON, redact(body).encode("utf-8")

    def metrics_page(self) -> Response:
        body, content_type = self.metrics.exposition()
        return 200, content_type, body


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


class _Loop:
    """The serving thread's state: listener, connections by phase, the handler pool."""

    def __init__(
        self,
        listener: socket.socket,
        app: _App,
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
        if request.path in _INLINE:
            self._answer(conn, _run(route, request, conn.client, is_head))
        elif self.pool_depth() >= POOL_QUEUE:
            self._answer(conn, _BUSY)
        else:
            self._hand_to_pool(conn, route, request, is_head)

    def _early_answer(self, request: _Request) -> bytes | None:
        """403 / 404 / 405, decided from the request alone; None when a route should answer."""
        is_head = request.method == "HEAD"
        if not self.app.guard.accepts(request.headers.get("Host")):
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


def _listen(address: tuple[str, int], family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _resolve(host: str, port: int) -> tuple[int, str]:
    """The address family and literal address to bind for `host` (empty: all IPv4 interfaces)."""
    if not host:
        return socket.AF_INET, "0.0.0.0"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        info = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        return info[0][0], str(info[0][4][0])
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), host


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpServer:
    """The health, status and metrics endpoints of one daemon, served from a daemon thread.

    `shed=False` is the negative control's server (`RECONCILER_UNSAFE_DISABLE=http_shed`): the
    header deadline is the send deadline, at most 32 connections, the newest refused at the cap.
    """

    def __init__(
        self,
        host: str,
        port: int,
        source: HealthSource,
        metrics: Metrics,
        allowed_hosts: Sequence[str] = (),
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        max_connections: int | None = None,
        shed: bool = True,
    ) -> None:
        self._host = host
        self._port = port
        self._source = source
        self._metrics = metrics
        self._allowed_hosts = tuple(allowed_hosts)
        self._send_timeout = request_timeout
        self._header_timeout = header_timeout if shed else request_timeout
        default_cap = default_max_connections() if shed else UNSHED_MAX_CONNECTIONS
        self._max_connections = max_connections or default_cap
        self._shed = shed
        self._loop: _Loop | None = None
        self._thread: threading.Thread | None = None
        self._bound: tuple[str, int] = (host, port)

    def start(self) -> None:
        """Bind and serve; a bind failure raises ConfigError naming HOST:PORT and the reason."""
        if self._loop is not None:
            return
        wanted = format_address(self._host, self._port)
        try:
            family, literal = _resolve(self._host, self._port)
            listener = _listen((literal, self._port), family)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"cannot listen on {wanted} for /healthz /readyz /status /metrics: {reason}; "
                "set [daemon] http to a free HOST:PORT (port 0 picks any)"
            ) from None
        guard = HostGuard(literal, self._allowed_hosts)
        bound = listener.getsockname()
        self._bound = (str(bound[0]), int(bound[1]))
        self._loop = _Loop(
            listener,
            _App(self._source, self._metrics, guard),
            header_timeout=self._header_timeout,
            send_timeout=self._send_timeout,
            max_connections=self._max_connections,
            shed=self._shed,
        )
        self._thread = threading.Thread(target=self._loop.run, name="reconciler-http", daemon=True)
        self._thread.start()
        if not self._shed:
            _log.warning("safeguards_disabled", disabled=[SHED_SWITCH], effect="slow clients fail /healthz")
        _log.debug(
            "http listening",
            address=format_address(*self._bound),
            host_check=guard.enforcing,
            header_timeout=self._header_timeout,
            max_connections=self._max_connections,
            shed=self._shed,
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the configured ones before `start`)."""
        return self._bound if self._loop is not None else (self._host, self._port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, wait up to `timeout` for the serving thread, close the socket."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        loop.stopping.set()
        loop.wake()
        thread.join(max(timeout, 0.0))
        loop.listener.close()
