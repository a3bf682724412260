"""Dev mode at any pace: a burst of saves is one generation, no generation sees stale modules,
and an app polling its own SQLite file does not stop changes from being applied."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.runtime.devpace import BURST_GAP, MAX_HOLD, SavePace, written_at
from tests.builders import Project
from tests.pgcluster import wait_until
from tests.runtime.test_devloop import BASE, baseline_project, columns, dev, revision_files, started


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def after_one_generation() -> tuple[Clock, SavePace]:
    """A pace that has seen one save and the generation that took it."""
    clock = Clock()
    pace = SavePace(clock)
    pace.saved()
    pace.generating()
    pace.generated()
    return clock, pace


def test_a_lone_save_waits_for_nothing_more() -> None:
    clock = Clock()
    pace = SavePace(clock)
    pace.saved()
    assert pace.quiet_left() == 0
    clock, pace = after_one_generation()
    clock.now += 0.4  # the next save, soon after the last change was applied
    pace.saved()
    assert pace.quiet_left() == 0


def test_a_burst_waits_until_its_saves_go_quiet() -> None:
    clock = Clock()
    pace = SavePace(clock)
    pace.saved()
    taken = pace.generating()
    clock.now += 0.1
    pace.saved()  # during the generation: a burst
    assert pace.saved_since(taken)
    pace.generated()
    assert pace.quiet_left() > 0
    for _ in range(5):  # the saves keep coming: the next generation keeps waiting
        clock.now += 0.1
        pace.saved()
        assert pace.quiet_left() > 0
    clock.now += 0.5
    assert pace.quiet_left() == 0


def test_a_burst_waits_at_least_the_burst_gap() -> None:
    """Saves delivered close together (a formatter right after the editor) do not make the quiet
    so short that the next save of the burst, delivered late on a loaded machine, misses it."""
    clock = Clock()
    pace = SavePace(clock)
    pace.saved()
    pace.generating()
    clock.now += 0.01
    pace.saved()
    pace.generated()
    clock.now += BURST_GAP - 0.05
    assert pace.quiet_left() > 0
    clock.now += 0.1
    assert pace.quiet_left() == 0


def test_saves_that_never_stop_are_held_back_only_so_long() -> None:
    clock, pace = after_one_generation()
    started_at = clock.now
    while clock.now < started_at + MAX_HOLD + 1:
        clock.now += 0.1
        pace.saved()
        if pace.quiet_left() == 0:
            break
    assert pace.quiet_left() == 0 and clock.now <= started_at + MAX_HOLD + 0.2


def test_a_stop_ends_the_wait() -> None:
    clock = Clock()  # it never moves: only the stop can end the wait
    pace = SavePace(clock)
    pace.saved()
    pace.generating()
    clock.now += 0.1
    pace.saved()
    pace.generated()
    assert pace.quiet_left() > 0
    stopping = threading.Event()
    stopping.set()
    pace.wait_for_quiet(stopping)


def test_the_first_save_during_the_start_generation_waits_the_burst_gap() -> None:
    """The first save of a burst lands during dev mode's first generation (no gap known yet):
    the follow-up still waits for the burst's shortest quiet instead of starting at once."""
    clock = Clock()
    pace = SavePace(clock)
    pace.generating()  # the full compare at start
    clock.now += 0.05
    pace.saved()
    clock.now += 0.05
    pace.generated()
    assert pace.quiet_left() > 0
    clock.now += BURST_GAP
    assert pace.quiet_left() == 0


def test_a_save_written_during_a_generation_and_delivered_after_it_is_a_burst() -> None:
    """A loaded machine delivers a save after the generation it was written during has ended:
    its write time, not its delivery, makes it part of a burst. Timed by delivery (the old way)
    it looks lone and the next generation starts at once, alone."""
    for timed_by_write in (True, False):
        clock = Clock()
        pace = SavePace(clock)
        pace.saved()
        pace.generating()
        written = clock.now + 0.05
        clock.now += 0.1
        pace.generated()
        clock.now += 0.15  # delivered late
        pace.saved(written if timed_by_write else None)
        assert (pace.quiet_left() > 0) is timed_by_write


def test_saves_delivered_unevenly_are_paced_by_when_they_were_written() -> None:
    """Saves written 0.1 s apart and delivered unevenly (0.28 s, then 0.04 s apart) are still one
    burst, whose quiet counts from the last delivery. Timed by delivery (the old way) the first
    gap makes a lone save and the next generation starts at once."""
    for timed_by_write in (True, False):
        clock, pace = after_one_generation()
        first = clock.now
        for write, delivery in ((0.1, 0.1), (0.2, 0.38)):
            clock.now = first + delivery
            pace.saved(first + write if timed_by_write else None)
        assert (pace.spacing is not None) is timed_by_write
        assert (pace.quiet_left() > 0) is timed_by_write
    clock.now += BURST_GAP + 0.01
    assert pace.quiet_left() == 0


def test_a_save_is_timed_by_its_file_unless_the_time_is_not_believable(tmp_path: Path) -> None:
    saved = tmp_path / "models.py"
    saved.write_text("x = 1\n")
    delivered = time.monotonic()
    os.utime(saved, (time.time() - 0.3, time.time() - 0.3))
    assert delivered - 0.4 < written_at([saved], delivered) < delivered - 0.2
    os.utime(saved, (time.time() - 3600, time.time() - 3600))  # copied with its old time
    assert written_at([saved], delivered) == delivered
    os.utime(saved, (time.time() + 60, time.time() + 60))  # a clock ahead of ours
    assert written_at([saved], delivered) == delivered
    assert written_at([tmp_path / "removed.py"], delivered) == delivered


# --- end to end ----------------------------------------------------------------------------------


def write_in_place(project: Project, text: str) -> None:
    (project.root / "myapp" / "models.py").write_text(text)  # as most editors save


@pytest.mark.slow
def test_a_burst_of_saves_is_one_generation(tmp_path: Path, sqlite_url: str) -> None:
    """Ten saves 0.1 s apart (a formatter, "save all", typing with autosave): one generation after
    the burst, or at most one more for the save a generation was running at; never one per save."""
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, 'draft = false\n[logging]\nlevel = "debug"\n') as log:
        started(project, sqlite_url)
        # The burst starts in a dev loop at rest: the first compare (models against the database)
        # is over. A burst that overlaps it is the generation-running case, tested on its own.
        wait_until(lambda: '"no_changes"' in log.text(), 60, "the first compare finished")
        models = BASE
        saved_at: list[float] = []
        for n in range(10):
            models += f"    c{n} = db.Column(db.Integer)\n"
            write_in_place(project, models)
            saved_at.append(time.monotonic())
            time.sleep(0.1)  # the burst's pace, not a wait for anything
        wanted = {f"c{n}" for n in range(10)}
        wait_until(lambda: wanted <= set(columns(sqlite_url, "user")), 60, "all ten columns")
        generated = [p for p in revision_files(project) if "base0001" not in p.name]
        gaps = [round(b - a, 3) for a, b in zip(saved_at, saved_at[1:])]
        assert 1 <= len(generated) <= 2, ([p.name for p in generated], gaps)


@pytest.mark.slow
def test_two_quick_edits_leave_the_final_one_in_the_schema(tmp_path: Path, sqlite_url: str) -> None:
    """A generation that imported the models before the second edit must not be the last word."""
    project = baseline_project(tmp_path, sqlite_url)
    first = BASE + "\n\nclass Tag(db.Model):\n    id = db.Column(db.Integer, primary_key=True)\n"
    second = first + "    label = db.Column(db.String(40))\n"
    with dev(project, "draft = false"):
        started(project, sqlite_url)
        write_in_place(project, first)
        time.sleep(0.1)  # the second edit lands while the first one's generation runs, or after it
        write_in_place(project, second)
        wait_until(lambda: "label" in columns(sqlite_url, "tag"), 60, "the second edit applied")
    assert set(columns(sqlite_url, "tag")) == {"id", "label"}


READER = """
import sqlite3, sys, time
path, out = sys.argv[1], sys.argv[2]
reads = 0
while True:
    try:
        conn = sqlite3.connect(path, timeout=5.0)
        conn.execute("SELECT count(*) FROM user").fetchall()
        conn.close()
        reads += 1
        if reads % 10 == 0:
            open(out, "w").write(str(reads))
    except sqlite3.Error:
        pass  # a table being rebuilt: an app retries on its next poll
    time.sleep(0.01)
"""


@contextmanager
def polling_reader(url: str, tmp_path: Path) -> Iterator[Path]:
    """Another process opening the SQLite file every 10 ms and reading a table, as an app's dev
    server or a test polling its database does; yields the file its read count is written to."""
    count = tmp_path / "reads"
    database = str(sa.engine.make_url(url).database)
    proc = subprocess.Popen([sys.executable, "-c", READER, database, str(count)])
    try:
        wait_until(count.exists, 30, "the reader polling")
        yield count
    finally:
        proc.kill()
        proc.wait(10)


def reads(count: Path) -> int:
    return int(count.read_text() or 0)


@pytest.mark.slow
@pytest.mark.parametrize("draft", ["false", "true"])
def test_an_app_polling_its_sqlite_file_does_not_stop_changes(
    tmp_path: Path, sqlite_url: str, draft: str
) -> None:
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, f"draft = {draft}"):
        started(project, sqlite_url)
        with polling_reader(sqlite_url, tmp_path) as count:
            models = BASE
            for n in range(3):
                models += f"    c{n} = db.Column(db.Integer)\n"
                write_in_place(project, models)
                wait_until(lambda c=f"c{n}": c in columns(sqlite_url, "user"), 60, f"c{n} applied")
            before = reads(count)
            wait_until(lambda: reads(count) > before, 30, "the reader still reading")


@pytest.mark.slow
def test_an_app_read_transaction_longer_than_the_busy_timeout_delays_a_change_never_loses_it(
    tmp_path: Path, sqlite_url: str
) -> None:
    """SQLite's busy timeout (5 s) ends the worker's commit while an app holds a read transaction
    (a debugger paused in a request, a database browser): a lock timeout, retried in place, not a
    failed revision that is removed with the change it carried."""
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, "draft = false") as log:
        started(project, sqlite_url)
        reader = sqlite3.connect(str(sa.engine.make_url(sqlite_url).database), isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM user").fetchall()  # holds the file's SHARED lock
            write_in_place(project, BASE + "    nickname = db.Column(db.String(40))\n")
            wait_until(lambda: "revision_lock_timeout_retry" in log.text(), 60, "the commit timed out")
        finally:
            reader.execute("COMMIT")
            reader.close()
        wait_until(lambda: "nickname" in columns(sqlite_url, "user"), 60, "the change applied")
        assert "revision_removed" not in log.text()


@pytest.mark.slow
def test_an_empty_models_file_at_the_first_save_is_a_save_in_progress(
    tmp_path: Path, sqlite_url: str
) -> None:
    """Most editors truncate, then write: the first generation can import the file empty. That is
    not the wrong `[target] models` attribute that stops dev mode at start: it keeps running, and
    the save's content, once whole, is generated. (Whether the empty file reaches the first
    generation or the first sync depends on timing; both must leave dev mode running.)"""
    project = baseline_project(tmp_path, sqlite_url)
    with dev(project, "draft = false") as log:
        wait_until(lambda: "dev_started" in log.text(), 60, "dev mode started")
        write_in_place(project, "")  # while the first generation is still to come
        seen = ("defines no names", "has no attribute", "dev_models_unusable")
        wait_until(lambda: any(s in log.text() for s in seen), 60, "the empty file's generation")
        assert "dev_models_unusable" not in log.text()
        write_in_place(project, BASE + "    nickname = db.Column(db.String(40))\n")
        wait_until(lambda: "nickname" in columns(sqlite_url, "user"), 60, "the whole save applied")
