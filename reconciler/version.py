"""The package's version, in one place below every layer (pyproject.toml carries the same string).

`reconciler.__version__` re-exports it; modules inside the package import it from here, so that
reading the version never loads the public façade (`reconciler/__init__.py`) and what it re-exports.
"""

from __future__ import annotations

__version__ = "0.1.0"
