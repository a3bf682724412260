"""The console entry point: a worker started early for the commands that need one, then the CLI.

The CLI's imports (click, structlog, SQLAlchemy) take a noticeable part of a short command; an
`apply` starts its worker before them (`control.prestart`), so that both interpreters import at
once.
"""

from __future__ import annotations

import sys


def main() -> None:
    from reconciler.control import prestart  # deferred: nothing heavier than the spawn comes first

    prestart.prestart(sys.argv[1:])
    from reconciler.cli import main as cli  # deferred: after the early worker's start

    cli()
