"""One autogenerate run's request, outcome, table scope, post-write hooks and draft marker."""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic.config import Config

from reconciler.errors import ConfigError, ReconcilerError
from reconciler.protocol import GenerateRequest
from reconciler.redact import redact
from reconciler.worker.describe import qualified
from reconciler.worker.models import tables_of_files

# --- generation --------------------------------------------------------------------------------

MESSAGE_LIMIT = 60
_HEADER_ASSIGNMENTS = frozenset({"revision", "down_revision", "branch_labels", "depends_on"})
NOT_A_SLUG = re.compile(r"[^a-z0-9]+")
TEXT_LIMIT = 300
ALTER_CLEARS = {
    "modify_type": ("modify_type", None),
    "modify_nullable": ("modify_nullable", None),
    "modify_default": ("modify_server_default", False),
    "modify_comment": ("modify_comment", False),
}


@dataclass
class GenerateOutcome:
    path: str | None
    revision: str | None
    message: str
    operations: list[dict[str, str]] = field(default_factory=list)
    destructive: list[str] = field(default_factory=list)
    renames: list[str] = field(default_factory=list)
    compared: list[str] | None = None  # the table scope used (see TableScope.compared); None: all
    hook_failures: list[dict[str, str]] = field(default_factory=list)  # see HookRuns.failures


_HOOK_OUTPUT_KEPT = 2000


class HookRuns:
    """alembic.ini's post-write hooks (`[post_write_hooks]`: ruff, black), run so that what goes
    wrong names the hook.

    Alembic runs each hook with `subprocess.run` and ignores its exit status. Here each hook's
    output is captured: a hook that cannot run (its executable is not on PATH, its entry point or
    module is not installed) raises ConfigError naming the hook, and the revision is not written;
    one that exits non-zero is recorded in `failures` ({hook, type, exit_code, output}) and the
    revision kept, as Alembic keeps it. The worker's PATH starts with its interpreter's `bin/`
    (the `[target] python` virtualenv), as an activated virtualenv's does.
    """

    def __init__(self) -> None:
        self.failures: list[dict[str, str]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from alembic.script import write_hooks  # deferred: worker start-up time (a warm spare preloads it)

        registry = getattr(write_hooks, "_registry", None)
        if not isinstance(registry, dict):  # another Alembic layout: its hooks run as they are
            yield
            return
        saved = dict(registry)
        registry.update({kind: self._wrap(write_hooks, kind, fn) for kind, fn in saved.items()})
        try:
            yield
        finally:
            registry.clear()
            registry.update(saved)

    def _wrap(self, module: Any, kind: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        def run(path: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
            name = str(options.get("_hook_name") or kind) if isinstance(options, Mapping) else kind
            process = _HookProcess(name, kind)
            original = getattr(module, "subprocess", None)
            setattr(module, "subprocess", process)  # noqa: B010 - Alembic calls subprocess.run through it
            try:
                return hook(path, options, *args, **kwargs)
            except ReconcilerError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"post-write hook {name!r} (type {kind}, alembic.ini [post_write_hooks]) failed: "
                    f"{type(exc).__name__}: {redact(str(exc))}; no revision was written. Install what "
                    f"it runs in the worker's environment ({sys.executable}) or fix the hook"
                ) from None
            finally:
                setattr(module, "subprocess", original)  # noqa: B010
                if process.failure is not None:
                    self.failures.append(process.failure)

        return run


class _HookProcess:
    """Stands in for the `subprocess` module inside Alembic's write_hooks during one hook."""

    DEVNULL = subprocess.DEVNULL
    PIPE = subprocess.PIPE
    STDOUT = subprocess.STDOUT

    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind = name, kind
        self.failure: dict[str, str] | None = None

    def run(self, command: Any, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        if kwargs.get("stdout") is not subprocess.DEVNULL:
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            done: subprocess.CompletedProcess[bytes] = subprocess.run(command, **kwargs)
        except OSError as exc:
            program = command[0] if isinstance(command, (list, tuple)) and command else command
            raise ConfigError(
                f"post-write hook {self.name!r} (type {self.kind}, alembic.ini [post_write_hooks]) "
                f"could not run {program!r}: {exc.strerror or exc}; no revision was written. "
                f"Install it in the [target] python virtualenv (the worker runs {sys.executable}, "
                f"its directory is first on PATH) or set the hook's executable to a full path"
            ) from None
        if done.returncode != 0:
            output = (done.stdout or b"").decode("utf-8", "replace").strip()
            self.failure = {
                "hook": self.name,
                "type": self.kind,
                "exit_code": str(done.returncode),
                "output": redact(output[-_HOOK_OUTPUT_KEPT:]),
            }
        return done


def table_scope(request: GenerateRequest) -> TableScope | None:
    """The scope of one autogenerate (None: every table); call it once the models are imported."""
    if request.files is not None:
        mapped = tables_of_files(request.files, request.classes)
        if mapped is None:
            return None
        return TableScope(mapped | (request.tables or frozenset()), orphans=True)
    return TableScope(request.tables) if request.tables is not None else None


class ConfiguredTables:
    """The tables made while SQLAlchemy configures mappers, not where a class is declared.

    Versioning extensions (SQLAlchemy-Continuum's `<table>_version` and `transaction`), history
    mixins and `__declare_last__` hooks build tables at `configure_mappers()`: no file defines
    them, so a scope built from the changed classes misses them. `install` (in the worker, before
    any user code is imported) records every table attached to a MetaData between
    `before_configured` and `after_configured`; our `after_configured` listener is moved last at
    each `before_configured`, so the extensions' own `after_configured` work counts too.
    """

    def __init__(self) -> None:
        self.names: set[tuple[str, str | None]] = set()  # (name, schema)
        self._configuring = False
        self._installed = False

    def install(self) -> None:
        from sqlalchemy import (  # deferred: worker start-up time: imported when a job needs it
            MetaData,
            Table,
            event,
        )
        from sqlalchemy.orm import Mapper  # deferred: worker start-up time: imported when a job needs it

        if self._installed:
            return
        self._installed = True

        def after_configured() -> None:
            self._configuring = False

        def before_configured() -> None:
            self._configuring = True
            if event.contains(Mapper, "after_configured", after_configured):
                event.remove(Mapper, "after_configured", after_configured)
            event.listen(Mapper, "after_configured", after_configured)

        def attached(table: Any, parent: Any) -> None:
            if self._configuring and isinstance(parent, MetaData):
                self.names.add((str(table.name), table.schema))

        event.listen(Mapper, "before_configured", before_configured)
        event.listen(Table, "after_parent_attach", attached)

    def derived(self, sources: Iterable[str], tables: Iterable[Any]) -> set[str]:
        """Of `tables` (the models' Table objects), the keys of those made at configuration that
        belong to one of `sources` (its name inside theirs, on `_` boundaries: `project_version`,
        `version_project`) or to no modelled table at all (`transaction`): both are compared."""
        made = [t for t in tables if (str(t.name), t.schema) in self.names]
        if not made:
            return set()
        modelled = {str(t.name) for t in tables} - {str(t.name) for t in made}
        wanted = {name.rsplit(".", 1)[-1] for name in sources}
        out: set[str] = set()
        for table in made:
            owners = {m for m in modelled if _name_inside(m, str(table.name))}
            if owners & wanted or not owners:
                out.add(qualified(str(table.name), table.schema))
        return out


def _name_inside(source: str, name: str) -> bool:
    return f"_{source}_" in f"_{name}_" and source != name


CONFIGURED_TABLES = ConfiguredTables()


class TableScope:
    """The tables one autogenerate may reflect; a table only in the models is always compared.

    `orphans`: database tables that no model defines are reflected too (they are what a deleted
    model leaves behind: its drop must not be missed). Tables made at mapper configuration
    (`ConfiguredTables`) go with the tables they derive from.
    """

    def __init__(self, tables: Iterable[str], orphans: bool = False) -> None:
        self.requested = frozenset(tables)
        self.names: set[str] = set(self.requested)
        self.in_database: set[str] = set()
        self.orphans = orphans
        self.modelled: set[str] = set()
        self.orphans_seen: set[str] = set()

    def compared(self) -> set[str]:
        """The requested tables, their foreign-key neighbours and the orphans found."""
        return self.names | self.orphans_seen

    def expand(self, metadata: Any, configured: ConfiguredTables = CONFIGURED_TABLES) -> None:
        """Add the tables made at mapper configuration for the requested ones, and the
        foreign-key neighbours (one hop, either direction) of all of them."""
        metadatas = metadata if isinstance(metadata, (list, tuple)) else [metadata]
        tables = [t for one in metadatas for t in list(getattr(one, "tables", {}).values())]
        derived = configured.derived(self.requested, tables)
        self.requested |= derived
        self.names |= derived
        for one in metadatas:
            for table in list(getattr(one, "tables", {}).values()):
                key = qualified(str(table.name), table.schema)
                self.modelled.update((str(table.name), key))
                requested = table.name in self.requested or key in self.requested
                for fk in table.foreign_keys:
                    target = str(fk.target_fullname).rsplit(".", 1)[0]
                    if requested:
                        self.names.add(target)
                    elif target in self.requested or target.rsplit(".", 1)[-1] in self.requested:
                        self.names.add(key)

    def _wanted(self, name: str, key: str) -> bool:
        return name in self.names or key in self.names

    def include_name(self, name: Any, type_: str, parent_names: Any) -> bool:
        if type_ != "table" or not isinstance(name, str):
            return True
        key = qualified(name, (parent_names or {}).get("schema_name"))
        self.in_database.update((name, key))
        if self._wanted(name, key):
            return True
        if self.orphans and name not in self.modelled and key not in self.modelled:
            self.orphans_seen.add(key)
            return True
        return False

    def include_object(self, obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ != "table" or reflected or not isinstance(name, str):
            return True
        key = qualified(name, getattr(obj, "schema", None))
        if self._wanted(name, key):
            return True
        return name not in self.in_database and key not in self.in_database  # a new table


SCOPE: list[TableScope] = []


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """`generate` sets the scope once env.py has imported the models; it never outlives it."""
    SCOPE.clear()
    try:
        yield
    finally:
        SCOPE.clear()


@contextlib.contextmanager
def autogenerate_flag(config: Config) -> Iterator[None]:
    """`cmd_opts.autogenerate`, as the CLIs set it: Flask-Migrate's env.py reads it."""
    if config.cmd_opts is None:
        config.cmd_opts = argparse.Namespace(x=[])
    opts = config.cmd_opts
    missing = object()
    before = getattr(opts, "autogenerate", missing)
    opts.autogenerate = True
    try:
        yield
    finally:
        if before is missing:
            delattr(opts, "autogenerate")
        else:
            opts.autogenerate = before


def mark_draft(path: Path) -> None:
    """Write `draft = True` after the header assignments of a revision file (graph.py reads it)."""
    text = path.read_bytes().decode("utf-8")
    lines = text.splitlines(keepends=True)
    end = len(lines)
    for node in ast.parse(text).body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else ([node.target] if isinstance(node, ast.AnnAssign) else [])
        )
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        if "draft" in names:  # the template already has one: replace it
            del lines[node.lineno - 1 : node.end_lineno or node.lineno]
            end = node.lineno - 1
            break
        if names & _HEADER_ASSIGNMENTS:
            end = node.end_lineno or node.lineno
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += newline
    lines.insert(end, "draft = True" + newline)
    _write_atomic(path, "".join(lines))


def _write_atomic(path: Path, text: str) -> None:

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
