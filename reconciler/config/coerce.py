"""Raw setting values → typed ones, each refusal naming where the value came from."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, get_origin, get_type_hints

from reconciler.config.tomlfile import did_you_mean
from reconciler.errors import ConfigError
from reconciler.settings import SECTIONS


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


def build_section(
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
                f"{where}: unknown key '{key}' in [{section}]{did_you_mean(key, sorted(known))}; "
                "`reconciler config --example` prints every key"
            )
        kwargs[key] = _coerce(value, hints[key], where, f"[{section}] {key}")
    return cls(**kwargs)
