"""The job as the worker takes it: checked, its secrets registered, its paths made absolute."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.protocol import DEFAULT_VERSION_TABLE, Job
from reconciler.redact import is_ambiguous, redact, register_secret, register_url


def checked_job(job: Job) -> Job:
    """`job` with its secrets registered for redaction, refused when it cannot be run, and its
    paths resolved (alembic.ini: the given one, else the migrations directory's, else None)."""
    for secret in job.secrets:
        register_secret(str(secret))
    if not job.url:
        raise ConfigError("the worker job has no database URL")
    register_url(job.url)
    if is_ambiguous(job.url):
        raise ConfigError(
            f"the worker job's database URL {redact(job.url)!r} has more than one '@' before its "
            "host; URL-encode the password (an '@' in it is written %40)"
        )
    if not job.migrations_dir:
        raise ConfigError("the worker job has no migrations directory")
    migrations_dir = Path(job.migrations_dir).resolve()
    ini = alembic_ini_of(job.alembic_ini, migrations_dir)
    return dataclasses.replace(
        job,
        migrations_dir=str(migrations_dir),
        root=str(Path(job.root or ".").resolve()),
        alembic_ini=str(ini) if ini else None,
        version_table=job.version_table or DEFAULT_VERSION_TABLE,
        log_level=job.log_level or "info",
    )


def alembic_ini_of(value: str | None, migrations_dir: Path) -> Path | None:
    """The job's alembic.ini (which must exist), else the migrations directory's if there is one."""
    if value:
        path = Path(value).resolve()
        if not path.is_file():
            raise ConfigError(f"alembic.ini {path} does not exist; fix [target] alembic_ini")
        return path
    default = migrations_dir / "alembic.ini"
    return default if default.is_file() else None
