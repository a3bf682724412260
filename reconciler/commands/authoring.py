"""What a person runs to write the repository's side: init, revision, merge, check, baseline.

`check` and `baseline` upgrade a (scratch) database through the control plane, under its lock.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from reconciler import logs
from reconciler.commands import heads
from reconciler.commands.common import listing
from reconciler.config import appsource
from reconciler.control.drift import compare, read_worker
from reconciler.control.reading import read_graph, read_status
from reconciler.control.reconcile import reconcile_once
from reconciler.control.target import TargetHandle, open_target, release_target
from reconciler.control.workers import Worker, WorkerJob, start_headers_worker
from reconciler.core.status import Status
from reconciler.db import connection, placement
from reconciler.errors import ConfigError, DifferencesFound, StateError, UnreachableError
from reconciler.project import differences, edits
from reconciler.project.edits import write_journal_filter
from reconciler.project.repository import Project
from reconciler.redact import redact
from reconciler.settings import Settings

if TYPE_CHECKING:
    from reconciler.control.workers import Generated

log = logs.get("reconciler.admin")
dev_log = logs.get("reconciler.dev")  # seal and confirm finish what dev mode began


# --- check and baseline ------------------------------------------------------------------------
@contextmanager
def scratch_settings(settings: Settings) -> Iterator[Settings]:
    """A temporary empty database on the target's server, dropped afterwards."""
    url = sa.engine.make_url(settings.target.url)
    backend = url.get_backend_name()
    name = f"reconciler_check_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        folder = Path(url.database or ".").parent if url.database else Path.cwd()
        path = folder / f".{name}.db"
        scratch_url = url.set(database=str(path)).render_as_string(hide_password=False)
        try:
            yield _with_url(settings, scratch_url)
        finally:
            for leftover in folder.glob(f".{name}.db*"):
                leftover.unlink(missing_ok=True)
        return
    admin = connection.make_engine(settings.target.url, settings.target.name, 10.0)
    try:
        create_database(admin, name)
    except ConfigError:
        admin.dispose()
        raise
    try:
        yield scratch_copy(settings, name)
    finally:
        drop_database(admin, name)
        admin.dispose()


def scratch_copy(settings: Settings, database: str) -> Settings:
    """The settings with the target's URL naming another database on the same server."""
    url = sa.engine.make_url(settings.target.url).set(database=database)
    return _with_url(settings, url.render_as_string(hide_password=False))


def create_database(admin: sa.engine.Engine, name: str, template: str | None = None) -> None:
    """CREATE DATABASE `name` (PostgreSQL: a copy of `template` when given; nobody may be connected
    to it), on the server of `admin`; refused with the fix when the user may not."""
    quote = admin.dialect.identifier_preparer.quote
    copy = f" TEMPLATE {quote(template)}" if template else ""
    with connection.connect(admin) as conn:
        try:
            conn.execute(sa.text(f"CREATE DATABASE {quote(name)}{copy}"))
        except sa.exc.DBAPIError as exc:
            reason = redact(str(exc.orig)).strip().splitlines()
            raise ConfigError(
                f"cannot create the scratch database {name}: {reason[0] if reason else exc}; "
                "let the user create databases, or run `check` without --scratch against a "
                "throwaway database"
            ) from None


def drop_database(admin: sa.engine.Engine, name: str) -> None:
    """Drop a scratch database (its sessions ended first; MySQL: its journal's side database too)."""
    backend = admin.dialect.name
    quote = admin.dialect.identifier_preparer.quote
    with connection.connect(admin) as conn:
        if backend == "postgresql":
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quote(name)}"))
        if backend in ("mysql", "mariadb"):  # the scratch journal's own database (journal.py)
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quote(placement.side_schema(backend, name))}"))


def _with_url(settings: Settings, url: str) -> Settings:
    target = dataclasses.replace(settings.target, url=url, lock_url="")
    return dataclasses.replace(settings, target=target)


def check(settings: Settings, scratch: bool) -> list[dict[str, str]]:
    """The HEADS marker against the graph (before any database), then: upgrade the (scratch)
    database to the heads, compare with the models; raise on differences."""
    heads.check(settings)
    found = _compare_at_heads(settings, scratch)
    if found:
        raise DifferencesFound(
            f"the models and the migrations differ ({len(found)}):\n{listing(found)}\n"
            "generate a revision for them (`flask db migrate` or dev mode), or accept them with "
            "`reconciler baseline`"
        )
    return found


def _compare_at_heads(settings: Settings, scratch: bool, use_known: bool = True) -> list[Any]:
    @contextmanager
    def chosen() -> Iterator[Settings]:
        if scratch:
            with scratch_settings(settings) as s:
                yield s
        else:
            yield settings

    with chosen() as s:
        handle = open_target(s)
        try:
            reconcile_once(handle, trigger="check")
            if use_known:
                return compare(handle)
            with read_worker(handle) as worker:
                return list(worker.compare())
        finally:
            release_target(handle)


def baseline(settings: Settings, scratch: bool) -> tuple[Path, int]:
    """Write every difference autogenerate reports at the heads into the known-differences file."""
    found = _compare_at_heads(settings, scratch, use_known=False)
    path = differences.path_for(settings)
    return path, differences.save(path, found, differences.dialect_of(settings.target.url))


# --- revision, merge (the Flask-Migrate authoring verbs) ---------------------------------------
def generate_revision(handle: TargetHandle, message: str | None, rev_id: str | None = None) -> Generated:
    """`flask db migrate`: one revision autogenerated from the models, through the project's
    env.py, in the worker dev mode uses; no differences (after the known ones), no file.

    Only reads the database, which must be at the repository's heads: a revision generated
    against an older schema would repeat the pending ones."""
    check_rev_id(handle.settings, rev_id)
    _refuse_unless_at_heads(read_status(handle))
    with read_worker(handle) as worker:
        result: Generated = worker.generate(message=message, rev_id=rev_id)
    if result.path is not None:
        heads.keep(handle.settings)
        log.info(
            "revision_generated",
            revision=result.revision,
            path=result.path,
            operations=[op["text"] for op in result.operations],
        )
    return result


def check_rev_id(settings: Settings, rev_id: str | None) -> None:
    """`--rev-id` must fit the version table's column, as every revision file's id must (see
    `graph.check_id_lengths`): refused before a worker starts or anything connects."""
    limit = settings.target.revision_id_length
    if rev_id is not None and len(rev_id) > limit:
        raise ConfigError(
            f"--rev-id {rev_id!r} is {len(rev_id)} characters, longer than the {limit} of the "
            "version table's version_num column; give a shorter id (or none: a new 12-character "
            "one is made)"
        )


def _refuse_unless_at_heads(status: Status) -> None:
    state = status.sync_state
    if state == "unknown":
        raise UnreachableError(status.message)
    if state in ("behind", "uninitialized_empty"):
        pending = status.decision.pending
        raise StateError(
            f"the database is not at the repository's heads: {len(pending)} revision(s) pending "
            f"({', '.join(pending)}); a revision generated now would repeat them: run "
            "`reconciler upgrade` first, then generate"
        )
    if state == "multiple_heads":
        raise StateError(f"{status.message}; `reconciler merge` writes the merge revision")
    if state != "in_sync":
        raise StateError(status.message)


def empty_revision(settings: Settings, message: str | None, rev_id: str | None = None) -> Generated:
    """`flask db revision`: an empty revision from the directory's template, on the one head."""
    check_rev_id(settings, rev_id)
    with _plain_worker(settings) as worker:
        result: Generated = worker.revision(message=message, rev_id=rev_id)
    heads.keep(settings)
    log.info("revision_created", revision=result.revision, path=result.path)
    return result


def merge(
    settings: Settings, revisions: tuple[str, ...], message: str | None, rev_id: str | None = None
) -> Generated | None:
    """`flask db merge`: a merge revision of `revisions` (default: every head); None when the
    repository has fewer than two heads (nothing to merge, no file)."""
    check_rev_id(settings, rev_id)
    wanted = tuple(revisions) or ("heads",)
    if wanted == ("heads",) and len(Project(settings, start_worker=start_headers_worker).graph().heads) < 2:
        return None
    with _plain_worker(settings) as worker:
        result: Generated = worker.merge(wanted, message=message, rev_id=rev_id)
    heads.keep(settings)
    log.info("revision_merged", revision=result.revision, path=result.path, merged=list(wanted))
    return result


@contextmanager
def _plain_worker(settings: Settings) -> Iterator[Any]:
    """A worker for what needs neither the models nor the database (an in-memory one when no
    URL is set: writing a revision file connects to nothing)."""
    job = WorkerJob.from_settings(settings, url=settings.target.url or "sqlite://")
    with Worker.start(job, python=settings.target.python or None) as worker:
        yield worker


# --- init ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InitResult:
    """What `init` created, from which template, and why that one."""

    directory: Path
    template: str  # "flask" (what `flask db init` writes) or "generic" (what `alembic init` writes)
    reason: str
    alembic_ini: Path


def init(settings: Settings, flask_app: str = "") -> InitResult:
    """Create a migrations directory: Flask-Migrate's layout for a Flask project, else Alembic's.

    A Flask project is one whose `models` is a Flask-SQLAlchemy db (the worker tells), or, without
    `models`, whose app module (`flask_app`, as FLASK_APP names it, else wsgi.py / app.py, where
    Flask looks) creates a `Migrate(...)` object: found by reading the source, never importing it.
    """
    directory = settings.migrations_dir
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(
            f"migrations directory {directory} already exists and is not empty; "
            "choose another --migrations or use the existing one"
        )
    template, reason = None, ""
    if not settings.target.models:
        template, reason = _template_without_models(settings.root_dir, flask_app)
    # The layout needs no database; an in-memory one satisfies the worker's job.
    job = WorkerJob.from_settings(settings, url=settings.target.url or "sqlite://")
    with Worker.start(job, python=settings.target.python or None) as worker:
        made = worker.init_dir(template)
    if settings.journal.placement == "default":
        write_journal_filter(directory / "env.py", settings.journal.table)
    chosen = str(made.get("template") or template or "generic")
    reason = reason or _models_reason(settings.target.models, chosen)
    ini = Path(str(made.get("alembic_ini") or directory / "alembic.ini"))
    log.info("initialized", migrations=redact(str(directory)), template=chosen, reason=reason)
    return InitResult(directory, chosen, reason, ini)


def _models_reason(models: str, template: str) -> str:
    if template.startswith("flask"):
        return f"[target] models {models!r} is a Flask-SQLAlchemy db"
    return f"[target] models {models!r} is not a Flask-SQLAlchemy db (a declarative base or MetaData)"


def _template_without_models(root: Path, flask_app: str) -> tuple[str, str]:
    found = appsource.find_flask_migrate(root, flask_app)
    if found is not None:
        where, origin = found
        return "flask", f"{where} creates Migrate(...) ({origin})"
    looked = f"FLASK_APP={flask_app}" if flask_app else "wsgi.py and app.py"
    return "generic", (
        f"no Flask app creating Migrate(...) was found in {looked} and no models are set; for the "
        "layout `flask db init` makes, pass --models pkg.module:db (or set FLASK_APP)"
    )


# --- seal and confirm (dev mode's drafts and held-back revisions) ------------------------------
def seal(settings: Settings, message: str) -> Path:
    """Turn the draft revision into a normal one: drop its marker, set its message and file name.

    The result is what `flask db migrate -m MESSAGE` writes for the same change, byte for byte
    apart from the id and the date: only the `draft = True` line goes (never the blank lines
    around it), the message replaces the docstring's first line, and the file name's slug is
    Alembic's for the new message."""
    handle = open_target(settings)
    try:
        drafts = [r for r in read_graph(handle).revisions.values() if r.draft]
    finally:
        release_target(handle)
    if not drafts:
        raise StateError("there is no draft revision to seal")
    draft = drafts[0]
    text = edits.sealed_text(draft.path.read_text(encoding="utf-8"), draft.message, message)
    length = edits.slug_length(settings)
    target = draft.path.with_name(
        edits.sealed_name(draft.path.name, draft.revision, draft.message, message, length)
    )
    edits.write_replacing(draft.path, target, text)
    heads.keep(settings)
    dev_log.info("sealed", revision=draft.revision, path=str(target), message=message)
    return target


def confirm(settings: Settings, revision: str) -> Path:
    """Write `allow_destructive = True` into a held-back revision (the marker prod honours too)."""
    handle = open_target(settings)
    try:
        graph = read_graph(handle)
        rev = graph.resolve(revision)
        path = graph.revisions[rev].path
    finally:
        release_target(handle)
    text = path.read_text(encoding="utf-8")
    confirmed = edits.confirmed_text(text)
    if confirmed == text:
        return path
    edits.write_replacing(path, path, confirmed)
    dev_log.info("destructive_confirmed", revision=rev, path=str(path))
    return path
