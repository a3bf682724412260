"""Alert delivery that never blocks the loop: one worker thread and bounded queue per sink.

`AlertDispatcher` delivers off the loop: one worker thread per sink, each with a bounded queue
(the oldest alert is dropped when full), retries inside a total deadline per alert and sink,
spaced by `core.backoff`. Each connection's peer address is checked before a byte is sent.
Webhook URLs carry tokens: logs name the sink, never its URL.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from reconciler import logs
from reconciler.core import urlcheck
from reconciler.core.alerting import Alert
from reconciler.core.backoff import backoff
from reconciler.redact import redact
from reconciler.settings import AlertingSettings, AlertSink
from reconciler.version import __version__

log = logs.get("reconciler.alerts")

_BACKOFF = 0.2  # seconds: the backoff base between attempts, always inside the deadline
_MIN_ATTEMPT = 0.05  # no attempt is started with less time than this left


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: following it would resend the body (and token) elsewhere, as a GET."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


class _InFlight:
    """The connection of the attempt in flight, so that it can be cut at its deadline or at close.

    Per-attempt socket timeouts bound each connect and read; cutting the socket also bounds an
    endpoint that answers a byte at a time, and lets `close()` release a hung delivery.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.cut = False

    def track(
        self, cls: type[http.client.HTTPConnection], allow_link_local: bool = False
    ) -> Callable[..., http.client.HTTPConnection]:
        def make(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
            conn = cls(*args, **kwargs)
            conn._create_connection = _checked_connect(allow_link_local)  # type: ignore[attr-defined]
            with self._lock:
                self._conn, self.cut = conn, False
            return conn

        return make

    def abort(self) -> None:
        with self._lock:
            sock = self._conn.sock if self._conn is not None else None
            self.cut = True
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def opener(self, allow_link_local: bool = False) -> urllib.request.OpenerDirector:
        """HTTP and HTTPS only: not `build_opener`'s defaults, which also open file://, ftp:// and
        data: URLs. Each connection's peer address is checked (`_checked_connect`)."""
        tracker = self

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(tracker.track(http.client.HTTPConnection, allow_link_local), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(
                    tracker.track(http.client.HTTPSConnection, allow_link_local),
                    req,
                    context=ssl.create_default_context(),
                )

        opener = urllib.request.OpenerDirector()
        for handler in (
            urllib.request.ProxyHandler(),
            urllib.request.UnknownHandler(),
            Http(),
            Https(),
            _NoRedirect(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ):
            opener.add_handler(handler)
        return opener


def _checked_connect(allow_link_local: bool) -> Callable[..., socket.socket]:
    """`socket.create_connection`, refusing a peer on a link-local or metadata address once
    connected and before a byte is sent: a host name may resolve there (DNS is not checked at
    configuration time)."""

    def connect(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.create_connection(address, *args, **kwargs)
        why = urlcheck.peer_refusal(str(sock.getpeername()[0]), allow_link_local)
        if why:
            sock.close()
            raise OSError(why)
        return sock

    return connect


def wants(sink: AlertSink, alert: Alert) -> bool:
    """A sink's `events` filter (empty: all). `recovered` passes when the event it ends is listed."""
    if not sink.events:
        return True
    return alert.event in sink.events or (
        alert.event == "recovered" and alert.details.get("recovered_from") in sink.events
    )


def _failure(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return f"connection failed: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class Counts:
    """Where delivery results go (the metrics): each callback gets (event, sink name)."""

    on_sent: Callable[[str, str], None] | None = None
    on_failed: Callable[[str, str], None] | None = None
    on_dropped: Callable[[str, str], None] | None = None


class _SinkWorker:
    """One sink: a bounded queue and the thread that drains it."""

    def __init__(self, sink: AlertSink, alerting: AlertingSettings, counts: Counts) -> None:
        self.sink = sink
        self.alerting = alerting
        self.counts = counts
        self.queue: deque[Alert] = deque()
        self.size = max(1, alerting.queue_size)
        self.cond = threading.Condition()
        self.dropped = 0
        self.closing = False
        self.close_deadline = float("inf")
        self.in_flight = _InFlight()
        self.opener = self.in_flight.opener(alerting.allow_link_local)
        self.thread = threading.Thread(target=self._run, name=f"reconciler-alerts-{sink.name}", daemon=True)

    def put(self, alert: Alert) -> bool:
        with self.cond:
            if self.closing:
                self.dropped += 1
                lost: Alert | None = alert
            else:
                lost = self.queue.popleft() if len(self.queue) >= self.size else None
                if lost is not None:
                    self.dropped += 1
                self.queue.append(alert)
                self.cond.notify()
        if lost is not None:
            self._count(self.counts.on_dropped, lost)
        return lost is None

    def _next(self) -> Alert | None:
        with self.cond:
            while not self.queue and not self.closing:
                self.cond.wait()
            if not self.queue or time.monotonic() >= self.close_deadline:
                return None
            return self.queue.popleft()

    def _run(self) -> None:
        while (alert := self._next()) is not None:
            try:
                self._deliver(alert)
            except Exception as exc:  # the worker must outlive any surprise
                log.warning(
                    "alert_worker_error",
                    sink=self.sink.name,
                    alert_event=alert.event,
                    error=redact(f"{type(exc).__name__}: {exc}"),
                )

    def _deliver(self, alert: Alert) -> None:
        payload = alert.as_slack() if self.sink.kind == "slack" else alert.as_webhook()
        body = json.dumps(payload).encode("utf-8")
        send_deadline = time.monotonic() + self.alerting.send_timeout
        attempts = max(1, self.alerting.retries)
        error, tried = "no attempt fit in the deadline", 0
        for attempt in range(1, attempts + 1):
            left = min(send_deadline, self.close_deadline) - time.monotonic()
            if left < _MIN_ATTEMPT:
                break
            tried = attempt
            error = self._attempt(body, left)
            if not error:
                self._sent(alert)
                return
            pause = min(
                backoff(attempt, base=_BACKOFF, cap=self.alerting.send_timeout),
                min(send_deadline, self.close_deadline) - time.monotonic() - _MIN_ATTEMPT,
            )
            if attempt < attempts and pause > 0:
                time.sleep(pause)
        log.warning(
            "alert_delivery_failed",
            sink=self.sink.name,
            alert_event=alert.event,
            attempts=tried,
            error=redact(error),
            timeout=self.alerting.send_timeout,
        )
        self._count(self.counts.on_failed, alert)

    def _attempt(self, body: bytes, timeout: float) -> str:
        """One POST cut at `timeout`; returns "" on a 2xx answer, else what went wrong (never the URL)."""
        refused = urlcheck.refusal(self.sink.url, self.alerting.allow_link_local)
        if refused:  # the configuration refuses it too; a sink built in code is checked here
            return f"refused: {refused}"
        request = urllib.request.Request(
            self.sink.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"schema-reconciler/{__version__}"},
        )
        timer = threading.Timer(timeout, self.in_flight.abort)
        timer.daemon = True
        timer.start()
        try:
            with self.opener.open(request, timeout=timeout) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code}"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return "timed out" if self.in_flight.cut else _failure(exc)
        finally:
            timer.cancel()
        return "" if 200 <= status < 300 else f"HTTP {status}"

    def _sent(self, alert: Alert) -> None:
        log.debug("alert_sent", sink=self.sink.name, alert_event=alert.event)
        self._count(self.counts.on_sent, alert)

    def _count(self, callback: Callable[[str, str], None] | None, alert: Alert) -> None:
        """Tell the metrics what became of `alert`; a failing callback never stops delivery."""
        if callback is None:
            return
        try:
            callback(alert.event, self.sink.name)
        except Exception as exc:
            log.warning(
                "alert_on_sent_error", sink=self.sink.name, error=redact(f"{type(exc).__name__}: {exc}")
            )

    def stop(self) -> None:
        """Past the close deadline: cut a delivery still in flight."""
        if self.thread.is_alive():
            self.in_flight.abort()

    def begin_close(self, deadline: float) -> None:
        with self.cond:
            self.closing = True
            self.close_deadline = deadline
            self.cond.notify_all()

    def abandon(self) -> int:
        with self.cond:
            left = list(self.queue)
            self.queue.clear()
            self.dropped += len(left)
        for alert in left:
            self._count(self.counts.on_dropped, alert)
        return len(left)


class AlertDispatcher:
    """Delivery off the loop: `submit` never blocks; each sink has its own queue and thread."""

    def __init__(
        self,
        sinks: Sequence[AlertSink],
        alerting: AlertingSettings,
        on_sent: Callable[[str, str], None] | None = None,
        on_failed: Callable[[str, str], None] | None = None,
        on_dropped: Callable[[str, str], None] | None = None,
    ) -> None:
        """`on_sent`, `on_failed` (every attempt within the deadline failed) and `on_dropped`
        (pushed out of a full queue, submitted after close, left at close) get (event, sink)."""
        counts = Counts(on_sent, on_failed, on_dropped)
        self._workers = [_SinkWorker(sink, alerting, counts) for sink in sinks]
        self._started = False

    @property
    def dropped(self) -> int:
        """Alerts lost: pushed out of a full queue, submitted after close, or left at close."""
        return sum(w.dropped for w in self._workers)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for worker in self._workers:
            worker.thread.start()

    def submit(self, alert: Alert) -> bool:
        """Queue `alert` for every sink that wants it; False when an alert had to be dropped."""
        kept = True
        for worker in self._workers:
            if wants(worker.sink, alert) and not worker.put(alert):
                kept = False
                log.warning(
                    "alert_dropped",
                    sink=worker.sink.name,
                    alert_event=alert.event,
                    queue_size=worker.size,
                    dropped=worker.dropped,
                )
        return kept

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what fits in `timeout` seconds, then stop; a hung sink cannot hold it longer."""
        deadline = time.monotonic() + max(0.0, timeout)
        for worker in self._workers:
            worker.begin_close(deadline)
        for worker in self._workers:
            if worker.thread.is_alive():
                worker.thread.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            worker.stop()
        left = sum(worker.abandon() for worker in self._workers)
        if left:
            log.warning("alerts_abandoned", count=left, timeout=timeout)
