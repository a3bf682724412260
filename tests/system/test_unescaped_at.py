"""Issue 12 part 5: a password holding an unescaped `@` leaks no piece of itself in any output.

`postgresql://canary:p%40ss/w@rd:x@host/db` used to be shown as `canary:***@rd:x@host`: only the
part up to the first `@` was registered as the password. Every output is checked for the canary in
every encoding and for any piece of it of 4 characters or more.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from reconciler.redact import MASK, redact, register_url
from tests import dbs
from tests.builders import flask_project
from tests.cli import run_cli

KINDS = [
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]

COMMANDS: list[tuple[str, ...]] = [
    ("status",),
    ("status", "--json"),
    ("apply",),
    ("wait", "--timeout", "1"),
    ("run", "--interval", "1"),
]


def _old_redacted(url: str, text: str) -> str:
    """The masking of before, kept here as the negative control: the password was taken from the
    user part up to the FIRST `@` (config.py's regex), so the rest of it stayed in clear."""
    match = re.match(r"^[^:/]+://[^:/@]*:(?P<pw>[^@]*)@", url)
    assert match
    for form in sorted({match.group("pw"), unquote(match.group("pw"))}, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text


def test_negative_control_the_old_masking_leaks_part_of_the_password() -> None:
    url = "postgresql://canary:" + dbs.CANARY_PASSWORD + "@127.0.0.1:5432/db"
    shown = _old_redacted(url, f"cannot use '{url}'")
    assert "@rd:x@127.0.0.1" in shown and dbs.canary_hits(shown)  # 'rd:x' in clear
    register_url(url)
    assert not dbs.canary_hits(redact(f"cannot use '{url}'"))


def test_a_url_with_several_at_signs_is_masked_whole_in_any_text() -> None:
    # the registry is process-wide: a password no other test's text holds (`ab` masked "table")
    url = "postgresql://u:Qz7@cdefgh@db.example:5432/app"
    register_url(url)
    rendered = "postgresql://u:***@cdefgh@db.example:5432/app"  # how SQLAlchemy renders it
    for text in (url, rendered, f'{{"url": "{url}"}}', "host cdefgh@db.example unknown"):
        shown = redact(text)
        assert "cdefgh" not in shown and "Qz7@" not in shown, shown
    assert redact(url) == f"postgresql://{MASK}@db.example:5432/app"
    assert redact("postgresql://u:secret1@db/app") == "postgresql://u:secret1@db/app"  # not registered
    sqlite = "sqlite:////srv/a@b@c/app.db"  # a path, no user part: nothing to mask
    assert redact(sqlite) == sqlite


@pytest.mark.parametrize("kind", KINDS)
def test_unescaped_at_leaks_nothing_in_any_command_or_log_format(tmp_path: Path, kind: str) -> None:
    with dbs.database(kind, tmp_path, canary=True) as good_url:
        project = flask_project(tmp_path / "p", good_url)
        project.chain(1)
        bad = dbs.unescaped_canary_url(good_url)
        outputs: list[str] = []
        for fmt in ("json", "text"):
            for args in COMMANDS:
                result = run_cli(["--url", bad, *args], cwd=project.root, log_format=fmt, timeout=60)
                text = result.stdout + result.stderr
                assert dbs.canary_hits(text) == [], text
                assert result.returncode == 2, text
                assert "Traceback" not in text and "URL-encode the password" in text, text
                outputs.append(text)
        from_env = run_cli(["status"], cwd=project.root, env={"RECONCILER_TARGET_URL": bad})
        project.url = bad
        project.write_config()  # the same URL from the config file
        from_file = run_cli(["--config", str(project.config), "status"], cwd=project.root)
        for result in (from_env, from_file):
            assert result.returncode == 2, result.stderr
            outputs.append(result.stdout + result.stderr)
    assert all(f"://{MASK}@127.0.0.1" in text for text in outputs)
    assert dbs.canary_hits(*outputs) == []


@pytest.mark.parametrize("kind", KINDS)
def test_unescaped_at_leaks_nothing_in_the_workers_error_text(tmp_path: Path, kind: str) -> None:
    """The worker is handed such a URL directly (no config check in front of it): whatever it
    fails with, and whatever env.py logs or prints, shows no piece of the password."""
    from reconciler.control.workers import Worker, WorkerJob
    from reconciler.errors import ReconcilerError

    logs: list[str] = []
    with dbs.database(kind, tmp_path, canary=True) as good_url:
        project = flask_project(tmp_path / "p", good_url)
        project.chain(1)
        bad = dbs.unescaped_canary_url(good_url)
        job = WorkerJob(
            url=bad,
            migrations_dir=str(project.migrations),
            root=str(project.root),
            models="myapp.models:db",
            connect_timeout=5,
            timeout=60,
        )
        with pytest.raises(ReconcilerError) as caught, Worker.start(job, on_log=logs.append) as w:
            w.upgrade("r0000")
    assert dbs.canary_hits(str(caught.value), repr(caught.value), *logs) == []
    assert "URL-encode the password" in str(caught.value)  # not a port parse error blamed on env.py


UNESCAPED_IN_ERROR = (
    "url = op.get_bind().engine.url\n"
    'raise RuntimeError("cannot use " + url.drivername + "://canary:" + url.password + "@"'
    ' + str(url.host) + "/db, host part " + url.password.split("@")[1] + "@" + str(url.host))'
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_unescaped_at_in_a_revision_error_leaks_nothing_in_the_daemons_status(
    tmp_path: Path, kind: str
) -> None:
    """The daemon's /status, /metrics and logs, when a revision's error holds the URL with the
    password unescaped (and the piece a parser would take for the host)."""
    from tests.runtime.test_daemon import config, daemon

    with dbs.database(kind, tmp_path, canary=True) as url:
        project = flask_project(tmp_path / "p", url)
        project.chain(1)
        project.revision("bad", "r0000", upgrade=UNESCAPED_IN_ERROR)
        config(project, interval=0.3)
        with daemon(project) as d:
            status = d.wait_status(lambda s: "cannot use" in (s.get("last_error") or ""), 60, "the error")
            bodies = [d.get(path)[1] for path in ("/status", "/metrics", "/healthz", "/readyz")]
        assert dbs.canary_hits(*bodies, d.stdout, d.stderr) == []  # before: 'rd:x' in clear
        assert f"://{MASK}@" in status["last_error"], status["last_error"]
