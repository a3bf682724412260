"""Configuration: TOML file → `RECONCILER_*` environment → CLI flags, resolved once into frozen settings.

This is the only module that reads `os.environ`. Everything is validated here, before any
connection is attempted: unknown keys (with a "did you mean"), wrong types, missing values,
malformed URLs, a missing migrations directory, a models path that names no module.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_origin, get_type_hints

from reconciler.config import environment as envsettings
from reconciler.core import urlcheck
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.project import appsource
from reconciler.redact import is_ambiguous, redact, register_secret, register_url
from reconciler.settings import (
    JOURNAL_PLACEMENTS,
    LIST_SECTIONS,
    MAIN_CHAIN,
    NESTED_LISTS,
    SECTIONS,
    AlertSink,
    ChainSettings,
    DaemonSettings,
    DriftSettings,
    JournalSettings,
    SafetySettings,
    Settings,
    TargetSettings,
    resolve_path,
)

if TYPE_CHECKING:
    from reconciler.control.workerclient import AppUrl

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_NAME = "reconciler.toml"


ENV_KEYS = envsettings.LEGACY  # the six short names of before; every key has RECONCILER_<SECTION>_<KEY>

UNSAFE_ENV = "RECONCILER_UNSAFE_DISABLE"
UNSAFE_SWITCHES = (
    "lock",
    "orphan_wait",
    "dirty",
    "affinity",
    "drift_once",
    "checksums",
    "dev_recheck",
    "http_shed",
    "revision_id_length",
    "retry_gate",
)
_LEVELS = ("debug", "info", "warning", "error")
_FORMATS = ("auto", "text", "json", "console")  # console: the former name of text
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _decode(path: Path, raw: bytes) -> str:
    """The config file's text: UTF-8, with or without a byte order mark (as most tools accept)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
            "save it as UTF-8, as TOML requires"
        ) from None


@dataclass
class _Source:
    """Where a raw value came from, for error messages."""

    values: dict[str, Any]
    origin: dict[tuple[str, str], str]


def _line_of(text: str, section: str, key: str) -> int | None:
    current = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[+\s*([^\]]+?)\s*\]+", stripped)
        if header:
            current = header.group(1)
            continue
        if current == section and re.match(rf"^{re.escape(key)}\s*=", stripped):
            return number
    return None


def _read_file(path: Path) -> _Source:
    try:
        text = _decode(path, path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; pass an existing file with --config or remove the option"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {redact(str(exc))}") from None
    except RecursionError:
        raise ConfigError(
            f"config file {path} nests arrays or tables too deeply to be read; "
            "flatten it (no setting is nested more than a few levels deep)"
        ) from None
    values: dict[str, Any] = {}
    origin: dict[tuple[str, str], str] = {}
    for section, body in data.items():
        if section in LIST_SECTIONS:
            if not isinstance(body, list) or not all(isinstance(b, dict) for b in body):
                raise ConfigError(f"{path}: alert sinks are written as [[{section}]] tables")
            values[section] = [dict(b) for b in body]
            for index, item in enumerate(body):
                for key in item:
                    origin[(f"{section}#{index}", key)] = f"{path} [[{section}]] #{index + 1}"
            continue
        if section not in SECTIONS:
            line = _section_line(text, section)
            raise ConfigError(
                f"{path}{line}: unknown section [{section}]"
                f"{_did_you_mean(section, [*SECTIONS, *LIST_SECTIONS])}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        values[section] = dict(body)
        if section == "target" and "chains" in body:
            _read_chains(path, values[section].pop("chains"), values, origin)
        for key in values[section]:
            line_no = _line_of(text, section, key)
            where = f"{path}:{line_no}" if line_no else str(path)
            origin[(section, key)] = where
    return _Source(values, origin)


def _read_chains(path: Path, body: Any, values: dict[str, Any], origin: dict[tuple[str, str], str]) -> None:
    if not isinstance(body, list) or not all(isinstance(b, dict) for b in body):
        raise ConfigError(
            f"{path}: more chains are written as [[target.chains]] tables, each with "
            "migrations and version_table"
        )
    values["target.chains"] = [dict(b) for b in body]
    for index, item in enumerate(body):
        for key in item:
            origin[(f"target.chains#{index}", key)] = f"{path} [[target.chains]] #{index + 1}"


def _section_line(text: str, section: str) -> str:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*\[+\s*{re.escape(section)}\s*\]+", line):
            return f":{number}"
    return ""


def _did_you_mean(word: str, choices: Mapping[str, Any] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _seconds(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: {name} must be a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{where}: {name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(
            f"{where}: {name} must be a finite number of seconds, got {value!r}; "
            "write a number such as 30 (inf and nan are not durations)"
        )
    if number < 0:
        raise ConfigError(f"{where}: {name} must not be negative, got {value!r}")
    return number


def _coerce(value: Any, hint: Any, where: str, name: str) -> Any:
    origin = get_origin(hint)
    if hint is float:
        return _seconds(value, where, name)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: {name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name} must be a whole number, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {name} must be a list of strings, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in value.items()
        ):
            raise ConfigError(f"{where}: {name} must be a table of strings, got {value!r}")
        return {k: str(v) for k, v in value.items()}
    raise AssertionError(f"unsupported setting type {hint!r}")  # pragma: no cover


def _build_section(
    section: str, raw: dict[str, Any], origin: dict[tuple[str, str], str], cls: type | None = None
) -> Any:
    cls = cls or SECTIONS[section]
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = origin.get((section, key), "configuration")
        if key not in known:
            raise ConfigError(
                f"{where}: unknown key '{key}' in [{section}]{_did_you_mean(key, sorted(known))}; "
                "`reconciler config --example` prints every key"
            )
        kwargs[key] = _coerce(value, hints[key], where, f"[{section}] {key}")
    return cls(**kwargs)


def _config_path(flag: str | None, environ: Mapping[str, str], cwd: Path) -> Path | None:
    if flag:
        return Path(flag).expanduser().resolve()
    if environ.get("RECONCILER_CONFIG"):
        return Path(environ["RECONCILER_CONFIG"]).expanduser().resolve()
    default = cwd / DEFAULT_CONFIG_NAME
    return default if default.is_file() else None


def _with_environment(
    source: _Source,
    raw: dict[str, dict[str, Any]],
    origin: dict[tuple[str, str], str],
    environ: Mapping[str, str],
) -> dict[str, list[dict[str, Any]]]:
    """Lay the RECONCILER_* variables over the file's values (in `raw` and `origin`); return the
    lists of tables ([[alerts]], [[target.chains]]), a variable's replacing the file's."""
    schema = {name: get_type_hints(cls) for name, cls in SECTIONS.items()}
    env = envsettings.read_environment(environ, schema, [*LIST_SECTIONS, *NESTED_LISTS])
    for section, body in env.values.items():
        raw.setdefault(section, {}).update(body)
    tables = {name: source.values.get(name, []) for name in (*LIST_SECTIONS, *NESTED_LISTS)}
    for name, items in env.tables.items():
        for stale in [k for k in origin if k[0].startswith(f"{name}#")]:
            del origin[stale]
        tables[name] = items
    origin.update(env.origin)
    return tables


def colour_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """`NO_COLOR` set to anything but the empty string (https://no-color.org)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get("NO_COLOR"))


def load_settings(
    config: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    require_url: bool = True,
    require_migrations: bool = True,
    resolve_alerts: bool = False,
    app_url: Callable[[Settings], AppUrl | None] | None = None,
) -> Settings:
    """Resolve the settings once: defaults < file < environment < flags; validate everything.

    With `require_url`, the database URL is settled too: a Flask project's default is its app's
    `SQLALCHEMY_DATABASE_URI` as the app resolves it, asked of a worker through `app_url`
    (default: `workerclient.resolve_app_url`); nothing is connected before this is settled."""
    environ = os.environ if environ is None else environ
    cwd = (cwd or Path.cwd()).resolve()
    path = _config_path(config, environ, cwd)
    source = _read_file(path) if path else _Source({}, {})
    raw: dict[str, dict[str, Any]] = {
        k: dict(v) for k, v in source.values.items() if k not in LIST_SECTIONS and k not in NESTED_LISTS
    }
    origin = dict(source.origin)
    tables = _with_environment(source, raw, origin, environ)
    for section, body in (overrides or {}).items():
        for key, value in body.items():
            if value is None:
                continue
            raw.setdefault(section, {})[key] = value
            origin[(section, key)] = f"option --{key.replace('_', '-')}"
    sections = {name: _build_section(name, raw.get(name, {}), origin) for name in SECTIONS}
    base_dir = path.parent if path else cwd
    target: TargetSettings = sections["target"]
    target = _resolve_target(target, environ, base_dir, origin, require_url)
    settings = Settings(
        target=target,
        apply=sections["apply"],
        journal=sections["journal"],
        logging=sections["logging"],
        config_file=path,
        base_dir=base_dir,
        daemon=sections["daemon"],
        dev=sections["dev"],
        alerting=sections["alerting"],
        drift=sections["drift"],
        safety=sections["safety"],
        alerts=_alert_sinks(
            tables.get("alerts", []),
            origin,
            environ,
            base_dir,
            resolve_alerts,
            sections["alerting"].allow_link_local,
        ),
        unsafe=_unsafe(environ),
        chains=_chains(tables.get("target.chains", []), origin),
    )
    _validate(settings, origin, require_migrations)
    if not require_url:
        return settings
    return settle_url(settings, origin, app_url or _app_url_in(environ))


_CHAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _chains(items: list[dict[str, Any]], origin: dict[tuple[str, str], str]) -> tuple[ChainSettings, ...]:
    """The [[target.chains]] tables, each complete (keys, names; directories are `_validate`'s)."""
    chains = []
    for index, item in enumerate(items):
        section = f"target.chains#{index}"
        where = f"[[target.chains]] #{index + 1}"
        chain: ChainSettings = _build_section(section, item, origin, ChainSettings)
        where = origin.get((section, "migrations"), where)
        for key in ("migrations", "version_table"):
            if not getattr(chain, key):
                raise ConfigError(
                    f"{where}: a chain needs {key} (its migrations directory and the version "
                    'table its env.py passes), e.g. migrations = "plugin_migrations", '
                    'version_table = "plugin_version"'
                )
        if not _TABLE_NAME.match(chain.version_table):
            raise ConfigError(
                f"{where}: version_table must be a plain table name, got {chain.version_table!r}"
            )
        name = chain.name or Path(chain.migrations).name
        if not _CHAIN_NAME.match(name) or name == MAIN_CHAIN:
            raise ConfigError(
                f"{where}: chain name {name!r} must be 1-40 letters, digits, _ . - and not "
                f"{MAIN_CHAIN!r} (the name of [target]'s own directory); set name"
            )
        chains.append(dataclasses.replace(chain, name=name))
    return tuple(chains)


def chain_settings(settings: Settings, chain: ChainSettings) -> Settings:
    """The settings of one more chain: [target] with its directory, version table and ini."""
    target = dataclasses.replace(
        settings.target,
        migrations=chain.migrations,
        version_table=chain.version_table,
        alembic_ini=chain.alembic_ini,
        known_differences="",
    )
    return dataclasses.replace(settings, target=target, chains=())


ALERT_KINDS = ("webhook", "slack")


def _alert_sinks(
    items: list[dict[str, Any]],
    origin: dict[tuple[str, str], str],
    environ: Mapping[str, str],
    base_dir: Path,
    resolve: bool,
    allow_link_local: bool = False,
) -> tuple[AlertSink, ...]:
    """[[alerts]] tables, each with its URL resolved (url, url_env or url_file) and masked.

    Only `run` sends alerts: other commands (an `apply` Job, a `wait` init container) check the
    tables' shape but neither need nor resolve the sinks' secrets."""
    sinks = []
    for index, item in enumerate(items):
        keyed = {("alerts", key): where for (sec, key), where in origin.items() if sec == f"alerts#{index}"}
        sink: AlertSink = _build_section("alerts", item, keyed, AlertSink)
        where = next(iter(keyed.values()), f"[[alerts]] #{index + 1}")  # the file's, or RECONCILER_ALERTS
        if sink.kind not in ALERT_KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(ALERT_KINDS)}, got {sink.kind!r}")
        if sink.url:  # a literal URL is checked by every command, secrets only by `run`
            _check_alert_url(sink.url, where, allow_link_local)
        if not resolve:
            continue
        url = sink.url or _sink_url_from(sink, environ, base_dir, where)
        _check_alert_url(url, where, allow_link_local)
        register_secret(_url_secret_part(url))
        sinks.append(dataclasses.replace(sink, url=url, name=sink.name or f"{sink.kind}{index + 1}"))
    return tuple(sinks)


def _check_alert_url(url: str, where: str, allow_link_local: bool) -> None:
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


def _sink_url_from(sink: AlertSink, environ: Mapping[str, str], base_dir: Path, where: str) -> str:
    if sink.url_env:
        value = environ.get(sink.url_env, "").strip()
        if not value:
            raise ConfigError(f"{where}: url_env names {sink.url_env}, which is not set or empty")
        return value
    if sink.url_file:
        path = resolve_path(base_dir, sink.url_file)
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{where}: url_file {path} cannot be read: {exc.strerror}") from None
    raise ConfigError(f"{where}: give url, url_env or url_file")


def _url_secret_part(url: str) -> str:
    """Everything after the host: webhook URLs carry their token in the path or query."""
    match = re.match(r"^https?://[^/?#]+(?P<rest>[/?#].*)?$", url)
    rest = (match.group("rest") if match else "") or ""
    return rest if len(rest) > 1 else ""


def _unsafe(environ: Mapping[str, str]) -> frozenset[str]:
    """Safeguards a test switches off to show the bad outcome they prevent (never in production)."""
    names = frozenset(n.strip() for n in environ.get(UNSAFE_ENV, "").split(",") if n.strip())
    unknown = sorted(names - set(UNSAFE_SWITCHES))
    if unknown:
        raise ConfigError(
            f"environment variable {UNSAFE_ENV}: unknown safeguard(s) {', '.join(unknown)}; "
            f"known: {', '.join(UNSAFE_SWITCHES)}"
        )
    return names


def _resolve_target(
    target: TargetSettings,
    environ: Mapping[str, str],
    base_dir: Path,
    origin: dict[tuple[str, str], str],
    require_url: bool,
) -> TargetSettings:
    url = target.url
    if not url and target.url_env:
        url = environ.get(target.url_env, "")
        if not url:
            where = origin.get(("target", "url_env"), "configuration")
            raise ConfigError(
                f"{where}: url_env names the environment variable {target.url_env}, "
                "which is not set or empty; set it or give [target] url"
            )
        origin[("target", "url")] = f"environment variable {target.url_env} (from url_env)"
    if url:
        url = normalize_url(url, base_dir, origin.get(("target", "url"), "the database URL"))
    elif not require_url:
        return dataclasses.replace(target, url="")
    # Without a URL yet, a Flask project's default is its app's (`settle_url`, after validation);
    # lock_url is resolved here all the same.
    lock_url = target.lock_url or (environ.get(target.lock_url_env, "") if target.lock_url_env else "")
    if target.lock_url_env and not lock_url:
        raise ConfigError(
            f"{origin.get(('target', 'lock_url_env'), '[target] lock_url_env')}: names "
            f"{target.lock_url_env}, which is not set or empty"
        )
    if lock_url:
        lock_url = normalize_url(lock_url, base_dir, origin.get(("target", "lock_url"), "lock_url"))
    name = target.name or (default_target_name(url) if url else "")
    return dataclasses.replace(target, url=url, lock_url=lock_url, name=name)


NO_URL = "no database URL: give --url, RECONCILER_URL, or [target] url / url_env in reconciler.toml"


def settle_url(
    settings: Settings,
    origin: dict[tuple[str, str], str],
    app_url: Callable[[Settings], AppUrl | None] | None = None,
) -> Settings:
    """The target's URL, settled against the Flask app's own (`[target] url` defaults to it).

    Without `url`, a Flask project's app is asked (through a worker) for the database it uses;
    with both, they must name the same database, or nothing runs (exit 2, both named). A project
    without `models` or `app` is not asked: there is no app to find; nor, when `url` is given, one
    whose models create no Flask app at import (an app factory's app exists only when called).
    """
    target = settings.target
    if not (target.models or target.app):
        if not target.url:
            raise ConfigError(NO_URL + _models_hint(settings.root_dir))
        return settings
    if target.url and not _may_have_flask_app(settings):
        return settings  # no app is made at import: nothing to compare with (and no worker to pay)
    if app_url is None:
        app_url = _app_url_in(os.environ)
    try:
        found = app_url(settings)
    except ReconcilerError as exc:
        if not target.url:
            raise
        # The URL is given: commands that never run user code (status, history) keep working
        # while the models do not import; every worker job reports the models' error itself.
        # Logged through the standard library: structlog is set up only once settings exist.
        logging.getLogger("reconciler.config").warning(
            "app_url_unknown: the Flask app's database URL could not be compared with [target] url: %s",
            redact(str(exc)),
        )
        return settings
    if found is None:
        if not target.url:
            raise ConfigError(
                f"{NO_URL}; no Flask app holding [target] models {target.models or target.app!r} "
                "was found to take SQLALCHEMY_DATABASE_URI from (an app factory is called only "
                "when [target] app names it)"
            )
        return settings
    where = f"SQLALCHEMY_DATABASE_URI of the Flask app {found.where}"
    app_db = normalize_url(found.url, settings.root_dir, where)
    if not target.url:
        origin[("target", "url")] = where
        name = target.name or default_target_name(app_db)
        return dataclasses.replace(settings, target=dataclasses.replace(target, url=app_db, name=name))
    if not same_database(target.url, app_db):
        configured = origin.get(("target", "url"), "[target] url")
        raise ConfigError(
            f"{configured} names the database {redact(target.url)}, but {where} is "
            f"{redact(app_db)}: the reconciler would migrate a database the app does not use. "
            "Remove [target] url to use the app's, or make the two name the same database"
        )
    return settings


def _app_url_in(environ: Mapping[str, str]) -> Callable[[Settings], AppUrl | None]:
    """The worker's lookup of the app's URL, in the environment the settings came from."""

    def lookup(settings: Settings) -> AppUrl | None:
        from reconciler.control.workerclient import resolve_app_url  # the worker side: imports config

        return resolve_app_url(settings, environ)

    return lookup


def _models_hint(root: Path) -> str:
    models = appsource.suggested_models(root)
    if not models:
        return ""
    return (
        f"; or, to use the Flask app's SQLALCHEMY_DATABASE_URI, name its db: [target] models = "
        f'"{models}" (or --models {models})'
    )


def _may_have_flask_app(settings: Settings) -> bool:
    """`[target] app` is set, or importing the models creates a Flask app (their source read, not
    imported): only then is there an app whose URI a worker could report."""
    target = settings.target
    if target.app:
        return True
    if not target.models:
        return False
    return appsource.creates_app_at_import(settings.root_dir, target.models.partition(":")[0])


_LOCAL = {"localhost", "127.0.0.1", "::1", ""}
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}


def same_database(first: str, second: str) -> bool:
    """Whether two URLs name one database: the same backend, server, user and database (SQLite:
    the same file). Drivers and passwords may differ."""
    from sqlalchemy.engine import make_url

    a, b = make_url(first), make_url(second)
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return _sqlite_file(a.database) == _sqlite_file(b.database)
    host_a, host_b = (a.host or "").lower(), (b.host or "").lower()
    same_host = host_a == host_b or (host_a in _LOCAL and host_b in _LOCAL)
    default = _DEFAULT_PORTS.get(a.get_backend_name())
    same_port = (a.port or default) == (b.port or default)
    return same_host and same_port and a.database == b.database and a.username == b.username


def _sqlite_file(database: str | None) -> str:
    if not database or database == ":memory:" or database.startswith("file:"):
        return database or ":memory:"
    return os.path.realpath(database)


def normalize_url(url: str, base_dir: Path, where: str) -> str:
    """Parse and check a URL; register its password as a secret; make SQLite paths absolute."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    register_url(url)
    if is_ambiguous(url):
        raise ConfigError(
            f"{where}: the URL '{redact(url)}' has more than one '@' before its host, so its "
            "password cannot be told from its host; URL-encode the password "
            "(an '@' in it is written %40: urllib.parse.quote(password, safe=''))"
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"{where}: '{redact(url)}' is not a database URL ({redact(str(exc))}); "
            "expected e.g. postgresql://user:password@host:5432/dbname or sqlite:///app.db"
        ) from None
    if parsed.drivername.split("+")[0] == "postgres":
        raise ConfigError(
            f"{where}: the URL '{redact(url)}' starts with postgres://, a name SQLAlchemy does not "
            "know; write postgresql:// instead (the rest of the URL stays as it is)"
        )
    try:
        dialect = parsed.get_dialect()
    except Exception as exc:  # NoSuchModuleError
        raise ConfigError(
            f"{where}: cannot use the database URL '{redact(url)}': {redact(str(exc))}; "
            "check the dialect name and install its driver (psycopg2-binary, pymysql)"
        ) from None
    _check_driver(dialect, parsed.get_backend_name(), url, where)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            absolute = resolve_path(base_dir, database)
            parsed = parsed.set(database=str(absolute))
        return parsed.render_as_string(hide_password=False)
    if not parsed.database:
        raise ConfigError(f"{where}: the URL '{redact(url)}' names no database; add /dbname at its end")
    return url


DRIVER_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def _check_driver(dialect: Any, backend: str, url: str, where: str) -> None:
    """Import the URL's database driver now: a missing one is the user's to install (exit 2)."""
    loader = getattr(dialect, "import_dbapi", None) or getattr(dialect, "dbapi", None)
    if loader is None:
        return
    try:
        loader()
    except ImportError as exc:
        module = getattr(exc, "name", None) or "its driver"
        extra = DRIVER_EXTRAS.get(backend)
        install = f"pip install 'schema-reconciler[{extra}]'" if extra else f"install {module}"
        hint = ""
        if extra == "mysql" and module != "pymysql":
            hint = f" and write the URL as {backend}+pymysql://..., the driver that extra installs"
        raise ConfigError(
            f"{where}: the database URL '{redact(url)}' needs the Python module {module}, which "
            f"is not installed here; {install}{hint}"
        ) from None


def default_target_name(url: str) -> str:
    from sqlalchemy.engine import make_url

    database = make_url(url).database or "db"
    stem = Path(database).stem if "/" in database or database.endswith(".db") else database
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:24] or "db"


def _validate(settings: Settings, origin: dict[tuple[str, str], str], need_dir: bool) -> None:
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
    from reconciler.core.drift import parse_rule

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


def setting_keys() -> dict[str, list[str]]:
    """Every section and key (used to check config.example.toml)."""
    every = {**SECTIONS, **LIST_SECTIONS, **NESTED_LISTS}
    return {name: [f.name for f in dataclasses.fields(cls)] for name, cls in every.items()}


def setting_defaults() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, cls in {**SECTIONS, **LIST_SECTIONS, **NESTED_LISTS}.items():
        instance = cls()
        out[name] = {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)}
    return out


EXAMPLE_NAME = "config.example.toml"


def example_config() -> str:
    """config.example.toml: every key with its default and a comment.

    A wheel carries it inside the package (setup.py copies the repository's file in at build
    time); a checkout or an editable install reads the repository's own, beside the package."""
    from importlib import resources

    packaged = resources.files("reconciler").joinpath(EXAMPLE_NAME)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parents[2] / EXAMPLE_NAME
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise ConfigError(
        f"{EXAMPLE_NAME} is missing from this installation (looked in {packaged} and {checkout}); "
        "reinstall schema-reconciler from a wheel or a complete checkout"
    )
