"""`/healthz`, `/readyz`, `/status` and `/metrics` on the standard library's HTTP server.

The server runs in a daemon thread, one short-lived thread per connection (at most
`max_connections` at once; more are answered 503 and closed), HTTP/1.0 (one request per
connection). Every request has a total deadline, so a client trickling bytes cannot hold a thread.
Handlers only read values the loop has cached (`HealthSource`); none of them touches the database.

DNS-rebinding guard: on a loopback bind, a request whose `Host` is neither a loopback name, an IP
literal nor one of `allowed_hosts` is refused (403), so a web page a developer visits cannot read
`/status` through a rebound name. Kubernetes probes and Prometheus use the pod IP (an IP literal),
and non-loopback binds accept any Host.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from reconciler import logs
from reconciler.errors import ConfigError
from reconciler.metrics import Metrics
from reconciler.redact import redact

ALLOWED_METHODS = "GET, HEAD"
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
_POLL_INTERVAL = 0.2
_BUSY_RESPONSE = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

_log = logs.get("reconciler.http")

Response = tuple[int, str, bytes]


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


class _DeadlineReader(io.RawIOBase):
    """Socket reads that all end by one deadline, however slowly the client sends."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("request not received in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _App:
    """What the handlers need: the routes' data sources and the Host guard."""

    def __init__(self, source: HealthSource, metrics: Metrics, guard: HostGuard, timeout: float) -> None:
        self.source = source
        self.metrics = metrics
        self.guard = guard
        self.timeout = timeout
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


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "schema-reconciler"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        app = self.server.app
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, time.monotonic() + app.timeout))

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _other_method(self) -> None:
        app = self.server.app
        if not app.guard.accepts(self.headers.get("Host")):
            self._respond(403, TEXT, b"forbidden host\n")
        elif self._route() is None:
            self._respond(404, TEXT, b"not found\n")
        else:
            self._respond(405, TEXT, b"method not allowed\n", {"Allow": ALLOWED_METHODS})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _other_method

    def _route(self) -> Callable[[], Response] | None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        return self.server.app.routes.get(path)

    def _dispatch(self, head: bool) -> None:
        app = self.server.app
        if not app.guard.accepts(self.headers.get("Host")):
            self._respond(403, TEXT, b"forbidden host\n", head=head)
            return
        route = self._route()
        if route is None:
            self._respond(404, TEXT, b"not found\n", head=head)
            return
        try:
            status, content_type, body = route()
        except Exception as exc:
            _log.warning("http handler failed", path=self.path, error=type(exc).__name__, detail=str(exc))
            status, content_type, body = 500, TEXT, b"internal error\n"
        self._respond(status, content_type, body, head=head)

    def _respond(
        self,
        status: int,
        content_type: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        self.connection.settimeout(self.server.app.timeout)  # bounds the whole send (sendall)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        _log.debug(
            "http request", method=self.command, path=self.path, status=code, client=self.client_address[0]
        )

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("http server", message=format % args, client=self.client_address[0])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], family: int, app: _App, max_connections: int) -> None:
        self.address_family = family
        self.app = app
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a pod without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            _log.debug("http busy, connection refused", client=client_address[0])
            try:
                request.setblocking(False)
                request.send(_BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        _log.debug("http connection error", client=client_address[0], exc_info=True)


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
    """The health, status and metrics endpoints of one daemon, served from a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        source: HealthSource,
        metrics: Metrics,
        allowed_hosts: Sequence[str] = (),
        *,
        request_timeout: float = 10.0,
        max_connections: int = 32,
    ) -> None:
        self._host = host
        self._port = port
        self._source = source
        self._metrics = metrics
        self._allowed_hosts = tuple(allowed_hosts)
        self._timeout = request_timeout
        self._max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; a bind failure raises ConfigError naming HOST:PORT and the reason."""
        if self._server is not None:
            return
        wanted = format_address(self._host, self._port)
        try:
            family, literal = _resolve(self._host, self._port)
            guard = HostGuard(literal, self._allowed_hosts)
            app = _App(self._source, self._metrics, guard, self._timeout)
            server = _Server((literal, self._port), family, app, self._max_connections)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"cannot listen on {wanted} for /healthz /readyz /status /metrics: {reason}; "
                "set [daemon] http to a free HOST:PORT (port 0 picks any)"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name="reconciler-http",
            daemon=True,
        )
        self._thread.start()
        host, port = self.address
        _log.debug("http listening", address=format_address(host, port), host_check=guard.enforcing)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the configured ones before `start`)."""
        if self._server is None:
            return self._host, self._port
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, wait up to `timeout` for the serving thread, close the socket."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        # shutdown() waits without a deadline; the serving thread's join below bounds the wait.
        threading.Thread(target=server.shutdown, name="reconciler-http-stop", daemon=True).start()
        thread.join(max(timeout, 0.0))
        server.server_close()
