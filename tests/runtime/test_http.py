"""The health / status / metrics endpoints, over real sockets, and the metrics they expose."""

from __future__ import annotations

import http.client
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from reconciler.errors import EXIT_CONFIG, ConfigError
from reconciler.redact import register_secret
from reconciler.runtime.http import HttpServer
from reconciler.runtime.metrics import HISTOGRAM_NAMES, METRIC_NAMES, OUTCOMES, STATES, Metrics

TARGET = "orders"


class FakeSource:
    """The loop's side of the HealthSource interface: cached values the test sets."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.is_alive = True
        self.is_ready = True
        self.document: dict[str, Any] = {"state": "in_sync", "pending": 0}
        self.fail = False

    def alive(self) -> bool:
        return self.is_alive

    def ready(self) -> bool:
        return self.is_ready

    def status(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("status exploded")
        return self.document


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def call(address: tuple[str, int], path: str, method: str = "GET", host: str | None = None) -> Reply:
    conn = http.client.HTTPConnection(address[0], address[1], timeout=5)
    try:
        conn.request(method, path, headers={"Host": host} if host is not None else {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def wait_until(condition: Any, deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        time.sleep(0.02)


@pytest.fixture
def own_source() -> FakeSource:
    return FakeSource()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(TARGET, "1.2.3")


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[HttpServer, FakeSource, Metrics]]:
    """One loopback server for the route tests (stopping one takes a poll interval)."""
    source, metrics = FakeSource(), Metrics(TARGET, "1.2.3")
    srv = HttpServer("127.0.0.1", 0, source, metrics, allowed_hosts=("App.Internal",))
    srv.start()
    yield srv, source, metrics
    srv.stop()


@pytest.fixture
def server(shared: tuple[HttpServer, FakeSource, Metrics]) -> HttpServer:
    shared[1].reset()
    return shared[0]


@pytest.fixture
def source(shared: tuple[HttpServer, FakeSource, Metrics]) -> FakeSource:
    """The shared server's source, reset by `server`."""
    return shared[1]


@pytest.fixture
def shared_metrics(shared: tuple[HttpServer, FakeSource, Metrics]) -> Metrics:
    return shared[2]


# --- routes -------------------------------------------------------------------------------------


def test_healthz_follows_the_heartbeat(server: HttpServer, source: FakeSource) -> None:
    ok = call(server.address, "/healthz")
    assert (ok.status, ok.text.strip()) == (200, "ok")
    assert ok.headers["Content-Type"].startswith("text/plain")
    source.is_alive = False
    stale = call(server.address, "/healthz")
    assert (stale.status, stale.text.strip()) == (503, "stale")
    source.is_alive = True
    assert call(server.address, "/healthz").status == 200


def test_readyz_follows_readiness(server: HttpServer, source: FakeSource) -> None:
    assert call(server.address, "/readyz").status == 200
    source.is_ready = False
    assert call(server.address, "/readyz").status == 503
    assert call(server.address, "/healthz").status == 200  # liveness is independent


def test_status_is_json(server: HttpServer, source: FakeSource) -> None:
    source.document = {"state": "behind", "conditions": ["drift"], "pending": 2, "heads": {"db": None}}
    reply = call(server.address, "/status?pretty=1")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert json.loads(reply.body) == source.document
    source.is_ready = source.is_alive = False  # /status answers whatever the state
    assert call(server.address, "/status").status == 200


def test_status_masks_registered_secrets(server: HttpServer, source: FakeSource) -> None:
    secret = "pw-" + uuid.uuid4().hex
    register_secret(secret)
    source.document = {"error": f"connection to postgresql://app:{secret}@db/app failed"}
    reply = call(server.address, "/status")
    assert secret not in reply.text
    assert json.loads(reply.body)["error"] == "connection to postgresql://app:***@db/app failed"


def test_metrics_route_serves_prometheus_text(server: HttpServer, shared_metrics: Metrics) -> None:
    def applied() -> float:
        reply = call(server.address, "/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        runs = samples(reply.text, "reconciler_runs_total")
        return next(s.value for s in runs if s.labels["outcome"] == "applied")

    before = applied()
    shared_metrics.observe_run("applied", 0.3)
    assert applied() == before + 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/status", "/metrics"])
def test_head_has_the_headers_and_no_body(server: HttpServer, path: str) -> None:
    got = call(server.address, path)
    head = call(server.address, path, method="HEAD")
    assert head.status == got.status == 200
    assert head.body == b""
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) > 0


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
def test_unknown_path_is_404(server: HttpServer, method: str) -> None:
    assert call(server.address, "/nope", method=method).status == 404
    assert call(server.address, "/healthz/extra", method=method).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405_with_allow(server: HttpServer, method: str) -> None:
    reply = call(server.address, "/status", method=method)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"


def test_a_failing_source_gives_500_and_the_server_keeps_serving(
    server: HttpServer, source: FakeSource
) -> None:
    source.fail = True
    assert call(server.address, "/status").status == 500
    source.fail = False
    assert call(server.address, "/status").status == 200


def test_no_access_log_on_stderr(server: HttpServer, capfd: pytest.CaptureFixture[str]) -> None:
    for path in ("/healthz", "/nope", "/metrics"):
        call(server.address, path)
    call(server.address, "/status", method="POST")
    call(server.address, "/healthz", host="evil.example")
    err = capfd.readouterr().err
    assert "GET" not in err and "POST" not in err and "HTTP/1" not in err


# --- DNS-rebinding guard ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io", ""]
)
def test_loopback_bind_refuses_foreign_host_names(server: HttpServer, host: str) -> None:
    value = host.format(port=server.address[1])
    assert call(server.address, "/healthz", host=value).status == 403
    assert call(server.address, "/status", host="evil.example").status == 403
    assert call(server.address, "/metrics", method="HEAD", host="evil.example").status == 403


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:{port}",
        "127.0.0.1:{port}",
        "127.9.8.7",
        "[::1]:{port}",
        "10.1.2.3",
        "10.1.2.3:8089",
        "[fd00::7]",
        "app.internal",
        "app.internal:{port}",
    ],
)
def test_loopback_bind_accepts_loopback_ip_literals_and_allowed_hosts(server: HttpServer, host: str) -> None:
    value = host.format(port=server.address[1])
    assert call(server.address, "/healthz", host=value).status == 200


def test_a_request_without_host_header_is_accepted(server: HttpServer) -> None:
    conn = http.client.HTTPConnection(*server.address, timeout=5)
    try:
        conn.putrequest("GET", "/healthz", skip_host=True)
        conn.endheaders()
        assert conn.getresponse().status == 200  # not a browser: browsers always send Host
    finally:
        conn.close()


def test_non_loopback_bind_accepts_any_host(own_source: FakeSource, metrics: Metrics) -> None:
    srv = HttpServer("0.0.0.0", 0, own_source, metrics)
    srv.start()
    try:
        port = srv.address[1]
        assert call(("127.0.0.1", port), "/healthz", host="evil.example").status == 200
        assert call(("127.0.0.1", port), "/status", host="evil.example").status == 200
    finally:
        srv.stop()


def test_localhost_name_binds_loopback_and_guards(own_source: FakeSource, metrics: Metrics) -> None:
    srv = HttpServer("localhost", 0, own_source, metrics)
    srv.start()
    try:
        address = srv.address
        assert address[0] in ("127.0.0.1", "::1")
        assert call(address, "/healthz", host="evil.example").status == 403
        assert call(address, "/healthz", host="localhost").status == 200
    finally:
        srv.stop()


def test_ipv6_loopback_bind_guards_too(own_source: FakeSource, metrics: Metrics) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    srv = HttpServer("::1", 0, own_source, metrics)
    try:
        srv.start()
    except ConfigError:
        pytest.skip("::1 is not configured on this machine")
    try:
        assert srv.address[0] == "::1"
        assert call(srv.address, "/healthz", host="evil.example").status == 403
        assert call(srv.address, "/healthz", host=f"[::1]:{srv.address[1]}").status == 200
    finally:
        srv.stop()


# --- lifecycle and robustness -------------------------------------------------------------------


def test_bind_failure_names_the_address(own_source: FakeSource, metrics: Metrics) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        srv = HttpServer("127.0.0.1", port, own_source, metrics)
        with pytest.raises(ConfigError) as info:
            srv.start()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "in use" in str(info.value).lower()
    assert info.value.exit_code == EXIT_CONFIG
    srv.stop()  # never started: a no-op


def test_start_binds_a_free_port_and_stop_releases_it(own_source: FakeSource, metrics: Metrics) -> None:
    srv = HttpServer("127.0.0.1", 0, own_source, metrics)
    assert srv.address == ("127.0.0.1", 0)
    srv.start()
    host, port = srv.address
    assert host == "127.0.0.1" and port > 0
    assert call((host, port), "/healthz").status == 200
    srv.stop(timeout=2)
    srv.stop()  # idempotent
    with pytest.raises(OSError):
        call((host, port), "/healthz")
    again = HttpServer("127.0.0.1", port, own_source, metrics)
    again.start()
    try:
        assert call((host, port), "/healthz").status == 200
    finally:
        again.stop()


def test_a_slow_client_is_cut_off_at_the_deadline(own_source: FakeSource, metrics: Metrics) -> None:
    srv = HttpServer("127.0.0.1", 0, own_source, metrics, request_timeout=0.5)
    srv.start()
    try:
        with socket.create_connection(srv.address, timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            started = time.monotonic()
            closed = False
            # one header byte every 50 ms: no single read ever idles out, so only the request's
            # total deadline (0.5 s) can close it; the loop's own 60 s is just the test's bound
            while time.monotonic() - started < 60 and not closed:
                try:
                    sock.sendall(b"X")
                    sock.settimeout(0.05)
                    closed = sock.recv(1024) == b""
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
            assert closed, "the server kept a trickling client for 60 s"
        assert call(srv.address, "/healthz").status == 200
    finally:
        srv.stop()


def test_unshed_connections_beyond_the_cap_get_503(own_source: FakeSource, metrics: Metrics) -> None:
    """The unsafe server's cap (`shed=False`); the default one sheds instead (test_http_slowloris)."""
    srv = HttpServer("127.0.0.1", 0, own_source, metrics, max_connections=2, request_timeout=5, shed=False)
    srv.start()
    idle = [socket.create_connection(srv.address, timeout=5) for _ in range(2)]
    try:
        wait_until(lambda: call(srv.address, "/healthz").status == 503)
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: call(srv.address, "/healthz").status == 200)
    srv.stop()


# --- metrics ------------------------------------------------------------------------------------


def families(text: str) -> dict[str, list[Sample]]:
    """Samples by exposed family name (the parser drops a counter's `_total`; put it back)."""
    found: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        found[name] = list(family.samples)
    return found


def samples(text: str, name: str, suffix: str = "") -> list[Sample]:
    return [s for s in families(text)[name] if s.name == name + suffix]


def exposed(metrics: Metrics) -> str:
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return body.decode("utf-8")


def test_every_metric_name_is_exposed_with_the_target_label(metrics: Metrics) -> None:
    # the alert counters have series only for declared sinks (the daemon declares its own)
    metrics.declare_sinks(["slack-ops"], ["behind"])
    found = families(exposed(metrics))
    for name in METRIC_NAMES:
        assert name in found, name
        assert found[name], name
        assert all(s.labels["target"] == TARGET for s in found[name]), name
    info = samples(exposed(metrics), "reconciler_info")
    assert [(s.labels["version"], s.value) for s in info] == [("1.2.3", 1.0)]


def test_series_exist_from_the_start_with_zero(metrics: Metrics) -> None:
    text = exposed(metrics)
    runs = {s.labels["outcome"]: s.value for s in samples(text, "reconciler_runs_total")}
    assert runs == dict.fromkeys(OUTCOMES, 0.0)
    states = {s.labels["state"]: s.value for s in samples(text, "reconciler_state")}
    assert states == dict.fromkeys(STATES, 0.0)
    for name in HISTOGRAM_NAMES:
        assert [s.value for s in samples(text, name, "_count")] == [0.0]


def test_observations_move_the_values(metrics: Metrics) -> None:
    metrics.observe_run("noop", 0.0007)
    metrics.observe_run("noop", 0.0009)
    metrics.observe_run("failed", 2.0)
    metrics.observe_revision_apply(12.5)
    metrics.observe_lock_wait(0.2)
    metrics.set_pending(3)
    metrics.set_last_success(1700000000.5)
    metrics.set_consecutive_failures(1)
    metrics.alert_sent("failed", "webhook")
    metrics.alert_sent("failed", "webhook")
    text = exposed(metrics)
    runs = {s.labels["outcome"]: s.value for s in samples(text, "reconciler_runs_total")}
    assert (runs["noop"], runs["failed"], runs["applied"]) == (2.0, 1.0, 0.0)
    assert samples(text, "reconciler_run_duration_seconds", "_count")[0].value == 3.0
    assert samples(text, "reconciler_run_duration_seconds", "_sum")[0].value == pytest.approx(2.0016)
    buckets = {s.labels["le"]: s.value for s in samples(text, "reconciler_run_duration_seconds", "_bucket")}
    assert (buckets["0.0005"], buckets["0.001"], buckets["600.0"], buckets["+Inf"]) == (0.0, 2.0, 3.0, 3.0)
    assert samples(text, "reconciler_revision_apply_duration_seconds", "_count")[0].value == 1.0
    assert samples(text, "reconciler_lock_wait_seconds", "_count")[0].value == 1.0
    assert samples(text, "reconciler_pending_revisions")[0].value == 3.0
    assert samples(text, "reconciler_last_success_timestamp_seconds")[0].value == 1700000000.5
    assert samples(text, "reconciler_consecutive_failures")[0].value == 1.0
    alert = samples(text, "reconciler_alerts_total")[0]
    assert (alert.labels["event"], alert.labels["sink"], alert.value) == ("failed", "webhook", 2.0)


def test_state_gauge_is_one_only_for_the_current_state(metrics: Metrics) -> None:
    metrics.set_state("dirty", "behind", ["dirty", "drift"])
    metrics.set_state("drift", "ahead", ["drift"])
    text = exposed(metrics)
    states = {s.labels["state"]: s.value for s in samples(text, "reconciler_state")}
    assert {k for k, v in states.items() if v == 1.0} == {"drift"}
    assert set(states) == set(STATES)
    sync = {s.labels["sync_state"]: s.value for s in samples(text, "reconciler_sync_state")}
    assert {k for k, v in sync.items() if v == 1.0} == {"ahead"}
    conditions = {s.labels["condition"]: s.value for s in samples(text, "reconciler_condition")}
    assert {k for k, v in conditions.items() if v == 1.0} == {"drift"}
    metrics.set_state("in_sync", "in_sync", [])
    states = {s.labels["state"]: s.value for s in samples(exposed(metrics), "reconciler_state")}
    assert {k for k, v in states.items() if v == 1.0} == {"in_sync"}


def test_instances_have_their_own_registries() -> None:
    first, second = Metrics("a", "1"), Metrics("b", "1")
    first.observe_run("applied", 1.0)
    runs = {s.labels["outcome"]: s.value for s in samples(exposed(second), "reconciler_runs_total")}
    assert runs["applied"] == 0.0
    assert {s.labels["target"] for s in samples(exposed(first), "reconciler_runs_total")} == {"a"}
