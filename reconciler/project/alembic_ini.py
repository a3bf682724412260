"""The one alembic.ini resolver: which alembic.ini a target uses, its options, its version locations."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.settings import Settings

_SEPARATORS = {"space": " ", "newline": "\n", "os": os.pathsep, ":": ":", ";": ";"}
_LEGACY_SPLIT = re.compile(r", *|(?: +)")


def alembic_ini_path(settings: Settings) -> Path | None:
    """The alembic.ini in use: configured, else <migrations>/alembic.ini, else <root>/alembic.ini."""
    if settings.target.alembic_ini:
        path = Path(settings.target.alembic_ini)
        return path if path.is_absolute() else (settings.base_dir / path).resolve()
    for candidate in (settings.migrations_dir / "alembic.ini", settings.root_dir / "alembic.ini"):
        if candidate.is_file():
            return candidate
    return None


def read_option(alembic_ini: Path, name: str) -> str | None:
    """`[alembic] <name>` of this alembic.ini (`%(here)s` expanded), None when it is not set."""
    return _option(_read_ini(alembic_ini), name, alembic_ini)


def _read_ini(alembic_ini: Path) -> configparser.ConfigParser:
    here = str(alembic_ini.resolve().parent).replace("%", "%%")
    parser = configparser.ConfigParser(defaults={"here": here})
    try:
        with alembic_ini.open(encoding="utf-8") as handle:
            parser.read_file(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read {alembic_ini}: {exc.strerror}; fix [target] alembic_ini") from exc
    except configparser.Error as exc:
        raise ConfigError(f"{alembic_ini} is not a valid ini file: {exc}; fix it") from exc
    return parser


def _option(parser: configparser.ConfigParser, name: str, ini: Path) -> str | None:
    if not parser.has_section("alembic") or not parser.has_option("alembic", name):
        return None
    try:
        return parser.get("alembic", name)
    except configparser.Error as exc:
        raise ConfigError(f"{ini}: [alembic] {name}: {exc}; fix the value") from exc


def _split_locations(value: str, parser: configparser.ConfigParser, ini: Path) -> list[str]:
    for key in ("path_separator", "version_path_separator"):
        sep_name = _option(parser, key, ini)
        if sep_name is not None:
            break
    else:
        return [part for part in _LEGACY_SPLIT.split(value.strip()) if part]
    if sep_name not in _SEPARATORS:
        raise ConfigError(
            f"{ini}: [alembic] {key} = {sep_name!r} is not one of "
            f"{', '.join(sorted(_SEPARATORS))}; fix the value"
        )
    return [part.strip() for part in value.split(_SEPARATORS[sep_name]) if part.strip()]


def versions_dirs(migrations_dir: Path, alembic_ini: Path | None, root: Path) -> tuple[list[Path], bool]:
    """The directories holding the revision files, and whether to walk them recursively.

    Default: `<migrations_dir>/versions`. alembic.ini's `[alembic]` section may set
    `version_locations` (split on `path_separator` / `version_path_separator`, else on spaces
    and commas, as Alembic does; `%(here)s` is the ini's folder) and
    `recursive_version_locations = true`. A relative location is taken from `root` (the project
    root, where `alembic` / `flask db` are run from). Package-resource locations are not
    supported.
    """
    default = [migrations_dir / "versions"]
    if alembic_ini is None:
        return default, False
    parser = _read_ini(alembic_ini)
    recursive = _option(parser, "recursive_version_locations", alembic_ini) == "true"
    value = _option(parser, "version_locations", alembic_ini)
    if not value or not value.strip():
        return default, recursive
    dirs: list[Path] = []
    for location in _split_locations(value, parser, alembic_ini):
        if not os.path.isabs(location) and ":" in location:
            raise ConfigError(
                f"{alembic_ini}: version location {location!r} is a package resource, which "
                "reconciler cannot read without importing; use a directory path"
            )
        path = Path(location).expanduser()
        dirs.append(path if path.is_absolute() else root / path)
    return dirs, recursive
