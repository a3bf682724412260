"""A private PgBouncer in front of the machine's PostgreSQL, for the session-affinity tests.

Each instance gets its own temp dir (ini, auth file, log), its own port and its own pool mode and
size; it forwards every database name (`* =`) to the PostgreSQL service of tests/dbs.py with trust
auth. PgBouncer refuses to run as root, so as root it switches to `postgres` with its own `-u`
(not runuser, which delays a SIGTERM stop by two seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import sqlalchemy as sa

from tests.dbs import PG_ADMIN_URL
from tests.pgcluster import _free_port, wait_until

_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def binary() -> str | None:
    """The pgbouncer executable, or None when it is not installed (apt-get install pgbouncer)."""
    found = shutil.which("pgbouncer")
    return found or next((p for p in _CANDIDATES if os.access(p, os.X_OK)), None)


class PgBouncer:
    def __init__(self, pool_mode: str = "transaction", pool_size: int = 1) -> None:
        exe = binary()
        if exe is None:
            raise RuntimeError("pgbouncer is not installed")
        self.exe = exe
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="reconciler-pgb-"))
        self.log = self.root / "pgbouncer.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0

    def _write_files(self) -> Path:
        upstream = sa.engine.make_url(PG_ADMIN_URL)
        user = upstream.username or "root"
        (self.root / "users.txt").write_text(f'"{user}" ""\n', encoding="utf-8")
        ini = self.root / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={upstream.host or '127.0.0.1'} port={upstream.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            f"pool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 50\n"
            f"logfile = {self.log}\n",
            encoding="utf-8",
        )
        if self._as_postgres:
            for path in (self.root, *self.root.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        return ini

    def start(self) -> PgBouncer:
        ini = self._write_files()
        self._proc = subprocess.Popen(
            [self.exe, *(["-u", "postgres"] if self._as_postgres else []), str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._ready, 15, f"pgbouncer on port {self.port} (log: {self.log})")
        return self

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise AssertionError(f"pgbouncer exited with {self._proc.returncode}:\n{text[-2000:]}")
        return self.log.exists() and "process up" in self.log.read_text(errors="replace")

    def url(self, direct_url: str) -> str:
        """`direct_url` (a database of the PostgreSQL service) rewritten to go through the pooler."""
        return (
            sa.engine.make_url(direct_url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
