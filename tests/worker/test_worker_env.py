"""The worker's environment: the interpreter's directory first on PATH, as an activated venv."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from reconciler.control.workerprocess import child_env

pytestmark = pytest.mark.core


def test_a_virtualenv_interpreter_puts_its_bin_first_unresolved(tmp_path: Path) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)  # venvs link to the base interpreter
    path = child_env(str(bin_dir / "python"))["PATH"].split(os.pathsep)
    assert path[0] == str(bin_dir)
    assert path.count(str(bin_dir)) == 1
    assert path[1:] == [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != str(bin_dir)]


def test_a_bare_interpreter_name_is_looked_up_on_path() -> None:
    name = Path(sys.executable).name
    found = shutil.which(name)
    path = child_env(name)["PATH"].split(os.pathsep)
    assert found is not None and path[0] == os.path.dirname(os.path.abspath(found))


def test_the_url_never_reaches_the_worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECONCILER_TARGET_URL", "postgresql://u:secret@h/db")
    assert not any(k.startswith("RECONCILER_") for k in child_env(sys.executable))
