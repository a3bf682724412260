"""schema-reconciler: keep a database schema in step with its models and Alembic revisions.

The public API, for apps, env.py files and scripts: the hooks (`migration_lock`,
`exclude_reconciler_tables`), the exception tree, the settings schema and `load_settings`.
Everything else is reached through its module and may move between releases.

Importing this package stays cheap and standard-library only (the worker and a project's env.py
import `reconciler.hooks`, which runs this first): `load_settings` loads the configuration layer
on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reconciler.errors import (
    Blocked,
    ConfigError,
    DifferencesFound,
    LockTimeout,
    ReconcilerError,
    Refused,
    RetryDeferred,
    RevisionFailed,
    StateError,
    Suspended,
    UnreachableError,
    WaitTimeout,
    WorkerError,
)
from reconciler.hooks import exclude_reconciler_tables, migration_lock
from reconciler.settings import Settings

if TYPE_CHECKING:
    from reconciler.config.load import load_settings

__version__ = "0.1.0"

__all__ = [
    "Blocked",
    "ConfigError",
    "DifferencesFound",
    "LockTimeout",
    "ReconcilerError",
    "Refused",
    "RetryDeferred",
    "RevisionFailed",
    "Settings",
    "StateError",
    "Suspended",
    "UnreachableError",
    "WaitTimeout",
    "WorkerError",
    "__version__",
    "exclude_reconciler_tables",
    "load_settings",
    "migration_lock",
]


def __getattr__(name: str) -> Any:
    """`reconciler.load_settings`, imported on first use (PEP 562)."""
    if name == "load_settings":
        from reconciler.config.load import load_settings  # lazy: the worker and env.py import us

        return load_settings
    raise AttributeError(f"module 'reconciler' has no attribute {name!r}")
