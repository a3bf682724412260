"""`reconciler apply` starts its worker before the CLI's imports; only a start for the same
interpreter, project root and environment takes that early worker."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from reconciler.control.prestart import command_of
from tests.builders import Project, db_heads, flask_project, worker_python
from tests.cli import run_cli

# prepended to env.py: where, in which interpreter and with which arguments env.py ran
RECORD = """import json as _json, os as _os, pathlib as _pathlib, sys as _sys
with open(_pathlib.Path(__file__).with_name("seen.jsonl"), "a") as _seen:
    _seen.write(_json.dumps({"cwd": _os.getcwd(), "argv": _sys.argv, "python": _sys.executable}) + "\\n")
"""


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["apply"], "apply"),
        (["--config", "x.toml", "-v", "apply"], "apply"),
        (["--url", "sqlite:///a.db", "upgrade", "head"], "upgrade"),
        (["--log-format", "json", "status"], "status"),
        (["test", "--since", "main"], "test"),
        (["apply", "--help"], None),
        (["--help"], None),
        (["--version"], None),
        (["--config"], None),
        ([], None),
    ],
)
def test_the_command_is_the_first_word_after_the_global_options(argv: list[str], command: str | None) -> None:
    assert command_of(argv) == command


def recorded(project: Project, cwd: Path, command: str = "apply", code: int = 0) -> list[dict[str, object]]:
    env_py = project.migrations / "env.py"
    env_py.write_text(RECORD + env_py.read_text())
    result = run_cli(["--config", str(project.config), command], cwd=cwd)
    assert result.returncode == code, result.stderr
    seen = project.migrations / "seen.jsonl"
    return [json.loads(line) for line in seen.read_text().splitlines()]


@pytest.mark.skipif(bool(worker_python()), reason="the worker runs in another interpreter here")
def test_apply_from_the_project_root_runs_in_the_early_worker(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    runs = recorded(project, project.root)
    assert db_heads(sqlite_url) == {"r0001"}
    assert runs and all("--preload" in run["argv"] for run in runs), runs  # type: ignore[operator]
    assert {run["cwd"] for run in runs} == {str(project.root.resolve())}


@pytest.mark.skipif(bool(worker_python()), reason="the worker runs in another interpreter here")
def test_the_stairway_test_runs_in_the_early_worker(tmp_path: Path, sqlite_url: str) -> None:
    """`reconciler test` steps the revisions in a worker too: started before the CLI's imports."""
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    # exit 7: the tutorial's models are not these revisions' tables (a check after the steps)
    runs = recorded(project, project.root, "test", code=7)
    assert db_heads(sqlite_url) == set()  # a scratch database was stepped, not the target
    assert runs and "--preload" in runs[0]["argv"], runs  # type: ignore[operator]


def test_apply_from_elsewhere_never_runs_user_code_in_the_wrong_directory(
    tmp_path: Path, sqlite_url: str
) -> None:
    """The early worker was started in the caller's directory: it is not the project root's, so
    a worker of its own runs env.py there."""
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    runs = recorded(project, elsewhere)
    assert db_heads(sqlite_url) == {"r0001"}
    assert {run["cwd"] for run in runs} == {str(project.root.resolve())}
    assert not any("--preload" in run["argv"] for run in runs), runs  # type: ignore[operator]


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as the interpreter")
def test_another_interpreter_gets_a_worker_of_its_own(tmp_path: Path, sqlite_url: str) -> None:
    project = flask_project(tmp_path / "p", sqlite_url)
    project.chain(1)
    marker = tmp_path / "wrapper-ran"
    wrapper = tmp_path / "python-wrapper"
    real = worker_python() or sys.executable
    wrapper.write_text(f'#!/bin/sh\ntouch "{marker}"\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    lines = [line for line in project.config.read_text().splitlines() if not line.startswith("python = ")]
    lines.insert(lines.index("[target]") + 1, f'python = "{wrapper}"')
    project.config.write_text("\n".join(lines) + "\n")
    runs = recorded(project, project.root)
    assert db_heads(sqlite_url) == {"r0000"}
    assert marker.exists(), "the worker ran in the configured interpreter"
    assert not any("--preload" in run["argv"] for run in runs), runs  # type: ignore[operator]
    assert os.path.realpath(str(runs[0]["python"])) == os.path.realpath(real)
