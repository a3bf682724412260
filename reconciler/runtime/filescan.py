"""Listing and fingerprinting the files under watched paths by stat, and the ignore rules (no watchdog).

What the watcher reports and the fingerprint polled when watching fails agree because both use
these: `DEFAULT_IGNORE` (editor and tool droppings), an ignore pattern without a `/` matching one
name, one with a `/` a whole path, and `exclude` directories whose files never count.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

DEFAULT_IGNORE: tuple[str, ...] = (
    "__pycache__",  # bytecode cache directories
    "*.pyc",  # bytecode files
    "*.pyo",  # optimised bytecode (older Pythons)
    "*.swp",  # Vim swap file
    "*.swo",  # Vim second swap file
    "*.swx",  # Vim swap probe written on open
    "4913",  # Vim's "can I write here" probe file
    "*~",  # Vim / Emacs backup files
    ".#*",  # Emacs lock symlinks
    "#*#",  # Emacs auto-save files
    "*.tmp",  # temporary files of atomic savers
    "*___jb_tmp___",  # JetBrains IDE safe-write temporary file
    "*___jb_old___",  # JetBrains IDE safe-write previous version
    "*.kate-swp",  # Kate swap file
    ".DS_Store",  # macOS Finder metadata
    ".git",  # git metadata (git-sync checkouts keep one)
    ".mypy_cache",  # tool caches that live beside the code
    ".pytest_cache",
    ".ruff_cache",
)

_MAX_SYMLINK_HOPS = 40


def fingerprint(
    paths: Sequence[Path],
    suffixes: Sequence[str] | None = (".py",),
    ignore: Sequence[str] = DEFAULT_IGNORE,
    exclude: Sequence[Path] = (),
) -> str:
    """A cheap digest of the files under `paths`: names, sizes and mtime_ns, following symlinks.

    It changes when a matching file is added, modified (size or mtime), deleted or renamed, or when
    a path resolves to another directory (a swapped symlink); it is stable otherwise.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        real = os.path.realpath(path)
        digest.update(f"root\0{path}\0{real}\n".encode("utf-8", "surrogateescape"))
        for rel, size, mtime_ns in sorted(_stat_files(str(path), real, suffixes, ignore, exclude)):
            digest.update(f"{rel}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def files_under(
    paths: Sequence[Path],
    suffixes: Sequence[str] | None = (".py",),
    ignore: Sequence[str] = DEFAULT_IGNORE,
    exclude: Sequence[Path] = (),
) -> list[Path]:
    """The matching files under `paths`, spelled under each path as configured (as events are)."""
    out: list[Path] = []
    for path in paths:
        found = _stat_files(str(path), os.path.realpath(path), suffixes, ignore, exclude)
        out.extend(path / rel if rel else path for rel, _size, _mtime in found)
    return out


def _stat_files(
    spelled: str,
    root: str,
    suffixes: Sequence[str] | None,
    ignore: Sequence[str],
    exclude: Sequence[Path] = (),
) -> Iterator[tuple[str, int, int]]:
    if os.path.isfile(root):
        try:
            stat = os.stat(root)
        except OSError:  # deleted meanwhile
            return
        yield "", stat.st_size, stat.st_mtime_ns
        return
    seen: set[tuple[int, int]] = set()
    excluded = real_dirs(exclude)
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            stat = os.stat(directory)
            if (stat.st_dev, stat.st_ino) in seen:  # a symlink loop
                continue
            seen.add((stat.st_dev, stat.st_ino))
            entries = list(os.scandir(directory))
        except OSError:  # vanished or unreadable meanwhile: the digest still differs from before
            continue
        for entry in entries:
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir()
                if ignored_at(rel, f"{spelled}/{rel}", is_dir, ignore):
                    continue
                if is_dir:
                    if not under(os.path.realpath(entry.path), excluded):
                        stack.append((entry.path, rel + "/"))
                elif wanted(entry.name, suffixes):
                    stat = entry.stat()
                    yield rel, stat.st_size, stat.st_mtime_ns
            except OSError:  # a dangling symlink or a file deleted between scandir and stat
                continue


def ignored_at(rel: str, full: str, is_dir: bool, ignore: Sequence[str]) -> bool:
    """Whether `rel` (a path under a watched path, `/`-separated; `full` spelled with that path)
    is ignored: a pattern without `/` is matched against its name, one with `/` against the
    whole path (relative or full; a directory's also with a trailing `/`, so `*/migrations/*`
    covers the directory itself). Callers check each directory on the way down too."""
    name = rel.rsplit("/", 1)[-1]
    full = full.replace(os.sep, "/")
    spellings = (rel, full, rel + "/", full + "/") if is_dir else (rel, full)
    for pattern in ignore:
        if "/" not in pattern:
            if fnmatchcase(name, pattern):
                return True
        elif any(fnmatchcase(one, pattern) for one in spellings):
            return True
    return False


def real_dirs(paths: Sequence[Path]) -> tuple[str, ...]:
    return tuple(os.path.realpath(p).rstrip(os.sep) for p in paths)


def under(real: str, dirs: Sequence[str]) -> bool:
    return any(real == d or real.startswith(d + os.sep) for d in dirs)


def wanted(name: str, suffixes: Sequence[str] | None) -> bool:
    return suffixes is None or name.endswith(tuple(suffixes))


def deciding_dirs(path: str) -> set[str]:
    """The directories whose entries decide what `path` resolves to.

    Those are the directories holding each symlink met while resolving it, and the parent of the
    result (so a deleted and recreated directory is noticed too).
    """
    dirs: set[str] = set()
    parts = list(Path(os.path.abspath(path)).parts)
    current = parts.pop(0)  # the filesystem root
    hops = 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        if os.path.islink(candidate) and hops < _MAX_SYMLINK_HOPS:
            hops += 1
            dirs.add(current)
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = target.parts[0]
                parts = list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
        else:
            current = candidate
    dirs.add(os.path.dirname(os.path.realpath(path)))
    return dirs
