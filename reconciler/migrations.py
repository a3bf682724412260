"""The only importer of Alembic: one migrations directory driven through the project's env.py.

Runs inside the worker. Every operation goes through `EnvironmentContext(...)` + `run_env()` the
way `alembic.command` does, so env.py decides the connection, `target_metadata`, `version_table`
and every `context.configure` option (Flask-Migrate's `configure_args` included). The
`ScriptDirectory` is built once per worker and reused across steps.

A custom version table must be passed by env.py itself (`context.configure(version_table=...)`, or
Flask-Migrate's `Migrate(..., version_table=...)`); the worker refuses when env.py's version table
differs from the target's `version_table` setting, so the control plane never reads one table
while env.py writes another.
"""

from __future__ import annotations

import argparse
import io
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory

from reconciler.errors import ConfigError, StateError
from reconciler.redact import redact

DEFAULT_VERSION_TABLE = "alembic_version"
_SPLIT_PATHS = re.compile(r"[,\s" + re.escape(os.pathsep) + r"]+")


class RevisionError(Exception):
    """A revision raised while it ran; carries the revision id and the original exception."""

    def __init__(self, revision: str, direction: str, original: BaseException) -> None:
        super().__init__(f"{direction} of revision {revision} failed")
        self.revision = revision
        self.direction = direction
        self.original = original


@dataclass(frozen=True)
class Guard:
    """What the configure wrapper enforces on every `context.configure(...)` call."""

    exclude_tables: frozenset[str]
    version_table: str = DEFAULT_VERSION_TABLE
    version_table_schema: str = ""


def install_configure_guard(guard: Guard) -> None:
    """Wrap `EnvironmentContext.configure` (in this process only) to apply `guard`.

    - our journal tables are excluded from autogenerate (chained with env.py's own hooks);
    - env.py's version table must be the target's;
    - online SQLite gets `transactional_ddl=True` unless env.py chose, so one revision is one
      transaction (the worker makes pysqlite emit BEGIN).
    """
    original = getattr(EnvironmentContext.configure, "_reconciler_original", None)
    original = original or EnvironmentContext.configure

    def configure(self: EnvironmentContext, *args: Any, **kwargs: Any) -> None:
        _check_version_table(kwargs, guard)
        kwargs["include_object"] = _chain_include_object(kwargs.get("include_object"), guard)
        kwargs["include_name"] = _chain_include_name(kwargs.get("include_name"), guard)
        connection = kwargs.get("connection", args[0] if args else None)
        dialect = getattr(getattr(connection, "dialect", None), "name", "")
        if dialect == "sqlite" and kwargs.get("transactional_ddl") is None:
            kwargs["transactional_ddl"] = True
        original(self, *args, **kwargs)

    configure._reconciler_original = original  # type: ignore[attr-defined]
    EnvironmentContext.configure = configure  # type: ignore[method-assign]


def _check_version_table(kwargs: dict[str, Any], guard: Guard) -> None:
    table = kwargs.get("version_table") or DEFAULT_VERSION_TABLE
    schema = kwargs.get("version_table_schema") or ""
    if (table, schema) != (guard.version_table, guard.version_table_schema or ""):
        ours = _qualified(guard.version_table, guard.version_table_schema)
        raise ConfigError(
            f"env.py uses the version table {_qualified(table, schema)} but the target's "
            f"version_table is {ours}; make [target] version_table / version_table_schema match "
            "what env.py passes to context.configure"
        )


def _qualified(table: str, schema: str | None) -> str:
    return f"{schema}.{table}" if schema else table


def _chain_include_object(user_hook: Any, guard: Guard) -> Callable[..., bool]:
    def include_object(obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "table" and name in guard.exclude_tables:
            return False
        return bool(user_hook(obj, name, type_, reflected, compare_to)) if user_hook else True

    return include_object


def _chain_include_name(user_hook: Any, guard: Guard) -> Callable[..., bool]:
    def include_name(name: Any, type_: str, parent_names: Any) -> bool:
        if type_ == "table" and name in guard.exclude_tables:
            return False
        return bool(user_hook(name, type_, parent_names)) if user_hook else True

    return include_name


def _step_revision(step: Any) -> str | None:
    script = getattr(step, "revision", None)
    revision = getattr(script, "revision", None)
    return revision if isinstance(revision, str) else None


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


class Migrations:
    """One migrations directory with its Alembic Config, ScriptDirectory and env.py."""

    def __init__(
        self,
        migrations_dir: Path,
        alembic_ini: Path | None,
        url: str,
        x_args: dict[str, str] | None = None,
    ) -> None:
        self.directory = migrations_dir
        self.ini = alembic_ini
        self.config = Config(str(alembic_ini) if alembic_ini else None)
        self.ini_script_location = self._ini_option("script_location")
        self.ini_prepend_sys_path = self._ini_option("prepend_sys_path")
        self.config.set_main_option("script_location", str(migrations_dir).replace("%", "%%"))
        self.config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        x = [f"{key}={value}" for key, value in (x_args or {}).items()]
        self.config.cmd_opts = argparse.Namespace(x=x)
        self._script: ScriptDirectory | None = None
        self._running: str | None = None
        self.env_ran = True  # False while env.py runs up to context.run_migrations()

    def _ini_option(self, name: str) -> str | None:
        if self.ini is None:
            return None
        try:
            return self.config.get_main_option(name)
        except Exception as exc:  # a malformed ini (configparser errors)
            raise ConfigError(f"{self.ini} cannot be read: {redact(str(exc))}") from None

    @property
    def env_py(self) -> Path:
        return self.directory / "env.py"

    def extra_sys_paths(self) -> list[Path]:
        """alembic.ini's `prepend_sys_path`, resolved against the ini's folder."""
        if not self.ini or not self.ini_prepend_sys_path:
            return []
        base = self.ini.parent
        parts = [p for p in _SPLIT_PATHS.split(self.ini_prepend_sys_path) if p]
        return [(base / p).resolve() for p in parts]

    def script_location_warning(self) -> str | None:
        """A note when the ini's script_location names another directory than ours."""
        if not self.ini_script_location or ":" in self.ini_script_location.replace(os.sep, ""):
            return None  # unset, or a package resource ("pkg:dir")
        configured = Path(self.ini_script_location)
        if not configured.is_absolute():
            configured = Path.cwd() / configured
        if configured.resolve() == self.directory.resolve():
            return None
        return (
            f"{self.ini} has script_location {self.ini_script_location}, but the target's "
            f"migrations directory is {self.directory}; using the latter"
        )

    def use_callbacks(self, apply: Callable[[Config], Config]) -> None:
        """Let the project's Flask-Migrate `@migrate.configure` callbacks adjust the Config."""
        self.config = apply(self.config)

    @property
    def script(self) -> ScriptDirectory:
        if self._script is None:
            if not self.directory.is_dir():
                raise ConfigError(
                    f"migrations directory {self.directory} does not exist; create it with "
                    "`reconciler init` or point [target] migrations at it"
                )
            self._script = ScriptDirectory.from_config(self.config)
        return self._script

    def _run(self, fn: Callable[[Any, Any], Any], **options: Any) -> None:
        script = self.script

        def reached(heads: Any, context: Any) -> Any:
            self.env_ran = True
            return fn(heads, context)

        self.env_ran = False
        with EnvironmentContext(self.config, script, fn=reached, **options):
            script.run_env()

    def _run_steps(self, direction: str, fn: Callable[[Any, Any], Any], **options: Any) -> None:
        try:
            self._run(fn, **options)
        except BaseException as exc:
            if self._running is not None:
                raise RevisionError(self._running, direction, exc) from exc
            raise
        finally:
            self._running = None

    def upgrade(self, revision: str) -> list[str]:
        """Apply exactly one step from the database's heads to `revision`; the ids applied."""
        applied: list[str] = []

        def fn(heads: Any, context: Any) -> Any:
            steps = self.script._upgrade_revs(revision, heads)
            ids = [r for r in (_step_revision(s) for s in steps) if r]
            if len(steps) > 1:
                raise StateError(
                    f"upgrade to {revision} would apply {len(steps)} revisions "
                    f"({', '.join(ids)}) from the database heads {', '.join(heads) or 'base'}; "
                    "the reconciler applies one revision per step: upgrade to the next one first"
                )
            applied.extend(ids)
            self._running = ids[0] if ids else None
            return steps

        self._run_steps("upgrade", fn, destination_rev=revision)
        return applied

    def downgrade(self, revision: str) -> list[str]:
        """Downgrade the database to `revision`; the ids reverted."""
        reverted: list[str] = []

        def fn(heads: Any, context: Any) -> Any:
            steps = self.script._downgrade_revs(revision, heads)
            reverted.extend(r for r in (_step_revision(s) for s in steps) if r)
            self._running = reverted[0] if reverted else None
            return steps

        self._run_steps("downgrade", fn, destination_rev=revision)
        return reverted

    def stamp(self, revisions: list[str], purge: bool = False) -> None:
        """Set the version table to `revisions` without running any revision."""
        destination = tuple(revisions)

        def fn(heads: Any, context: Any) -> Any:
            return self.script._stamp_revs(destination, heads)

        self._run(fn, destination_rev=destination, purge=purge)

    def sql(self, start: str | None, end: str) -> str:
        """Offline SQL of the upgrade start:end (start None = from base), through env.py."""
        buffer = io.StringIO()

        def fn(heads: Any, context: Any) -> Any:
            return self.script._upgrade_revs(end, heads)

        self.config.output_buffer = buffer
        try:
            self._run(fn, as_sql=True, starting_rev=start, destination_rev=end)
        finally:
            self.config.output_buffer = None
        return buffer.getvalue()

    def compare(self, fallback_metadata: Any) -> list[Any]:
        """Autogenerate's differences between env.py's target_metadata and the database."""
        found: list[Any] = []

        def fn(heads: Any, context: Any) -> Any:
            from alembic.autogenerate import compare_metadata

            metadata = context.opts.get("target_metadata") or fallback_metadata
            if metadata is None:
                raise ConfigError(
                    f"{self.env_py} sets no target_metadata and no [target] models is configured; "
                    "set target_metadata in env.py or [target] models"
                )
            found.extend(compare_metadata(context, metadata))
            return []

        self._run(fn, dont_mutate=True)
        return found

    def headers(self, paths: Iterable[Path], on_error: Callable[[BaseException, Path], Exception]
                ) -> list[dict[str, Any]]:
        """Execute revision files and return their identifiers (for non-literal headers)."""
        from alembic.util import load_python_file

        out: list[dict[str, Any]] = []
        for path in paths:
            try:
                module = load_python_file(str(path.parent), path.name)
            except (Exception, SystemExit) as exc:
                raise on_error(exc, path) from None
            out.append(
                {
                    "path": str(path),
                    "doc": module.__doc__,
                    "revision": getattr(module, "revision", None),
                    "down_revision": _as_list(getattr(module, "down_revision", None)),
                    "branch_labels": _as_list(getattr(module, "branch_labels", None)),
                    "depends_on": _as_list(getattr(module, "depends_on", None)),
                }
            )
        return out

    def init_dir(
        self,
        template: str,
        template_dir: Path | None,
        ini_path: Path,
        metadata_lines: str | None,
    ) -> None:
        """Create the migrations directory from a template (Alembic's or Flask-Migrate's)."""
        from alembic import command
        from alembic.util import CommandError

        config = _template_config(ini_path, template_dir)
        try:
            directory = os.path.relpath(self.directory, Path.cwd())
        except ValueError:  # another drive
            directory = str(self.directory)
        if directory.startswith(".."):
            directory = str(self.directory)
        try:
            command.init(config, directory, template=template)
        except CommandError as exc:
            raise ConfigError(f"cannot create {self.directory}: {redact(str(exc))}") from None
        if metadata_lines:
            _set_target_metadata(self.env_py, metadata_lines)


def _template_config(ini_path: Path, template_dir: Path | None) -> Config:
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


def _set_target_metadata(env_py: Path, lines: str) -> None:
    text = env_py.read_text(encoding="utf-8")
    pattern = re.compile(r"^target_metadata = None$", re.MULTILINE)
    if not pattern.search(text):
        raise ConfigError(
            f"{env_py} has no line 'target_metadata = None' to replace; set target_metadata "
            "in it by hand"
        )
    env_py.write_text(pattern.sub(lambda _m: lines, text, count=1), encoding="utf-8")


# --- differences -------------------------------------------------------------------------------


def _table_name(table: Any) -> str:
    schema = getattr(table, "schema", None)
    return _qualified(str(table.name), schema)


def _columns(constraint: Any) -> str:
    try:
        return ",".join(str(c.name) for c in constraint.columns)
    except Exception:  # an expression index
        return "?"


def _render_type(type_: Any) -> str:
    try:
        return str(type_)
    except Exception:
        return type(type_).__name__


def _object_key(obj: Any) -> tuple[str, str]:
    """(table, stable one-line name) of an index, unique constraint or foreign key."""
    table = _table_name(obj.table)
    if type(obj).__name__ == "ForeignKeyConstraint":
        target = obj.elements[0].target_fullname.rsplit(".", 1)[0] if obj.elements else "?"
        referred = ",".join(e.target_fullname.rsplit(".", 1)[-1] for e in obj.elements)
        return table, f"{table}({_columns(obj)})->{target}({referred})"
    name = getattr(obj, "name", None)
    return table, f"{table}.{name}" if name else f"{table}({_columns(obj)})"


def _describe_one(diff: tuple[Any, ...]) -> tuple[str, str, str, str]:
    """(kind, table, key, text) of one of autogenerate's difference tuples."""
    kind = str(diff[0])
    if kind in ("add_table", "remove_table"):
        table = _table_name(diff[1])
        where = "models" if kind == "add_table" else "database"
        return kind, table, f"{kind} {table}", f"table {table} is only in the {where}"
    if kind in ("add_column", "remove_column"):
        table, column = _qualified(diff[2], diff[1]), diff[3]
        where = "models" if kind == "add_column" else "database"
        text = f"column {table}.{column.name} {_render_type(column.type)} is only in the {where}"
        return kind, table, f"{kind} {table}.{column.name}", text
    if kind.startswith("modify_"):
        table = _qualified(diff[2], diff[1])
        old, new = diff[5], diff[6]
        if kind == "modify_type":
            old, new = _render_type(old), _render_type(new)
        what = kind.split("_", 1)[1]
        text = f"column {table}.{diff[3]} {what}: database {old!s}, models {new!s}"
        return kind, table, f"{kind} {table}.{diff[3]}", text
    if kind in ("add_table_comment", "remove_table_comment"):
        table = _table_name(diff[1])
        return kind, table, f"{kind} {table}", f"table {table} comment differs"
    obj = diff[1]
    if hasattr(obj, "table"):
        table, name = _object_key(obj)
        where = "models" if kind.startswith("add_") else "database"
        noun = kind.split("_", 1)[1].replace("fk", "foreign key")
        return kind, table, f"{kind} {name}", f"{noun} {name} is only in the {where}"
    return kind, "", f"{kind} {' '.join(str(x) for x in diff[1:])}", f"{kind}: {diff[1:]!s}"


def describe_differences(diffs: list[Any], exclude_tables: frozenset[str]) -> list[dict[str, str]]:
    """Flatten autogenerate's differences into {kind, key, text}, dropping excluded tables."""
    flat: list[tuple[Any, ...]] = []
    for diff in diffs:
        flat.extend(diff if isinstance(diff, list) else [diff])
    out: list[dict[str, str]] = []
    for diff in flat:
        kind, table, key, text = _describe_one(diff)
        if table.rsplit(".", 1)[-1] in exclude_tables:
            continue
        out.append({"kind": kind, "key": redact(key), "text": redact(text)})
    return sorted(out, key=lambda d: d["key"])
