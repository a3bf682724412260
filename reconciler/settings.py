"""The settings schema: frozen dataclasses, one per TOML section, with a doc string per field.

Standard library only. `config.load` fills them (TOML file, then `RECONCILER_*` environment, then
flags) and validates them; every other layer only reads them.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.errors import ConfigError


@dataclass(frozen=True)
class TargetSettings:
    url: str = field(
        default="",
        metadata={"doc": "database URL (SQLAlchemy form); default: the Flask app's SQLALCHEMY_DATABASE_URI"},
    )
    url_env: str = field(
        default="", metadata={"doc": "name of an environment variable holding the URL instead"}
    )
    name: str = field(
        default="", metadata={"doc": "short name in logs and application_name; default: db name"}
    )
    migrations: str = field(
        default="migrations", metadata={"doc": "the Alembic / Flask-Migrate migrations directory"}
    )
    models: str = field(
        default="",
        metadata={"doc": "'pkg.module:attr': a MetaData, declarative base or Flask-SQLAlchemy db"},
    )
    version_table: str = field(default="alembic_version", metadata={"doc": "Alembic's table"})
    version_table_schema: str = field(
        default="", metadata={"doc": "schema of the version table; default: the default schema"}
    )
    imports: list[str] = field(
        default_factory=list,
        metadata={"doc": "modules or packages imported before taking the metadata"},
    )
    app: str = field(
        default="",
        metadata={"doc": "'pkg.module:app' Flask app or factory; used only when set"},
    )
    migrate: str = field(
        default="",
        metadata={"doc": "'pkg.module:migrate', the project's own Migrate object"},
    )
    alembic_ini: str = field(
        default="", metadata={"doc": "alembic.ini; default: <migrations>/alembic.ini or ./alembic.ini"}
    )
    x_args: dict[str, str] = field(
        default_factory=dict, metadata={"doc": "passed to env.py as Alembic's -x key=value"}
    )
    root: str = field(default=".", metadata={"doc": "project root, put first on sys.path"})
    python: str = field(
        default="", metadata={"doc": "interpreter for the worker; default: the reconciler's own"}
    )
    lock_url: str = field(default="", metadata={"doc": "direct URL for the advisory lock (behind a pooler)"})
    lock_url_env: str = field(
        default="", metadata={"doc": "environment variable holding lock_url (from a Secret)"}
    )
    lock_key: str = field(
        default="", metadata={"doc": "advisory lock name; default: derived from db, schema, table"}
    )
    known_differences: str = field(
        default="",
        metadata={"doc": "known-differences file; default: <migrations>/known_differences.json"},
    )
    worker_timeout: float = field(
        default=3600.0, metadata={"doc": "seconds one worker job may take before it is killed"}
    )
    search_path: str = field(
        default="",
        metadata={"doc": "PostgreSQL: a schema set as the worker's search_path ([fleet]: each tenant's)"},
    )
    revision_id_length: int = field(
        default=32,
        metadata={"doc": "longest revision id accepted: the version table's column width (Alembic: 32)"},
    )


@dataclass(frozen=True)
class ChainSettings:
    """A second, independent migrations directory for the same database (`[[target.chains]]`)."""

    migrations: str = field(default="", metadata={"doc": "its migrations directory (a plugin's); required"})
    version_table: str = field(
        default="", metadata={"doc": "its own version table, the one its env.py passes; required"}
    )
    name: str = field(
        default="", metadata={"doc": "its name in status, logs and the journal; default: the folder's"}
    )
    alembic_ini: str = field(
        default="", metadata={"doc": "its alembic.ini; default: <migrations>/alembic.ini, else [target]'s"}
    )


@dataclass(frozen=True)
class ApplySettings:
    lock_acquire_timeout: float = field(
        default=300.0, metadata={"doc": "seconds to wait for the advisory lock"}
    )
    ddl_lock_timeout: float = field(
        default=5.0,
        metadata={"doc": "PostgreSQL lock_timeout / MySQL lock_wait_timeout for migrations"},
    )
    statement_timeout: float = field(
        default=0.0, metadata={"doc": "PostgreSQL statement_timeout for migrations; 0 = none"}
    )
    lock_timeout_retries: int = field(
        default=3, metadata={"doc": "retries of a revision that hit ddl_lock_timeout, in one run"}
    )
    lock_timeout_backoff: float = field(
        default=1.0, metadata={"doc": "seconds before the first such retry; doubles, with jitter"}
    )
    connect_timeout: float = field(
        default=10.0, metadata={"doc": "seconds to wait for a database connection"}
    )
    orphan_wait_timeout: float = field(
        default=600.0,
        metadata={"doc": "seconds to wait for a killed applier's statement to end on the server"},
    )
    role: str = field(
        default="", metadata={"doc": "SET ROLE for the worker's connections, so objects get its owner"}
    )


JOURNAL_PLACEMENTS = ("side", "default")


@dataclass(frozen=True)
class JournalSettings:
    table: str = field(
        default="reconciler_journal", metadata={"doc": "our side table (never alembic_version)"}
    )
    placement: str = field(
        default="side",
        metadata={"doc": "side (where autogenerate does not look) or default (the target's schema)"},
    )
    schema: str = field(
        default="",
        metadata={"doc": "the side schema / database; default: reconciler (MySQL: <db>_reconciler)"},
    )


@dataclass(frozen=True)
class LoggingSettings:
    level: str = field(default="info", metadata={"doc": "debug, info, warning or error"})
    format: str = field(
        default="auto",
        metadata={"doc": "auto (text; JSON lines for `run` when not on a terminal), text or json"},
    )


@dataclass(frozen=True)
class DaemonSettings:
    mode: str = field(default="prod", metadata={"doc": "prod (reconcile loop) or dev (auto-migrate)"})
    interval: float = field(default=30.0, metadata={"doc": "seconds between periodic reconciles"})
    jitter: float = field(default=2.0, metadata={"doc": "up to this many seconds added to each tick"})
    http: str = field(
        default="127.0.0.1:8089", metadata={"doc": "HOST:PORT of /healthz /readyz /status /metrics"}
    )
    allowed_hosts: list[str] = field(
        default_factory=list, metadata={"doc": "extra Host header names accepted on a loopback bind"}
    )
    http_header_timeout: float = field(
        default=2.0,
        metadata={"doc": "seconds an HTTP client has from connecting to the end of its request headers"},
    )
    page_refresh: int = field(
        default=10, metadata={"doc": "seconds between the status page's reloads (GET /); 0: none"}
    )
    grace: float = field(
        default=25.0, metadata={"doc": "on SIGTERM, seconds an in-flight revision may take to finish"}
    )
    backoff_max: float = field(
        default=300.0,
        metadata={"doc": "cap of the backoff after failed runs (it starts at the interval)"},
    )
    blocked_after: int = field(
        default=3,
        metadata={"doc": "the same revision failing the same way this many tries is blocked"},
    )
    apply: bool = field(default=True, metadata={"doc": "false makes this replica observe-only"})
    ready_when: str = field(
        default="started",
        metadata={"doc": "/readyz: started (first reconcile attempted) or in_sync"},
    )
    debounce: float = field(
        default=0.2, metadata={"doc": "quiet seconds after a revision file change before a run"}
    )
    heartbeat: float = field(
        default=300.0, metadata={"doc": "seconds between info heartbeat lines while nothing changes"}
    )
    idle_disconnect_after: float = field(
        default=10.0,
        metadata={"doc": "close the connection between runs when the next is this far away or more"},
    )


@dataclass(frozen=True)
class DevSettings:
    watch: list[str] = field(
        default_factory=list,
        metadata={"doc": "paths to watch; default: the package that holds the models module"},
    )
    ignore: list[str] = field(
        default_factory=list, metadata={"doc": "extra glob patterns to ignore (editor files are)"}
    )
    draft: bool = field(default=True, metadata={"doc": "consecutive saves amend one draft revision"})
    allow_destructive: bool = field(
        default=False, metadata={"doc": "apply drops without asking (otherwise: written, held back)"}
    )
    allow_remote: bool = field(
        default=False, metadata={"doc": "allow a database that is not local (it writes schemas!)"}
    )
    local_hosts: list[str] = field(
        default_factory=list, metadata={"doc": "host names that count as local (compose services)"}
    )
    debounce: float = field(default=0.05, metadata={"doc": "quiet seconds after a save"})
    generate_timeout: float = field(
        default=60.0, metadata={"doc": "seconds one generation (models import + compare) may take"}
    )


@dataclass(frozen=True)
class AlertingSettings:
    unreachable_after: int = field(
        default=3,
        metadata={"doc": "consecutive failed runs (retried no faster than the interval) before the alert"},
    )
    repeat_interval: float = field(
        default=3600.0, metadata={"doc": "seconds between reminders while a bad state lasts"}
    )
    ahead_alert: bool = field(
        default=False, metadata={"doc": "alert on ahead (otherwise a metric only: canaries are normal)"}
    )
    ahead_grace: float = field(default=600.0, metadata={"doc": "seconds ahead before that alert"})
    lock_held_after: float = field(
        default=600.0, metadata={"doc": "seconds a lock may be held by another before an alert"}
    )
    queue_size: int = field(default=100, metadata={"doc": "alerts waiting for delivery, at most"})
    send_timeout: float = field(
        default=10.0, metadata={"doc": "total seconds one delivery may take, retries included"}
    )
    retries: int = field(default=3, metadata={"doc": "delivery attempts per alert and sink"})
    allow_link_local: bool = field(
        default=False,
        metadata={"doc": "allow alert URLs on link-local / metadata addresses (169.254.0.0/16, fe80::/10)"},
    )


@dataclass(frozen=True)
class DriftSettings:
    interval: float = field(
        default=3600.0, metadata={"doc": "seconds between drift compares, fleet-wide; 0 = off"}
    )
    ignore: list[str] = field(
        default_factory=list,
        metadata={"doc": "differences never reported: KIND:GLOB, e.g. 'table:audit_*', 'index:*'"},
    )


@dataclass(frozen=True)
class SafetySettings:
    allow_destructive: bool = field(
        default=False, metadata={"doc": "apply data-loss revisions without their allow_destructive marker"}
    )
    strict_locking: bool = field(
        default=False, metadata={"doc": "refuse lock-risk revisions too (otherwise a warning)"}
    )
    on_unanalysable: str = field(
        default="refuse",
        metadata={
            "doc": "a revision whose operations cannot be recorded ahead: refuse "
            "(PostgreSQL, SQLite: each operation checked as it runs instead) or warn"
        },
    )
    squawk: str = field(
        default="auto", metadata={"doc": "PostgreSQL lock rules from squawk: auto (when installed) or off"}
    )


FLEET_SOURCES = ("schemas", "databases", "files", "query", "list")


@dataclass(frozen=True)
class FleetSettings:
    source: str = field(
        default="",
        metadata={"doc": "schemas | databases | files | query | list; empty: no fleet (one target)"},
    )
    match: str = field(default="*", metadata={"doc": "glob over schema names, database names or file paths"})
    query: str = field(default="", metadata={"doc": "source = query: SQL returning one tenant name per row"})
    names: list[str] = field(default_factory=list, metadata={"doc": "source = list: the tenants"})
    kind: str = field(
        default="schemas",
        metadata={"doc": "source = query or list: whether a name is a schema or a database"},
    )
    concurrency: int = field(default=8, metadata={"doc": "tenants one replica applies at once"})
    waves: list[str] = field(
        default_factory=lambda: ["100%"],
        metadata={"doc": "rollout waves, cumulative: a count or a share of the tenants, in order"},
    )
    halt_after: int = field(
        default=1, metadata={"doc": "failed tenants in a wave that halt the rollout; 0 = never"}
    )

    @property
    def enabled(self) -> bool:
        return bool(self.source)


@dataclass(frozen=True)
class AlertSink:
    kind: str = field(default="webhook", metadata={"doc": "webhook (JSON) or slack"})
    url: str = field(default="", metadata={"doc": "endpoint; carries a token: prefer url_env"})
    url_env: str = field(default="", metadata={"doc": "environment variable holding the URL"})
    url_file: str = field(default="", metadata={"doc": "file holding the URL (a mounted Secret)"})
    name: str = field(default="", metadata={"doc": "label in metrics and logs; default: the kind"})
    events: list[str] = field(default_factory=list, metadata={"doc": "events to send; empty: all of them"})


@dataclass(frozen=True)
class Settings:
    target: TargetSettings
    apply: ApplySettings
    journal: JournalSettings
    logging: LoggingSettings
    config_file: Path | None
    base_dir: Path
    daemon: DaemonSettings = DaemonSettings()
    dev: DevSettings = DevSettings()
    alerting: AlertingSettings = AlertingSettings()
    drift: DriftSettings = DriftSettings()
    safety: SafetySettings = SafetySettings()
    fleet: FleetSettings = FleetSettings()
    alerts: tuple[AlertSink, ...] = ()
    unsafe: frozenset[str] = frozenset()  # safeguards switched off, for negative-control tests only
    chains: tuple[ChainSettings, ...] = ()  # [[target.chains]]: more chains of the same database

    @property
    def migrations_dir(self) -> Path:
        return resolve_path(self.base_dir, self.target.migrations)

    @property
    def root_dir(self) -> Path:
        return resolve_path(self.base_dir, self.target.root)


@dataclass(frozen=True)
class AppUrl:
    """A Flask app's `SQLALCHEMY_DATABASE_URI` as the app resolves it (`db.engine.url`)."""

    url: str = field(repr=False)
    where: str  # the app it came from: "app:app (/srv/app.py)"


SECTIONS: dict[str, type] = {
    "target": TargetSettings,
    "apply": ApplySettings,
    "journal": JournalSettings,
    "logging": LoggingSettings,
    "daemon": DaemonSettings,
    "dev": DevSettings,
    "alerting": AlertingSettings,
    "drift": DriftSettings,
    "safety": SafetySettings,
    "fleet": FleetSettings,
}
LIST_SECTIONS: dict[str, type] = {"alerts": AlertSink}
NESTED_LISTS: dict[str, type] = {"target.chains": ChainSettings}  # [[target.chains]] tables
MAIN_CHAIN = "main"  # the name of [target]'s own migrations directory among the chains


def resolve_path(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    joined = base / path  # `path` itself when it is absolute
    try:
        if path.is_absolute():
            os.stat(path)  # only to find a loop; an absolute path is kept as written
            return path
        return joined.resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a loop, before Python 3.13
        if isinstance(exc, OSError) and exc.errno != errno.ELOOP:
            return joined  # missing or unreadable: the check of that setting says so
        raise ConfigError(
            f"{joined} is a loop of symbolic links; replace it with the real file or directory "
            "(or a link to it)"
        ) from None
