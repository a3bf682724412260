"""A worker started before the CLI's own imports, for a command that will need one.

`reconciler apply` on an empty database spends most of its time in two interpreters importing
SQLAlchemy: ours (the CLI, the config, the control plane) and the worker's (SQLAlchemy, Alembic,
Flask, then the project). Started first, the worker imports while the control plane reads the
config, connects, takes the lock and reads the status: the two overlap on two cores.

The early worker is a pre-warmed spare (`--preload`: never the project's code), spawned exactly as
`workerprocess.spawn` would spawn it for this interpreter and working directory. `take` hands it
to the first spawn that asks for the same interpreter, project root and environment; any other
spawn starts its own, and an early worker nobody took is killed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from reconciler.control.workerprocess import child_env, spawn_process
from reconciler.errors import ConfigError

# the commands that start a worker at once (`upgrade`: Flask-Migrate's name for apply; `test`:
# the stairway's worker on the scratch database)
_COMMANDS = frozenset({"apply", "upgrade", "test"})
# the CLI's global options that take a value (the command is the first word after them)
_VALUED = frozenset({"--config", "--url", "--migrations", "--models", "--log-format"})

_early: list[tuple[tuple[str, str, tuple[tuple[str, str], ...]], subprocess.Popen[bytes]]] = []


def command_of(argv: Sequence[str]) -> str | None:
    """The CLI command `argv` names (None: none, or help asked for)."""
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help", "--version"):
            return None
        if word in _VALUED:
            next(words, None)
        elif not word.startswith("-"):
            return None if any(w in ("-h", "--help") for w in words) else word
    return None


def prestart(argv: Sequence[str]) -> None:
    """Start the worker early when `argv` is a command that will start one."""
    if command_of(argv) not in _COMMANDS or _early:
        return
    interpreter, root = sys.executable, os.getcwd()
    env = child_env(interpreter)
    try:
        process = spawn_process(interpreter, root, True, env)
    except ConfigError:
        return  # the real start says why
    _early.append((_key(interpreter, root, env), process))
    atexit.register(_discard)


def take(interpreter: str, root: str, env: Mapping[str, str]) -> subprocess.Popen[bytes] | None:
    """The early worker, when it was started for this interpreter, root and environment and is
    still running (once: it is the caller's from then on)."""
    if not _early:
        return None
    key, process = _early.pop()
    if key == _key(interpreter, root, env) and process.poll() is None:
        return process
    _kill(process)
    return None


def _key(interpreter: str, root: str, env: Mapping[str, str]) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    return interpreter, os.path.realpath(root), tuple(sorted(env.items()))


def _discard() -> None:
    while _early:
        _kill(_early.pop()[1])


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        process.kill()
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        process.wait(timeout=5)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
