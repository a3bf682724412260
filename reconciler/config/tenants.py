"""One tenant of a fleet as a target: the base settings with the tenant's schema, database or file.

A tenant is an ordinary target to everything below the fleet: its own version table, lock key,
journal rows and failure counts, because each of those is derived from the target's settings.

- schema per tenant (PostgreSQL): the version table's schema and the worker's `search_path` are
  the tenant's schema, so an unchanged Flask-Migrate or Alembic env.py builds the tenant's tables
  there and keeps its version table beside them; the journal stays in the shared side schema.
- database per tenant (PostgreSQL, MySQL / MariaDB): `[target] url` with the tenant as its
  database name; each database keeps its own journal.
- file per tenant (SQLite): the tenant's file as the database.

The tenant's name is the target's name (logs, application_name, the journal's `target`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.settings import Settings, resolve_path

_LAYOUT_OF = {"sqlite": "files", "mysql": "databases", "mariadb": "databases"}
TENANT_NAME_LIMIT = 63  # PostgreSQL identifiers; MySQL database names are at most 64


def tenant_kind(settings: Settings, dialect: str) -> str:
    """What a tenant name means: "schemas", "databases" or "files" (query / list: `kind`)."""
    source = settings.fleet.source
    kind = source if source in ("schemas", "databases", "files") else settings.fleet.kind
    if kind == "schemas" and dialect in ("mysql", "mariadb"):
        return "databases"  # a MySQL schema is a database
    return kind


def check_dialect(kind: str, dialect: str, where: str = "[fleet] source") -> None:
    """Refuse a layout the database cannot have, before anything is connected."""
    allowed = {
        "schemas": ("postgresql",),
        "databases": ("postgresql", "mysql", "mariadb"),
        "files": ("sqlite",),
    }[kind]
    if dialect not in allowed:
        raise ConfigError(
            f"{where}: tenants as {kind} need a {' or '.join(allowed)} [target] url, and this one "
            f"is {dialect}; use source = {_LAYOUT_OF.get(dialect, 'schemas')!r}"
        )


def tenant_settings(settings: Settings, tenant: str, kind: str) -> Settings:
    """The settings of `tenant` (see the module docstring); `kind` from `tenant_kind`."""
    # Why here: SQLAlchemy's URL type, deferred like config.urls does for the CLI's start-up
    from sqlalchemy.engine import make_url

    target = settings.target
    url = make_url(target.url)
    if kind == "schemas":
        target = dataclasses.replace(target, version_table_schema=tenant, search_path=tenant)
    elif kind == "databases":
        target = dataclasses.replace(
            target, url=url.set(database=tenant).render_as_string(hide_password=False)
        )
    else:
        path = resolve_path(settings.base_dir, tenant)
        target = dataclasses.replace(target, url=url.set(database=str(Path(path))).render_as_string(False))
    target = dataclasses.replace(target, name=tenant[:TENANT_NAME_LIMIT], lock_key="")
    fleet = dataclasses.replace(settings.fleet, source="")  # a tenant is one target
    return dataclasses.replace(settings, target=target, fleet=fleet, chains=())
