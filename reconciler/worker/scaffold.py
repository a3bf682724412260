"""The migrations directory's creation from a template (`init_dir`): Alembic's or Flask-Migrate's."""

from __future__ import annotations

import re
from pathlib import Path

from alembic.config import Config

from reconciler.errors import ConfigError


def template_config(ini_path: Path, template_dir: Path | None) -> Config:
    if template_dir is None:
        return Config(str(ini_path))

    class TemplateConfig(Config):
        def get_template_directory(self) -> str:
            return str(template_dir)

    return TemplateConfig(str(ini_path))


def metadata_lines(models: str, is_metadata: bool) -> str:
    """The env.py lines that set target_metadata from 'pkg.module:attr'."""
    module, _, attr = models.partition(":")
    first = attr.split(".")[0]
    expression = attr if is_metadata else f"{attr}.metadata"
    return f"from {module} import {first}\n\ntarget_metadata = {expression}"


def set_target_metadata(env_py: Path, lines: str) -> None:
    text = env_py.read_text(encoding="utf-8")
    pattern = re.compile(r"^target_metadata = None$", re.MULTILINE)
    if not pattern.search(text):
        raise ConfigError(
            f"{env_py} has no line 'target_metadata = None' to replace; set target_metadata in it by hand"
        )
    env_py.write_text(pattern.sub(lambda _m: lines, text, count=1), encoding="utf-8")
