"""The worker's error replies: which SQLite errors are lock timeouts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from reconciler.core.status import LOCK_TIMEOUT_CODES
from reconciler.worker.failures import sqlstate_of

pytestmark = pytest.mark.core


def test_sqlite_busy_is_a_lock_timeout(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0.01)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            other.execute("SELECT * FROM t")
    finally:
        holder.execute("ROLLBACK")
        other.close()
        holder.close()
    assert sqlstate_of(caught.value) == "SQLITE_BUSY"
    assert "SQLITE_BUSY" in LOCK_TIMEOUT_CODES  # retried in place with backoff, never `blocked`


def test_other_sqlite_errors_have_no_code(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "app.db")
    with pytest.raises(sqlite3.OperationalError) as caught:
        conn.execute("SELECT * FROM no_such_table")
    conn.close()
    assert sqlstate_of(caught.value) is None
