"""The worker's process seen from the control plane: its start, its environment, its pipes.

The worker (`python -m reconciler.worker`) runs in the project's interpreter with the project root
as its working directory; only our `reconciler` package is put on its path (through a private
folder holding a link to it), never the rest of our environment. The database URL travels over
stdin, never argv or the environment, so it does not show in `ps`.

The worker dies with its parent. On Linux that is the kernel's parent-death signal, which fires
when the *thread* that started the worker exits: start workers from a thread that outlives them.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import reconciler
from reconciler import protocol
from reconciler.config.processenv import process_environment
from reconciler.errors import ConfigError, WorkerError
from reconciler.redact import redact

_CLOSE_WAIT = 5.0
_STDERR_KEPT = 40
_shim_lock = threading.Lock()
_shim_dir: list[str] = []


def _package_path() -> str:
    """A private folder whose only entry is our `reconciler` package (for PYTHONPATH)."""
    with _shim_lock:
        if _shim_dir and Path(_shim_dir[0]).is_dir():
            return _shim_dir[0]
        folder = tempfile.mkdtemp(prefix="reconciler-worker-")
        package = Path(reconciler.__file__).resolve().parent
        try:
            os.symlink(package, Path(folder) / "reconciler", target_is_directory=True)
        except OSError:  # no symlinks (Windows without privilege): copy the sources
            shutil.copytree(
                package, Path(folder) / "reconciler", ignore=shutil.ignore_patterns("__pycache__")
            )
        atexit.register(shutil.rmtree, folder, True)
        _shim_dir[:] = [folder]
        return folder


def child_env(interpreter: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment (or `environ`, the one the settings were resolved in) minus RECONCILER_*
    (the URL may be there), our package on PYTHONPATH, and the interpreter's directory first on
    PATH, as an activated virtualenv has it: alembic.ini's post-write hooks (`ruff`, `black`) and
    env.py's subprocesses find the project's tools."""
    base = process_environment() if environ is None else environ
    env = {k: v for k, v in base.items() if not k.startswith("RECONCILER_")}
    located = interpreter if os.sep in interpreter else shutil.which(interpreter)
    if located:  # not resolved: a virtualenv's python is a link to the base interpreter
        bin_dir = os.path.dirname(os.path.abspath(located))
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
        env["PATH"] = os.pathsep.join([bin_dir, *path])
    existing = env.get("PYTHONPATH")
    shim = _package_path()
    env["PYTHONPATH"] = os.pathsep.join([shim, existing]) if existing else shim
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class WorkerProcess(Protocol):
    """What the control plane uses of a worker's process: a `subprocess.Popen`, or a child of the
    fork server (`control.zygote.ForkedProcess`)."""

    pid: int
    returncode: int | None
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


def spawn(
    interpreter: str,
    root: str,
    preload: bool,
    environ: Mapping[str, str] | None,
    zygote: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python -m reconciler.worker` in `interpreter`, in the project root.

    `zygote`: start the fork server instead (`control.zygote`), this socket as its stdin."""
    return spawn_process(interpreter, root, preload, child_env(interpreter, environ), zygote)


def spawn_process(
    interpreter: str, root: str, preload: bool, env: Mapping[str, str], zygote: int | None = None
) -> subprocess.Popen[bytes]:
    """`spawn` with the child's environment given (`child_env`'s)."""
    command = [interpreter, "-m", "reconciler.worker", "--parent", str(os.getpid())]
    if preload:
        command.append("--preload")
    if zygote is not None:
        command.append("--zygote")
    try:
        return subprocess.Popen(
            command,
            stdin=subprocess.PIPE if zygote is None else zygote,
            stdout=subprocess.PIPE if zygote is None else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=root,
            env=dict(env),
            close_fds=True,
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot start the worker with interpreter {interpreter} in {root}: "
            f"{exc.strerror or exc}; check [target] python and [target] root"
        ) from None


class Pipes:
    """A started worker's stdin (requests), stdout (replies and events) and stderr (its log)."""

    def __init__(self, process: WorkerProcess, on_log: Callable[[str], None] | None) -> None:
        self.process = process
        self.on_log = on_log
        self._replies: queue.Queue[bytes | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_KEPT)
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True, name="worker-stdout"),
            threading.Thread(target=self._read_stderr, daemon=True, name="worker-stderr"),
        ]
        for thread in self._threads:
            thread.start()

    def send(self, line: str) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.closed:
            raise WorkerError("the worker's input is closed; start a new worker")
        stdin.write((line + "\n").encode("utf-8"))
        stdin.flush()

    def exchange(
        self,
        request: Any,
        timeout: float,
        on_event: Callable[[Any], Any] | None,
        kill: Callable[[], None],
        after_event: Callable[[Any], None] | None = None,
    ) -> dict[str, Any]:
        """Send `request` (a protocol request) and return its reply line's object; the events
        sent before it are answered on the way: `on_event(event)` returns the answer (a
        protocol request; None: proceed), `after_event(event)` runs once it is sent. `kill`:
        what a failed answer or a timeout does."""
        op = type(request).op
        try:
            self.send(protocol.request_line(request))
        except OSError:
            raise self.died(op) from None
        while True:
            reply = self.next_line(op, timeout, kill)
            if "event" not in reply:
                return reply
            self._answer_event(reply, on_event, kill, after_event)

    def _answer_event(
        self,
        event: Mapping[str, Any],
        on_event: Callable[[Any], Any] | None,
        kill: Callable[[], None],
        after_event: Callable[[Any], None] | None,
    ) -> None:
        """A revision is about to run, or to leave its transaction: record it (on_event), then
        let the worker go on (or stop, when on_event says so)."""
        try:
            parsed = protocol.parse_event(event)
            answer = on_event(parsed) if on_event is not None else None
        except BaseException:
            kill()  # it waits inside its transaction: dying there rolls it back
            raise
        try:
            self.send(protocol.request_line(answer or protocol.ProceedRequest()))
        except OSError:
            raise self.died("upgrade") from None
        if after_event is not None:
            try:
                after_event(parsed)
            except BaseException:
                kill()  # what it records must not go missing while the worker goes on
                raise

    def next_line(self, op: str, timeout: float, on_timeout: Callable[[], None]) -> dict[str, Any]:
        """The next line the worker sent: a reply, or an event before the reply."""
        try:
            raw = self._replies.get(timeout=timeout)
        except queue.Empty:
            on_timeout()
            raise WorkerError(
                f"the worker (pid {self.process.pid}) did not finish {op} within {timeout:g}s "
                "and was killed; raise [target] worker_timeout if the job needs longer"
            ) from None
        if raw is None:
            raise self.died(op)
        try:
            reply = json.loads(raw.decode("utf-8"))
        except ValueError:
            raise WorkerError(
                f"the worker sent a line that is not JSON during {op}: "
                f"{redact(raw.decode('utf-8', 'replace'))[:500]}"
            ) from None
        return dict(reply)

    def wait_reply(self, timeout: float) -> None:
        """Wait for one more line (the exit request's reply); queue.Empty after `timeout`."""
        self._replies.get(timeout=timeout)

    def died(self, op: str) -> WorkerError:
        try:
            code = self.process.wait(timeout=_CLOSE_WAIT)
        except subprocess.TimeoutExpired:
            code = None
        self._threads[1].join(timeout=_CLOSE_WAIT)
        tail = "\n".join(list(self._stderr)[-15:]) or "(nothing on stderr)"
        return WorkerError(
            redact(
                f"the worker (pid {self.process.pid}) exited with code {code} during {op} without a "
                f"reply; its last log lines:\n{tail}"
            )
        )

    def close_stdin(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()

    def finish(self) -> None:
        """Close our ends and wait for the reading threads."""
        with contextlib.suppress(OSError):
            self.close_stdin()
        for thread in self._threads:
            thread.join(timeout=_CLOSE_WAIT)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _read_stdout(self) -> None:
        stream: IO[bytes] | None = self.process.stdout
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                for line in stream:
                    self._replies.put(line)
        self._replies.put(None)

    def _read_stderr(self) -> None:
        stream: IO[bytes] | None = self.process.stderr
        if stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                line = redact(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._stderr.append(line)
                if self.on_log is not None:
                    with contextlib.suppress(Exception):
                        self.on_log(line)
