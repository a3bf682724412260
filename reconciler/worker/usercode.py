"""Importing the project's own modules safely: sys.path, stale bytecode, errors that name the user's file."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import traceback
from collections.abc import Iterable
from importlib.machinery import SourceFileLoader
from importlib.util import cache_from_source
from pathlib import Path
from types import ModuleType
from typing import Any

from reconciler.errors import ConfigError
from reconciler.redact import redact

_OWN_PACKAGE = Path(__file__).resolve().parent.parent  # reconciler/, not reconciler/worker/
# In the worker our package is imported through a link in a private temporary folder (see
# control.workerprocess), so tracebacks name that folder: messages name the real package instead.
_OWN_LINK = os.path.join(os.path.dirname(os.path.abspath(os.path.dirname(__file__))), "")
_OWN_FORMS = tuple(dict.fromkeys((_OWN_LINK, os.path.join(str(_OWN_PACKAGE), ""))))
_MAX_MESSAGE = 1500


def put_first_on_sys_path(paths: Iterable[str | Path]) -> None:
    """Put `paths` first on sys.path, in the given order."""
    for path in reversed([str(p) for p in paths]):
        while path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def distrust_stale_bytecode(folders: Iterable[str | Path]) -> None:
    """Never run a cached .pyc of a project file that may be older than its source.

    Python trusts a .pyc whose recorded source mtime (whole seconds) and size match: a model file
    saved twice within one second with the same size (`String(128)` -> `String(256)`) would
    import stale. Under `folders`, a .pyc not written strictly after its source is deleted (and
    the source compiled afresh) or, when it cannot be deleted, ignored.
    """

    prefixes = tuple(
        {
            os.path.join(form, "")
            for f in folders
            for form in (os.path.abspath(str(f)), os.path.realpath(str(f)))
        }
    )
    original = getattr(SourceFileLoader.path_stats, "_reconciler_original", None)
    original = original or SourceFileLoader.path_stats

    def path_stats(self: Any, path: str) -> Any:
        stats = original(self, path)
        if _project_file(path, prefixes) and not _fresh_bytecode(path):
            raise OSError(f"the cached bytecode of {path} may be stale")  # compile the source
        return stats

    path_stats._reconciler_original = original  # type: ignore[attr-defined]
    SourceFileLoader.path_stats = path_stats  # type: ignore[method-assign]


def _project_file(path: str, prefixes: tuple[str, ...]) -> bool:
    """Under the project, but not in a virtualenv kept there (installed code is not edited)."""
    if not path.startswith(prefixes):
        return False
    return "site-packages" not in path and "dist-packages" not in path


def _fresh_bytecode(source: str) -> bool:
    """False when the .pyc of `source` may be stale and could not be removed."""

    try:
        cached = cache_from_source(source)
        if os.stat(cached).st_mtime_ns > os.stat(source).st_mtime_ns:
            return True
        os.unlink(cached)
    except FileNotFoundError:
        return True
    except (OSError, NotImplementedError, ValueError):
        return False
    return True


def real_paths(text: str) -> str:
    """`text` with our package's temporary link folder replaced by the package's real path."""
    real = os.path.join(str(_OWN_PACKAGE), "")
    return text.replace(_OWN_LINK, real)


def _short(text: str) -> str:
    text = real_paths(redact(text))
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."


def is_own_file(filename: str) -> bool:
    """True for a file of our package, through its real path or the worker's link to it."""
    return os.path.abspath(filename).startswith(_OWN_FORMS)


def _user_frame(exc: BaseException, root: Path) -> traceback.FrameSummary | None:
    """The frame to blame: the deepest one in the project's files, else the deepest non-import one
    outside our package, else the deepest of ours (by its real path)."""
    frames = traceback.extract_tb(exc.__traceback__)
    root_text = str(root.resolve())
    ours = [f for f in frames if f.filename.startswith(root_text) and not is_own_file(f.filename)]
    if ours:
        return ours[-1]
    other = [f for f in frames if not f.filename.startswith("<frozen") and not is_own_file(f.filename)]
    if other:
        return other[-1]
    own = [f for f in frames if is_own_file(f.filename)]
    return own[-1] if own else None


def user_error(exc: BaseException, what: str, root: Path) -> ConfigError:
    """A ConfigError naming the file and line of a user's code failure; no traceback."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else "unknown file"
        return ConfigError(_short(f"{what}: syntax error at {where}: {exc.msg}; fix the file and retry"))
    frame = _user_frame(exc, root)
    where = f" at {frame.filename}:{frame.lineno}" if frame else ""
    return ConfigError(_short(f"{what} failed{where}: {type(exc).__name__}: {exc}; fix the error and retry"))


def import_module(name: str, what: str, root: Path) -> ModuleType:
    """Import `name`, turning any failure into a ConfigError that names the file and line."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise ConfigError(
                f"{what}: cannot import module '{name}': it is not under the project root {root} "
                f"nor installed in {sys.executable}; check [target] root and the module name"
            ) from None
        raise user_error(exc, f"{what}: importing '{name}'", root) from None
    except (Exception, SystemExit) as exc:
        raise user_error(exc, f"{what}: importing '{name}'", root) from None


def import_modules(names: Iterable[str], root: Path, skip_under: Path | None) -> None:
    """Import each module; a package imports all its submodules (not those under `skip_under`)."""
    for name in names:
        module = import_module(name, "[target] imports", root)
        if hasattr(module, "__path__"):
            _import_submodules(module, root, skip_under)


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _import_submodules(package: ModuleType, root: Path, skip_under: Path | None) -> None:
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        folder = Path(getattr(info.module_finder, "path", "") or ".")
        location = folder / info.name.rsplit(".", 1)[-1]
        if skip_under is not None and _is_under(location, skip_under):
            continue  # the migrations directory: env.py must only run under Alembic
        module = import_module(info.name, "[target] imports", root)
        if info.ispkg:
            _import_submodules(module, root, skip_under)
