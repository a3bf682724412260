"""The fork server (zygote) dev mode's fresh workers come from on Linux, and the spawned spare
where it cannot serve.

Real projects, real worker processes, real signals; what is checked is read from /proc: which
process a worker's parent is, its threads, its descriptors, which processes are left after a kill.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.control.workerpool import WarmWorker
from reconciler.control.workers import Worker
from reconciler.control.zygote import Zygote, ZygoteStale
from tests import dbs
from tests.builders import flask_project
from tests.cli import cli_command, cli_env
from tests.pgcluster import wait_until
from tests.worker.test_generate import WORKER_PYTHON, Gen, flask_gen, ops_of

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote serves on Linux")

PROBE = """\
import os as _os
import sys as _sys
import types as _types

_before = "zygote_probe_side_effect" in _sys.modules
_sys.modules["zygote_probe_side_effect"] = _types.ModuleType("zygote_probe_side_effect")
with open({mark!r}, "a") as _f:
    _f.write(f"{{_os.getpid()}} {{_os.getppid()}} {{_before}}\\n")
"""


@pytest.fixture
def gen(tmp_path: Path, sqlite_url: str) -> Gen:
    made = flask_gen(tmp_path / "proj", sqlite_url)
    made.baseline()
    return made


@pytest.fixture
def pool(gen: Gen) -> Iterator[WarmWorker]:
    warm = WarmWorker(gen.job(), python=WORKER_PYTHON, on_log=gen.logs.append, timeout=60)
    try:
        yield warm
    finally:
        warm.close()


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _probe(gen: Gen, mark: Path) -> None:
    gen.set_models(PROBE.format(mark=str(mark)) + gen.models_file.read_text())


def _lines(mark: Path) -> list[tuple[int, int, str]]:
    out = []
    for line in mark.read_text().splitlines():
        pid, ppid, before = line.split()
        out.append((int(pid), int(ppid), before))
    return out


@linux
@pytest.mark.core
def test_each_generation_imports_the_models_in_a_fresh_child(
    gen: Gen, pool: WarmWorker, tmp_path: Path
) -> None:
    """Edit the models between two generations: the second sees the edit, and what the first
    child's import left in sys.modules is not in the second's."""
    mark = tmp_path / "imports.txt"
    _probe(gen, mark)
    with pool.take() as worker:
        assert worker.generate().path is None
        zygote = pool.zygote_pid
    gen.edit_models(
        "    name = db.Column(db.String(50))\n",
        "    name = db.Column(db.String(50))\n    age = db.Column(db.Integer)\n",
    )
    with pool.take() as worker:  # forked, and initialised, before the edit
        assert ops_of(worker.generate()) == [("add_column", "user", "age")]
    (first, first_parent, first_saw), (second, second_parent, second_saw) = _lines(mark)
    assert first != second and first_parent == second_parent == zygote is not None
    assert (first_saw, second_saw) == ("False", "False")


@linux
def test_the_control_one_worker_for_two_generations_sees_stale_modules(gen: Gen, tmp_path: Path) -> None:
    """The negative control: without a fresh process, the second import finds the first's
    module-level side effect (and the models module it already imported)."""
    mark = tmp_path / "imports.txt"
    _probe(gen, mark)
    with gen.start() as worker:
        worker.generate()
        worker.compare()
        gen.edit_models("    name = db.Column(db.String(50))\n", "")
        assert [d["key"] for d in worker.compare()] == []  # the edit is not seen
    assert [saw for _pid, _ppid, saw in _lines(mark)] == ["False"]  # imported once, not anew


def _sockets(pid: int) -> set[int]:
    """The socket inodes among `pid`'s descriptors."""
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[len("socket:[") : -1]))
    return out


def _tcp_inodes() -> set[int]:
    """Inodes of the TCP sockets of this network namespace (a database connection is one)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                out.add(int(line.split()[9]))
    return out


def _open_files(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except OSError:
            continue
    return out


@linux
@pytest.mark.postgres
def test_the_zygote_holds_one_thread_and_no_connection(tmp_path: Path) -> None:
    """The zygote, after forking workers that connected to PostgreSQL, has one thread and no
    TCP socket; the control (this process, connected and threaded) shows both checks can fail."""
    with dbs.database("postgresql", tmp_path) as url:
        made = flask_gen(tmp_path / "proj", url)
        made.baseline()
        with WarmWorker(made.job(), python=WORKER_PYTHON, timeout=60) as warm:
            for _ in range(2):
                with warm.take() as worker:
                    assert worker.generate().path is None
                    zygote = warm.zygote_pid
                    assert zygote is not None and _ppid(worker.pid) == zygote
                    assert _sockets(worker.pid) & _tcp_inodes()  # the worker is connected
            assert len(list(Path(f"/proc/{zygote}/task").iterdir())) == 1
            assert not _sockets(zygote) & _tcp_inodes()
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with engine.connect():
                assert _sockets(os.getpid()) & _tcp_inodes()  # the control: a connection shows
            engine.dispose()
            assert len(list(Path(f"/proc/{os.getpid()}/task").iterdir())) > 1  # the pool's thread


@linux
def test_the_zygote_never_opens_the_sqlite_database(gen: Gen, pool: WarmWorker) -> None:
    with pool.take() as worker:
        assert worker.generate().path is None
        database = gen.project.url.split("///", 1)[1]
        assert any(database in path for path in _open_files(worker.pid))  # the control
        zygote = pool.zygote_pid
        assert zygote is not None
        assert not any(database in path for path in _open_files(zygote))
        assert len(list(Path(f"/proc/{zygote}/task").iterdir())) == 1


def _signals(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("SigBlk", "SigIgn", "SigCgt"):
            fields[key] = value.strip()
    return fields


@linux
def test_a_forked_worker_has_the_signal_dispositions_of_a_spawned_one(gen: Gen, pool: WarmWorker) -> None:
    with pool.take() as forked, gen.start() as spawned:
        assert _ppid(forked.pid) == pool.zygote_pid and _ppid(spawned.pid) == os.getpid()
        assert _signals(forked.pid) == _signals(spawned.pid)


def _descriptors(pid: int) -> list[tuple[int, str]]:
    """`pid`'s descriptors and what kind of file each is (`pipe:`, `socket:`, a path)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            out.append((int(fd.name), os.readlink(fd).split("[", 1)[0]))
    return sorted(out)


@linux
def test_a_forked_worker_holds_the_descriptors_of_a_spawned_one(gen: Gen, pool: WarmWorker) -> None:
    """Nothing of the zygote's (its socket, its children's pidfds) leaks into a child."""
    with pool.take() as forked, gen.start() as spawned:
        zygote = pool.zygote_pid
        assert zygote is not None and _ppid(forked.pid) == zygote
        assert ("socket:" in dict(_descriptors(zygote)).values()) is True  # the control
        assert _descriptors(forked.pid) == _descriptors(spawned.pid)


def _user_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user site-packages folder the worker's interpreter reads (PYTHONUSERBASE), not made yet."""
    monkeypatch.setenv("PYTHONUSERBASE", str(tmp_path / "userbase"))
    found = subprocess.run(
        [WORKER_PYTHON, "-c", "import site; print(site.getusersitepackages())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found.startswith(str(tmp_path))
    return Path(found)


@linux
def test_a_zygote_whose_libraries_changed_on_disk_is_replaced(
    gen: Gen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An install into a site-packages folder of the zygote's interpreter (here the user site)
    makes the zygote stale: the next worker comes from a new one."""
    user_site = _user_site(tmp_path, monkeypatch)
    with WarmWorker(gen.job(), python=WORKER_PYTHON, timeout=60) as warm:
        with warm.take():
            first = warm.zygote_pid
        assert first is not None
        wait_until(lambda: warm.spare_pid is not None, 60, "the next spare")
        with warm.take():  # the control: nothing changed, the same zygote
            assert warm.zygote_pid == first
            user_site.mkdir(parents=True)  # as `pip install --user` does
        with warm.take() as worker:
            assert worker.generate().path is None
            assert warm.zygote_pid not in (None, first) and _ppid(worker.pid) == warm.zygote_pid


@linux
def test_a_stale_zygote_forks_no_more_and_leaves_its_children_running(
    gen: Gen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_site = _user_site(tmp_path, monkeypatch)
    zygote = Zygote.start(WORKER_PYTHON, str(gen.project.root))
    try:
        running = zygote.fork(gen.job().url)
        user_site.mkdir(parents=True)
        with pytest.raises(ZygoteStale, match="changed on disk"):
            zygote.fork(gen.job().url)
        with Worker.adopt(running, gen.job(), timeout=60) as worker:
            assert worker.generate().path is None
        assert running.returncode == 0 and zygote.alive()
    finally:
        zygote.close()


@linux
def test_a_dead_zygote_is_replaced(gen: Gen, pool: WarmWorker) -> None:
    with pool.take() as worker:
        first = pool.zygote_pid
    assert first is not None
    wait_until(lambda: pool.spare_pid is not None, 60, "the next spare")
    os.kill(first, signal.SIGKILL)  # its spare dies with it
    wait_until(lambda: not _alive(first), 30, "the zygote killed")
    with pool.take() as worker:
        assert worker.generate().path is None
        assert pool.zygote_pid not in (None, first) and _ppid(worker.pid) == pool.zygote_pid


# --- where the zygote does not serve: the spawned spare ---------------------------------------


def test_without_fork_the_spare_is_spawned(gen: Gen) -> None:
    warm = WarmWorker(gen.job(), python=WORKER_PYTHON, timeout=60, fork=False)
    with warm, warm.take() as worker:
        assert worker.generate().path is None
        assert warm.zygote_pid is None
        if sys.platform.startswith("linux"):
            assert _ppid(worker.pid) == os.getpid()


@linux
def test_a_zygote_that_cannot_serve_falls_back_to_spawned_workers(gen: Gen, tmp_path: Path) -> None:
    """An interpreter whose zygote exits at once (as it does where it cannot serve)."""
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\nfor arg in "$@"; do [ "$arg" = --zygote ] && exit 3; done\nexec "{WORKER_PYTHON}" "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    with WarmWorker(gen.job(), python=str(python), timeout=60) as warm:
        for _ in range(2):
            with warm.take() as worker:
                assert worker.generate().path is None
                assert warm.zygote_pid is None and _ppid(worker.pid) == os.getpid()


# --- the chain of parent-death signals -------------------------------------------------------


def _ours(parent: int) -> set[int]:
    """Live processes of `python -m reconciler.worker --parent PARENT`: its workers, its zygote,
    the zygote's children (their command line is the zygote's), wherever they were re-parented."""
    out = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and b"reconciler.worker" in argv and str(parent).encode() in argv:
            out.add(int(entry.name))
    return out


def _zygote_and_child(parent: int) -> tuple[int, int] | None:
    for pid in _ours(parent):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"--zygote" not in f.read().split(b"\0"):
                continue
        children = [p for p in _ours(parent) if p != pid and _ppid(p) == pid]
        if children:
            return pid, children[0]
    return None


@linux
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killing_the_dev_daemon_leaves_no_zygote_and_no_child(
    tmp_path: Path, sqlite_url: str, sig: signal.Signals
) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.write_config(extra="[dev]\ndebounce = 0.05\n", models="myapp.models:db")
    log = tmp_path / "dev.log"
    with open(log, "w") as stderr:
        daemon = subprocess.Popen(
            cli_command(["--config", str(project.config), "run", "--mode", "dev"]),
            cwd=project.root,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    try:
        found = wait_until(lambda: _zygote_and_child(daemon.pid), 120, "the zygote and its spare")
        daemon.send_signal(sig)
        daemon.wait(timeout=60)
        wait_until(
            lambda: not _ours(daemon.pid), 30, f"no worker left of {found} (log: {log.read_text()[-2000:]})"
        )
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@linux
def test_the_control_a_process_without_the_parent_death_signal_outlives_its_parent(tmp_path: Path) -> None:
    """The negative control of the test above: the chain is what kills them. A parent starts a
    zygote (which forks a child) and a plain `sleep`; SIGKILL the parent: the zygote and its child
    die, the sleep does not."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, threading\n"
        "from reconciler.control.zygote import Zygote\n"
        "zygote = Zygote.start(sys.executable, '.')\n"
        "child = zygote.fork()\n"
        "sleeper = subprocess.Popen(['sleep', '300'])\n"
        "print(zygote.pid, child.pid, sleeper.pid, flush=True)\n"
        "threading.Event().wait()\n"
    )
    parent = subprocess.Popen(
        [WORKER_PYTHON, str(script)], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        zygote, child, sleeper = (int(p) for p in parent.stdout.readline().split())
        parent.kill()
        parent.wait()
        wait_until(lambda: not _alive(zygote) and not _alive(child), 30, "the zygote and its child gone")
        assert _alive(sleeper)
    finally:
        if parent.poll() is None:
            parent.kill()
        if "sleeper" in locals() and _alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@linux
def test_a_forked_process_reports_its_exit_code_and_can_be_killed(gen: Gen) -> None:
    zygote = Zygote.start(WORKER_PYTHON, str(gen.project.root))
    try:
        worker = Worker.adopt(zygote.fork(gen.job().url), gen.job(), timeout=60)
        process = worker._process
        assert process.poll() is None
        worker.close()  # the exit request: it exits 0
        assert process.returncode == 0
        killed = zygote.fork()
        assert killed.poll() is None
        killed.kill()
        assert killed.wait(timeout=30) == -signal.SIGKILL
        with pytest.raises(subprocess.TimeoutExpired):
            zygote.fork().wait(timeout=0.01)  # alive: its stdin is open
    finally:
        zygote.close()
    assert zygote.process.returncode is not None
