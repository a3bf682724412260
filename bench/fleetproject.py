"""The tenant fleets `bench/fleet.py` measures: built in bulk, with a peer project beside ours.

A fleet is the generated Flask-SQLAlchemy project of `bench.common.project` (Flask-Migrate's
unchanged env.py, for our tool) with a `[fleet]` section, plus tenants already at the project's head:
schemas in one PostgreSQL database, MariaDB databases, or SQLite files. The tenants are made by
generated SQL (the tables Alembic's revisions would create and the version row), not by running
Alembic a thousand times. The peer is a copy of the project whose env.py takes `-x tenant=NAME`,
the way Flask-Migrate users add tenants themselves, with its own tenants (`peer_*`), so timing the
peer leaves our fleet untouched. `add_revision` writes one new revision into both projects: it
creates a table and appends the tenant it ran in to a witness file (O_APPEND, which no rollback
undoes), so "each tenant applied exactly once" is checked from outside the tool.
"""

from __future__ import annotations

import io
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout, suppress
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bench.common import env_for, project
from tests import dbs
from tests.builders import Project

WITNESS_VARIABLE = "FLEET_WITNESS"
NEW_REVISION = "fleet0001"
BATCH = 50  # PostgreSQL schemas built per transaction (each takes a dozen locks until its commit)

# Flask-Migrate's env.py, the lines a tenant-per-schema user changes (the Alembic cookbook's
# "rudimental schema-level multi tenancy" recipe; a database or a file per tenant: the tenant
# becomes the URL's database)
ENV_CONNECT = """\
    connectable = get_engine()

    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=get_metadata(),
            **conf_args
        )
"""
ENV_TENANT = """\
    tenant = context.get_x_argument(as_dictionary=True).get("tenant")
    connectable = get_engine()
    if tenant and connectable.dialect.name != "postgresql":
        connectable = sa.create_engine(
            connectable.url.set(database=tenant), poolclass=sa.pool.NullPool
        )

    with connectable.connect() as connection:
        if tenant and connection.dialect.name == "postgresql":
            connection.execute(sa.text('SET search_path TO "%s"' % tenant))
            connection.commit()
            connection.dialect.default_schema_name = tenant
            conf_args["version_table_schema"] = tenant
        context.configure(
            connection=connection,
            target_metadata=get_metadata(),
            **conf_args
        )
"""

WITNESSED_UPGRADE = f"""\
op.create_table("t_fleet", sa.Column("id", sa.Integer, primary_key=True))
bind = op.get_bind()
if bind.dialect.name == "postgresql":
    tenant = bind.execute(sa.text("SELECT current_schema()")).scalar()
elif bind.dialect.name == "sqlite":
    tenant = [r[2] for r in bind.execute(sa.text("PRAGMA database_list")) if r[1] == "main"][0]
else:
    tenant = bind.execute(sa.text("SELECT DATABASE()")).scalar()
# the guard's recording pass runs upgrade() in a read-only transaction: only the real run writes
if bind.dialect.name == "postgresql":
    recording = bind.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
elif bind.dialect.name == "sqlite":
    recording = bool(bind.execute(sa.text("PRAGMA query_only")).scalar())
else:
    variable = "tx_read_only" if bind.dialect.is_mariadb else "transaction_read_only"
    recording = bool(bind.execute(sa.text("SELECT @@session." + variable)).scalar())
if not recording:
    fd = os.open(os.environ["{WITNESS_VARIABLE}"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (str(tenant) + "\\n").encode())
    finally:
        os.close(fd)
"""


@dataclass
class Fleet:
    """Our project and the peer's, on one database server, with their tenants."""

    dialect: str
    url: str  # the [target] url, and the app's DATABASE_URL
    ours: Project
    peer: Project
    tenants: list[str]  # as the fleet names them: schema, database or file path
    peer_tenants: list[str]  # as `-x tenant=` takes them
    head: str
    witness: Path
    peer_witness: Path
    env: dict[str, str] = field(default_factory=dict)

    def peer_env(self) -> dict[str, str]:
        return {**self.env, WITNESS_VARIABLE: str(self.peer_witness)}


def _fleet_section(dialect: str, uid: str, waves: str | None, concurrency: int) -> str:
    source, match = {
        "postgresql": ("schemas", "tenant_*"),
        "mysql": ("databases", f"tenant_{uid}_*"),
        "sqlite": ("files", "tenants/*.db"),
    }[dialect]
    section = f'\n[fleet]\nsource = "{source}"\nmatch = "{match}"\nconcurrency = {concurrency}\n'
    if waves:
        section += "waves = [" + ", ".join(f'"{w.strip()}"' for w in waves.split(",")) + "]\n"
    return section


def _peer_project(folder: Path, url: str, history: int) -> Project:
    proj = project(folder, url, history)
    env_py = proj.migrations / "env.py"
    text = env_py.read_text()
    if ENV_CONNECT not in text:
        raise SystemExit(
            f"{env_py}: Flask-Migrate's env.py template changed; the peer's -x tenant= edit "
            "(bench/fleetproject.py ENV_CONNECT) needs updating"
        )
    text = text.replace(ENV_CONNECT, ENV_TENANT).replace(
        "from alembic import context", "import sqlalchemy as sa\nfrom alembic import context"
    )
    env_py.write_text(text)
    return proj


def _ddl(dialect: str, qualifier: str, history: int, head: str) -> list[str]:
    """What Alembic leaves after the project's `history` revisions, for one tenant."""
    serial = {"postgresql": "SERIAL", "mysql": "INTEGER", "sqlite": "INTEGER"}[dialect]
    auto = " AUTO_INCREMENT" if dialect == "mysql" else ""
    statements = [
        f"CREATE TABLE {qualifier}t_r{n} (id {serial} NOT NULL{auto}, PRIMARY KEY (id))"
        for n in range(history)
    ]
    statements.append(
        f"CREATE TABLE {qualifier}alembic_version (version_num VARCHAR(32) NOT NULL, "
        "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
    )
    statements.append(f"INSERT INTO {qualifier}alembic_version (version_num) VALUES ('{head}')")
    return statements


def _build_pg(url: str, names: list[str], history: int, head: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            for start in range(0, len(names), BATCH):
                script: list[str] = []
                for name in names[start : start + BATCH]:
                    script.append(f'CREATE SCHEMA "{name}"')
                    script += _ddl("postgresql", f'"{name}".', history, head)
                conn.exec_driver_sql(";\n".join(script))
                conn.commit()
    finally:
        engine.dispose()


def _build_mysql(url: str, names: list[str], history: int, head: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for name in names:
                conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
                for statement in _ddl("mysql", f"`{name}`.", history, head):
                    conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _build_sqlite(paths: list[str], history: int, head: str, template: Path) -> None:
    with sqlite3.connect(template) as conn:
        for statement in _ddl("sqlite", "", history, head):
            conn.execute(statement)
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)


def _mysql_cleanup(uid: str) -> None:
    admin = sa.create_engine(dbs.MYSQL_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            for prefix in ("tenant", "peer"):
                pattern = f"{prefix}\\_{uid}\\_%"
                pids: list[int] = list(
                    conn.execute(
                        sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB LIKE :p"),
                        {"p": pattern},
                    ).scalars()
                )
                for pid in pids:
                    with suppress(sa.exc.DBAPIError):
                        conn.execute(sa.text(f"KILL {int(pid)}"))
                names: list[str] = list(
                    conn.execute(
                        sa.text(
                            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE :p"
                        ),
                        {"p": pattern},
                    ).scalars()
                )
                for name in names:
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        admin.dispose()


@contextmanager
def fleet(
    dialect: str,
    folder: Path,
    size: int,
    peers: int,
    history: int,
    waves: str | None = None,
    concurrency: int = 8,
) -> Iterator[Fleet]:
    """A throwaway fleet of `size` tenants (and `peers` peer tenants) at revision `history`."""
    uid = uuid.uuid4().hex[:8]
    folder = folder.resolve()  # SQLite reports a tenant file by its resolved path
    head = f"r{history - 1:04d}"
    with dbs.database(dialect, folder) as url:
        if dialect == "sqlite":
            url = f"sqlite:///{folder / 'base.db'}"
        with redirect_stdout(io.StringIO()):  # Alembic's init lists every file it writes
            ours = project(folder / "ours", url, history)
            peer = _peer_project(folder / "peer", url, history)
        ours.write_config(extra=_fleet_section(dialect, uid, waves, concurrency), models="myapp.models:db")
        if dialect == "postgresql":
            tenants = [f"tenant_{n:04d}" for n in range(size)]
            peer_tenants = [f"peer_{n:04d}" for n in range(peers)]
            _build_pg(url, tenants + peer_tenants, history, head)
        elif dialect == "mysql":
            tenants = [f"tenant_{uid}_{n:04d}" for n in range(size)]
            peer_tenants = [f"peer_{uid}_{n:04d}" for n in range(peers)]
        else:
            tenants = [str(ours.root / "tenants" / f"tenant_{n:04d}.db") for n in range(size)]
            peer_tenants = [str(peer.root / "tenants" / f"peer_{n:04d}.db") for n in range(peers)]
            _build_sqlite(tenants + peer_tenants, history, head, folder / "template.db")
        try:
            if dialect == "mysql":
                _build_mysql(url, tenants + peer_tenants, history, head)
            env = env_for(url)
            env[WITNESS_VARIABLE] = str(folder / "witness.txt")
            yield Fleet(
                dialect,
                url,
                ours,
                peer,
                tenants,
                peer_tenants,
                head,
                folder / "witness.txt",
                folder / "peer-witness.txt",
                env,
            )
        finally:
            if dialect == "mysql":
                _mysql_cleanup(uid)


def add_revision(found: Fleet) -> str:
    """The one new revision, in both projects; the witness files start empty."""
    for proj in (found.ours, found.peer):
        proj.revision(
            NEW_REVISION, found.head, upgrade=WITNESSED_UPGRADE, message="fleet witness", extra="import os\n"
        )
    for path in (found.witness, found.peer_witness):
        path.write_text("")
    return NEW_REVISION


def versions(found: Fleet, names: list[str]) -> dict[str, set[str]]:
    """Each tenant's version rows, read with our own SQL (one query per dialect, files one by one)."""
    out: dict[str, set[str]] = {name: set() for name in names}
    if found.dialect == "sqlite":
        for name in names:
            with suppress(sqlite3.Error), sqlite3.connect(f"file:{name}?mode=ro", uri=True) as conn:
                out[name] = {r[0] for r in conn.execute("SELECT version_num FROM alembic_version")}
        return out
    quote = '"' if found.dialect == "postgresql" else "`"
    engine = sa.create_engine(found.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            for start in range(0, len(names), 500):
                parts = [
                    f"SELECT '{name}' AS tenant, version_num FROM {quote}{name}{quote}.alembic_version"
                    for name in names[start : start + 500]
                ]
                for tenant, version in conn.exec_driver_sql(" UNION ALL ".join(parts)).tuples():
                    out[str(tenant)].add(str(version))
    finally:
        engine.dispose()
    return out


def witnessed(path: Path, dialect: str) -> dict[str, int]:
    """How often each tenant's upgrade ran, from the witness file (SQLite: paths resolved)."""
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        name = str(Path(line).resolve()) if dialect == "sqlite" else line
        counts[name] = counts.get(name, 0) + 1
    return counts
