"""What the next dev generation compares: the model files saved since the last one, and how it saw each."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.project.modelscan import FileDigest, changed_classes, read_digest

FULL_COMPARE_EVERY = 300.0  # seconds: saves compare only what they touched; this catches the rest


class ModelChanges:
    """The saved model files not compared yet, and the digests of the files as last compared."""

    def __init__(self, files: Callable[[], list[Path]]) -> None:
        self._files = files  # every model file under the watched paths, now
        self._changed: set[Path] = set()
        self._lock = threading.Lock()
        self._last_full = 0.0
        self._digests: dict[Path, FileDigest] = {}  # model files as the last generation saw them

    def add(self, paths: set[Path]) -> None:
        with self._lock:
            self._changed |= paths

    def full(self) -> Scope:
        """Every table, with every model file as it is now."""
        return Scope(None, {}, {p: read_digest(p) for p in self._files()})

    def next_scope(self) -> Scope:
        """What the next generation compares: the tables of the classes the saved files changed
        (of the whole file when code outside its classes changed), or everything: at start, and
        every FULL_COMPARE_EVERY seconds."""
        with self._lock:
            changed, self._changed = self._changed, set()
        now = time.monotonic()
        if not changed or now - self._last_full > FULL_COMPARE_EVERY:
            self._last_full = now
            return self.full()
        digests = {p: read_digest(p) for p in changed}
        files: list[str] = []
        classes: dict[str, list[str]] = {}
        for path in sorted(changed):
            names = changed_classes(self._digests.get(path), digests[path])
            if names is None or names:
                files.append(str(path))
            if names:
                classes[str(path)] = sorted(names)
        return Scope(files, classes, digests)

    def differ(self) -> bool:
        """Whether a saved file's model code differs from what the last generation saw."""
        with self._lock:
            changed = set(self._changed)
        return any(changed_classes(self._digests.get(p), read_digest(p)) != frozenset() for p in changed)

    def changed_since(self, scope: Scope) -> bool:
        """Whether a file saved after `scope` was taken holds model code other than it read."""
        with self._lock:
            changed = set(self._changed)
        return any(changed_classes(scope.digests.get(p), read_digest(p)) != frozenset() for p in changed)

    def remember(self, scope: Scope) -> None:
        """The files as this generation saw them: the next save is compared with these."""
        if scope.files is None:
            self._digests.clear()
        for path, seen in scope.digests.items():
            if seen is None:
                self._digests.pop(path, None)
            else:
                self._digests[path] = seen

    def requeue(self, scope: Scope) -> None:
        """Not compared after all (the generation failed): the next save compares them again."""
        if scope.files:
            with self._lock:
                self._changed |= {Path(f) for f in scope.files}


@dataclass(frozen=True)
class Scope:
    """What one generation compares, and the model files as it read them."""

    files: list[str] | None  # the saved files to compare; None: every table
    classes: dict[str, list[str]]  # for some of `files`: the only classes of it that changed
    digests: dict[Path, FileDigest | None]

    def request(self, also: frozenset[str] | None = frozenset()) -> dict[str, Any]:
        """Keyword arguments for `Worker.generate`: `also` adds tables; None compares all."""
        if self.files is None or also is None:
            return {}
        if not self.files:
            return {"tables": sorted(also)}
        return {"files": self.files, "classes": self.classes, "tables": sorted(also)}
