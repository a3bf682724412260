"""schema-reconciler: keep a database schema in step with its models and Alembic revisions.

The public API, what an application, its env.py or a script uses: the hooks for an env.py
(`migration_lock`, `exclude_reconciler_tables`), the exception tree, the settings schema and
`load_settings`, and the version. Importing the package stays cheap: the names here need only
the standard library, and `load_settings` (which pulls in SQLAlchemy's URL parsing) is imported
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
from reconciler.version import __version__

if TYPE_CHECKING:
    from reconciler.config.load import load_settings

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
    """`load_settings` on first use: importing it loads the config package and SQLAlchemy."""
    if name == "load_settings":
        from reconciler.config.load import load_settings  # deferred: `import reconciler` stays cheap

        return load_settings
    raise AttributeError(f"module 'reconciler' has no attribute {name!r}")
