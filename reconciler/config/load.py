"""Configuration: TOML file → `RECONCILER_*` environment → CLI flags, resolved once into frozen settings.

The environment comes from `processenv` (the one reader of `os.environ`). Everything is checked
here (`validate`), before any connection is attempted: unknown keys (with a "did you mean"), wrong
types, missing values, malformed URLs, a missing migrations directory, a models path that names no
module.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from reconciler import sessions
from reconciler.config import appsource
from reconciler.config import environment as envsettings
from reconciler.config.coerce import build_section
from reconciler.config.processenv import process_environment
from reconciler.config.tomlfile import Source, read_file
from reconciler.config.urls import default_target_name, normalize_url, same_database
from reconciler.config.validate import ALERT_KINDS, check_alert_url, validate
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.redact import redact, register_secret
from reconciler.settings import (
    LIST_SECTIONS,
    MAIN_CHAIN,
    NESTED_LISTS,
    SECTIONS,
    AlertSink,
    AppUrl,
    ChainSettings,
    Settings,
    TargetSettings,
    resolve_path,
)

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

# The worker's lookup of a Flask app's URL (`control.appurl.resolve_app_url`), run in the
# environment the settings were resolved in. Passed in by the caller: config sits below control.
AppUrlLookup = Callable[[Settings, Mapping[str, str]], "AppUrl | None"]


def _config_path(flag: str | None, environ: Mapping[str, str], cwd: Path) -> Path | None:
    if flag:
        return Path(flag).expanduser().resolve()
    if environ.get("RECONCILER_CONFIG"):
        return Path(environ["RECONCILER_CONFIG"]).expanduser().resolve()
    default = cwd / DEFAULT_CONFIG_NAME
    return default if default.is_file() else None


def _with_environment(
    source: Source,
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
    environ = process_environment() if environ is None else environ
    return bool(environ.get("NO_COLOR"))


def load_settings(
    config: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    require_url: bool = True,
    require_migrations: bool = True,
    resolve_alerts: bool = False,
    app_url: AppUrlLookup | None = None,
) -> Settings:
    """Resolve the settings once: defaults < file < environment < flags; validate everything.

    With `require_url`, the database URL is settled too: a Flask project's default is its app's
    `SQLALCHEMY_DATABASE_URI` as the app resolves it, asked of a worker through `app_url` (the
    caller passes `control.appurl.resolve_app_url`; without it, a project that needs the
    app's URL is refused); nothing is connected before this is settled. The replica id's host is
    taken from the same environment (`HOSTNAME`, else the host name)."""
    environ = process_environment() if environ is None else environ
    sessions.set_replica_host(environ.get("HOSTNAME", ""))
    cwd = (cwd or Path.cwd()).resolve()
    path = _config_path(config, environ, cwd)
    source = read_file(path) if path else Source({}, {})
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
    sections = {name: build_section(name, raw.get(name, {}), origin) for name in SECTIONS}
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
        fleet=sections["fleet"],
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
    validate(settings, origin, require_migrations)
    if not require_url:
        return settings
    return settle_url(settings, origin, _in_environment(app_url, environ) if app_url else None)


_CHAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _chains(items: list[dict[str, Any]], origin: dict[tuple[str, str], str]) -> tuple[ChainSettings, ...]:
    """The [[target.chains]] tables, each complete (keys, names; directories are `_validate`'s)."""
    chains = []
    for index, item in enumerate(items):
        section = f"target.chains#{index}"
        where = f"[[target.chains]] #{index + 1}"
        chain: ChainSettings = build_section(section, item, origin, ChainSettings)
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
        sink: AlertSink = build_section("alerts", item, keyed, AlertSink)
        where = next(iter(keyed.values()), f"[[alerts]] #{index + 1}")  # the file's, or RECONCILER_ALERTS
        if sink.kind not in ALERT_KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(ALERT_KINDS)}, got {sink.kind!r}")
        if sink.url:  # a literal URL is checked by every command, secrets only by `run`
            check_alert_url(sink.url, where, allow_link_local)
        if not resolve:
            continue
        url = sink.url or _sink_url_from(sink, environ, base_dir, where)
        check_alert_url(url, where, allow_link_local)
        register_secret(_url_secret_part(url))
        sinks.append(dataclasses.replace(sink, url=url, name=sink.name or f"{sink.kind}{index + 1}"))
    return tuple(sinks)


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
    app_url: Callable[[Settings], AppUrl | None] | None,
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
        raise TypeError(
            "load_settings(app_url=...) is needed to settle the URL of a project with a Flask app: "
            "pass control.appurl.resolve_app_url"
        )
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


def _in_environment(app_url: AppUrlLookup, environ: Mapping[str, str]) -> Callable[[Settings], AppUrl | None]:
    """The lookup of the app's URL, in the environment the settings came from."""

    def lookup(settings: Settings) -> AppUrl | None:
        return app_url(settings, environ)

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
