"""Run `reconciler` as a real process; every output is checked for the password canary.

`run_cli` and `start_cli` pass `--log-format json` unless told otherwise (`log_format=None`):
most tests read the log events from stderr. tests/test_cli_output.py checks the default output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.dbs import assert_no_canary

ROOT = Path(__file__).resolve().parent.parent


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def cli_command(args: Sequence[str], log_format: str | None = None) -> list[str]:
    fmt = ["--log-format", log_format] if log_format else []
    return [sys.executable, "-m", "reconciler", *fmt, *args]


def run_cli(
    args: Sequence[str],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
    log_format: str | None = "json",
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cli_command(args, log_format),
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    assert_no_canary(result.stdout, result.stderr)
    return result


def start_cli(
    args: Sequence[str],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    log_format: str | None = "json",
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(args, log_format),
        cwd=cwd,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def run_in_pty(
    args: Sequence[str],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, str]:
    """Run `reconciler` with stdout and stderr on a pseudo-terminal, as a person at a terminal
    runs it: (exit code, everything it wrote, escape sequences and carriage returns included)."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cli_command(args),
        cwd=cwd,
        env=cli_env({"TERM": "xterm", "COLUMNS": "120", **(env or {})}),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert_no_canary(text)
    return code, text
