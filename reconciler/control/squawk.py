"""The only runner of squawk (the PostgreSQL migration linter, `pip install squawk-cli`).

`lint` hands it the offline SQL of each recorded operation at once and maps its findings back to
the operation by line. Rules about style, timeouts we set ourselves, or data loss (judged by
`safety.py`) are left out: what remains is lock risk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from reconciler.errors import ReconcilerError

TIMEOUT = 60.0
IGNORED_RULES = frozenset(
    {
        "require-lock-timeout",
        "require-statement-timeout",
        "require-timeout-settings",  # we set both
        "prefer-robust-stmts",
        "prefer-bigint-over-int",
        "prefer-bigint-over-smallint",
        "prefer-big-int",
        "prefer-identity",
        "prefer-text-field",
        "prefer-timestamptz",
        "ban-char-field",
        "ban-drop-column",
        "ban-drop-table",
        "ban-drop-database",
        "ban-drop-not-null",  # data loss: ours
        "renaming-column",
        "renaming-table",
        "transaction-nesting",
        "syntax-error",
    }
)


class SquawkFailed(ReconcilerError):
    """squawk could not be run or its output not read; the built-in rules are used instead."""


def find() -> str | None:
    """The squawk executable: on PATH, or installed beside our interpreter."""
    found = shutil.which("squawk")
    if found:
        return found
    beside = Path(sys.executable).parent / "squawk"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def lint(binary: str, statements: Sequence[tuple[Hashable, str]]) -> dict[Hashable, list[tuple[str, str]]]:
    """squawk's lock findings [(rule, message)] per key of `statements` ((key, SQL) pairs)."""
    spans: list[tuple[int, int, Hashable]] = []
    lines: list[str] = []
    for key, sql in statements:
        if not sql.strip():
            continue
        start = len(lines)
        lines.extend(lintable(sql).splitlines())
        spans.append((start, len(lines) - 1, key))
        lines.append("")
    if not spans:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False, encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    try:
        reports = _run(binary, handle.name)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    found: dict[Hashable, list[tuple[str, str]]] = {}
    for report in reports:
        rule, line = str(report.get("rule_name") or ""), int(report.get("line") or 0)
        if rule in IGNORED_RULES:
            continue
        key = next((k for start, end, k in spans if start <= line <= end), None)
        if key is not None:
            message = str(report.get("message") or rule)
            advice = str(report.get("help") or "")
            found.setdefault(key, []).append((rule, f"{message} {advice}".strip()))
    return found


_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s|\?|(?<![:\w]):\w+")


def lintable(sql: str) -> str:
    """A statement as squawk can parse it: DB-API placeholders (statements recorded from the
    bind carry them) as NULL, and ended by a semicolon, so one statement never swallows the next
    and hides its findings behind a syntax error."""
    text = _PLACEHOLDER.sub("NULL", sql.strip())
    return text if text.endswith(";") else text + ";"


def _run(binary: str, path: str) -> list[dict[str, Any]]:
    try:
        done = subprocess.run(
            [binary, "--reporter", "json", path],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SquawkFailed(f"squawk ({binary}) could not run: {exc}") from None
    try:
        reports = json.loads(done.stdout or "[]")
    except ValueError:
        raise SquawkFailed(
            f"squawk ({binary}) exited {done.returncode} without a JSON report: {done.stderr.strip()[:300]}"
        ) from None
    if not isinstance(reports, list):
        raise SquawkFailed(f"squawk ({binary}) returned an unexpected report")
    return [r for r in reports if isinstance(r, dict)]
