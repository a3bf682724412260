"""Slow and idle clients (slowloris) cannot fail `/healthz`: 500 half-open connections and 500
concurrent requests at once, over real sockets against the real server."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.config.load import load_settings
from reconciler.errors import ConfigError
from reconciler.runtime.http import SHED_SWITCH, HttpServer
from reconciler.runtime.metrics import Metrics
from tests.builders import flask_project
from tests.config.test_config import write
from tests.runtime.test_http import TARGET, FakeSource, call, wait_until
from tests.slowloris import Slowloris, burst, closed_by_peer, raise_fd_limit

HALF_OPEN = 500
REQUESTS = 500


@pytest.fixture(autouse=True)
def enough_descriptors() -> None:
    # both ends of every connection live in this process, plus the burst
    raise_fd_limit(4 * (HALF_OPEN + REQUESTS) + 256)


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(TARGET, "1.2.3")


@contextlib.contextmanager
def serving(source: FakeSource, metrics: Metrics, **options: Any) -> Iterator[HttpServer]:
    srv = HttpServer("127.0.0.1", 0, source, metrics, **options)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(source: FakeSource, metrics: Metrics) -> Iterator[HttpServer]:
    """The server as the daemon builds it: default deadlines and limits."""
    with serving(source, metrics) as srv:
        yield srv


def probe_during_burst(address: tuple[str, int]) -> tuple[int, dict[int, int]]:
    """One /healthz probe sent while REQUESTS other requests are in flight."""
    result: dict[int, int] = {}

    def run_burst() -> None:
        result.update(burst(address, REQUESTS))

    thread = threading.Thread(target=run_burst)
    thread.start()
    try:
        probe = call(address, "/healthz").status
    finally:
        thread.join(60)
    return probe, result


def test_healthz_is_200_under_500_half_open_connections_and_500_requests(server: HttpServer) -> None:
    with Slowloris(server.address, HALF_OPEN) as attack:
        all_open = attack.wait_open()
        probes = [probe_during_burst(server.address) for _ in range(3)]
        still_open = attack.open
    assert [status for status, _ in probes] == [200, 200, 200]
    for _, answers in probes:
        assert answers == {200: REQUESTS}
    assert all_open and still_open == HALF_OPEN  # (re-opened as closed:) the attack never let up
    assert call(server.address, "/status").status == 200


def test_half_open_connections_are_closed_at_the_header_deadline(
    source: FakeSource, metrics: Metrics
) -> None:
    """Each kind (half a request line, half a header, nothing) is closed without an answer, and not
    by eviction: 500 is below the connection cap."""
    with serving(source, metrics, header_timeout=0.5) as srv:
        with Slowloris(srv.address, HALF_OPEN, reopen=False) as attack:
            assert attack.wait_open()
            wait_until(lambda: attack.closed_by_server == HALF_OPEN, deadline=60)
            assert attack.answered == 0
            assert attack.opened == HALF_OPEN
        assert call(srv.address, "/healthz").status == 200


def test_at_the_cap_the_oldest_incomplete_request_makes_room(source: FakeSource, metrics: Metrics) -> None:
    with serving(source, metrics, max_connections=20, header_timeout=600) as srv:
        idle = [socket.create_connection(srv.address, timeout=5) for _ in range(20)]
        try:
            address = srv.address
            wait_until(lambda: call(address, "/healthz").status == 200)
            assert closed_by_peer(idle[0])
            assert not closed_by_peer(idle[-1])
        finally:
            for sock in idle:
                sock.close()


def test_a_blocked_status_handler_does_not_delay_the_probes(source: FakeSource, metrics: Metrics) -> None:
    release = threading.Event()
    original = source.status

    def stuck() -> dict[str, Any]:
        release.wait(60)
        return original()

    source.status = stuck  # type: ignore[method-assign]
    with serving(source, metrics) as srv:
        waiting = [threading.Thread(target=call, args=(srv.address, "/status")) for _ in range(4)]
        for thread in waiting:
            thread.start()
        try:
            assert call(srv.address, "/healthz").status == 200
            assert call(srv.address, "/readyz").status == 200
        finally:
            release.set()
            for thread in waiting:
                thread.join(10)


def test_negative_control_without_shedding_slowloris_fails_the_probe(
    source: FakeSource, metrics: Metrics
) -> None:
    """RECONCILER_UNSAFE_DISABLE=http_shed: the limits of before (the header deadline is the
    10 s send deadline, 32 connections, the newest refused) give the probe a 503."""
    with serving(source, metrics, shed=False) as srv, Slowloris(srv.address, HALF_OPEN):
        assert call(srv.address, "/healthz").status == 503


# --- the setting and the switch -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "0.01", "600", "inf", "nan"])
def test_a_header_timeout_out_of_range_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f'[target]\nurl = "sqlite:///a.db"\n[daemon]\nhttp_header_timeout = {value}\n')
    # inf and nan are refused earlier, by the check every duration gets
    expected = r":4: (\[daemon\] )?http_header_timeout must be (between 0.05 and 60|a finite number)"
    with pytest.raises(ConfigError, match=expected):
        load_settings(str(path), environ={})


def test_the_header_timeout_and_the_unsafe_switch_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl = "sqlite:///a.db"\n[daemon]\nhttp_header_timeout = 0.5\n')
    settings = load_settings(str(path), environ={"RECONCILER_UNSAFE_DISABLE": SHED_SWITCH})
    assert settings.daemon.http_header_timeout == 0.5
    assert settings.unsafe == {SHED_SWITCH}


# --- bad requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /healthz SPDY/3\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000, 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 150 + b"\r\n", 431),
    ],
    ids=["no-request-line", "not-http", "huge-header", "too-many-headers"],
)
def test_a_bad_request_is_answered_and_the_server_keeps_serving(
    server: HttpServer, request_bytes: bytes, status: int
) -> None:
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(request_bytes)
        answer = sock.recv(4096)
    assert answer.split(b" ", 2)[1] == str(status).encode()
    assert call(server.address, "/healthz").status == 200


# --- the daemon ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("unsafe", "expected"), [(False, 200), (True, 503)], ids=["default", "negative-control"]
)
def test_the_daemons_healthz_under_slowloris(tmp_path: Path, unsafe: bool, expected: int) -> None:
    """`reconciler run` as a process: 200 under the attack; 503 with RECONCILER_UNSAFE_DISABLE=http_shed."""
    from tests.runtime.test_daemon import config, daemon

    project = flask_project(tmp_path / "p", f"sqlite:///{tmp_path / 'app.db'}")
    project.chain(1)
    config(project, interval=60)
    env = {"RECONCILER_UNSAFE_DISABLE": SHED_SWITCH} if unsafe else None
    with daemon(project, env) as running, Slowloris(("127.0.0.1", running.port), HALF_OPEN):
        assert running.get("/healthz")[0] == expected
