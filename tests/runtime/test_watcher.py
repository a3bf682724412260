"""Debounced file events and the stat fingerprint; real threads, real files, real inotify."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.runtime.filescan import DEFAULT_IGNORE, files_under, fingerprint
from reconciler.runtime.watcher import DirWatcher

DEADLINE = 5.0


class Changes:
    """The callback: records each delivered set (and the thread it came on)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[set[Path]] = []
        self.threads: list[str] = []
        self.cond = threading.Condition()
        self.fail_first = fail_first

    def __call__(self, paths: set[Path]) -> None:
        with self.cond:
            self.calls.append(set(paths))
            self.threads.append(threading.current_thread().name)
            self.cond.notify_all()
            failing = len(self.calls) <= self.fail_first
        if failing:
            raise RuntimeError("callback bug")

    def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), ("not delivered in time", self.calls)

    def wait_path(self, path: Path) -> None:
        self.wait_for(lambda: any(path in call for call in self.calls))

    def wait_count(self, count: int) -> None:
        self.wait_for(lambda: len(self.calls) >= count)

    def all_paths(self) -> set[Path]:
        with self.cond:
            return set().union(*self.calls) if self.calls else set()


@pytest.fixture
def watchers() -> Iterator[list[DirWatcher]]:
    made: list[DirWatcher] = []
    yield made
    for watcher in made:
        watcher.stop()


def watch(
    watchers: list[DirWatcher],
    paths: list[Path],
    changes: Changes,
    debounce: float = 0.05,
    suffixes: tuple[str, ...] | None = None,
) -> DirWatcher:
    watcher = DirWatcher(paths, changes, debounce=debounce, suffixes=suffixes)
    watchers.append(watcher)
    assert watcher.start() is True
    assert watcher.healthy
    return watcher


def probe(directory: Path, changes: Changes, name: str = "probe.py") -> None:
    """Write one more file and wait for it: every delivery due before it has happened by then."""
    path = directory / name
    path.write_text("probe\n")
    changes.wait_path(path)


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_new_file_fires_once_with_its_path(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    changes = Changes()
    watch(watchers, [tmp_path], changes)
    new = tmp_path / "0001_add_users.py"
    new.write_text("revision = '0001'\n")
    changes.wait_path(new)
    probe(tmp_path, changes)
    assert changes.calls == [{new}, {tmp_path / "probe.py"}]
    assert changes.threads[0] == "reconciler-watch"  # not the observer's thread


def test_a_burst_fires_once(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    changes = Changes()
    watch(watchers, [tmp_path], changes, debounce=1.0)  # wide: the suite runs three at a time
    target = tmp_path / "models.py"
    others = [tmp_path / f"m{n}.py" for n in range(10)]
    for n in range(10):  # 20 writes, far inside the 1 s quiet window
        target.write_text(f"x = {n}\n")
        others[n].write_text("y\n")
    changes.wait_count(1)
    assert changes.calls[0] == {target, *others}
    probe(tmp_path, changes)
    assert len(changes.calls) == 2


def test_ignored_names_never_fire(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    changes = Changes()
    watch(watchers, [tmp_path], changes)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "x.pyc").write_bytes(b"\0")
    (tmp_path / ".x.py.swp").write_text("swap")
    (tmp_path / "x.py~").write_text("backup")
    (tmp_path / "4913").write_text("")
    (tmp_path / "4913").unlink()
    (tmp_path / ".#x.py").write_text("lock")
    (tmp_path / "#x.py#").write_text("autosave")
    (tmp_path / "x.tmp").write_text("tmp")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    real = tmp_path / "x.py"
    real.write_text("real\n")
    changes.wait_path(real)
    probe(tmp_path, changes)
    assert changes.all_paths() == {real, tmp_path / "probe.py"}


def nested_migrations(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A models package holding its migrations two levels down: pkg/sub/migrations/versions."""
    pkg = tmp_path / "pkg"
    versions = pkg / "sub" / "migrations" / "versions"
    versions.mkdir(parents=True)
    (pkg / "models.py").write_text("x = 1\n")
    return pkg, pkg / "sub" / "migrations", versions


@pytest.mark.parametrize("pattern", ["*/migrations/*", "sub/migrations/*", "migrations"])
def test_an_ignore_glob_matches_nested_paths(
    tmp_path: Path, watchers: list[DirWatcher], pattern: str
) -> None:
    """A pattern with a `/` matches the whole path at any depth; one without, any one name."""
    pkg, migrations, versions = nested_migrations(tmp_path)
    changes = Changes()
    watcher = DirWatcher([pkg], changes, debounce=0.05, ignore=(*DEFAULT_IGNORE, pattern), suffixes=(".py",))
    watchers.append(watcher)
    assert watcher.start()
    (versions / "x.py").write_text("revision = 'x'\n")
    (migrations / "env.py").write_text("# env\n")
    probe(pkg, changes)
    assert changes.all_paths() == {pkg / "probe.py"}
    assert files_under([pkg], ignore=(*DEFAULT_IGNORE, pattern)) == [pkg / "models.py", pkg / "probe.py"]


def test_without_the_glob_a_nested_revision_fires(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    """Control: the same write, nothing ignored, is reported."""
    pkg, _migrations, versions = nested_migrations(tmp_path)
    changes = Changes()
    watch(watchers, [pkg], changes, suffixes=(".py",))
    (versions / "x.py").write_text("revision = 'x'\n")
    changes.wait_path(versions / "x.py")


def test_an_excluded_directory_never_fires(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    """`exclude` names a directory by its path (here through a symlinked spelling)."""
    pkg, migrations, versions = nested_migrations(tmp_path)
    (tmp_path / "link").symlink_to(migrations)
    changes = Changes()
    watcher = DirWatcher([pkg], changes, debounce=0.05, suffixes=(".py",), exclude=[tmp_path / "link"])
    watchers.append(watcher)
    assert watcher.start()
    (versions / "x.py").write_text("revision = 'x'\n")
    (migrations / "env.py").write_text("# env\n")
    shutil.rmtree(versions)
    probe(pkg, changes)
    assert changes.all_paths() == {pkg / "probe.py"}
    assert sorted(watcher.files()) == [pkg / "models.py", pkg / "probe.py"]


def test_editor_save_by_rename_reports_the_real_name(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    target = tmp_path / "models.py"
    target.write_text("old\n")
    changes = Changes()
    watch(watchers, [tmp_path], changes)
    temp = tmp_path / "models.py.tmp"
    temp.write_text("new\n")
    os.replace(temp, target)
    changes.wait_path(target)
    assert changes.all_paths() == {target}


def test_delete_and_move_fire(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    gone = tmp_path / "gone.py"
    gone.write_text("a\n")
    before = tmp_path / "before.py"
    before.write_text("b\n")
    changes = Changes()
    watch(watchers, [tmp_path], changes)
    gone.unlink()
    changes.wait_path(gone)
    after = tmp_path / "after.py"
    before.rename(after)
    changes.wait_path(after)
    assert changes.calls[-1] == {before, after}  # both ends of a move


def test_suffixes_limit_what_counts(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    changes = Changes()
    watch(watchers, [tmp_path], changes, suffixes=(".py",))
    (tmp_path / "notes.txt").write_text("no\n")
    (tmp_path / "empty_dir").mkdir()
    probe(tmp_path, changes)
    assert changes.calls == [{tmp_path / "probe.py"}]


def test_nested_directories_are_watched(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    changes = Changes()
    watch(watchers, [tmp_path], changes)
    nested = tmp_path / "pkg" / "sub"
    nested.mkdir(parents=True)
    changes.wait_path(tmp_path / "pkg")  # a new directory counts without suffixes
    new = nested / "models.py"
    new.write_text("x\n")
    changes.wait_path(new)


def test_a_single_file_can_be_watched(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    target = tmp_path / "models.py"
    target.write_text("a\n")
    changes = Changes()
    watch(watchers, [target], changes)
    (tmp_path / "sibling.py").write_text("no\n")
    target.write_text("b\n")
    changes.wait_path(target)
    assert changes.all_paths() == {target}


def test_a_callback_error_does_not_kill_the_watcher(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    changes = Changes(fail_first=1)
    watcher = watch(watchers, [tmp_path], changes)
    (tmp_path / "a.py").write_text("a\n")
    changes.wait_count(1)
    probe(tmp_path, changes)
    assert watcher.healthy


def test_start_on_a_missing_directory_returns_false(tmp_path: Path) -> None:
    watcher = DirWatcher([tmp_path / "missing"], Changes())
    assert watcher.start() is False
    assert not watcher.healthy
    watcher.stop()


def test_stop_ends_the_threads(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    watcher = DirWatcher([tmp_path], Changes(), debounce=0.05)
    assert watcher.start()
    watcher.stop()
    assert not watcher.healthy
    wait_until(lambda: {t for t in threading.enumerate() if t.is_alive()} <= before)


def configmap(root: Path, version: str, files: dict[str, str]) -> Path:
    """Lay out (or swap to) a ConfigMap-style volume: root/..<version>/versions/*, root/..data."""
    data = root / f"..{version}"
    (data / "versions").mkdir(parents=True)
    for name, text in files.items():
        (data / "versions" / name).write_text(text)
    link = root / "..data_tmp"
    os.symlink(data.name, link)
    os.replace(link, root / "..data")  # the atomic swap
    if not (root / "versions").is_symlink():
        os.symlink("..data/versions", root / "versions")
    return data


def test_configmap_swap_is_noticed_watching_the_volume(tmp_path: Path, watchers: list[DirWatcher]) -> None:
    old = configmap(tmp_path, "2026_a", {"0001.py": "a\n"})
    changes = Changes()
    watch(watchers, [tmp_path], changes)
    configmap(tmp_path, "2026_b", {"0001.py": "a\n", "0002.py": "b\n"})
    shutil.rmtree(old)
    changes.wait_path(tmp_path / "..data")


def test_configmap_swap_rearms_a_watch_through_the_symlinks(
    tmp_path: Path, watchers: list[DirWatcher]
) -> None:
    old = configmap(tmp_path, "2026_a", {"0001.py": "a\n"})
    versions = tmp_path / "versions"
    changes = Changes()
    watcher = watch(watchers, [versions], changes)
    (versions / "0002.py").write_text("b\n")
    changes.wait_path(versions / "0002.py")  # spelled under the configured path, not ..2026_a

    configmap(tmp_path, "2026_b", {"0001.py": "a\n", "0002.py": "b\n", "0003.py": "c\n"})
    shutil.rmtree(old)  # kubelet deletes the previous version: a plain watch on it would go deaf
    changes.wait_path(versions)
    wait_until(lambda: watcher.healthy)

    (versions / "0004.py").write_text("d\n")  # a change inside the new target is still seen
    changes.wait_path(versions / "0004.py")


def test_a_deleted_and_recreated_directory_is_watched_again(
    tmp_path: Path, watchers: list[DirWatcher]
) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    changes = Changes()
    watcher = watch(watchers, [versions], changes)
    shutil.rmtree(versions)
    changes.wait_path(versions)
    wait_until(lambda: not watcher.healthy)  # the caller falls back to fingerprint polling now
    versions.mkdir()
    wait_until(lambda: watcher.healthy)
    new = versions / "0001.py"
    new.write_text("a\n")
    changes.wait_path(new)


def test_fingerprint_changes_on_add_modify_delete_and_is_stable_otherwise(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "0001.py").write_text("a\n")
    first = fingerprint([versions])
    assert fingerprint([versions]) == first

    (versions / "__pycache__").mkdir()
    (versions / "__pycache__" / "0001.cpython-311.pyc").write_bytes(b"\0")
    (versions / "README").write_text("not a revision\n")
    assert fingerprint([versions]) == first  # ignored names and other suffixes do not count

    (versions / "0002.py").write_text("b\n")
    added = fingerprint([versions])
    assert added != first

    stat = (versions / "0002.py").stat()
    os.utime(versions / "0002.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    modified = fingerprint([versions])
    assert modified not in (first, added)

    (versions / "0002.py").unlink()
    deleted = fingerprint([versions])
    assert deleted not in (added, modified)
    assert fingerprint([versions]) == deleted


def test_fingerprint_follows_symlinks(tmp_path: Path) -> None:
    old = configmap(tmp_path, "2026_a", {"0001.py": "a\n"})
    versions = tmp_path / "versions"
    first = fingerprint([versions])
    assert first == fingerprint([versions])
    configmap(tmp_path, "2026_b", {"0001.py": "a\n"})
    shutil.rmtree(old)
    assert fingerprint([versions]) != first
    assert fingerprint([tmp_path / "missing"]) == fingerprint([tmp_path / "missing"])


def test_fingerprint_survives_a_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("a\n")
    os.symlink(".", tmp_path / "loop")
    assert fingerprint([tmp_path]) == fingerprint([tmp_path])
