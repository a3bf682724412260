"""Projects laid out as their tools lay them out, with revision files written for each test.

`flask_project` copies Flask-Migrate's own `flask` template (what `flask db init` writes);
`alembic_project` copies Alembic's `generic` template (what `alembic init` writes) and sets
`target_metadata`, the one edit its comments ask for.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

FLASK_MODELS = """\
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()


class User(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    username = db.Column(db.String(80), unique=True, nullable=False)
    email = db.Column(db.String(120), unique=True, nullable=False)
"""

PLAIN_MODELS = """\
import sqlalchemy as sa

try:
    from sqlalchemy.orm import declarative_base
except ImportError:  # SQLAlchemy 1.3
    from sqlalchemy.ext.declarative import declarative_base

Base = declarative_base()


class User(Base):
    __tablename__ = "user"
    id = sa.Column(sa.Integer, primary_key=True)
    username = sa.Column(sa.String(80), unique=True, nullable=False)
    email = sa.Column(sa.String(120), unique=True, nullable=False)
"""


def worker_python() -> str:
    """The worker's interpreter for this run (CI sets an oldest-versions one for the core subset)."""
    return os.environ.get("RECONCILER_TEST_WORKER_PYTHON", "")


@dataclass
class Project:
    root: Path
    migrations: Path
    url: str

    @property
    def versions(self) -> Path:
        return self.migrations / "versions"

    @property
    def config(self) -> Path:
        return self.root / "reconciler.toml"

    def write_config(self, extra: str = "", **target: str) -> Path:
        lines = ["[target]", f'url = "{self.url}"', f'migrations = "{self.migrations.name}"']
        python = worker_python()
        if python:
            lines.append(f'python = "{python}"')
        lines += [f'{k} = "{v}"' for k, v in target.items()]
        if "[drift]" not in extra:
            # test projects' models seldom match their migrations: drift tests turn it on
            extra += "\n[drift]\ninterval = 0\n"
        self.config.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
        return self.config

    def revision(
        self,
        rev: str,
        down: str | Sequence[str] | None,
        upgrade: str = "pass",
        downgrade: str = "pass",
        message: str = "",
        branch_labels: str | None = None,
        depends_on: str | None = None,
        extra: str = "",
    ) -> Path:
        path = self.versions / f"{rev}_{(message or rev).replace(' ', '_')[:30]}.py"
        path.write_text(
            revision_source(rev, down, upgrade, downgrade, message, branch_labels, depends_on, extra),
            encoding="utf-8",
        )
        return path

    def chain(self, count: int, prefix: str = "r", start_down: str | None = None) -> list[str]:
        """`count` linear revisions, each creating table t_<n>."""
        revs = []
        down = start_down
        for n in range(count):
            rev = f"{prefix}{n:04d}"
            self.revision(
                rev,
                down,
                upgrade=create_table(f"t_{prefix}{n}"),
                downgrade=f'op.drop_table("t_{prefix}{n}")',
                message=f"create t_{prefix}{n}",
            )
            revs.append(rev)
            down = rev
        return revs


def create_table(name: str) -> str:
    """A revision body that creates table `name`."""
    return f'op.create_table("{name}", sa.Column("id", sa.Integer, primary_key=True))'


def revision_source(
    rev: str,
    down: str | Sequence[str] | None,
    upgrade: str,
    downgrade: str,
    message: str,
    branch_labels: str | None,
    depends_on: str | None,
    extra: str = "",
) -> str:
    down_repr = repr(tuple(down)) if isinstance(down, (list, tuple)) else repr(down)
    return textwrap.dedent('''\
        """{message}

        Revision ID: {rev}
        Revises: {down_text}
        Create Date: 2026-11-21 10:00:00.000000

        """
        from alembic import op
        import sqlalchemy as sa


        # revision identifiers, used by Alembic.
        revision = {rev!r}
        down_revision = {down_repr}
        branch_labels = {branch_labels!r}
        depends_on = {depends_on!r}
        {extra}

        def upgrade():
            {upgrade}


        def downgrade():
            {downgrade}
        ''').format(
        message=message or rev,
        rev=rev,
        down_text=down_repr if down else "",
        down_repr=down_repr,
        branch_labels=branch_labels,
        depends_on=depends_on,
        upgrade=_indent(upgrade),
        downgrade=_indent(downgrade),
        extra=extra,
    )


def _indent(body: str) -> str:
    lines = body.strip().splitlines() or ["pass"]
    return "\n    ".join(lines)


def _template_dir(package: str) -> Path:
    module = __import__(package)
    return Path(module.__file__).parent / "templates"


def _alembic_init(ini: Path, directory: Path, templates: Path, name: str) -> None:
    """What `flask db init` and `alembic init` do: Alembic's init with their template."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ini))
    config.set_main_option("script_location", str(directory))
    config.get_template_directory = lambda: str(templates)  # type: ignore[method-assign]
    command.init(config, str(directory), name)


def _package(root: Path, models: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    pkg = root / "myapp"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(models)


def flask_project(root: Path, url: str, models: str = FLASK_MODELS) -> Project:
    """A project as `flask db init` lays it out, with models in `myapp/models.py`."""
    _package(root, models)
    migrations = root / "migrations"
    _alembic_init(migrations / "alembic.ini", migrations, _template_dir("flask_migrate"), "flask")
    project = Project(root, migrations, url)
    project.write_config(models="myapp.models:db")
    return project


def alembic_project(root: Path, url: str, models: str = PLAIN_MODELS) -> Project:
    """A project as `alembic init migrations` lays it out, target_metadata set to the models."""
    _package(root, models)
    migrations = root / "migrations"
    ini = root / "alembic.ini"
    _alembic_init(ini, migrations, _template_dir("alembic"), "generic")
    placeholder = "driver://user:pass@localhost/dbname"
    ini.write_text(ini.read_text().replace(placeholder, url.replace("%", "%%")))
    env = (migrations / "env.py").read_text()
    env = env.replace(
        "target_metadata = None", "from myapp.models import Base\ntarget_metadata = Base.metadata"
    )
    (migrations / "env.py").write_text(env)
    project = Project(root, migrations, url)
    project.write_config(models="myapp.models:Base")
    return project


def table_names(url: str) -> set[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def db_heads(url: str, table: str = "alembic_version") -> set[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(table):
                return set()
            return {r[0] for r in conn.execute(sa.text(f"SELECT version_num FROM {table}"))}
    finally:
        engine.dispose()


def journal_engine(url: str, table: str = "reconciler_journal") -> tuple[object, str | None]:
    """An engine that sees the journal, and the schema it is in: its side place (db/placement.py) when
    that exists, else the database's default schema (the previous release's placement)."""
    import sqlalchemy as sa

    from reconciler.db import journal, placement

    place = placement.Place(table, url)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    if place.attachment is not None:
        sa.event.listen(engine, "connect", lambda raw, _rec: place.attachment.attach(raw))  # type: ignore[union-attr]
    side = place.side.steps.schema if place.side is not None else None
    with engine.connect() as conn:
        try:
            found = side is not None and journal.exists(conn, place.side)  # type: ignore[arg-type]
        except sa.exc.DBAPIError:  # MySQL: no right to look into the side database
            found = False
    return engine, side if found else None


def journal_rows(url: str, table: str = "reconciler_journal") -> list[dict[str, object]]:
    import sqlalchemy as sa

    engine, schema = journal_engine(url, table)
    assert isinstance(engine, sa.engine.Engine)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(table, schema=schema):
                return []
            name = f"{schema}.{table}" if schema else table
            rows = conn.execute(sa.text(f"SELECT * FROM {name} ORDER BY id")).mappings()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()
