"""`reconciler run` (prod mode) as a real process: files, restarts, failures, alerts, signals."""

from __future__ import annotations

import json
import platform
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.builders import Project, create_table, db_heads, flask_project, journal_rows
from tests.cli import run_cli, start_cli
from tests.dbs import assert_no_canary
from tests.pgcluster import PrivateCluster, wait_until
from tests.webhooks import Recorder

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A port free now (for a URL where nothing listens): a daemon binds port 0 instead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    """One daemon process and the HTTP port it bound.

    The daemon is given port 0 and says the port in its `daemon_started` event: a port picked
    here and bound later can be taken meanwhile by another test's daemon, whose /status then
    answers for this one (a daemon that exited 2, "cannot listen", passed its waits that way)."""

    def __init__(self, project: Project, env: dict[str, str] | None = None) -> None:
        self.proc = start_cli(
            ["--config", str(project.config), "run", "--http", "127.0.0.1:0"],
            cwd=project.root,
            env=env,
        )
        self._port = 0
        self._bound = threading.Event()
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if lines is self._err and not self._port:
                self._port = _bound_port(line)
                if self._port:
                    self._bound.set()
        self._bound.set()  # the process ended: no port is coming

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    @property
    def port(self) -> int:
        if not self._bound.wait(60) or not self._port:
            raise AssertionError(
                f"the daemon serves no HTTP (exit {self.proc.poll()}): {self.stderr[-3000:]}"
            )
        return self._port

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        return json.loads(body) if code == 200 else {}

    def wait_status(self, predicate, timeout: float = 30, what: str = "status"):  # type: ignore[no-untyped-def]
        return wait_until(lambda: (lambda s: s if s and predicate(s) else None)(self.status()), timeout, what)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout)
        assert_no_canary(self.stdout, self.stderr)
        return int(code)


def _bound_port(line: str) -> int:
    """The port of a `daemon_started` event's `http` field (0: another line)."""
    try:
        event = json.loads(line)
    except ValueError:
        return 0
    if not isinstance(event, dict) or event.get("event") != "daemon_started":
        return 0
    return int(str(event["http"]).rpartition(":")[2])


@contextmanager
def daemon(project: Project, env: dict[str, str] | None = None) -> Iterator[Running]:
    running = Running(project, env)
    try:
        running.wait_status(lambda s: s.get("runs", 0) >= 1, 60, "the first run")
        yield running
    finally:
        running.stop()


def config(
    project: Project,
    interval: float = 60,
    sinks: list[str] | None = None,
    extra: str = "",
    alerting: str = "",
) -> None:
    alerts = "".join(f'\n[[alerts]]\nkind = "webhook"\nurl = "{url}"\n' for url in sinks or [])
    project.write_config(
        extra=f"[daemon]\ninterval = {interval}\njitter = 0\ndebounce = 0.1\nbackoff_max = 2\n"
        f"{extra}\n[alerting]\nunreachable_after = 2\n{alerting}\n{alerts}",
        models="myapp.models:db",
    )


def test_new_revision_files_are_applied_at_once_not_at_the_next_interval(tmp_path: Path, pg_url: str) -> None:
    """The watcher triggers a run: the steps are journaled with that trigger, long before the
    ten-minute interval could have. (How fast is a benchmark's business, not this test's.)"""
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(2)
    config(project, interval=600)
    staging = flask_project(tmp_path / "staging", pg_url)
    new_files = [
        staging.revision("n1", "r0001", upgrade=create_table("t_n1")),
        staging.revision("n2", "n1", upgrade=create_table("t_n2")),
    ]
    with daemon(project) as d:
        d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
        for path in new_files:  # what a new image or a git-sync sidecar does
            shutil.copy(path, project.versions / path.name)
        wait_until(lambda: db_heads(pg_url) == {"n2"}, 60, "n2 applied")
        steps = {r["revision"]: r["trigger"] for r in journal_rows(pg_url) if r["outcome"] == "applied"}
        assert steps["n1"] == steps["n2"] == "revision_files_changed"
        # the heads are in before the run ends; while it runs, /status shows the run's plan
        # (state behind, `applying`): wait for the run to finish
        status = d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after n2")
        assert status["last_outcome"] in ("applied", "noop")
        code, body = d.get("/metrics")
        assert code == 200 and "reconciler_runs_total" in body


def test_server_restart_survives_with_one_unreachable_and_one_recovered_alert(tmp_path: Path) -> None:
    cluster = PrivateCluster()
    hooks = Recorder()
    try:
        cluster.init()
        cluster.start()
        url = cluster.create_database("app")
        project = flask_project(tmp_path / "p", url)
        project.chain(2)
        config(project, interval=0.5, sinks=[hooks.url])
        with daemon(project) as d:
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
            cluster.stop("fast")
            d.wait_status(lambda s: s["state"] == "unknown", 30, "the outage in /status")
            assert d.get("/healthz")[0] == 200
            wait_until(lambda: hooks.events("unreachable"), 30, "the unreachable alert")
            project.chain(1, prefix="s", start_down="r0001")  # a release arrives during the outage
            assert d.get("/healthz")[0] == 200 and d.proc.poll() is None
            cluster.start()
            back = time.monotonic()
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after the restart")
            print(f"back in sync {time.monotonic() - back:.1f} s after the server returned")
            wait_until(lambda: hooks.events("recovered"), 10, "the recovered alert")
            assert db_heads(url) == {"s0000"}
        assert len(hooks.events("unreachable")) == 1
        assert len(hooks.events("recovered")) == 1
        for body in hooks.bodies:
            assert {"event", "state", "target", "message", "timestamp"} <= set(body)
    finally:
        hooks.close()
        cluster.destroy()


FAILS = 'op.execute("SELECT 1/0")'


def test_failing_revision_alerts_once_backs_off_then_blocks_until_fixed(tmp_path: Path, pg_url: str) -> None:
    hooks = Recorder()
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    bad = project.revision("bad", "r0000", upgrade=FAILS)
    config(project, interval=0.2, sinks=[hooks.url], extra="blocked_after = 3")
    try:
        with daemon(project) as d:
            d.wait_status(lambda s: "blocked" in s.get("conditions", []), 60, "blocked")
            attempts = [r for r in journal_rows(pg_url) if r["revision"] == "bad"]
            assert len(attempts) == 3  # backoff, then blocked: not one attempt per 0.2 s tick
            wait_until(lambda: len(hooks.events("blocked")) >= 1, 10, "the blocked alert")
            assert len(hooks.events("failed")) == 1
            # Fixing the file unblocks it.
            bad.write_text(bad.read_text().replace(FAILS, create_table("t_fixed")))
            d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync after the fix")
        assert db_heads(pg_url) == {"bad"}
    finally:
        hooks.close()


def test_dead_or_slow_webhooks_do_not_change_the_rhythm(tmp_path: Path, pg_url: str) -> None:
    hung, slow = Recorder(hang=True), Recorder(delay=3)
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    project.revision("bad", "r0000", upgrade=FAILS)  # alerts to send on every state change
    # A send gives up only after a minute: runs that go on meanwhile did not wait for it.
    config(
        project,
        interval=0.2,
        sinks=[hung.url, slow.url],
        extra="blocked_after = 100",
        alerting="send_timeout = 60",
    )
    try:
        with daemon(project) as d:
            first = d.wait_status(lambda s: s.get("runs", 0) >= 3, 60, "three runs")
            runs0 = first["runs"]
            wait_until(lambda: len(hung.bodies) >= 1, 60, "the hung sink was tried")
            wait_until(lambda: d.status().get("runs", 0) >= runs0 + 5, 60, "five more runs")
            # The hung sink's first delivery is still in flight (its dispatcher has sent nothing
            # else), yet the loop went on: alert delivery never holds up a run.
            assert len(hung.bodies) == 1
            assert d.status().get("runs", 0) >= runs0 + 5
    finally:
        hung.close()
        slow.close()


SLOW = 'op.execute("SELECT pg_sleep(3)")\n' + create_table("t_slow")


def test_sigterm_during_a_long_revision_completes_it_and_exits_0(tmp_path: Path, pg_url: str) -> None:
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    config(project, interval=60, extra="grace = 20")
    with daemon(project) as d:
        d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
        project.revision("slow", "r0000", upgrade=SLOW)
        wait_until(lambda: any(r["revision"] == "slow" for r in journal_rows(pg_url)), 20, "slow started")
        code = d.stop(signal.SIGTERM)
    assert code == 0, d.stderr[-3000:]
    assert db_heads(pg_url) == {"slow"}
    assert lock_is_free(pg_url)


def test_five_daemons_apply_once_alert_once(tmp_path: Path, pg_url: str) -> None:
    hooks = Recorder()
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    config(project, interval=0.3, sinks=[hooks.url], extra="blocked_after = 2")
    procs = [Running(project) for _ in range(5)]
    try:
        for d in procs:
            d.wait_status(lambda s: s.get("state") == "in_sync", 60, "in sync")
        for n in range(3):
            project.revision(f"f{n}", f"f{n - 1}" if n else "r0000", upgrade=create_table(f"t_f{n}"))
        wait_until(lambda: db_heads(pg_url) == {"f2"}, 30, "f2 applied")
        applied = [r["revision"] for r in journal_rows(pg_url) if r["outcome"] == "applied"]
        assert applied == ["r0000", "f0", "f1", "f2"]

        def applied_alerts() -> list[str]:
            return sorted(b["revision"] for b in hooks.events("applied") if b["revision"] != "r0000")

        # r0000's alert counts in events("applied"): wait for the three new revisions' own alerts
        wait_until(lambda: len(applied_alerts()) >= 3, 10, "applied alerts")
        assert applied_alerts() == ["f0", "f1", "f2"]
        # A failing revision: one `failed` alert for the fleet, not five.
        project.revision("bad", "f2", upgrade=FAILS)
        wait_until(lambda: hooks.events("failed"), 30, "the failed alert")
        for d in procs:
            d.wait_status(lambda s: "blocked" in s.get("conditions", []), 60, "blocked everywhere")
        assert len(hooks.events("failed")) == 1
        assert len(hooks.events("blocked")) == 1, hooks.events("blocked")
    finally:
        for d in procs:
            assert d.stop() == 0
        hooks.close()


def test_suspend_stops_all_replicas_until_resume(tmp_path: Path, pg_url: str) -> None:
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    config(project, interval=0.3)
    procs = [Running(project) for _ in range(5)]
    try:
        for d in procs:
            d.wait_status(lambda s: s.get("state") == "in_sync", 60, "in sync")
        assert (
            run_cli(
                ["--config", str(project.config), "suspend", "--reason", "manual fix"], cwd=project.root
            ).returncode
            == 0
        )
        project.revision("new1", "r0000", upgrade=create_table("t_new1"))
        for d in procs:
            d.wait_status(lambda s: s.get("state") == "suspended", 30, "suspended")
        runs = [d.status()["runs"] for d in procs]
        wait_until(lambda: all(d.status()["runs"] >= r + 3 for d, r in zip(procs, runs)), 30, "runs")
        assert db_heads(pg_url) == {"r0000"}  # nobody applied new1 while suspended
        assert run_cli(["--config", str(project.config), "resume"], cwd=project.root).returncode == 0
        wait_until(lambda: db_heads(pg_url) == {"new1"}, 30, "new1 applied after resume")
        assert [r["revision"] for r in journal_rows(pg_url)].count("new1") == 1
    finally:
        for d in procs:
            d.stop()


def test_endpoints_and_canary(tmp_path: Path, pg_canary_url: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    hooks = Recorder()
    project = flask_project(tmp_path / "p", pg_canary_url)
    project.chain(1)
    project.revision(
        "bad",
        "r0000",
        upgrade=('raise RuntimeError("cannot use " + op.get_bind().engine.url.render_as_string(False))'),
    )
    config(project, interval=0.3, sinks=[hooks.url], extra="blocked_after = 2")
    try:
        with daemon(project) as d:
            d.wait_status(lambda s: "blocked" in s.get("conditions", []), 60, "blocked")
            wait_until(lambda: hooks.events("blocked"), 10, "the blocked alert")
            bodies = {path: d.get(path) for path in ("/status", "/metrics", "/healthz", "/readyz")}
            assert bodies["/healthz"][0] == 200 and bodies["/readyz"][0] == 200
            assert d.get("/nope")[0] == 404
            families = {f.name for f in text_string_to_metric_families(bodies["/metrics"][1])}
            assert {"reconciler_state", "reconciler_runs", "reconciler_pending_revisions"} <= families
            for _code, body in bodies.values():
                assert_no_canary(body)
        assert_no_canary(*(raw.decode() for raw in hooks.raw))
        assert "***" in json.dumps(hooks.bodies)  # the URL was in the error, masked
    finally:
        hooks.close()


def test_observe_only_replica_applies_nothing(tmp_path: Path, pg_url: str) -> None:
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(2)
    config(project, interval=0.3, extra="apply = false")
    with daemon(project) as d:
        status = d.wait_status(lambda s: s.get("state") == "uninitialized_empty", 30, "observed")
        assert status["pending"] == ["r0000", "r0001"]
    assert db_heads(pg_url) == set()


def test_grace_expiry_cancels_the_statement_and_exits_non_zero(tmp_path: Path, pg_url: str) -> None:
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1)
    config(project, interval=60, extra="grace = 1")
    with daemon(project) as d:
        d.wait_status(lambda s: s["state"] == "in_sync", 30, "in sync")
        # The statement would run for ten minutes, far past the stop's own deadline: a daemon
        # that exits by itself meanwhile has cancelled it.
        project.revision(
            "endless", "r0000", upgrade='op.execute("SELECT pg_sleep(600)")\n' + create_table("t_endless")
        )
        wait_until(
            lambda: any(r["revision"] == "endless" for r in journal_rows(pg_url)),
            20,
            "the long revision started",
        )
        code = d.stop(signal.SIGTERM, timeout=60)
    assert code == 1, d.stderr[-3000:]
    wait_until(lambda: not sleeping_backends(pg_url), 30, "the server stopped running it")
    assert "grace_expired" in d.stderr
    assert db_heads(pg_url) == {"r0000"}  # rolled back: nothing of the cancelled revision
    assert lock_is_free(pg_url)


def sleeping_backends(url: str) -> list[int]:
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            sql = (
                "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(600)%' "
                "AND state = 'active' AND pid <> pg_backend_pid()"
            )
            return [int(pid) for pid in conn.execute(sa.text(sql)).scalars()]
    finally:
        engine.dispose()


def lock_is_free(url: str) -> bool:
    import sqlalchemy as sa

    from reconciler.db import locks

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            lock = locks.AdvisoryLock(
                conn, locks.lock_key(sa.engine.make_url(url).database or "", None, "alembic_version")
            )
            free = lock.try_acquire()
            lock.release()
            return free
    finally:
        engine.dispose()


def test_lock_timeouts_never_block(tmp_path: Path, pg_url: str) -> None:
    import sqlalchemy as sa

    hooks = Recorder()
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(1, prefix="a")
    config(
        project,
        interval=0.2,
        sinks=[hooks.url],
        extra="blocked_after = 2\n[apply]\n"
        "ddl_lock_timeout = 0.2\nlock_timeout_retries = 1\nlock_timeout_backoff = 0.1",
    )
    assert run_cli(["--config", str(project.config), "apply"], cwd=project.root).returncode == 0
    project.revision("alter1", "a0000", upgrade='op.add_column("t_a0", sa.Column("x", sa.Integer))')
    holder = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with holder.connect() as conn:
            conn.execute(sa.text("LOCK TABLE t_a0 IN ACCESS EXCLUSIVE MODE"))  # an app transaction
            with daemon(project) as d:
                wait_until(
                    lambda: len([r for r in journal_rows(pg_url) if r["revision"] == "alter1"]) >= 4,
                    60,
                    "two runs of two attempts",
                )
                assert "blocked" not in d.status().get("conditions", [])
                wait_until(lambda: hooks.events("lock_timeout"), 10, "the lock_timeout alert")
                conn.rollback()  # the app lets go
                d.wait_status(lambda s: s["state"] == "in_sync", 30, "applied after the lock went away")
                wait_until(lambda: hooks.events("recovered"), 10, "the recovery")
        assert len(hooks.events("lock_timeout")) == 1 and hooks.events("failed") == []
        assert hooks.events("recovered")[0]["details"]["recovered_from"] == "lock_timeout"
    finally:
        holder.dispose()
        hooks.close()
    assert db_heads(pg_url) == {"alter1"}


_TGKILL = {"x86_64": 234, "aarch64": 131}  # the tgkill system call's number


def _signal_thread(pid: int, tid: int, sig: int) -> None:
    """Send `sig` to one thread of `pid` (tgkill): the case the kernel may pick for a kill()."""
    import ctypes
    import platform

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_TGKILL[platform.machine()], pid, tid, int(sig)) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


@pytest.mark.skipif(
    platform.machine() not in _TGKILL or not Path("/proc/self/task").exists(),
    reason="needs Linux tgkill and /proc",
)
def test_sigterm_taken_by_another_thread_still_stops_the_daemon(tmp_path: Path) -> None:
    """A process-directed SIGTERM may land on any thread. Python runs the handler in the main
    thread, which must not sleep through it in a wait without a timeout."""
    project = flask_project(tmp_path / "p", f"sqlite:///{tmp_path / 'app.db'}")
    project.chain(1)
    config(project, interval=60)
    running = Running(project)
    try:
        running.wait_status(lambda s: s.get("runs", 0) >= 1, 60, "the first run")
        others = [
            int(t.name)
            for t in Path(f"/proc/{running.proc.pid}/task").iterdir()
            if int(t.name) != running.proc.pid
        ]
        assert others, "the daemon runs threads besides the main one"
        for tid in others:  # the first that still exists
            try:
                _signal_thread(running.proc.pid, tid, signal.SIGTERM)
                break
            except OSError:
                continue
        assert running.proc.wait(timeout=30) == 0
    finally:
        code = running.stop()
    assert code == 0 and '"daemon_stopped"' in running.stderr
