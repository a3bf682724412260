"""Issue 12 part 7: inputs that are the user's mistake end with exit 2 and one message that names
the file or value and says what to do; never "internal error" and a traceback.

Each case breaks a small SQLite project (Flask-Migrate layout) in one way, for real: bytes on
disk, symbolic links, a Python that cannot import the MySQL driver.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builders import Project, flask_project
from tests.cli import ROOT, run_cli

# Hides the MySQL drivers from the CLI process, as a machine without them installed: a
# sitecustomize module on PYTHONPATH puts a finder first on sys.meta_path that refuses them.
NO_MYSQL_DRIVER = """\
import sys


class _NoMySQLDriver:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pymysql", "MySQLdb", "mysql", "mariadb"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoMySQLDriver())
"""

Case = Callable[[Project, Path], tuple[list[str], dict[str, str], str]]


def _project(tmp_path: Path) -> Project:
    project = flask_project(tmp_path / "p", f"sqlite:///{tmp_path / 'p' / 'app.db'}")
    project.chain(2)
    return project


def _status(project: Project) -> list[str]:
    return ["--config", str(project.config), "status"]


def nested_toml(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    p.config.write_text(p.config.read_text() + "deep = " + "[" * 5000 + "]" * 5000 + "\n")
    return _status(p), {}, str(p.config)


def invalid_utf8(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    p.config.write_bytes(p.config.read_bytes() + b"# caf\xe9 in Latin-1\n")
    return _status(p), {}, str(p.config)


def interval_flag_overflow(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    return ["--config", str(p.config), "run", "--interval", "1e309"], {}, "--interval"


def interval_inf(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    p.write_config(extra="[daemon]\ninterval = inf\n")
    return ["--config", str(p.config), "run"], {}, "interval"


def interval_nan(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    p.write_config(extra="[daemon]\ninterval = nan\n")
    return ["--config", str(p.config), "run"], {}, "interval"


def versions_loop(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    shutil.rmtree(p.versions)
    os.symlink(p.versions, p.versions)
    return _status(p), {}, str(p.versions)


def migrations_loop(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    shutil.rmtree(p.migrations)
    os.symlink(p.migrations, p.migrations)
    return _status(p), {}, str(p.migrations)


def migrations_loop_absolute(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    shutil.rmtree(p.migrations)
    os.symlink(p.migrations, p.migrations)
    return ["--migrations", str(p.migrations), *_status(p)], {}, str(p.migrations)


def revision_file_loop(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    loop = p.versions / "zz_loop.py"
    os.symlink(loop, loop)
    return _status(p), {}, str(loop)


def no_down_revision(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    path = next(p.versions.glob("r0001_*.py"))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(ln for ln in lines if not ln.startswith("down_revision")))
    return ["--config", str(p.config), "apply"], {}, str(path)


def no_down_revision_dynamic(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    """A header that is not a literal: the worker executes the file to read it."""
    path = next(p.versions.glob("r0001_*.py"))
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.startswith("down_revision")]
    path.write_text(
        "".join('revision = "r" + "0001"\n' if ln.startswith("revision =") else ln for ln in kept)
    )
    return ["--config", str(p.config), "apply"], {}, str(path)


def postgres_scheme(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    return ["--url", "postgres://app@127.0.0.1:5432/app", *_status(p)], {}, "postgresql://"


def _no_mysql(tmp: Path) -> dict[str, str]:
    folder = tmp / "no_mysql_driver"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(NO_MYSQL_DRIVER)
    return {"PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


def missing_pymysql(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    url = "mysql+pymysql://app@127.0.0.1:3306/app"
    return ["--url", url, *_status(p)], _no_mysql(tmp), "pip install 'schema-reconciler[mysql]'"


def missing_default_mysql_driver(p: Project, tmp: Path) -> tuple[list[str], dict[str, str], str]:
    url = "mysql://app@127.0.0.1:3306/app"  # SQLAlchemy's default: mysqlclient (MySQLdb)
    return ["--url", url, *_status(p)], _no_mysql(tmp), "mysql+pymysql://"


CASES: list[Case] = [
    nested_toml,
    invalid_utf8,
    interval_flag_overflow,
    interval_inf,
    interval_nan,
    versions_loop,
    migrations_loop,
    migrations_loop_absolute,
    revision_file_loop,
    no_down_revision,
    no_down_revision_dynamic,
    postgres_scheme,
    missing_pymysql,
    missing_default_mysql_driver,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_a_user_error_is_exit_2_naming_it_without_a_traceback(tmp_path: Path, case: Case) -> None:
    project = _project(tmp_path)
    args, env, named = case(project, tmp_path)
    result = run_cli(args, cwd=project.root, env=env, log_format=None, timeout=60)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "internal error" not in output, output
    assert result.returncode == 2, output
    assert named in output, output
    # one message: `Error: ...`, or one `command_failed` line (`run` logs JSON when piped)
    assert output.count("Error: ") + output.count('"command_failed"') == 1, output


def test_a_config_file_with_a_utf8_bom_is_read(tmp_path: Path) -> None:
    """Notepad and PowerShell write one; most TOML tools accept it, and so do we."""
    project = _project(tmp_path)
    project.write_config(name="bommed")
    project.config.write_bytes(b"\xef\xbb\xbf" + project.config.read_bytes())
    result = run_cli(["--config", str(project.config), "status", "--json"], cwd=project.root, log_format=None)
    assert result.returncode == 0, result.stderr
    assert '"bommed"' in result.stdout
