"""The known-differences file: differences between models and migrations a team accepts.

Real projects have some (enum types, unnamed constraints, indexes made only in migrations) that
autogenerate reports every time. `reconciler baseline` writes them to one committed JSON file;
`check`, dev mode and drift detection ignore what it lists.

A difference is accepted whole: its `key` (kind and object, e.g. `modify_type invoice.bill_type`)
and its `detail` (both sides' values, e.g. `database ENUM bill_type('paid', 'free'); models ...`),
as the worker's compare makes them. A later change to the same object (the column altered to
`varchar(5)`) has another detail, so it is reported again. Differences depend on the dialect, so
the file keeps one list per dialect (the URL's backend name: `sqlite`, `postgresql`, `mysql`,
`mariadb`); `baseline` replaces only the list of the dialect it ran on.

Files of format 1 (one list, keys only) still load. Their entries apply to every dialect that has
no list of its own yet, matched by key alone, except `modify_*` entries: those named a column but
not the values accepted, so they match nothing and the difference is reported until `baseline`
is run again on that dialect (which writes format 2 and keeps the old list for the others).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import logs
from reconciler.errors import ConfigError
from reconciler.settings import Settings

FILE_NAME = "known_differences.json"
FORMAT_VERSION = 2
LEGACY = "differences"  # format 1's one list, kept for the dialects without a list of their own
_UNTRUSTED_LEGACY = "modify_"  # format-1 kinds whose key does not say which values were accepted

Difference = Mapping[str, str]
log = logs.get("reconciler.differences")


@dataclass(frozen=True)
class Known:
    """The accepted differences of one dialect: (key, detail) pairs; detail None: the key alone
    (a format-1 entry, or a key given by hand)."""

    entries: frozenset[tuple[str, str | None]] = frozenset()

    @classmethod
    def of_keys(cls, keys: Iterable[str]) -> Known:
        return cls(frozenset((str(k), None) for k in keys))

    def matches(self, difference: Difference) -> bool:
        key = str(difference.get("key", ""))
        return (key, str(difference.get("detail", ""))) in self.entries or (key, None) in self.entries

    def wire(self) -> list[dict[str, str | None]]:
        """As the worker's `generate` request takes them."""
        return [{"key": k, "detail": d} for k, d in sorted(self.entries, key=_sort_key)]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({k for k, _d in self.entries}))

    def __len__(self) -> int:
        return len(self.entries)


def _sort_key(entry: tuple[str, str | None]) -> tuple[str, str]:
    return entry[0], entry[1] or ""


def dialect_of(url: str) -> str:
    """The backend name of a URL (`postgresql+psycopg://...` -> `postgresql`)."""
    backend = url.split(":", 1)[0].split("+", 1)[0].strip().lower()
    return "postgresql" if backend == "postgres" else backend


def path_for(settings: Settings) -> Path:
    configured = settings.target.known_differences
    if configured:
        path = Path(configured)
        return path if path.is_absolute() else (settings.base_dir / path).resolve()
    return settings.migrations_dir / FILE_NAME


def load_for(settings: Settings) -> Known:
    """The known differences of the target's dialect."""
    return load(path_for(settings), dialect_of(settings.target.url))


def load(path: Path, dialect: str) -> Known:
    """The differences the file accepts on `dialect`; none when there is no file."""
    data = _read(path)
    if data is None:
        return Known()
    lists = data.get("dialects") or {}
    if dialect in lists:
        return Known(frozenset((str(e["key"]), str(e.get("detail", ""))) for e in lists[dialect]))
    return _legacy(path, dialect, data.get(LEGACY) or [])


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        for entries in [data.get(LEGACY) or [], *(data.get("dialects") or {}).values()]:
            for entry in entries:
                str(entry["key"])
        return data
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"known-differences file {path} is not valid ({exc}); fix it (see its history in "
            "version control), or delete it and run `reconciler baseline` on each dialect"
        ) from None


def _legacy(path: Path, dialect: str, entries: list[Any]) -> Known:
    keys = [str(e["key"]) for e in entries]
    trusted = [k for k in keys if not k.startswith(_UNTRUSTED_LEGACY)]
    if len(trusted) < len(keys):
        log.warning(
            "known_differences_outdated",
            file=str(path),
            dialect=dialect,
            unmatched=sorted(set(keys) - set(trusted)),
            next_step=f"review them and run `reconciler baseline` on {dialect}",
        )
    return Known.of_keys(trusted)


def unknown(differences: Iterable[Difference], known: Known) -> list[Difference]:
    return [d for d in differences if not known.matches(d)]


def save(path: Path, differences: Iterable[Difference], dialect: str) -> int:
    """Write `dialect`'s list (sorted, one entry per difference), keeping the other dialects'
    lists, atomically; returns how many were written."""
    data = _read(path) or {}
    items = sorted(
        (
            {"key": d["key"], "detail": d.get("detail", ""), "text": d.get("text", d["key"])}
            for d in differences
        ),
        key=lambda d: (d["key"], d["detail"]),
    )
    lists = dict(data.get("dialects") or {})
    lists[dialect] = items
    body: dict[str, Any] = {"version": FORMAT_VERSION, "dialects": dict(sorted(lists.items()))}
    if data.get(LEGACY):
        body[LEGACY] = data[LEGACY]
    _write(path, json.dumps(body, indent=2) + "\n")
    return len(items)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
