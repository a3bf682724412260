"""`[apply] role`: check, on the control plane's connection, that the worker will be able to switch
to it, so a missing role or grant is one clear configuration error (exit 2) before any revision.

The worker runs `SET ROLE` (sessions.set_role_statement) on every connection env.py opens, so
on PostgreSQL the tables a revision creates are owned by the role. On MySQL / MariaDB `SET ROLE`
only adds the role's privileges (tables have no owner there). The control plane itself (journal,
lock) keeps the login user's own rights.
"""

from __future__ import annotations

import sqlalchemy as sa

from reconciler import sessions
from reconciler.errors import ConfigError
from reconciler.redact import redact

_RESET = {"postgresql": "RESET ROLE", "mysql": "SET ROLE NONE"}
_WHO = {"postgresql": "SELECT current_user", "mysql": "SELECT CURRENT_USER()"}


def check(conn: sa.engine.Connection, backend: str, role: str) -> None:
    """Raise ConfigError naming the role and the GRANT to run unless this login can SET ROLE."""
    statement = sessions.set_role_statement(backend, role)
    if statement is None:
        return
    try:
        conn.exec_driver_sql(statement)
    except sa.exc.DBAPIError as exc:
        raise _unusable(conn, backend, role, exc) from None
    finally:
        conn.exec_driver_sql(_RESET[backend])


def _unusable(conn: sa.engine.Connection, backend: str, role: str, exc: sa.exc.DBAPIError) -> ConfigError:
    lines = str(exc.orig).strip().splitlines()
    detail = redact(lines[0] if lines else type(exc.orig).__name__)
    user = str(conn.exec_driver_sql(_WHO[backend]).scalar() or "")
    if backend == "postgresql":
        grantee = '"' + user.replace('"', '""') + '"'
        steps = (
            f'CREATE ROLE "{role}" NOLOGIN; GRANT "{role}" TO {grantee}; and let it create '
            f'in the schema: GRANT USAGE, CREATE ON SCHEMA public TO "{role}"'
        )
    else:
        name, _, host = user.partition("@")
        steps = (
            f"CREATE ROLE `{role}`; GRANT `{role}` TO '{name}'@'{host or '%'}'; "
            "and grant the role the DDL rights"
        )
    return ConfigError(
        f"[apply] role {role!r} cannot be used by the login user {user!r}: {detail}. "
        f"Create the role and grant it to that user ({steps}), or empty [apply] role"
    )


__all__ = ["check"]
