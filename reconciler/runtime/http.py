"""`/healthz`, `/readyz`, `/status` and `/metrics`: the routes, the Host check and the server around them.

The server runs `httploop.ServeLoop` (one `selectors` thread for every connection) in a daemon
thread. HTTP/1.0: one request per connection, closed after the answer.

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

DNS-rebinding check (`HostCheck`): on a loopback bind, a request whose `Host` is neither a loopback
name, an IP literal nor one of `allowed_hosts` is refused (403), so a web page a developer visits
cannot read `/status` through a rebound name. Kubernetes probes and Prometheus use the pod IP (an IP literal),
and non-loopback binds accept any Host.

Handlers only read values the loop has cached (`HealthSource`); none of them touches the database.
"""

from __future__ import annotations

import ipaddress
import json
import resource
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from reconciler import logs
from reconciler.errors import ConfigError
from reconciler.redact import redact
from reconciler.runtime.httploop import TEXT, Response, ServeLoop
from reconciler.runtime.metrics import Metrics

JSON = "application/json"
HTML = "text/html; charset=utf-8"
SHED_SWITCH = "http_shed"  # RECONCILER_UNSAFE_DISABLE: the limits of before (slowloris fails /healthz)
HEADER_TIMEOUT = 2.0  # seconds from accept to the end of the headers
REQUEST_TIMEOUT = 10.0  # seconds to send the answer
MAX_CONNECTIONS = 1024
UNSHED_MAX_CONNECTIONS = 32  # the thread-per-connection server's cap
_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
_FD_RESERVE = 128  # descriptors left for the database, the worker, the watcher and logs

_log = logs.get("reconciler.http")


class HealthSource(Protocol):
    def alive(self) -> bool:
        """The loop heartbeat is fresh. Never depends on the database."""

    def ready(self) -> bool:
        """Readiness as configured (`[daemon] ready_when`)."""

    def status(self) -> dict[str, Any]:
        """The JSON-able status document, already redacted."""

    def page(self) -> str:
        """The status page (HTML), already redacted."""


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


class HostCheck:
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
    """What the handlers need: the routes' data sources and the Host check."""

    def __init__(self, source: HealthSource, metrics: Metrics, guard: HostCheck) -> None:
        self.source = source
        self.metrics = metrics
        self.guard = guard
        self.routes: dict[str, Callable[[], Response]] = {
            "/healthz": self.healthz,
            "/readyz": self.readyz,
            "/": self.page,
            "/status": self.status,
            "/metrics": self.metrics_page,
        }

    def accepts(self, host: str | None) -> bool:
        return self.guard.accepts(host)

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

    def page(self) -> Response:
        return 200, HTML, redact(self.source.page()).encode("utf-8")

    def metrics_page(self) -> Response:
        body, content_type = self.metrics.exposition()
        return 200, content_type, body


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
        self._loop: ServeLoop | None = None
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
        guard = HostCheck(literal, self._allowed_hosts)
        bound = listener.getsockname()
        self._bound = (str(bound[0]), int(bound[1]))
        self._loop = ServeLoop(
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
