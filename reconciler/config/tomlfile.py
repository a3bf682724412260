"""The config file: its TOML text read into raw values, each with the place it came from."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import ConfigError
from reconciler.redact import redact
from reconciler.settings import LIST_SECTIONS, SECTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
class Source:
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


def read_file(path: Path) -> Source:
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
                f"{did_you_mean(section, [*SECTIONS, *LIST_SECTIONS])}"
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
    return Source(values, origin)


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


def did_you_mean(word: str, choices: Mapping[str, Any] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
