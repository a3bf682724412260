"""Small tenant fleets for tests: a Flask-Migrate project (its env.py unchanged) with `[fleet]`, and
a few tenants on a real server: PostgreSQL schemas, MariaDB databases or SQLite files.

The tenants start at revision `f1` (table `item`), built by plain SQL, not by the tool, so a test
pays only for the revision it is about. `witnessed` writes a revision that appends the tenant it
ran in to a witness file (O_APPEND: no rollback undoes it) only in the real run, never in the
guard's read-only recording pass; "each tenant applied exactly once" is read from that file.
A revision may also sleep once in one tenant (`slow`), so a replica can be caught mid-run.

MariaDB databases are server-wide: each fleet names its tenants `tenant_<uid>_NN` and drops them
(and their journals' side databases) afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler.config.load import load_settings
from reconciler.settings import Settings
from tests import dbs
from tests.builders import Project, flask_project
from tests.cli import run_cli, start_cli

WITNESS_VARIABLE = "FLEET_TEST_WITNESS"
MARKER_VARIABLE = "FLEET_TEST_MARKER"  # the slow tenant's run writes it before it sleeps
BASE = "f1"

FLEET_DIALECTS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]

ITEM_TABLE = (
    'op.create_table("item", sa.Column("id", sa.Integer, primary_key=True), sa.Column("code", sa.String(20)))'
)

# the tenant the revision runs in, and whether this is the guard's read-only recording pass
_WHERE = """\
bind = op.get_bind()
if bind.dialect.name == "postgresql":
    tenant = bind.execute(sa.text("SELECT current_schema()")).scalar()
    recording = bind.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
elif bind.dialect.name == "sqlite":
    tenant = [r[2] for r in bind.execute(sa.text("PRAGMA database_list")) if r[1] == "main"][0]
    recording = bool(bind.execute(sa.text("PRAGMA query_only")).scalar())
else:
    tenant = bind.execute(sa.text("SELECT DATABASE()")).scalar()
    try:  # MariaDB before 11.1 and MySQL before 8 name it tx_read_only
        recording = bool(bind.execute(sa.text("SELECT @@session.transaction_read_only")).scalar())
    except sa.exc.OperationalError:
        recording = bool(bind.execute(sa.text("SELECT @@session.tx_read_only")).scalar())
tenant = str(tenant)
"""
_SLOW = """\
if not recording and tenant.endswith({slow!r}) and not os.path.exists(os.environ["{marker}"]):
    open(os.environ["{marker}"], "w").close()
    time.sleep({seconds})
"""
_WITNESS = f"""\
if not recording:
    fd = os.open(os.environ["{WITNESS_VARIABLE}"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (tenant + "\\n").encode())
    finally:
        os.close(fd)
"""

# one tenant's data breaks this: its `item` rows have a duplicate code
UNIQUE_CODE = 'op.create_index("uq_item_code", "item", ["code"], unique=True)'


@dataclass
class TenantFleet:
    dialect: str
    url: str  # the [target] url
    project: Project
    folder: Path
    uid: str
    tenants: list[str]  # as the fleet names them (SQLite: paths relative to the project)

    @property
    def witness(self) -> Path:
        return self.folder / "witness.txt"

    @property
    def marker(self) -> Path:
        return self.folder / "slow.marker"

    @property
    def env(self) -> dict[str, str]:
        return {WITNESS_VARIABLE: str(self.witness), MARKER_VARIABLE: str(self.marker)}

    # --- naming and building tenants -------------------------------------------------------
    def name(self, label: str) -> str:
        """The fleet's name of the tenant labelled `label` (tenant_<label> in this layout)."""
        if self.dialect == "postgresql":
            return f"tenant_{label}"
        if self.dialect == "mysql":
            return f"tenant_{self.uid}_{label}"
        return f"tenants/tenant_{label}.db"

    def add_tenant(self, label: str, at: str | None = BASE) -> str:
        """A new tenant: an empty schema, database or file (`at` None), or one at revision f1."""
        name = self.name(label)
        if self.dialect == "postgresql":
            self.admin(f'CREATE SCHEMA "{name}"')
        elif self.dialect == "mysql":
            self.admin(f"CREATE DATABASE `{name}`")
        else:
            path = self.project.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            sqlite3.connect(path).close()
        if at is not None:
            self.execute(
                name,
                "CREATE TABLE item (id INTEGER NOT NULL PRIMARY KEY, code VARCHAR(20))",
                "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
                "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))",
                f"INSERT INTO alembic_version (version_num) VALUES ('{at}')",
            )
        self.tenants = sorted({*self.tenants, name})
        return name

    def tenant_url(self, name: str) -> str:
        if self.dialect == "sqlite":
            return f"sqlite:///{self.project.root / name}"
        if self.dialect == "mysql":
            return sa.engine.make_url(self.url).set(database=name).render_as_string(hide_password=False)
        return self.url

    def _engine(self, name: str) -> sa.engine.Engine:
        args = {"options": f"-csearch_path={name}"} if self.dialect == "postgresql" else {}
        return sa.create_engine(self.tenant_url(name), poolclass=sa.pool.NullPool, connect_args=args)

    def execute(self, name: str, *statements: str) -> None:
        """SQL in one tenant (its schema searched first, its database or its file), committed."""
        engine = self._engine(name)
        try:
            with engine.begin() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()

    def admin(self, *statements: str) -> None:
        """SQL on the base database, autocommitted (CREATE SCHEMA / DATABASE)."""
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()

    # --- reading tenants --------------------------------------------------------------------
    def heads(self, name: str) -> set[str]:
        engine = self._engine(name)
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table("alembic_version", schema=self._schema(name)):
                    return set()
                table = self._qualified(name, "alembic_version")
                return {str(r[0]) for r in conn.exec_driver_sql(f"SELECT version_num FROM {table}")}
        finally:
            engine.dispose()

    def all_heads(self) -> dict[str, set[str]]:
        return {name: self.heads(name) for name in self.tenants}

    def tables(self, name: str) -> set[str]:
        engine = self._engine(name)
        try:
            with engine.connect() as conn:
                return set(sa.inspect(conn).get_table_names(schema=self._schema(name)))
        finally:
            engine.dispose()

    def _schema(self, name: str) -> str | None:
        return name if self.dialect == "postgresql" else None

    def _qualified(self, name: str, table: str) -> str:
        return f'"{name}".{table}' if self.dialect == "postgresql" else table

    def witnessed(self) -> dict[str, int]:
        """How often each tenant's witnessed upgrade really ran, by the fleet's tenant names."""
        counts: dict[str, int] = {}
        if not self.witness.exists():
            return counts
        for line in self.witness.read_text().splitlines():
            name = line
            if self.dialect == "sqlite":
                name = Path(line).resolve().relative_to(self.project.root.resolve()).as_posix()
            counts[name] = counts.get(name, 0) + 1
        return counts

    # --- revisions ----------------------------------------------------------------------------
    def revision(
        self, rev: str, down: str, body: str = "pass", slow: str | None = None, seconds: float = 60
    ) -> str:
        """A witnessed revision: `body` runs in every tenant, then the witness line is written
        (real runs only); `slow`: the tenant whose first real run sleeps `seconds` first."""
        upgrade = _WHERE
        if slow is not None:
            upgrade += _SLOW.format(slow=slow, marker=MARKER_VARIABLE, seconds=seconds)
        upgrade += body + "\n" + _WITNESS
        self.project.revision(rev, down, upgrade=upgrade, message=rev, extra="import os\nimport time\n")
        return rev

    # --- running the tool ---------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(
            ["--config", str(self.project.config), *args],
            cwd=self.project.root,
            env=self.env,
            timeout=timeout,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return start_cli(["--config", str(self.project.config), *args], cwd=self.project.root, env=self.env)

    def status(self, *args: str) -> dict[str, Any]:
        result = self.cli("status", "--json", *args)
        assert result.returncode in (0, 3, 4, 5), result.stdout + result.stderr
        return dict(json.loads(result.stdout))

    def settings(self) -> Settings:
        return load_settings(str(self.project.config), cwd=self.project.root)

    def configure(self, **fleet: object) -> None:
        """Rewrite the config with these [fleet] keys over the defaults of `fleet()`."""
        self.project.write_config(
            extra=fleet_section(self.dialect, self.uid, **fleet), models="myapp.models:db"
        )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def fleet_section(dialect: str, uid: str, **keys: object) -> str:
    source, match = {
        "postgresql": ("schemas", "tenant_*"),
        "mysql": ("databases", f"tenant_{uid}_*"),
        "sqlite": ("files", "tenants/*.db"),
    }[dialect]
    values: dict[str, object] = {"source": source, "match": match, "concurrency": 3, **keys}
    return "\n[fleet]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


def _drop_mysql_tenants(uid: str) -> None:
    admin = sa.create_engine(dbs.MYSQL_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    pattern = f"tenant\\_{uid}\\_%"
    try:
        with admin.connect() as conn:
            for pid in conn.execute(
                sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB LIKE :p"), {"p": pattern}
            ).scalars():
                with suppress(sa.exc.DBAPIError):
                    conn.execute(sa.text(f"KILL {int(pid)}"))
            for name in conn.execute(
                sa.text("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE :p"),
                {"p": pattern},
            ).scalars():
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.dispose()


@contextmanager
def fleet(
    dialect: str, folder: Path, size: int = 3, at: str | None = BASE, **keys: object
) -> Iterator[TenantFleet]:
    """A throwaway fleet of `size` tenants (labels 00, 01, ...) at revision f1 (`at` None: empty),
    the project's one revision f1 creating `item`; `keys`: more [fleet] settings."""
    uid = uuid.uuid4().hex[:8]
    folder = folder.resolve()
    with dbs.database(dialect, folder) as url:
        if dialect == "sqlite":
            url = f"sqlite:///{folder / 'base.db'}"
        project = flask_project(folder / "p", url)
        project.revision(BASE, None, upgrade=ITEM_TABLE, downgrade='op.drop_table("item")', message="item")
        found = TenantFleet(dialect, url, project, folder, uid, [])
        found.configure(**keys)
        try:
            for n in range(size):
                found.add_tenant(f"{n:02d}", at)
            yield found
        finally:
            if dialect == "mysql":
                _drop_mysql_tenants(uid)


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll `predicate` until it returns something true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def at_head(found: TenantFleet, names: Sequence[str], head: str) -> bool:
    return all(found.heads(name) == {head} for name in names)
