"""The one read of `os.environ` in the package.

A module of its own, importing nothing, so that the worker an `apply` starts before the CLI's
imports (`control.prestart`) gets its environment without loading the configuration code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def process_environment() -> Mapping[str, str]:
    """This process's environment (a worker's child environment starts from it; settings are
    resolved in it unless a caller passes another)."""
    return os.environ
