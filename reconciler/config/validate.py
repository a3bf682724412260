"""Checks of the resolved settings' values: names, ranges, directories, import paths, alert URLs, rules."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from reconciler.config import appsource
from reconciler.core import urlcheck
from reconciler.core.alert_rules import EVENTS
from reconciler.core.drift import parse_rule
from reconciler.core.fleet import check_tenant_name, parse_waves
from reconciler.errors import ConfigError
from reconciler.redact import redact
from reconciler.settings import (
    FLEET_SOURCES,
    JOURNAL_PLACEMENTS,
    MAIN_CHAIN,
    DaemonSettings,
    DriftSettings,
    FleetSettings,
    JournalSettings,
    SafetySettings,
    Settings,
    resolve_path,
)

_LEVELS = ("debug", "info", "warning", "error")
_FORMATS = ("auto", "text", "json", "console")  # console: the former name of text
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

ALERT_KINDS = ("webhook", "slack")


def check_alert_url(url: str, where: str, allow_link_local: bool) -> None:
    """http(s) only, and no link-local or metadata host unless allowed (see `urlcheck`). The
    message shows the URL up to its host: the path and query carry the sink's token."""
    why = urlcheck.refusal(url, allow_link_local)
    if why is None and not re.match(r"^https?://[^/\s]+", url, re.IGNORECASE):
        why = "it must start with http:// or https://"
    if why:
        match = re.match(
            r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*:/*)?(?:[^/?#]*@)?(?P<host>[^/?#]*)", url.strip()
        )
        shown = redact(f"{match['scheme'] or ''}{match['host']}" if match else "")
        raise ConfigError(f"{where}: alert URL {shown!r} (shown up to its host) refused: {why}")


def validate(settings: Settings, origin: dict[tuple[str, str], str], need_dir: bool) -> None:
    target = settings.target

    def where(key: str) -> str:
        return origin.get(("target", key), f"[target] {key}")

    if need_dir and not settings.migrations_dir.is_dir():
        raise ConfigError(
            f"{where('migrations')}: migrations directory {settings.migrations_dir} does not exist; "
            "point [target] migrations / --migrations at it, or create one with `reconciler init`"
        )
    _validate_chains(settings, origin, need_dir)
    for key in ("models", "app", "migrate"):
        value = getattr(target, key)
        if value:
            check_import_path(value, settings, where(key), key)
    for module in target.imports:
        if not _DOTTED.match(module):
            raise ConfigError(f"{where('imports')}: '{module}' is not a module name")
    if settings.logging.level not in _LEVELS:
        raise ConfigError(
            f"{origin.get(('logging', 'level'), '[logging] level')}: level must be one of "
            f"{', '.join(_LEVELS)}, got {settings.logging.level!r}"
        )
    if settings.logging.format not in _FORMATS:
        raise ConfigError(
            f"{origin.get(('logging', 'format'), '[logging] format')}: format must be one of "
            f"{', '.join(_FORMATS[:3])}, got {settings.logging.format!r}"
        )
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", settings.journal.table):
        raise ConfigError(f"[journal] table must be a plain table name, got {settings.journal.table!r}")
    _validate_journal(settings.journal, origin)
    _validate_daemon(settings.daemon, origin)
    _validate_limits(settings, origin)
    _validate_role(settings.apply.role, origin.get(("apply", "role"), "[apply] role"))
    _validate_drift(settings.drift, origin)
    _validate_safety(settings.safety, origin)
    _validate_fleet(settings.fleet, origin)
    if target.search_path and (problem := check_tenant_name(target.search_path)):
        raise ConfigError(f"{where('search_path')}: {target.search_path!r}: {problem}")
    if target.python and not Path(target.python).exists():
        raise ConfigError(f"{where('python')}: interpreter {target.python} does not exist")


def _validate_journal(journal: JournalSettings, origin: dict[tuple[str, str], str]) -> None:
    if journal.placement not in JOURNAL_PLACEMENTS:
        where = origin.get(("journal", "placement"), "[journal] placement")
        raise ConfigError(
            f"{where}: placement must be one of {', '.join(JOURNAL_PLACEMENTS)}, got {journal.placement!r}"
        )
    if journal.schema and not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$", journal.schema):
        where = origin.get(("journal", "schema"), "[journal] schema")
        raise ConfigError(f"{where}: schema must be a plain schema or database name, got {journal.schema!r}")


def _validate_chains(settings: Settings, origin: dict[tuple[str, str], str], need_dir: bool) -> None:
    """Every chain names an existing directory of its own and a version table of its own."""
    tables = {settings.target.version_table: f"[target] version_table ({MAIN_CHAIN})"}
    dirs = {settings.migrations_dir: MAIN_CHAIN}
    names = {MAIN_CHAIN}
    for index, chain in enumerate(settings.chains):
        where = origin.get((f"target.chains#{index}", "migrations"), f"[[target.chains]] #{index + 1}")
        directory = resolve_path(settings.base_dir, chain.migrations)
        if need_dir and not directory.is_dir():
            raise ConfigError(
                f"{where}: chain {chain.name!r}: migrations directory {directory} does not exist; "
                "point its migrations at the directory that holds its env.py"
            )
        if directory in dirs:
            raise ConfigError(
                f"{where}: chain {chain.name!r} uses the migrations directory {directory}, which "
                f"chain {dirs[directory]!r} uses already; each chain has a directory of its own"
            )
        if chain.version_table in tables:
            raise ConfigError(
                f"{where}: chain {chain.name!r} has version_table {chain.version_table!r}, like "
                f"{tables[chain.version_table]}; two chains in one version table would read each "
                "other's revisions as unknown: give each its own (what its env.py passes)"
            )
        if chain.name in names:
            raise ConfigError(f"{where}: two chains are named {chain.name!r}; set name on one")
        tables[chain.version_table] = f"chain {chain.name!r}"
        dirs[directory] = chain.name
        names.add(chain.name)


_FLEET_KINDS = ("schemas", "databases", "files")


def _validate_fleet(fleet: FleetSettings, origin: dict[tuple[str, str], str]) -> None:
    """[fleet]: a known source with what it needs, a bounded concurrency, waves that parse."""

    def where(key: str) -> str:
        return origin.get(("fleet", key), f"[fleet] {key}")

    if not fleet.source:
        return
    if fleet.source not in FLEET_SOURCES:
        raise ConfigError(
            f"{where('source')}: source must be one of {', '.join(FLEET_SOURCES)}, got {fleet.source!r}"
        )
    if fleet.source == "query" and not fleet.query.strip():
        raise ConfigError(
            f'{where("query")}: source = "query" needs a query returning one tenant name per row'
        )
    if fleet.source == "list" and not fleet.names:
        raise ConfigError(f'{where("names")}: source = "list" needs names = ["tenant_a", ...]')
    for name in fleet.names:
        if problem := check_tenant_name(name):
            raise ConfigError(f"{where('names')}: {name!r}: {problem}")
    if fleet.kind not in _FLEET_KINDS:
        raise ConfigError(
            f"{where('kind')}: kind must be one of {', '.join(_FLEET_KINDS)}, got {fleet.kind!r}"
        )
    if not 1 <= fleet.concurrency <= 64:
        raise ConfigError(
            f"{where('concurrency')}: concurrency must be 1 to 64 (each applying tenant holds a "
            f"connection), got {fleet.concurrency}"
        )
    if fleet.halt_after < 0:
        raise ConfigError(
            f"{where('halt_after')}: halt_after must be 0 (never) or more, got {fleet.halt_after}"
        )
    try:
        parse_waves(fleet.waves)
    except ValueError as exc:
        raise ConfigError(f"{where('waves')}: {exc}") from None


_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$.-]{0,62}$")


def _validate_role(role: str, where: str) -> None:
    if role and not _ROLE.match(role):
        raise ConfigError(
            f"{where}: role must be a role name (a letter or _, then letters, digits, _ $ . -; at "
            f"most 63 characters), got {role!r}; give the name as the server stores it"
        )


MODES = ("prod", "dev")
READY_WHEN = ("started", "in_sync")
HEADER_TIMEOUT_RANGE = (0.05, 60.0)  # below: a busy node's probe misses it; above: slowloris holds fds


def _validate_daemon(daemon: DaemonSettings, origin: dict[tuple[str, str], str]) -> None:
    def where(key: str) -> str:
        return origin.get(("daemon", key), f"[daemon] {key}")

    if daemon.mode not in MODES:
        raise ConfigError(f"{where('mode')}: mode must be prod or dev, got {daemon.mode!r}")
    if daemon.ready_when not in READY_WHEN:
        raise ConfigError(
            f"{where('ready_when')}: ready_when must be started or in_sync, got {daemon.ready_when!r}"
        )
    if daemon.interval < 0.01:
        raise ConfigError(f"{where('interval')}: interval must be at least 0.01 s, got {daemon.interval}")
    parse_http(daemon.http, where("http"))
    if not HEADER_TIMEOUT_RANGE[0] <= daemon.http_header_timeout <= HEADER_TIMEOUT_RANGE[1]:
        low, high = HEADER_TIMEOUT_RANGE
        raise ConfigError(
            f"{where('http_header_timeout')}: http_header_timeout must be between {low} and {high} "
            f"seconds, got {daemon.http_header_timeout}; the default, 2, suits probes and scrapers"
        )
    if not 0 <= daemon.page_refresh <= 3600:
        raise ConfigError(
            f"{where('page_refresh')}: page_refresh must be 0 (no reload) to 3600 seconds, got "
            f"{daemon.page_refresh}"
        )


MAX_BLOCKED_AFTER = 1000  # failures; more is "never" in practice: say 0
MAX_REVISION_ID_LENGTH = 255  # the widest version column MySQL's utf8mb4 primary key allows


def _validate_limits(settings: Settings, origin: dict[tuple[str, str], str]) -> None:
    """Numbers with a meaningful range: a value outside it is a mistake, not a wish."""

    def where(section: str, key: str) -> str:
        return origin.get((section, key), f"[{section}] {key}")

    if settings.apply.connect_timeout <= 0:
        raise ConfigError(
            f"{where('apply', 'connect_timeout')}: connect_timeout must be more than 0 seconds, got "
            f"{settings.apply.connect_timeout:g} (0 would wait for a connection forever); e.g. 10"
        )
    blocked = settings.daemon.blocked_after
    if not 0 <= blocked <= MAX_BLOCKED_AFTER:
        raise ConfigError(
            f"{where('daemon', 'blocked_after')}: blocked_after must be 0 (never block) or 1 to "
            f"{MAX_BLOCKED_AFTER} failures of the same revision, got {blocked}; e.g. 3"
        )
    length = settings.target.revision_id_length
    if not 1 <= length <= MAX_REVISION_ID_LENGTH:
        raise ConfigError(
            f"{where('target', 'revision_id_length')}: revision_id_length must be 1 to "
            f"{MAX_REVISION_ID_LENGTH} characters (the width of the version table's version_num "
            f"column; Alembic creates it as 32), got {length}"
        )


def _validate_drift(drift: DriftSettings, origin: dict[tuple[str, str], str]) -> None:
    where = origin.get(("drift", "ignore"), "[drift] ignore")
    for pattern in drift.ignore:
        parse_rule(pattern, where)


UNANALYSABLE = ("refuse", "warn")
SQUAWK = ("auto", "off")


def _validate_safety(safety: SafetySettings, origin: dict[tuple[str, str], str]) -> None:
    for key, allowed in (("on_unanalysable", UNANALYSABLE), ("squawk", SQUAWK)):
        value = getattr(safety, key)
        if value not in allowed:
            where = origin.get(("safety", key), f"[safety] {key}")
            raise ConfigError(f"{where}: {key} must be {' or '.join(allowed)}, got {value!r}")


def check_sink_events(settings: Settings) -> None:
    """Every `[[alerts]] events` name is an alert event (checked when the daemon starts)."""
    for index, sink in enumerate(settings.alerts, start=1):
        for name in sink.events:
            if name not in EVENTS:
                close = difflib.get_close_matches(name, list(EVENTS), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"[[alerts]] #{index} ({sink.name}): unknown event {name!r}{hint}; "
                    f"events are {', '.join(EVENTS)}"
                )


def parse_http(value: str, where: str = "[daemon] http") -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as [::1]:PORT) → (host, port)."""
    match = re.match(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]*)):(?P<port>\d{1,5})$", value.strip())
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT such as 0.0.0.0:8089, got {value!r}")
    return (match["v6"] or match["host"] or "127.0.0.1", int(match["port"]))


def check_import_path(value: str, settings: Settings, where: str, key: str) -> None:
    """Check 'pkg.module:attr' names a module file under the project root, without importing it."""
    module, sep, attr = value.partition(":")
    if not sep or not attr or not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise ConfigError(f"{where}: {key} must look like 'package.module:attribute', got {value!r}")
    path = find_module_file(module, settings)
    if path is None:
        raise ConfigError(
            f"{where}: cannot find module '{module}' for {key} {value!r} under the project root "
            f"{settings.root_dir}; set [target] root to the folder that holds it"
        )
    _check_attribute(path, value, where, key)


def _check_attribute(path: Path, value: str, where: str, key: str) -> None:
    """The attribute must be one the module's source binds at its top level (read with ast, not
    imported). Not refused when the source cannot tell (`import *`, `__getattr__`, `globals()`):
    the worker, importing it, says then."""
    attr = value.partition(":")[2].split(".")[0]
    if not path.is_file() or appsource.defines(path, attr) is not False:
        return
    names = sorted(n for n in appsource.top_level_names(path) or () if not n.startswith("_"))
    close = difflib.get_close_matches(attr, names, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"{where}: {key} {value!r}: {path} defines no top-level name '{attr}'; {hint}names it "
        f"defines: {', '.join(names[:20]) or 'none'}; fix [target] {key} (or --{key})"
    )


def find_module_file(module: str, settings: Settings) -> Path | None:
    """The file a module would be imported from: the project root first, then installed packages."""
    parts = module.split(".")
    for base in [settings.root_dir, *_sys_path_dirs()]:
        candidate = base.joinpath(*parts)
        for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
            if path.is_file():
                return path
        if candidate.is_dir() and len(parts) > 0:  # namespace package
            return candidate
    return None


def _sys_path_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]
