"""schema-reconciler: keep a database schema in step with its models and Alembic revisions."""

from __future__ import annotations

__version__ = "0.1.0"
