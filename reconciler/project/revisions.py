"""The revision files on disk: which files, their parsed headers (cached) and the graph they form.

File selection follows Alembic: every `*.py` in the versions directories except names starting
with `__init__` or `.#`; `__pycache__` is skipped; sourceless `.pyc` files are ignored; with
`recursive`, subdirectories are walked too.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from reconciler.core.graph import MissingRevision, Revision, RevisionGraph, build_graph
from reconciler.core.headers import (
    NotARevisionFile,
    RevisionFileError,
    combined_error,
    parse_revision_source,
    revision_from_values,
    source_hash,
)
from reconciler.errors import ConfigError

_REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")
_LEGACY_NAME = re.compile(r"[a-f0-9]+\.py$")  # Alembic 0.1 files: the id is the file name


# --- one file ---------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    """The file's bytes; FileNotFoundError passes through (a file removed while we list)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read revision file {path}: {exc.strerror}; check its permissions") from exc


def parse_revision_file(path: Path) -> Revision | None:
    """Read one revision file's headers without executing it.

    Returns the `Revision`, or None when a header is not a literal (execute it in the worker).
    Raises `NotARevisionFile` when the file assigns no `revision`, `RevisionSyntaxError` when it
    does not parse, `RevisionFileError` when a header literal has the wrong type, `ConfigError`
    when it cannot be read.
    """
    return parse_revision_source(_read(path), path)


def revision_from_headers(headers: Mapping[str, object]) -> Revision:
    """A `Revision` from the header values the worker read by executing a file (see
    `headers.revision_from_values`). The file hash is always computed here from the file, so it
    does not depend on the worker's interpreter.
    """
    path = Path(str(headers["path"]))
    try:
        file_hash = source_hash(_read(path))
    except FileNotFoundError as exc:
        raise MissingRevision(
            f"revision file {path} disappeared while it was being read; it is read again on the next change",
            path,
            str(headers.get("revision", "")),
            str(headers.get("revision", "")),
        ) from exc
    return revision_from_values(headers, file_hash)


class ParseCache:
    """Parsed files keyed by path, reused while (size, mtime_ns, inode) stay the same."""

    def __init__(self) -> None:
        self._entries: dict[Path, tuple[tuple[int, int, int], Revision | None]] = {}

    def parse(self, path: Path) -> Revision | None:
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        hit = self._entries.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        revision = parse_revision_file(path)
        self._entries[path] = (key, revision)
        return revision

    def keep_only(self, paths: Iterable[Path]) -> None:
        wanted = set(paths)
        for path in [p for p in self._entries if p not in wanted]:
            del self._entries[path]


# --- files and directories --------------------------------------------------------------------


def _symlink_loop(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} is a loop of symbolic links; replace it with the real file or directory (or a link to it)"
    )


def _walk(directory: Path, recursive: bool) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return
    subdirs: list[Path] = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and bool(_REVISION_FILE.match(entry.name)) and entry.is_file()
        except OSError:  # ELOOP: a symbolic link that leads back to itself
            raise _symlink_loop(Path(entry.path)) from None
        if is_dir:  # like os.walk, symlinked directories are not descended into
            if not entry.name.endswith("__pycache__") and not entry.is_symlink():
                subdirs.append(Path(entry.path))
        elif is_file:
            yield Path(entry.path)
    if recursive:
        for sub in subdirs:
            yield from _walk(sub, recursive)


def revision_files(version_dirs: Sequence[Path], recursive: bool = False) -> list[Path]:
    """The candidate revision files, in directory order; missing directories are skipped."""
    seen: set[Path] = set()
    files: list[Path] = []
    for directory in version_dirs:
        try:
            real = directory.resolve()
        except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
            raise _symlink_loop(directory) from None
        if real in seen or not real.is_dir():
            continue
        seen.add(real)
        files.extend(_walk(directory, recursive))
    return files


def graph_fingerprint_of_dir(version_dirs: Sequence[Path], recursive: bool = True) -> str:
    """A cheap stat fingerprint (names, sizes, mtimes, inodes): reload the graph when it changes.

    Subdirectories count by default, which can only cause an extra reload; pass the same
    `recursive` as `load_graph` to be exact.
    """
    parts: list[str] = [repr([str(d) for d in version_dirs])]
    for path in revision_files(version_dirs, recursive):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        parts.append(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}")
    return hashlib.sha256("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


def load_graph(
    version_dirs: Sequence[Path], recursive: bool = False, cache: ParseCache | None = None
) -> tuple[RevisionGraph, list[Path]]:
    """The graph of the literal revisions, and the files the worker must execute.

    When that list is not empty the graph is `partial` (not `complete`): build the full one with
    `build_graph([*graph.revisions.values(), *worker_revisions])`. Files that cannot be used
    (syntax errors, no `revision`, bad header types) are all reported in one `RevisionFileError`.
    """
    revisions: list[Revision] = []
    fallback: list[Path] = []
    problems: list[RevisionFileError] = []
    paths = revision_files(version_dirs, recursive)
    for path in paths:
        try:
            revision = cache.parse(path) if cache is not None else parse_revision_file(path)
        except FileNotFoundError:
            continue  # removed while we listed: it is not there
        except NotARevisionFile as exc:
            if _LEGACY_NAME.match(path.name):
                fallback.append(path)
            else:
                problems.append(exc)
            continue
        except RevisionFileError as exc:
            problems.append(exc)
            continue
        if revision is None:
            fallback.append(path)
        else:
            revisions.append(revision)
    if cache is not None:
        cache.keep_only(paths)
    if problems:
        raise combined_error(problems)
    return build_graph(revisions, partial=bool(fallback)), fallback
