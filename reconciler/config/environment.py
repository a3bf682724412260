"""`RECONCILER_<SECTION>_<KEY>` environment variables → raw setting values, each with its origin.

Every key of the settings schema has a variable: `[daemon] interval` is `RECONCILER_DAEMON_INTERVAL`,
`[target] x_args` is `RECONCILER_TARGET_X_ARGS`. A value is written as in the file, without TOML's
quotes for a string: numbers and `true` / `false` as they are; a list as a TOML or JSON array
(`["app", "lib"]`) or comma-separated (`app,lib`); a table as a TOML inline table or a JSON object
(`{tenant = "acme"}`, `{"tenant": "acme"}`). The lists of tables (`[[alerts]]`,
`[[target.chains]]`) are one variable each (`RECONCILER_ALERTS`, `RECONCILER_TARGET_CHAINS`)
holding an array of tables, which replaces the file's. An empty variable counts as unset.

The six short names of before (`RECONCILER_URL`, `_MIGRATIONS`, `_MODELS`, `_MODE`, `_INTERVAL`,
`_HTTP`) keep working; set beside their long name with another value, they are refused.

A variable under a section's prefix that names no key is an error with a "did you mean", and so is
one that is one typo away from a known name; the tool's own variables (`RECONCILER_CONFIG`,
`RECONCILER_UNSAFE_DISABLE`, `RECONCILER_PYTHON`, `RECONCILER_TEST_*`) and any other unrelated
`RECONCILER_*` name are left alone. This module never reads `os.environ`: `config` passes it in.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_origin

from reconciler.errors import ConfigError
from reconciler.redact import redact

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PREFIX = "RECONCILER_"
# The short names of before: still read, at the same level as the long names.
LEGACY: dict[str, tuple[str, str]] = {
    "RECONCILER_URL": ("target", "url"),
    "RECONCILER_MIGRATIONS": ("target", "migrations"),
    "RECONCILER_MODELS": ("target", "models"),
    "RECONCILER_MODE": ("daemon", "mode"),
    "RECONCILER_INTERVAL": ("daemon", "interval"),
    "RECONCILER_HTTP": ("daemon", "http"),
}
# Variables of the tool itself, not settings: the config file, the negative-control switch, the
# interpreter scripts/_venv.sh builds .venv with, and the test suite's own knobs.
RESERVED = frozenset({"RECONCILER_CONFIG", "RECONCILER_UNSAFE_DISABLE", "RECONCILER_PYTHON"})
RESERVED_PREFIXES = ("RECONCILER_TEST_",)
_TABLE_EXAMPLE = 'a table such as {tenant = "acme"} (TOML) or {"tenant": "acme"} (JSON)'
_TYPO_CUTOFF = 0.85  # how close (difflib ratio, after the prefix) an unknown name must be to a known one


@dataclass
class EnvValues:
    """What the environment sets: section → key → value, the lists of tables, and the origins."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)


def variable_name(section: str, key: str = "") -> str:
    """`("daemon", "interval")` → `RECONCILER_DAEMON_INTERVAL`; `("target.chains",)` →
    `RECONCILER_TARGET_CHAINS`."""
    name = PREFIX + section.replace(".", "_").upper()
    return f"{name}_{key.upper()}" if key else name


def read_environment(
    environ: Mapping[str, str],
    schema: Mapping[str, Mapping[str, Any]],
    table_lists: Iterable[str],
) -> EnvValues:
    """The settings the environment sets. `schema` is section → key → type hint; `table_lists`
    the names of the lists of tables (`alerts`, `target.chains`)."""
    keys = {variable_name(s, k): (s, k) for s, hints in schema.items() for k in hints}
    lists = {variable_name(name): name for name in table_lists}
    found = EnvValues()
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in RESERVED or name.startswith(RESERVED_PREFIXES):
            continue
        text = environ[name]
        if name in keys or name in LEGACY:
            section, key = keys.get(name) or LEGACY[name]
            if text:
                _set(found, environ, name, section, key, parse_value(text, schema[section][key], name))
        elif name in lists:
            if text:
                found.tables[lists[name]] = _tables(text, name)
                _table_origins(found, lists[name], name)
        else:
            _refuse_unknown(name, schema, lists, [*keys, *lists, *LEGACY, *RESERVED])
    return found


def _set(found: EnvValues, environ: Mapping[str, str], name: str, section: str, key: str, value: Any) -> None:
    """One value; a short and a long name for the same key must agree (whichever is read first)."""
    where = f"environment variable {name}"
    previous = found.origin.get((section, key))
    if previous is not None:
        other = previous.removeprefix("environment variable ")
        if environ.get(other) != environ.get(name):
            raise ConfigError(
                f"environment variables {other} and {name} both set [{section}] {key}, to "
                f"different values; keep {variable_name(section, key)} and unset the other"
            )
        return
    found.values.setdefault(section, {})[key] = value
    found.origin[(section, key)] = where


def _table_origins(found: EnvValues, list_name: str, name: str) -> None:
    for index, item in enumerate(found.tables[list_name]):
        for key in item:
            found.origin[(f"{list_name}#{index}", key)] = f"environment variable {name} #{index + 1}"


def parse_value(text: str, hint: Any, name: str) -> Any:
    """A variable's text as the file's TOML value would be: the config's own type checks (and
    their messages, naming the variable) then apply to it as to a value from the file."""
    origin = get_origin(hint)
    if hint is int and re.fullmatch(r"\s*[+-]?\d+\s*", text):
        return int(text)
    if hint in (float, bool):
        return text.strip()
    if origin is list and text.lstrip().startswith("["):
        return _literal(text, name, 'a list such as ["app", "lib"] (TOML or JSON) or app,lib')
    if origin is dict:
        if not text.lstrip().startswith("{"):
            raise ConfigError(f"environment variable {name}: expected {_TABLE_EXAMPLE}, got {redact(text)!r}")
        return _literal(text, name, _TABLE_EXAMPLE)
    return text


def _literal(text: str, name: str, expected: str) -> Any:
    """A JSON value, else a TOML one (an inline table or an array)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"environment variable {name}: expected {expected}; it is neither JSON nor TOML "
            f"({redact(str(exc))})"
        ) from None


def _tables(text: str, name: str) -> list[dict[str, Any]]:
    """An array of tables. Its text is never echoed: an alert sink's URL carries a token."""
    expected = 'an array of tables such as [{kind = "slack", url_env = "SLACK_URL"}] (TOML or JSON)'
    if not text.lstrip().startswith("["):
        raise ConfigError(f"environment variable {name}: expected {expected}")
    value = _literal(text, name, expected)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"environment variable {name}: expected {expected}")
    return [dict(item) for item in value]


def _refuse_unknown(
    name: str, schema: Mapping[str, Mapping[str, Any]], lists: Mapping[str, str], known: list[str]
) -> None:
    """A name under a section's prefix, or one typo away from a known name, is a mistake; any
    other `RECONCILER_*` variable is someone else's and is left alone."""
    rest = name[len(PREFIX) :]
    close = difflib.get_close_matches(rest, [k[len(PREFIX) :] for k in known], n=1, cutoff=_TYPO_CUTOFF)
    hint = f" (did you mean {PREFIX}{close[0]}?)" if close else ""
    listed = next((v for v, n in lists.items() if name.startswith(v + "_")), None)
    section = next((s for s in schema if name.startswith(variable_name(s) + "_")), None)
    if listed is not None:
        where = f"[[{lists[listed]}]] is set whole, as {listed} holding an array of tables"
    elif section is not None:
        where = f"no key of [{section}] is called {name[len(variable_name(section)) + 1 :].lower()!r}"
    elif close:
        where = "no setting has this name"
    else:
        return
    raise ConfigError(
        f"environment variable {name}: {where}{hint}; every key is RECONCILER_<SECTION>_<KEY> "
        "(`reconciler config --example` lists them)"
    )
