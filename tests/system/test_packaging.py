"""Installing: the package's metadata, the wheel and sdist, the README's install lines."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import reconciler

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.toml"


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_metadata_is_publishable() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    assert project["version"] == reconciler.__version__
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table
    for name in project.get("license-files", []):
        assert (ROOT / name).is_file(), name
    assert (ROOT / project["readme"]).is_file()
    classifiers = project["classifiers"]
    minimum = re.match(r">=3\.(\d+)", project["requires-python"])
    assert minimum and f"Programming Language :: Python :: 3.{minimum.group(1)}" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # not beside an SPDX license
    assert {"postgres", "mysql", "flask"} <= set(project["optional-dependencies"])


def test_readme_install_lines_work_today_and_after_publication() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install '.[postgres,flask]'" in readme  # from a clone, today
    assert "pip install 'schema-reconciler[postgres,flask]'" in readme  # once published


@pytest.mark.slow
def test_wheel_built_from_the_repository_carries_the_example_and_license(tmp_path: Path) -> None:
    """setup.py copies config.example.toml into the package at build time: the wheel has it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in (
        "pyproject.toml",
        "setup.py",
        "MANIFEST.in",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "CONTRIBUTING.md",
        "config.example.toml",
    ):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "reconciler", src / "reconciler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    shutil.copytree(ROOT / "docs", src / "docs")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheels"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("schema_reconciler-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.read("reconciler/config.example.toml") == EXAMPLE.read_bytes()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "reconciler/py.typed" in names  # PEP 561: the inline types reach users
    assert "License-Expression: MIT" in metadata and f"Version: {reconciler.__version__}" in metadata
