"""The known-differences file: differences between models and migrations a team accepts.

Real projects have some (enum types, unnamed constraints, indexes made only in migrations) that
autogenerate reports every time. `reconciler baseline` writes them to one committed JSON file;
`check`, dev mode and drift detection ignore what it lists. Each difference is identified by a
stable one-line `key` produced by the worker's compare.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from reconciler.config import Settings
from reconciler.errors import ConfigError

FILE_NAME = "known_differences.json"
FORMAT_VERSION = 1

Difference = Mapping[str, str]


def path_for(settings: Settings) -> Path:
    configured = settings.target.known_differences
    if configured:
        path = Path(configured)
        return path if path.is_absolute() else (settings.base_dir / path).resolve()
    return settings.migrations_dir / FILE_NAME


def load(path: Path) -> frozenset[str]:
    """The keys listed in the file; empty when there is no file."""
    if not path.is_file():
        return frozenset()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data["differences"]
        return frozenset(str(item["key"]) for item in items)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"known-differences file {path} is not valid ({exc}); regenerate it with "
            "`reconciler baseline`"
        ) from None


def unknown(differences: Iterable[Difference], known: frozenset[str]) -> list[Difference]:
    return [d for d in differences if d["key"] not in known]


def save(path: Path, differences: Iterable[Difference]) -> int:
    """Write the file atomically (sorted, one entry per difference); returns how many."""
    items = sorted(
        ({"key": d["key"], "text": d.get("text", d["key"])} for d in differences),
        key=lambda d: d["key"],
    )
    body = json.dumps({"version": FORMAT_VERSION, "differences": items}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(items)
