"""Debounced file events on a few directories, and a stat fingerprint for when watching fails.

The only importer of watchdog. `DirWatcher` calls `on_change(paths)` once per burst of events,
after `debounce` seconds of quiet, on its own thread (never the observer's), with the changed
paths spelled under the configured paths. Editor and tool droppings (`filescan.DEFAULT_IGNORE`)
never count. An ignore pattern without a `/` matches one name (a file, or a directory and all under
it); one with a `/` matches a whole path, relative to the watched path or absolute, at any depth
(`*/migrations/*` matches `pkg/sub/migrations/versions/x.py`). `exclude` names directories whose
files never count, wherever they sit under the watched paths (a migrations directory inside the
models package).

Symlinked layouts are followed and re-armed: a Kubernetes ConfigMap volume swaps its `..data`
symlink atomically, git-sync swaps its worktree link, and a deployment may delete and recreate
the directory. The watcher watches the directories that hold each symlink met while resolving a
configured path (and the parent of the resolved directory); when one of them changes, it
resolves the path again, moves its watch to the new target and reports the configured path as
changed. `healthy` says whether every path is being watched; when it is not (inotify limits, a
directory that vanished), the caller polls `fingerprint()` instead.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from reconciler import logs
from reconciler.runtime.filescan import (
    DEFAULT_IGNORE,
    deciding_dirs,
    files_under,
    ignored_at,
    real_dirs,
    under,
    wanted,
)

_REPORTED = frozenset({"created", "modified", "deleted", "moved", "closed", "attrib"})

log = logs.get("reconciler.watcher")


def _quiet_watchdog() -> None:
    """Silence a benign watchdog warning (idempotent: an identical filter replaces itself).

    watchdog (7.x, inotify) warns when a directory created inside a recursive watch is registered
    twice (`mkdir -p`, a ConfigMap's new version directory): the second registration replaces the
    first and nothing is lost, so the warning (a page of internal state) is noise on stderr.
    """
    warnings.filterwarnings(
        "ignore", message=r"Callback with id .* already exists", category=RuntimeWarning, module=r"watchdog\."
    )


@dataclass
class _Root:
    path: Path  # as configured; reported paths are spelled under it
    real: str = ""  # the resolved path
    is_file: bool = False
    watched: tuple[str, bool] | None = None  # (directory, recursive) while a watch is held

    def watch_dir(self, recursive: bool) -> tuple[str, bool]:
        return (os.path.dirname(self.real), False) if self.is_file else (self.real, recursive)

    def map(self, path: str) -> Path | None:
        """The configured spelling of an event path, or None when it is not under this root."""
        if self.is_file:
            return self.path if path == self.real else None
        if path == self.real:
            return self.path
        if path.startswith(self.real.rstrip(os.sep) + os.sep):
            return self.path / path[len(self.real.rstrip(os.sep)) + 1 :]
        return None


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: DirWatcher) -> None:
        super().__init__()
        self._owner = owner

    def dispatch(self, event: FileSystemEvent) -> None:
        self._owner._on_event(event)


class DirWatcher:
    """Debounced change notifications for `paths` (directories, or single files); see the module doc.

    `suffixes` (e.g. `(".py",)`) limits which file names count; with it, creating an empty
    directory does not count either (its files report themselves), but deleting or moving one
    does. A burst that never goes quiet is delivered after at most `max_wait` seconds. Nothing
    under the `exclude` directories counts (matched by resolved path).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        on_change: Callable[[set[Path]], None],
        debounce: float = 0.2,
        ignore: Sequence[str] = DEFAULT_IGNORE,
        recursive: bool = True,
        suffixes: Sequence[str] | None = None,
        max_wait: float | None = None,
        exclude: Sequence[Path] = (),
    ) -> None:
        self._paths = [Path(p) for p in paths]
        self._exclude = tuple(Path(p) for p in exclude)
        self._excluded = real_dirs(self._exclude)
        self._on_change = on_change
        self._debounce = max(float(debounce), 0.0)
        self._max_wait = max_wait if max_wait is not None else max(1.0, 10 * self._debounce)
        self._ignore = tuple(ignore)
        self._recursive = recursive
        self._suffixes = tuple(suffixes) if suffixes is not None else None
        self._cond = threading.Condition()
        self._watch_lock = threading.RLock()
        self._reset()

    def files(self) -> list[Path]:
        """The files under the watched paths now that an event could name."""
        return files_under(self._paths, self._suffixes, self._ignore, self._exclude)

    def _reset(self) -> None:
        self._roots = [_Root(path=p) for p in self._paths]
        self._observer: Any = None
        self._handler = _Handler(self)
        self._watches: dict[tuple[str, bool], list[Any]] = {}  # (dir, recursive) -> [watch, users]
        self._anchors: set[str] = set()
        self._pending: set[Path] = set()
        self._recheck = False
        self._dirty = False
        self._first_event = 0.0
        self._last_event = 0.0
        self._stopping = False
        self._worker: threading.Thread | None = None

    @property
    def healthy(self) -> bool:
        """The observer is alive and every configured path is being watched."""
        with self._watch_lock:
            observer = self._observer
            if observer is None or self._stopping or not observer.is_alive():
                return False
            alive = {e.watch for e in observer.emitters if e.is_alive()}
            return all(
                root.watched is not None and self._watches[root.watched][0] in alive for root in self._roots
            )

    def start(self) -> bool:
        """Start watching; False (with a warning, never an exception) when that is not possible."""
        if self._observer is not None:
            return self.healthy
        self._reset()
        _quiet_watchdog()
        missing = [str(root.path) for root in self._roots if not os.path.exists(root.path)]
        if missing:
            log.warning("watch_path_missing", paths=missing, fallback="fingerprint polling")
            return False
        try:
            with self._watch_lock:
                self._observer = Observer()
                for root in self._roots:
                    root.real = os.path.realpath(root.path)
                    root.is_file = not os.path.isdir(root.real)
                    root.watched = self._acquire(*root.watch_dir(self._recursive))
                self._sync_anchors()
                self._observer.start()
        except Exception as exc:  # OSError for inotify limits; anything else must not crash either
            log.warning(
                "watch_start_failed",
                paths=[str(p) for p in self._paths],
                error=str(exc),
                error_class=type(exc).__name__,
                fallback="fingerprint polling",
            )
            self.stop()
            return False
        self._worker = threading.Thread(target=self._deliver_loop, name="reconciler-watch", daemon=True)
        self._worker.start()
        return True

    def stop(self) -> None:
        """Stop watching; a callback in progress is not waited for beyond a few seconds."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        with self._watch_lock:
            observer, self._observer = self._observer, None
        if observer is not None:
            try:
                observer.stop()
                if observer.is_alive():
                    observer.join(timeout=5.0)
            except Exception:  # a half-started observer; nothing more to release
                log.debug("watch_stop_failed", exc_info=True)
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=5.0)

    # -- observer thread: classify and record, nothing slow ----------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _REPORTED:
            return
        ends = [os.fsdecode(event.src_path)]
        if event.event_type == "moved" and event.dest_path:
            ends.append(os.fsdecode(event.dest_path))
        changed: set[Path] = set()
        recheck = False
        for end in ends:
            if os.path.dirname(end) in self._anchors or end in self._anchors:
                recheck = True
            if self._counts(event, end):
                changed.update(self._map(end, event.is_directory))
        if changed or recheck:
            with self._cond:
                self._pending |= changed
                self._recheck = self._recheck or recheck
                now = time.monotonic()
                if not self._dirty:
                    self._dirty, self._first_event = True, now
                self._last_event = now
                self._cond.notify_all()

    def _counts(self, event: FileSystemEvent, path: str) -> bool:
        if event.is_directory:
            if event.event_type in ("modified", "attrib", "closed"):
                return False  # a directory's own mtime changes with every entry: no news
            if event.event_type == "created" and self._suffixes is not None:
                return False
        elif not wanted(os.path.basename(path), self._suffixes):
            return False
        return True

    def _map(self, path: str, is_dir: bool) -> Iterator[Path]:
        if under(path, self._excluded) or (self._excluded and under(os.path.realpath(path), self._excluded)):
            return
        for root in self._roots:
            mapped = root.map(path)
            if mapped is None:
                continue
            parts = mapped.relative_to(root.path).parts
            if not any(
                ignored_at(
                    "/".join(parts[: n + 1]),
                    str(root.path / Path(*parts[: n + 1])),
                    is_dir or n < len(parts) - 1,
                    self._ignore,
                )
                for n in range(len(parts))
            ):
                yield mapped

    # -- worker thread: debounce, re-arm, deliver ---------------------------------------------

    def _deliver_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._dirty:
                    self._cond.wait()
                while not self._stopping:
                    deadline = min(self._last_event + self._debounce, self._first_event + self._max_wait)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopping:
                    return
                changed, recheck = self._pending, self._recheck
                self._pending, self._recheck, self._dirty = set(), False, False
            if recheck:
                changed |= self._rearm()
            if changed:
                self._deliver(changed)

    def _deliver(self, changed: set[Path]) -> None:
        try:
            self._on_change(changed)
        except Exception:
            log.error("watch_callback_failed", paths=sorted(str(p) for p in changed), exc_info=True)

    def _rearm(self) -> set[Path]:
        """Re-resolve every path; move watches whose target changed or died. Returns those paths."""
        changed: set[Path] = set()
        with self._watch_lock:
            if self._observer is None:
                return changed
            alive = {e.watch for e in self._observer.emitters if e.is_alive()}
            for root in self._roots:
                if self._rearm_root(root, alive):
                    changed.add(root.path)
            self._sync_anchors()
        return changed

    def _rearm_root(self, root: _Root, alive: set[Any]) -> bool:
        real = os.path.realpath(root.path)
        was_ok = root.watched is not None and self._watches[root.watched][0] in alive
        if real == root.real and was_ok:
            return False
        old_real = root.real
        if root.watched is not None:
            self._release(root.watched)
            root.watched = None
        root.real = real
        if os.path.exists(real):
            root.is_file = not os.path.isdir(real)
            try:
                root.watched = self._acquire(*root.watch_dir(self._recursive))
            except Exception as exc:
                log.warning(
                    "watch_rearm_failed",
                    path=str(root.path),
                    error=str(exc),
                    error_class=type(exc).__name__,
                    fallback="fingerprint polling",
                )
        moved = real != old_real or was_ok != (root.watched is not None)
        if moved:
            log.info("watch_rearmed", path=str(root.path), target=real, watching=root.watched is not None)
        return moved

    # -- watch bookkeeping (under _watch_lock): one watchdog watch per (directory, recursive) -----

    def _acquire(self, directory: str, recursive: bool) -> tuple[str, bool]:
        key = (directory, recursive)
        entry = self._watches.get(key)
        if entry is None:
            watch = self._observer.schedule(self._handler, directory, recursive=recursive)
            self._watches[key] = [watch, 1]
        else:
            entry[1] += 1
        return key

    def _release(self, key: tuple[str, bool]) -> None:
        entry = self._watches[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._watches[key]
            try:
                self._observer.unschedule(entry[0])
            except Exception:  # the emitter died with its directory; nothing left to stop
                log.debug("watch_unschedule_failed", directory=key[0], exc_info=True)

    def _sync_anchors(self) -> None:
        wanted: set[str] = set()
        for root in self._roots:
            wanted |= deciding_dirs(str(root.path))
        wanted = {d for d in wanted if os.path.isdir(d)}
        for directory in self._anchors - wanted:
            self._release((directory, False))
        anchors = self._anchors & wanted
        for directory in sorted(wanted - self._anchors):
            try:
                self._acquire(directory, False)
            except Exception as exc:  # without it only swaps go unnoticed; the paths are still watched
                log.warning("watch_anchor_failed", directory=directory, error=str(exc))
                continue
            anchors.add(directory)
        self._anchors = anchors
