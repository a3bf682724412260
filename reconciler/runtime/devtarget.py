"""Which databases dev mode may change (local, never one marked prod) and which model files it watches."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import sqlalchemy as sa

from reconciler.config.validate import find_module_file
from reconciler.control.target import TargetHandle, journal_exists
from reconciler.db import connection, flags
from reconciler.errors import ConfigError, Refused
from reconciler.settings import Settings


def is_local(url: str, local_hosts: list[str]) -> bool:
    """SQLite, a Unix socket, a loopback address, or a host listed as local."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return True
    host = (parsed.host or "").strip("[]")
    if not host or host.startswith("/"):
        return True  # no host: the driver's Unix socket
    if host == "localhost" or host in local_hosts:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_dev_target(settings: Settings, handle: TargetHandle) -> None:
    """Refuse a remote database (unless allowed) and any database marked `prod`."""
    if not settings.dev.allow_remote and not is_local(settings.target.url, settings.dev.local_hosts):
        raise Refused(
            f"dev mode writes revision files and changes schemas, and {handle.redacted_url} is not a "
            "local database; point it at a local one, add its host to [dev] local_hosts "
            "(compose service names), or set [dev] allow_remote = true"
        )
    with connection.connect(handle.engine) as conn:
        if not journal_exists(handle, conn):
            return
        key = flags.environment_key(handle.target_name)
        marker = flags.read(conn, handle.journal, [key])
    if marker.get(key) == "prod":
        raise Refused(
            f"the database of target {handle.target_name} is marked as a production database (a prod "
            "reconciler applied to it); dev mode never touches it"
        )


def watch_paths(settings: Settings) -> list[Path]:
    """[dev] watch, else the package that holds the models module (with its subpackages)."""
    if settings.dev.watch:
        return [
            p if p.is_absolute() else (settings.base_dir / p).resolve()
            for p in (Path(w) for w in settings.dev.watch)
        ]
    module = settings.target.models.partition(":")[0]
    if not module:
        raise ConfigError("dev mode needs [target] models (pkg.module:attr) or [dev] watch paths")
    found = find_module_file(module, settings)
    if found is None:
        raise ConfigError(f"cannot find the models module {module!r} under {settings.root_dir}")
    if found.name != "__init__.py" and not (found.parent / "__init__.py").exists():
        return [found]  # a top-level module: watch that file
    return [found.parent]
