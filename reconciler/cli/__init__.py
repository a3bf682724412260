"""click commands: each a settings lookup and one call into commands/ or runtime/ (global options
and output rules: runtime/options.py); errors become the documented exit codes. The only click
importer: the frame in shell.py, the commands in operate.py and authoring.py."""

from __future__ import annotations

from reconciler.cli import authoring, operate, teams  # noqa: F401  (they register their commands)
from reconciler.cli.shell import main

__all__ = ["main"]
