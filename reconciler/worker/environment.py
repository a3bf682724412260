"""One migrations directory driven through the project's env.py: Alembic's Config and
ScriptDirectory, and every run of env.py (upgrade, downgrade, stamp, sql, compare, generate).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory

from reconciler.errors import ConfigError, StateError
from reconciler.protocol import GenerateRequest
from reconciler.redact import redact
from reconciler.worker.autogenerate import (
    SCOPE,
    GenerateOutcome,
    HookRuns,
    TableScope,
    autogenerate_flag,
    mark_draft,
    scoped,
    table_scope,
)
from reconciler.worker.failures import RevisionError
from reconciler.worker.generated import OpInfo, finish_scripts, known_of, possible_renames
from reconciler.worker.recorder import RecordingConnection, record_revision
from reconciler.worker.scaffold import set_target_metadata, template_config
from reconciler.worker.stairway import Stairway
from reconciler.worker.upgrading import PlanOutcome, StepAsk, UpgradePlan, per_migration

_SPLIT_PATHS = re.compile(r"[,\s" + re.escape(os.pathsep) + r"]+")


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
        self._engines: list[Any] = []  # the engines env.py connected with, in this worker
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

    def rescan(self) -> None:
        """Read the versions directory again on next use (a file was moved meanwhile)."""
        self._script = None

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
            self._note_engine(context)
            return fn(heads, context)

        self.env_ran = False
        with EnvironmentContext(self.config, script, fn=reached, **options):
            script.run_env()

    def _note_engine(self, context: Any) -> None:
        """Remember the engine env.py connected with (see release_connections)."""
        engine = getattr(getattr(context, "connection", None), "engine", None)
        if engine is not None and all(engine is not seen for seen in self._engines):
            self._engines.append(engine)

    def release_connections(self) -> None:
        """Close the idle connections env.py's engines keep pooled (Flask-SQLAlchemy's
        `db.engine` keeps one after each run). Behind a session-mode pooler every open client
        holds a server connection: the guard's recording connection must not wait for one that
        an idle pooled connection of ours keeps."""
        for engine in self._engines:
            engine.dispose()

    def _run_steps(self, direction: str, fn: Callable[[Any, Any], Any], **options: Any) -> None:
        try:
            self._run(fn, **options)
        except BaseException as exc:
            if self._running is not None:
                raise RevisionError(self._running, direction, exc) from exc
            raise
        finally:
            self._running = None

    def probe(self) -> None:
        """Run env.py once applying nothing and creating nothing (not even the version table):
        its connection and configure() call are checked before the control plane writes."""
        self._run(lambda _heads, _context: [], dont_mutate=True)

    def upgrade(
        self, revisions: Sequence[str], checks: Mapping[str, Mapping[str, Any]], ask: StepAsk
    ) -> PlanOutcome:
        """Apply `revisions` in order, one step and one transaction each, in one run of env.py
        (`upgrading.UpgradePlan`; `ask` before each). `checks`: the guard's per-operation check of
        some of them (`checking_operations`)."""
        plan = UpgradePlan(self.script, revisions, checks, ask)
        try:
            with per_migration():
                self._run(plan.steps, destination_rev=revisions[-1] if revisions else None)
        except BaseException as exc:
            if plan.running is not None:
                raise RevisionError(plan.running, "upgrade", exc) from exc
            raise
        finally:
            plan.close()
        return plan.outcome

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

    def stairway(self, before: Sequence[str], revisions: Sequence[str]) -> Any:
        """`reconciler test`'s steps in one run of env.py (`stairway.Stairway`): its reply."""
        plan = Stairway(self.script, before, revisions)
        try:
            with per_migration():
                self._run(plan.steps)
        except Exception as exc:
            if plan.running is None:
                raise
            plan.failed(exc)
        return plan.reply()

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
            from alembic.autogenerate import (
                compare_metadata,  # deferred: worker start-up time (a warm spare preloads it)
            )

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

    def headers(
        self, paths: Iterable[Path], on_error: Callable[[BaseException, Path], BaseException]
    ) -> list[dict[str, Any]]:
        """Execute revision files and return their identifiers (for non-literal headers)."""
        from alembic.util import load_python_file  # deferred: worker start-up time (a warm spare preloads it)

        out: list[dict[str, Any]] = []
        for path in paths:
            try:
                module = load_python_file(str(path.parent), path.name)
            except (Exception, SystemExit) as exc:
                raise on_error(exc, path) from None
            header: dict[str, Any] = {
                "path": str(path),
                "doc": module.__doc__,
                "revision": getattr(module, "revision", None),
                "branch_labels": _as_list(getattr(module, "branch_labels", None)),
                "depends_on": _as_list(getattr(module, "depends_on", None)),
            }
            if hasattr(module, "down_revision"):  # absent: the control plane names the file
                header["down_revision"] = _as_list(module.down_revision)
            for flag in ("allow_destructive", "draft"):
                if hasattr(module, flag):
                    header[flag] = getattr(module, flag)
            out.append(header)
        return out

    def record(self, revisions: Iterable[str], url: str) -> list[dict[str, Any]]:
        """Each revision's upgrade operations, recorded through a read-only connection whose
        transaction is rolled back (nothing is written; see "recording" below)."""
        wanted = list(revisions)
        if not wanted:
            return []
        environment = EnvironmentContext(self.config, self.script)  # op.get_context().config
        self.release_connections()  # the recording connection is one more client: no idle extra
        recording = RecordingConnection(url)
        try:
            out = []
            for rev in wanted:
                script = self.script.get_revision(rev)
                out.append(record_revision(script.module, str(script.path), rev, url, recording, environment))
            return out
        finally:
            recording.close()

    def generate(self, request: GenerateRequest, fallback_metadata: Any) -> GenerateOutcome:
        """Autogenerate one revision file as `alembic revision --autogenerate` does.

        env.py runs with our ScriptDirectory; its hooks and the ini's post-write hooks apply. After
        env.py's own `process_revision_directives`, known differences are left out and a script
        without operations is dropped: no file is written then. A failure after a file was written
        removes it.
        """
        from alembic import autogenerate  # deferred: worker start-up time (a warm spare preloads it)
        from alembic.util import (
            rev_id as new_rev_id,  # deferred: worker start-up time (a warm spare preloads it)
        )

        rev_id = request.rev_id or new_rev_id()
        self._refuse_existing(rev_id)
        command_args: dict[str, Any] = {
            "message": request.message,
            "autogenerate": True,
            "sql": False,
            "head": request.head,
            "splice": False,
            "branch_label": None,
            "version_path": None,
            "rev_id": rev_id,
            "depends_on": None,
        }
        revision_context = autogenerate.RevisionContext(self.config, self.script, command_args)
        scopes: list[TableScope] = []
        dialects: list[Any] = []

        def fn(heads: Any, context: Any) -> Any:
            self._check_at_heads(heads, request.head)
            if context.opts.get("target_metadata") is None and fallback_metadata is not None:
                context.opts["target_metadata"] = fallback_metadata
            scope = table_scope(request)  # here: env.py has imported the models
            SCOPE[:] = [scope] if scope is not None else []
            if scope is not None:
                scope.expand(context.opts.get("target_metadata"))
                scopes.append(scope)
            dialects.append(context.dialect)
            revision_context.run_autogenerate(heads, context)
            return []

        with autogenerate_flag(self.config), scoped():
            self._run(fn, template_args=revision_context.template_args, revision_context=revision_context)
        infos = finish_scripts(
            revision_context.generated_revisions, known_of(request.known), dialects[0] if dialects else None
        )
        outcome = self._write(revision_context, infos, request)
        if scopes:
            outcome.compared = sorted({name for scope in scopes for name in scope.compared()})
        return outcome

    def _refuse_existing(self, rev_id: str) -> None:
        try:
            found = self.script.revision_map.get_revision(rev_id)
        except Exception:  # not there (or ambiguous as a prefix): Alembic decides later
            return
        if found is not None and found.revision == rev_id:
            raise ConfigError(
                f"revision {rev_id} already exists ({getattr(found, 'path', '?')}); remove that file (and "
                "downgrade the database below it) before generating it again"
            )

    def _check_at_heads(self, db_heads: Any, head: str) -> None:
        """Autogenerate compares against the database: it must be at the repository's heads."""
        repo = sorted(self.script.get_heads())
        if head == "head" and len(repo) > 1:
            raise StateError(
                f"the migrations directory has {len(repo)} heads ({', '.join(repo)}); merge them "
                "first (`alembic merge heads` or `flask db merge`) or name the head to build on"
            )
        current = sorted(str(h) for h in db_heads or ())
        try:
            at = sorted(r.revision for r in self.script.get_revisions(tuple(current)) if r)
        except Exception:  # the database has a revision the directory does not know
            at = None
        if at != repo:
            raise StateError(
                f"the database is at {', '.join(current) or 'no revision'}, not at the migrations "
                f"directory's heads ({', '.join(repo) or 'none'}); bring it to the heads first "
                "(upgrade it, or downgrade it when it is ahead)"
            )

    def revision_files(self) -> set[Path]:
        """Every `*.py` under the versions directories."""
        return self._revision_files()

    def _revision_files(self) -> set[Path]:
        try:
            folders = [Path(p) for p in self.script._version_locations]
        except Exception:  # a private attribute: fall back to the usual place
            folders = [self.directory / "versions"]
        return {p for folder in folders if folder.is_dir() for p in folder.rglob("*.py")}

    def _write(self, revision_context: Any, infos: list[OpInfo], request: GenerateRequest) -> GenerateOutcome:
        before = self._revision_files()
        hooks = HookRuns()
        try:
            with hooks.installed():  # alembic.ini's post-write hooks run while the scripts are written
                scripts = [s for s in revision_context.generate_scripts() if s is not None]
            if request.draft:
                for written in scripts:
                    mark_draft(Path(written.path))
        except BaseException:
            for path in self._revision_files() - before:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        first = scripts[0] if scripts else None
        messages = [str(s.message) for s in revision_context.generated_revisions if s.message]
        return GenerateOutcome(
            path=str(first.path) if first is not None else None,
            revision=str(first.revision) if first is not None else None,
            message=messages[0] if messages else (request.message or ""),
            operations=[info.as_dict() for info in infos],
            destructive=[info.destructive for info in infos if info.destructive],
            renames=possible_renames(infos),
            hook_failures=hooks.failures,
        )

    def empty_revision(
        self, message: str | None, head: str = "head", rev_id: str | None = None
    ) -> GenerateOutcome:
        """An empty revision from the directory's template, as `flask db revision` writes it
        (Alembic's `revision` without autogenerate: env.py runs only with `revision_environment`)."""
        from alembic import command  # deferred: worker start-up time (a warm spare preloads it)

        return self._written(
            lambda: command.revision(self.config, message=message, head=head, rev_id=rev_id), message
        )

    def merge(self, revisions: list[str], message: str | None, rev_id: str | None = None) -> GenerateOutcome:
        """A merge revision of `revisions` (`heads`: all of them), as `flask db merge` writes it."""
        from alembic import command  # deferred: worker start-up time (a warm spare preloads it)

        return self._written(
            lambda: command.merge(self.config, revisions, message=message, rev_id=rev_id), message
        )

    def _written(self, write: Callable[[], Any], message: str | None) -> GenerateOutcome:
        """Run one of Alembic's writing commands with the post-write hooks named on failure."""
        before = self._revision_files()
        hooks = HookRuns()
        try:
            with hooks.installed():
                written = write()
        except BaseException:
            for path in self._revision_files() - before:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        self.rescan()
        script = written[0] if isinstance(written, list) else written
        return GenerateOutcome(
            path=str(script.path) if script is not None else None,
            revision=str(script.revision) if script is not None else None,
            message=str(getattr(script, "doc", None) or message or ""),
            hook_failures=hooks.failures,
        )

    def init_dir(
        self,
        template: str,
        template_dir: Path | None,
        ini_path: Path,
        metadata_lines: str | None,
    ) -> None:
        """Create the migrations directory from a template (Alembic's or Flask-Migrate's)."""
        from alembic import command  # deferred: worker start-up time (a warm spare preloads it)
        from alembic.util import CommandError  # deferred: worker start-up time (a warm spare preloads it)

        config = template_config(ini_path, template_dir)
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
            set_target_metadata(self.env_py, metadata_lines)
