"""Values that must be refused before anything connects (issue 12, parts 6 and 8).

Every case: exit 2, the setting or value named, what to do, no traceback, and the database not
touched. The URL names a PostgreSQL database that does not exist, so a command that connected
would have ended `unreachable` (exit 5) instead.
"""

from __future__ import annotations

import subprocess
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from reconciler.core import urlcheck
from reconciler.core.alerting import Alert
from reconciler.runtime.delivery import AlertDispatcher, _InFlight
from reconciler.settings import AlertingSettings, AlertSink
from tests import dbs
from tests.builders import (
    Project,
    alembic_project,
    create_table,
    db_heads,
    flask_project,
    table_names,
)
from tests.cli import run_cli, start_cli

MISSING_PG = f"postgresql://root@127.0.0.1:5432/{dbs.new_name('absent')}"
LONG_ID = "a" * 33  # one more than Alembic's VARCHAR(32) version_num


def refused(result: subprocess.CompletedProcess[str], *named: str) -> None:
    """Exit 2, a message naming each of `named`, no traceback, and no connection attempted."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    for word in named:
        assert word in output, (word, output)
    assert "Traceback" not in output and "unreachable" not in output, output


def status_args(project: Project) -> list[str]:
    return ["--config", str(project.config), "status"]


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return alembic_project(tmp_path / "proj", MISSING_PG)


# --- part 6: revision ids longer than the version column ---------------------------------------


@pytest.mark.parametrize("command", [["status"], ["apply"], ["wait", "--timeout", "0"], ["plan"]])
def test_a_revision_id_longer_than_the_version_column_is_refused_naming_the_file(
    project: Project, command: list[str]
) -> None:
    project.revision("r1", None, upgrade=create_table("t1"))
    path = project.revision(LONG_ID, "r1", upgrade=create_table("t2"))
    result = run_cli(["--config", str(project.config), *command], cwd=project.root)
    refused(result, str(path), LONG_ID, "33 characters", "32", "revision_id_length")


def test_a_configured_column_width_accepts_a_longer_id(project: Project) -> None:
    """[target] revision_id_length: a project that widened its version column says so; the
    status then goes on to the database (absent here: exit 5, so it was not refused)."""
    project.revision(LONG_ID, None)
    project.write_config(models="myapp.models:Base", revision_id_length="40")
    config = project.config.read_text().replace('revision_id_length = "40"', "revision_id_length = 40")
    project.config.write_text(config)
    result = run_cli(status_args(project), cwd=project.root)
    assert result.returncode == 5, result.stderr


def test_rev_id_longer_than_the_column_is_refused_and_writes_no_file(project: Project) -> None:
    before = sorted(project.versions.iterdir())
    result = run_cli(
        ["--config", str(project.config), "revision", "-m", "x", "--rev-id", "b" * 40], cwd=project.root
    )
    refused(result, "--rev-id", "40 characters", "32")
    assert sorted(project.versions.iterdir()) == before


def test_negative_control_without_the_check_postgresql_fails_at_the_version_insert(
    tmp_path: Path, pg_url: str
) -> None:
    """RECONCILER_UNSAFE_DISABLE=revision_id_length: the id passes, the revision's table is
    created, and recording the id fails (value too long): every run fails the same way."""
    project = alembic_project(tmp_path / "proj", pg_url)
    project.revision(LONG_ID, None, upgrade=create_table("t_long"))
    env = {"RECONCILER_UNSAFE_DISABLE": "revision_id_length"}
    for _ in range(2):
        result = run_cli(["--config", str(project.config), "apply"], cwd=project.root, env=env)
        assert result.returncode == 1, result.stderr
        assert "too long" in result.stderr
    assert db_heads(pg_url) == set()


def test_negative_control_without_the_check_mariadb_is_left_half_applied(
    tmp_path: Path, mysql_url: str
) -> None:
    """MariaDB commits DDL as it goes: the revision's table is there, its id is not recorded."""
    project = alembic_project(tmp_path / "proj", mysql_url)
    project.revision(LONG_ID, None, upgrade=create_table("t_long"))
    env = {"RECONCILER_UNSAFE_DISABLE": "revision_id_length"}
    result = run_cli(["--config", str(project.config), "apply"], cwd=project.root, env=env)
    assert result.returncode == 1, result.stderr
    assert "t_long" in table_names(mysql_url) and db_heads(mysql_url) == set()


# --- part 8: settings and options --------------------------------------------------------------

CONFIG_CASES = {
    "blocked_after negative": ("[daemon]\nblocked_after = -1\n", ["status"], "blocked_after"),
    "blocked_after huge": ("[daemon]\nblocked_after = 1000000000\n", ["status"], "blocked_after"),
    "connect_timeout zero": ("[apply]\nconnect_timeout = 0\n", ["status"], "connect_timeout"),
    "alert file url": ('[[alerts]]\nurl = "file:///etc/passwd"\n', ["status"], "file://"),
    "alert gopher url": ('[[alerts]]\nurl = "gopher://example.com/x"\n', ["status"], "gopher://"),
    "alert metadata address": (
        '[[alerts]]\nurl = "http://169.254.169.254/latest/meta-data"\n',
        ["status"],
        "169.254.169.254",
    ),
    "alert metadata in run": ('[[alerts]]\nurl_env = "HOOK"\n', ["run"], "169.254.169.254"),
    "alert ipv6 link-local": ('[[alerts]]\nurl = "http://[fe80::1]/hook"\n', ["status"], "fe80::1"),
    "alert decimal link-local": ('[[alerts]]\nurl = "http://2852039166/hook"\n', ["status"], "2852039166"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_bad_setting_is_refused_before_connecting(project: Project, case: str) -> None:
    extra, command, named = CONFIG_CASES[case]
    project.write_config(extra, models="myapp.models:Base")
    env = {"HOOK": "http://169.254.169.254/token-path"}
    result = run_cli(["--config", str(project.config), *command], cwd=project.root, env=env)
    refused(result, named)
    assert "token-path" not in result.stderr  # the URL is shown up to its host only


def test_negative_control_allow_link_local_lets_the_metadata_url_through(project: Project) -> None:
    project.write_config(
        '[alerting]\nallow_link_local = true\n\n[[alerts]]\nurl = "http://169.254.169.254/hook"\n',
        models="myapp.models:Base",
    )
    result = run_cli(status_args(project), cwd=project.root)
    assert result.returncode == 5, result.stderr  # past validation: it tried the database


OPTION_CASES = {
    "wait negative timeout": (["wait", "--timeout", "-1"], "--timeout"),
    "wait zero interval": (["wait", "--interval", "0"], "--interval"),
    "resolve both outcomes": (["resolve", "r1", "--applied", "--rolled-back"], "--applied and --rolled-back"),
    "resolve both outcomes reversed": (
        ["resolve", "r1", "--rolled-back", "--applied"],
        "--applied and --rolled-back",
    ),
    "downgrade unknown revision": (["downgrade", "nope", "--yes"], "'nope'"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_a_bad_option_is_refused_before_connecting(project: Project, case: str) -> None:
    project.revision("r1", None)
    args, named = OPTION_CASES[case]
    result = run_cli(["--config", str(project.config), *args], cwd=project.root)
    refused(result, named)


# --- part 8: a models attribute the module does not define -------------------------------------


@pytest.mark.parametrize("command", [["status"], ["apply"]])
def test_a_models_attribute_the_module_does_not_define_is_refused(tmp_path: Path, command: list[str]) -> None:
    sqlite_file = tmp_path / "app.db"
    project = flask_project(tmp_path / "proj", f"sqlite:///{sqlite_file}")
    project.write_config(models="myapp.models:dbb")
    result = run_cli(["--config", str(project.config), *command], cwd=project.root)
    refused(result, "myapp.models:dbb", "'dbb'", "did you mean 'db'")
    assert not sqlite_file.exists()


UNDECIDABLE = {
    "star import": "from flask_sqlalchemy import *\n",
    "module __getattr__": "def __getattr__(name):\n    raise AttributeError(name)\n",
    "globals()": "from flask_sqlalchemy import SQLAlchemy\nglobals()['dbb'] = SQLAlchemy()\n",
}


@pytest.mark.parametrize("case", list(UNDECIDABLE))
def test_a_models_module_whose_names_cannot_be_read_is_not_refused(project: Project, case: str) -> None:
    (project.root / "myapp" / "models.py").write_text(UNDECIDABLE[case])
    project.write_config(models="myapp.models:dbb")
    result = run_cli(status_args(project), cwd=project.root)
    assert result.returncode == 5, result.stderr  # not refused: it went on to the database


def test_names_bound_in_blocks_imports_and_defs_count_as_defined(project: Project) -> None:
    (project.root / "myapp" / "models.py").write_text(
        "try:\n    from sqlalchemy import MetaData as M\nexcept ImportError:\n    M = None\n"
        "if M:\n    meta = M()\n"
        "def make():\n    global late\n    late = 1\n"
        "class Base:\n    pass\n"
    )
    for attr in ("M", "meta", "late", "make", "Base"):
        project.write_config(models=f"myapp.models:{attr}")
        result = run_cli(status_args(project), cwd=project.root)
        assert result.returncode == 5, (attr, result.stderr)


def test_dev_mode_stops_at_start_when_the_models_attribute_is_missing(tmp_path: Path) -> None:
    """The source cannot tell (it binds through globals()), so the worker finds out at the first
    generation: dev mode exits 2 then, instead of idling for ever with nothing to generate."""
    project = flask_project(tmp_path / "proj", f"sqlite:///{tmp_path / 'dev.db'}")
    (project.root / "myapp" / "models.py").write_text(
        "from flask_sqlalchemy import SQLAlchemy\nglobals()['database'] = SQLAlchemy()\n"
    )
    proc = start_cli(["--config", str(project.config), "run", "--mode", "dev"], cwd=project.root)
    try:
        try:
            _out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("dev mode is still running with unusable models")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    dbs.assert_no_canary(err)
    assert proc.returncode == 2, err
    assert "dev mode cannot start" in err and "'db'" in err and "Traceback" not in err


# --- part 8: the alert sender speaks http(s) only and follows no redirect -----------------------


class Redirector:
    """A real local endpoint answering every POST with a redirect to `location`."""

    def __init__(self, location: str) -> None:
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.hits += 1
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hook/T0KEN"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


FAST = AlertingSettings(send_timeout=1.0, retries=1)


def deliver(url: str, alerting: AlertingSettings = FAST) -> tuple[list[str], list[str]]:
    """One alert sent to `url`: (the sinks it reached, the delivery failures logged)."""
    sent: list[str] = []
    with capture_logs() as logged:
        dispatcher = AlertDispatcher(
            [AlertSink(url=url, name="hook")], alerting, on_sent=lambda _event, name: sent.append(name)
        )
        dispatcher.start()
        dispatcher.submit(Alert("failed", "behind", "app", "r2 failed", "r2", "2026-01-01T00:00:00Z"))
        dispatcher.close(timeout=5.0)
    failures = [str(e.get("error")) for e in logged if e["event"] == "alert_delivery_failed"]
    return sent, failures


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_the_sender_opens_no_file_ftp_or_data_urls(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for alerts")
    opener = _InFlight().opener()
    for url in (secret.as_uri(), "ftp://127.0.0.1/x", "data:text/plain,hi"):
        with pytest.raises(urllib.error.URLError, match="unknown url type"):
            opener.open(url, timeout=1)
    sent, failures = deliver(secret.as_uri())
    assert not sent and len(failures) == 1 and "file://" in failures[0]


@pytest.mark.parametrize(
    "location",
    [
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data",
        "gopher://127.0.0.1:70/x",
        "http://[fe80::1]/x",
    ],
)
def test_a_redirect_is_not_followed(location: str) -> None:
    """A sink that answers 302 gets one request; the body is not resent to where it points."""
    server = Redirector(location)
    try:
        sent, failures = deliver(server.url)
    finally:
        server.close()
    assert server.hits == 1 and not sent
    assert failures == ["HTTP 302"]


def test_a_link_local_sink_is_refused_by_the_sender_before_connecting() -> None:
    sent, failures = deliver("http://169.254.169.254/hook")
    assert not sent and len(failures) == 1
    assert "link-local" in failures[0] and "allow_link_local" in failures[0]


def test_negative_control_allow_link_local_turns_the_sender_checks_off() -> None:
    """With the setting on, neither the URL check nor the connect-time peer check refuses. (No
    request is made: a real link-local endpoint here would be the sandbox's metadata service.)"""
    url = "http://169.254.169.254/hook"
    assert urlcheck.refusal(url) is not None and urlcheck.refusal(url, allow_link_local=True) is None
    assert urlcheck.peer_refusal("169.254.169.254", allow_link_local=True) is None


@pytest.mark.parametrize(
    "peer", ["169.254.169.254", "169.254.0.1", "fe80::1", "::ffff:169.254.1.1", "fd00:ec2::254"]
)
def test_a_peer_on_a_link_local_or_metadata_address_is_refused(peer: str) -> None:
    """After DNS: a host name that resolves there is refused at connect, before a byte is sent."""
    assert urlcheck.peer_refusal(peer) is not None
    assert urlcheck.peer_refusal(peer, allow_link_local=True) is None
    assert urlcheck.peer_refusal("127.0.0.1") is None and urlcheck.peer_refusal("10.1.2.3") is None
