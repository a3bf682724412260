"""Build hook only; the metadata is pyproject.toml's.

`reconciler config --example` prints config.example.toml, so a wheel must carry it. The one copy
lives at the repository root (people read it there, and a test keeps it equal to the settings
schema): build_py copies it into the package as it builds, so there is no second copy to keep in
step. The sdist includes it through MANIFEST.in.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

EXAMPLE = "config.example.toml"


class BuildWithExample(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / EXAMPLE
        if not source.is_file():
            raise SystemExit(f"{source} is missing: the package ships it (reconciler config --example)")
        target = Path(self.build_lib) / "reconciler" / EXAMPLE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


setup(cmdclass={"build_py": BuildWithExample})
