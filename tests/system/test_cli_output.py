"""What the CLI prints for a person at a terminal and for a CI log: real processes, piped and
under a pseudo-terminal (`tests.cli.run_in_pty`), with the default log format (`log_format=None`)."""

from __future__ import annotations

import io
import json
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from reconciler import logs
from reconciler.control import guard
from tests.builders import Project, db_heads, flask_project
from tests.cli import run_cli, run_in_pty, start_cli
from tests.dbs import assert_no_canary
from tests.pgcluster import wait_until

ESC = "\x1b["


def cli(project: Project, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_cli(["--config", str(project.config), *args], cwd=project.root, env=env, log_format=None)


def json_lines(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@pytest.fixture
def project(tmp_path: Path, sqlite_url: str) -> Project:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(3)
    return project


# --------------------------------------------------------------------------- errors, piped


def test_a_piped_configuration_error_is_one_plain_line(project: Project) -> None:
    result = cli(project, "--migrations", "nowhere", "status")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and "nowhere" in lines[0]
    assert not json_lines(result.stderr) and "\\n" not in result.stderr


def test_a_piped_error_after_the_logs_started_is_plain_text_too(project: Project) -> None:
    """`wait` logs (`waiting`) before it fails: neither its log line nor its error is JSON."""
    result = cli(project, "wait", "--timeout", "0")
    assert result.returncode == 8, result.stderr
    assert not json_lines(result.stderr), result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "gave up" in errors[0], result.stderr
    assert "waiting" in result.stderr  # the event name stays visible in a text line
    assert "\\n" not in result.stderr and '"event"' not in result.stderr


def test_log_format_json_gives_json_lines_errors_included(project: Project) -> None:
    """The control: asked for, stderr is JSON lines, the error a `command_failed` event."""
    result = cli(project, "--log-format", "json", "wait", "--timeout", "0")
    assert result.returncode == 8
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    events = json_lines(result.stderr)
    assert lines and len(events) == len(lines), result.stderr
    failed = [e for e in events if e["event"] == "command_failed"]
    assert len(failed) == 1 and failed[0]["exit_code"] == 8
    early = cli(project, "--migrations", "nowhere", "--log-format", "json", "status")
    assert [e["event"] for e in json_lines(early.stderr)] == ["command_failed"], early.stderr


def test_logging_format_in_the_config_file_is_the_default_of_the_flag(project: Project) -> None:
    project.write_config(extra='[logging]\nformat = "json"\n', models="myapp.models:db")
    events = json_lines(cli(project, "apply").stderr)
    assert "reconcile_finished" in [e["event"] for e in events]
    text = cli(project, "--log-format", "text", "wait", "--timeout", "0")  # the flag wins
    assert not json_lines(text.stderr) and "Error: " not in text.stderr  # in sync: no error
    project.write_config(extra='[logging]\nformat = "console"\n', models="myapp.models:db")
    old_name = cli(project, "wait", "--timeout", "0")
    assert old_name.returncode == 0 and not json_lines(old_name.stderr)
    project.write_config(extra='[logging]\nformat = "yaml"\n', models="myapp.models:db")
    bad = cli(project, "status")
    assert bad.returncode == 2 and "auto, text, json, got 'yaml'" in bad.stderr, bad.stderr


# --------------------------------------------------------------------------- -q and -v


def test_quiet_prints_only_the_summary(project: Project, sqlite_url: str) -> None:
    result = cli(project, "-q", "apply")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "applied 3 revision(s); in sync\n"
    assert db_heads(sqlite_url) == {"r0002"}
    after = cli(project, "apply", "-q")  # after the command name too
    assert after.stderr == "in sync at r0002\n"


def test_quiet_and_verbose_together_are_a_usage_error(project: Project) -> None:
    result = cli(project, "-q", "-v", "status")
    assert result.returncode == 2 and "-q and -v" in result.stderr


# --------------------------------------------------------------------------- colour


def test_status_history_and_journal_are_coloured_on_a_terminal_only(project: Project) -> None:
    config = ["--config", str(project.config)]
    assert cli(project, "-q", "apply").returncode == 0
    for command, coloured in (
        ("status", "\x1b[32min_sync"),
        ("history", "\x1b[32m[applied]"),
        ("journal", "\x1b[32mapplied"),
    ):
        code, shown = run_in_pty([*config, command], cwd=project.root)
        assert code == 0 and coloured in shown, shown
        piped = cli(project, command)
        assert piped.returncode == 0 and ESC not in piped.stdout + piped.stderr
        code, plain = run_in_pty([*config, command], cwd=project.root, env={"NO_COLOR": "1"})
        assert code == 0 and ESC not in plain and "r0002" in plain, plain
        code, plain = run_in_pty([*config, command, "--no-color"], cwd=project.root)
        assert code == 0 and ESC not in plain, plain


def test_an_unreachable_state_is_red_on_a_terminal(tmp_path: Path) -> None:
    project = flask_project(tmp_path / "p", f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    code, shown = run_in_pty(["--config", str(project.config), "status"], cwd=project.root)
    assert code == 5 and "\x1b[31munknown" in shown, shown


# --------------------------------------------------------------------------- progress


def test_apply_on_a_terminal_rewrites_one_progress_line(project: Project) -> None:
    project.chain(6)  # r0000..r0005, rewritten: six revisions
    code, shown = run_in_pty(["--config", str(project.config), "apply"], cwd=project.root)
    assert code == 0, shown
    assert "applying 6 of 6: r0005" in shown and "applying 1 of 6: r0000" in shown
    lines = [line for line in shown.replace("\r\n", "\n").split("\n") if line.strip()]
    assert len(lines) == 1, shown  # the progress updates in place, then the summary ends it
    assert lines[0].endswith("applied 6 revision(s); in sync")
    assert "revision_applied" not in shown and "Running upgrade" not in shown


def test_apply_piped_has_no_progress_line_and_one_line_per_revision(project: Project) -> None:
    result = cli(project, "apply")
    assert result.returncode == 0
    assert "\r" not in result.stderr and "applying 1 of" not in result.stderr
    assert result.stderr.count("revision_applied") == 3


# --------------------------------------------------------------------------- a long apply


@pytest.mark.slow
def test_a_200_revision_apply_ends_with_a_short_summary(tmp_path: Path) -> None:
    project = flask_project(tmp_path / "p", f"sqlite:///{tmp_path / 'a.db'}")
    project.chain(200)
    result = cli(project, "apply")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "applied 200 revision(s); in sync"
    assert max(len(line) for line in lines) < 300, max(lines, key=len)
    finished = next(line for line in lines if "reconcile_finished" in line)
    assert "applied_count=200" in finished and "r0100" not in finished
    for chatter in ("Running upgrade", "Generating static SQL", "setting up autogenerate"):
        assert chatter not in result.stderr  # Alembic's own INFO is debug

    # -v: every id, in the summary and in the finished event; Alembic's lines at debug
    again = flask_project(tmp_path / "q", f"sqlite:///{tmp_path / 'b.db'}")
    again.chain(200)
    verbose = cli(again, "-v", "--log-format", "json", "apply")
    assert verbose.returncode == 0
    summary = verbose.stderr.strip().splitlines()[-1]
    assert summary.startswith("applied 200 revision(s) (r0000, r0001, ") and "r0100" in summary
    events = json_lines(verbose.stderr)
    done = next(e for e in events if e["event"] == "reconcile_finished")
    assert len(done["applied"]) == 200  # type: ignore[arg-type]
    assert any(e["event"] == "alembic" and "Running upgrade" in str(e["message"]) for e in events)


# --------------------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def test_the_daemon_logs_json_lines_when_piped(project: Project) -> None:
    port = free_port()
    proc = start_cli(
        [
            "--config",
            str(project.config),
            "run",
            "--mode",
            "prod",
            "--interval",
            "60",
            "--http",
            f"127.0.0.1:{port}",
        ],
        cwd=project.root,
        log_format=None,
    )
    try:
        wait_until(lambda: healthy(port) or proc.poll() is not None, 60, "the daemon serving")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert_no_canary(out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    events = json_lines(err)
    assert lines and len(events) == len(lines), err
    names = [e["event"] for e in events]
    assert "daemon_started" in names and "daemon_stopped" in names


# --------------------------------------------------------------------------- units


@pytest.fixture
def text_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.setup("info", "text", stream=stream)
    try:
        yield stream
    finally:
        import logging

        logging.getLogger().handlers[:] = []
        structlog.reset_defaults()


def test_a_multi_line_value_is_continued_on_real_lines(text_logs: io.StringIO) -> None:
    logs.get("t").error("revision_failed", revision="r1", error="first line\nsecond line")
    text = text_logs.getvalue()
    assert "first line\n    second line" in text and "\\n" not in text
    assert text.startswith("error   revision_failed")


def test_a_long_id_list_is_summarised_below_debug(text_logs: io.StringIO) -> None:
    ids = [f"r{n:04d}" for n in range(200)]
    logs.get("t").info("reconcile_finished", applied=ids, foreign=ids[:3])
    text = text_logs.getvalue()
    assert "applied_count=200 applied_first=r0000 applied_last=r0199" in text
    assert "foreign=[r0000, r0001, r0002]" in text and "r0100" not in text


def test_the_squawk_hint_is_debug_and_once() -> None:
    guard._noted.discard("squawk_test_hint")
    with capture_logs() as logged:
        guard._note_once("squawk_test_hint", "install it")
        guard._note_once("squawk_test_hint", "install it")
    assert [(e["event"], e["log_level"]) for e in logged] == [("squawk_test_hint", "debug")]


def test_alembic_info_is_debug_and_its_warnings_stay() -> None:
    assert logs.alembic_level("info", "alembic.runtime.migration", "Generating static SQL") == "debug"
    assert logs.alembic_level("info", "alembic.runtime.migration", "Running upgrade a -> b") == "debug"
    assert logs.alembic_level("warning", "alembic.ddl", "Detected x") == "warning"
    assert logs.alembic_level("info", "myapp", "Running upgrade") == "info"  # not Alembic's
