"""Commands a person runs: plan, history, check, baseline, stamp, downgrade, init, resolve,
revision, merge.

Each one reuses the control plane of `reconcile.py` (connection, lock, journal, worker); none of
them ever changes the database without the target's advisory lock.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from reconciler import logs
from reconciler.control import guard
from reconciler.control.reconcile import Reconciler, Status, refuse_unless_applicable
from reconciler.control.workers import start_headers_worker
from reconciler.core import safety
from reconciler.core.graph import RevisionGraph
from reconciler.db import connection, journal, placement
from reconciler.errors import (
    ConfigError,
    DifferencesFound,
    ReconcilerError,
    Refused,
    RevisionFailed,
    StateError,
    UnreachableError,
)
from reconciler.project import appsource, differences
from reconciler.project.repository import Project
from reconciler.redact import redact
from reconciler.settings import Settings

if TYPE_CHECKING:
    from reconciler.control.workers import Generated

log = logs.get("reconciler.admin")


# --- plan and history --------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanStep:
    revision: str
    message: str
    path: str


def plan(rec: Reconciler) -> tuple[Status, list[PlanStep]]:
    status = rec.status()
    graph = rec.graph()
    steps = [
        PlanStep(rev, graph.revisions[rev].message, str(graph.revisions[rev].path))
        for rev in status.decision.pending
    ]
    return status, steps


def plan_findings(rec: Reconciler, status: Status) -> guard.Analysis:
    """What the destructive-change guard finds in the pending revisions (each with its line)."""
    pending = status.decision.pending
    # A SQLite file that does not exist yet is an empty database, where nothing is refused (nothing
    # can be lost); starting a worker would connect, and create the file.
    if not pending or rec.missing_database_file() is not None:
        return guard.Analysis((), "built-in")
    with _worker(rec) as worker:
        return rec.check_pending(
            worker, rec.graph(), pending, empty=status.sync_state == "uninitialized_empty"
        )


def analysed_status(rec: Reconciler, status: Status) -> Status:
    """`status` with the `destructive_pending` condition decided (analysing needs a worker)."""
    if not status.decision.pending or status.sync_state not in ("behind", "uninitialized_empty"):
        return status
    try:
        plan_findings(rec, status)
    except ReconcilerError as exc:  # env.py or the models do not load: status still reports
        log.warning("pending_not_analysed", target=rec.target, error=str(exc))
        return status
    return rec.status()


def fail_on(analysis: guard.Analysis, kinds: Iterable[str]) -> None:
    """`plan --fail-on`: Refused (exit 6) when unacknowledged findings of these kinds exist;
    an unanalysable revision counts as possible data loss."""
    wanted = set(kinds)
    if safety.DATA_LOSS in wanted:
        wanted.add(safety.UNANALYSABLE)
    hits = [
        f
        for f in analysis.findings
        if f.kind in wanted and (not f.acknowledged or f.rule == safety.DROP_JOURNAL)
    ]
    if hits:
        fix = (
            safety.JOURNAL_FIX
            if any(f.rule == safety.DROP_JOURNAL for f in hits)
            else "fix the revisions, or acknowledge data loss with `allow_destructive = True` in the "
            "revision file"
        )
        raise Refused(
            f"the pending plan has {len(hits)} finding(s) of {', '.join(sorted(set(kinds)))}: "
            f"{'; '.join(f'{f.revision} ({f.where}) {f.message}' for f in hits)} — {fix}"
        )


def plan_sql(rec: Reconciler, status: Status) -> str:
    """Offline SQL of the pending revisions (Alembic's `upgrade --sql start:heads`)."""
    if not status.decision.pending:
        return ""
    heads = sorted(status.decision.db_heads)
    if len(heads) > 1:
        raise ConfigError(
            f"the database has several heads ({', '.join(heads)}); Alembic cannot render offline "
            "SQL from more than one starting revision: use `reconciler plan` without --sql"
        )
    with _worker(rec) as worker:
        return str(worker.sql(heads[0] if heads else None, "heads"))


def history(rec: Reconciler) -> tuple[list[str], bool]:
    """Lines of the revision graph, newest first, applied ones marked; and whether the db was read."""
    graph = rec.graph()
    status = rec.status()
    reachable = status.sync_state != "unknown"
    applied = _applied(graph, status)
    heads = set(graph.heads)
    lines = []
    for rev in graph.newest_first():
        revision = graph.revisions[rev]
        downs = ", ".join(revision.down_revisions) or "<base>"
        tags = []
        if rev in heads:
            tags.append("head")
        if rev in status.decision.db_heads:
            tags.append("current")
        if revision.branch_labels:
            tags.append("branch: " + ", ".join(revision.branch_labels))
        mark = "[applied]" if rev in applied else "[pending]" if reachable else ""
        tag = f" ({'; '.join(tags)})" if tags else ""
        lines.append(f"{downs} -> {rev}{tag}, {revision.message} {mark}".rstrip())
    return lines, reachable


def _applied(graph: RevisionGraph, status: Status) -> frozenset[str]:
    known = [h for h in status.decision.db_heads if h in graph.revisions]
    return graph.closure(known)


# --- worker helpers ------------------------------------------------------------------------------
@contextmanager
def _worker(rec: Reconciler) -> Iterator[Any]:
    """A worker that only reads (analysis, offline SQL, compares)."""
    with connection.connect(rec.engine) as conn, rec.start_worker(conn, role="read") as worker:
        yield worker


def compare(rec: Reconciler) -> list[dict[str, str]]:
    """Differences between the target database and the models, minus the known ones."""
    known = differences.load_for(rec.settings)
    with _worker(rec) as worker:
        found = list(worker.compare())
    return [dict(d) for d in differences.unknown(found, known)]


def drift(rec: Reconciler) -> list[dict[str, str]]:
    """What the daemon's drift compare would report now: compare minus `[drift] ignore`."""
    from reconciler.core.drift import without_ignored

    status = rec.status()
    if status.sync_state == "unknown":
        raise UnreachableError(status.message)
    if status.sync_state != "in_sync":
        raise StateError(
            f"the database is {status.sync_state} ({status.message}); drift is compared at the "
            "repository's heads: run `reconciler apply` first"
        )
    return [dict(d) for d in without_ignored(compare(rec), rec.settings.drift.ignore)]


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
    quoted = admin.dialect.identifier_preparer.quote(name)
    with connection.connect(admin) as conn:
        try:
            conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
        except sa.exc.DBAPIError as exc:
            admin.dispose()
            reason = redact(str(exc.orig)).strip().splitlines()
            raise ConfigError(
                f"cannot create the scratch database {name}: {reason[0] if reason else exc}; "
                "let the user create databases, or run `check` without --scratch against a "
                "throwaway database"
            ) from None
    scratch_url = url.set(database=name).render_as_string(hide_password=False)
    try:
        yield _with_url(settings, scratch_url)
    finally:
        with connection.connect(admin) as conn:
            if backend == "postgresql":
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": name},
                )
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted}"))
            if backend in ("mysql", "mariadb"):  # the scratch journal's own database (journal.py)
                side = admin.dialect.identifier_preparer.quote(placement.side_schema(backend, name))
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {side}"))
        admin.dispose()


def _with_url(settings: Settings, url: str) -> Settings:
    target = dataclasses.replace(settings.target, url=url, lock_url="")
    return dataclasses.replace(settings, target=target)


def check(settings: Settings, scratch: bool) -> list[dict[str, str]]:
    """Upgrade the (scratch) database to the heads, compare with the models; raise on differences."""
    found = _compare_at_heads(settings, scratch)
    if found:
        raise DifferencesFound(
            f"the models and the migrations differ ({len(found)}):\n{_listing(found)}\n"
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
        rec = Reconciler(s)
        try:
            rec.apply(trigger="check")
            if use_known:
                return compare(rec)
            with _worker(rec) as worker:
                return list(worker.compare())
        finally:
            rec.close()


def baseline(settings: Settings, scratch: bool) -> tuple[Path, int]:
    """Write every difference autogenerate reports at the heads into the known-differences file."""
    found = _compare_at_heads(settings, scratch, use_known=False)
    path = differences.path_for(settings)
    return path, differences.save(path, found, differences.dialect_of(settings.target.url))


# --- stamp, downgrade, resolve -----------------------------------------------------------------
def stamp(rec: Reconciler, revision: str, force: bool) -> tuple[str, ...]:
    """Adopt a database that has tables but no version table, after comparing it with the models.

    Nothing is replayed: the version table is set to `revision`. Without `force` the database must
    have no version table and must not differ from the models (minus the known differences).
    """
    targets = _stamp_targets(rec.graph(), revision)
    with (
        connection.connect(rec.engine) as conn,
        rec.locked(conn, rec.settings.apply.lock_acquire_timeout),
        rec.start_worker(conn) as worker,
    ):
        if not force:
            _refuse_unless_adoptable(rec.status())
            known = differences.load_for(rec.settings)
            found = differences.unknown(worker.compare(), known)
            if found:
                raise Refused(
                    f"the database differs from the models, so stamping {', '.join(targets)} "
                    f"would record a schema it does not have:\n{_listing(found)}\n"
                    "align them first, or pass --force"
                )
        rec.ensure_journal(conn)
        graph = rec.graph()
        rows = [
            journal.record_started(
                conn,
                rec.journal,
                target=rec.target,
                operation="stamp",
                revision=rev,
                down_revisions=graph.revisions[rev].down_revisions,
                file_hash=graph.revisions[rev].file_hash,
            )
            for rev in targets
        ]
        worker.stamp(list(targets), purge=force)
        for row in rows:
            journal.record_finished(conn, rec.journal, row, outcome="stamped")
        _record_below(rec, conn, graph, targets)
    log.info("stamped", target=rec.target, revisions=list(targets), forced=force)
    return targets


def _record_below(
    rec: Reconciler, conn: sa.engine.Connection, graph: RevisionGraph, targets: tuple[str, ...]
) -> None:
    """Stamping marks the ancestors applied too: record their hashes, so they are ours, not a
    foreign writer's."""
    held = journal.recorded_hashes(conn, rec.journal, rec.target)
    for rev in graph.topological(graph.closure(targets)):
        if rev not in targets and rev not in held:
            revision = graph.revisions[rev]
            journal.record_hash(
                conn,
                rec.journal,
                target=rec.target,
                operation=journal.RECORD,
                revision=rev,
                file_hash=revision.file_hash,
                down_revisions=revision.down_revisions,
                trigger="stamp",
            )


def _stamp_targets(graph: RevisionGraph, revision: str) -> tuple[str, ...]:
    if revision in ("head", "heads"):
        if not graph.heads:
            raise ConfigError("the repository has no revisions; there is nothing to stamp")
        if revision == "head" and len(graph.heads) > 1:
            raise ConfigError(
                f"the repository has several heads ({', '.join(graph.heads)}); name one, or say `heads`"
            )
        return tuple(graph.heads)
    return (graph.resolve(revision),)


def _refuse_unless_adoptable(status: Status) -> None:
    if status.sync_state == "unknown":
        raise UnreachableError(status.message)
    if status.sync_state == "uninitialized_empty":
        raise StateError(
            "the database has no tables: there is nothing to adopt; `reconciler apply` creates "
            "the schema from the revisions"
        )
    if status.sync_state != "uninitialized_with_tables":
        raise StateError(
            f"the database is {status.sync_state} (version table rows: "
            f"{', '.join(sorted(status.decision.db_heads)) or 'none'}); stamp only adopts a "
            "database without a version table (pass --force to overwrite the version table)"
        )


def _listing(found: list[Any]) -> str:
    return "\n".join(f"  - {d['text']}" for d in found)


def downgrade_plan(rec: Reconciler, revision: str) -> tuple[str, list[str]]:
    """What `downgrade REVISION` would undo, newest first (`base` undoes everything)."""
    graph = rec.graph()
    status = rec.status()
    refuse_unless_applicable(status)  # dirty, unreachable, ahead, diverged, unmerged, unadopted
    steps = relative_steps(revision)
    if steps is not None:
        target = steps_down(graph, status.decision.db_heads, steps)
    else:
        target = "base" if revision == "base" else graph.resolve(revision)
    applied = _applied(graph, status)
    if target != "base" and target not in applied:
        raise StateError(
            f"revision {target} is not applied (db heads: "
            f"{', '.join(sorted(status.decision.db_heads)) or 'none'}); nothing to downgrade to"
        )
    keep = frozenset() if target == "base" else graph.ancestors(target)
    return target, [r for r in reversed(graph.topological(applied)) if r not in keep]


def relative_steps(revision: str) -> int | None:
    """`-N` (Alembic's relative downgrade): N; None for a revision id, `base` or a label."""
    if not revision.startswith("-"):
        return None
    if not revision[1:].isdigit() or int(revision[1:]) == 0:
        raise ConfigError(
            f"{revision!r} is neither a revision nor a relative step: say `-1` (one step down), "
            "`-2`, a revision id, or `base`"
        )
    return int(revision[1:])


def steps_down(graph: RevisionGraph, db_heads: Iterable[str], steps: int) -> str:
    """The revision `steps` below the database's one current revision (`base` below the first)."""
    heads = sorted(db_heads)
    if not heads:
        return "base"  # nothing is applied: nothing to undo
    if len(heads) > 1:
        raise ConfigError(
            f"`downgrade -{steps}` counts down from one current revision, and the database has "
            f"{len(heads)} ({', '.join(heads)}); name the revision to go down to: "
            "`reconciler downgrade REV`"
        )
    rev = heads[0]
    for done in range(steps):
        if rev == "base":
            raise StateError(
                f"only {done} revision(s) are applied below {heads[0]}: `downgrade -{steps}` goes "
                f"below the base; `reconciler downgrade base` undoes everything"
            )
        downs = graph.revisions[rev].down_revisions
        if len(downs) > 1:
            raise ConfigError(
                f"revision {rev} merges {', '.join(downs)}: one step down from it is ambiguous; "
                "name the revision to go down to: `reconciler downgrade REV`"
            )
        rev = downs[0] if downs else "base"
    return rev


Confirm = Callable[[str, list[str]], bool]


def downgrade(rec: Reconciler, revision: str, confirm: Confirm) -> tuple[str, list[str]]:
    """Undo revisions down to `revision`, one per step, journaled, all under the target's lock.

    The plan is made under the lock and `confirm(target, undo)` (which shows it and asks the
    person) is called under the lock too, so what is confirmed is what gets undone.
    """
    # Before connecting: a revision the repository does not know is a typo, not a database state.
    if relative_steps(revision) is None and revision != "base":
        rec.graph().resolve(revision)
    with connection.connect(rec.engine) as conn, rec.locked(conn, rec.settings.apply.lock_acquire_timeout):
        target, undo = downgrade_plan(rec, revision)
        if not undo:
            return target, undo
        if not confirm(target, undo):
            raise Refused("downgrade not confirmed; nothing was changed")
        rec.ensure_journal(conn)
        with rec.start_worker(conn) as worker:
            for rev in undo:
                _downgrade_one(rec, conn, worker, rev)
    return target, undo


def _downgrade_one(rec: Reconciler, conn: sa.engine.Connection, worker: Any, rev: str) -> None:
    row = journal.record_started(
        conn,
        rec.journal,
        target=rec.target,
        operation="downgrade",
        revision=rev,
        trigger="downgrade",
    )
    try:
        # `rev@-1`: one step down on rev's own branch. Its plain parent as the destination
        # would also undo every other head that descends from that parent.
        seconds = worker.downgrade(f"{rev}@-1")
    except RevisionFailed as exc:
        transactional = rec.backend in journal.TRANSACTIONAL_DDL
        journal.record_finished(
            conn,
            rec.journal,
            row,
            outcome="failed" if transactional else "dirty",
            error_class=exc.error_class,
            error=str(exc),
            sqlstate=exc.sqlstate,
        )
        raise
    journal.record_finished(conn, rec.journal, row, outcome="downgraded", duration_ms=int(seconds * 1000))
    log.info("revision_downgraded", target=rec.target, revision=rev)


def resolve(rec: Reconciler, revision: str, outcome: str) -> str:
    """An operator says what became of a dirty revision: `applied` or `rolled_back`.

    `applied` also sets the version table to the revision (it failed before Alembic could), so
    the next reconcile goes on after it; `rolled_back` lets the next reconcile apply it again.
    """
    if outcome not in ("applied", "rolled_back"):
        raise ConfigError(f"outcome must be applied or rolled_back, got {outcome!r}")
    graph = rec.graph()
    rev = _dirty_revision_id(graph, revision, outcome)
    with connection.connect(rec.engine) as conn, rec.locked(conn, rec.settings.apply.lock_acquire_timeout):
        rec.ensure_journal(conn)
        status = rec.status()
        # Why here: the same judgement status made (journal and version table together).
        settled = journal.settle_interrupted(
            conn,
            rec.journal,
            _applied(graph, status),
            rec.backend,
            unsafe="dirty" in rec.settings.unsafe,
        )
        dirty = list(dict.fromkeys(str(r["revision"]) for r in settled))
        if rev not in dirty:
            raise StateError(_not_dirty(rev, dirty, rev in _applied(graph, status)))
        if outcome == "applied" and rev not in _applied(graph, status):
            with rec.start_worker(conn) as worker:
                worker.stamp(rev)
        journal.resolve_dirty(conn, rec.journal, rev, outcome)
    log.info("dirty_resolved", target=rec.target, revision=rev, outcome=outcome)
    return rev


def _not_dirty(rev: str, dirty: list[str], listed: bool) -> str:
    where = (
        f"the version table lists {rev}: it is applied, and the journal records it so"
        if listed
        else f"the version table does not list {rev} and no step of it left its "
        "transaction: the next apply runs it"
    )
    return (
        f"revision {rev} is not dirty in the journal ({where}; dirty: "
        f"{', '.join(dirty) or 'none'}); nothing to resolve"
    )


def _dirty_revision_id(graph: RevisionGraph, revision: str, outcome: str) -> str:
    """The full id; a revision rolled back by hand may have left the repository, so keep it."""
    try:
        return graph.resolve(revision)
    except ConfigError:
        if outcome == "applied":
            raise
        return revision


# --- revision, merge (the Flask-Migrate authoring verbs) ---------------------------------------
def generate_revision(rec: Reconciler, message: str | None, rev_id: str | None = None) -> Generated:
    """`flask db migrate`: one revision autogenerated from the models, through the project's
    env.py, in the worker dev mode uses; no differences (after the known ones), no file.

    Only reads the database, which must be at the repository's heads: a revision generated
    against an older schema would repeat the pending ones."""
    check_rev_id(rec.settings, rev_id)
    _refuse_unless_at_heads(rec.status())
    with _worker(rec) as worker:
        result: Generated = worker.generate(message=message, rev_id=rev_id)
    if result.path is not None:
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
    log.info("revision_merged", revision=result.revision, path=result.path, merged=list(wanted))
    return result


@contextmanager
def _plain_worker(settings: Settings) -> Iterator[Any]:
    """A worker for what needs neither the models nor the database (an in-memory one when no
    URL is set: writing a revision file connects to nothing)."""
    from reconciler.control.workers import Worker, WorkerJob

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
    from reconciler.control.workers import Worker, WorkerJob

    template, reason = None, ""
    if not settings.target.models:
        template, reason = _template_without_models(settings.root_dir, flask_app)
    # The layout needs no database; an in-memory one satisfies the worker's job.
    job = WorkerJob.from_settings(settings, url=settings.target.url or "sqlite://")
    with Worker.start(job, python=settings.target.python or None) as worker:
        made = worker.init_dir(template)
    if settings.journal.placement == "default":
        _write_journal_filter(directory / "env.py", settings.journal.table)
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


JOURNAL_FILTER = """

RECONCILER_TABLES = {{{tables}}}


def exclude_reconciler_tables(object, name, type_, reflected, compare_to):
    # schema-reconciler keeps its journal beside the models' tables
    # ([journal] placement = "default"): autogenerate must leave it alone
    return not (type_ == "table" and name in RECONCILER_TABLES)

"""
# (the template's text, the same with the filter) for Flask-Migrate's and Alembic's env.py
_FILTER_EDITS = (
    (
        """        conf_args["process_revision_directives"] = process_revision_directives
""",
        """        conf_args["process_revision_directives"] = process_revision_directives
    conf_args.setdefault("include_object", exclude_reconciler_tables)
""",
    ),
    (
        "connection=connection, target_metadata=target_metadata\n",
        "connection=connection, target_metadata=target_metadata,\n"
        "            include_object=exclude_reconciler_tables,\n",
    ),
)


def _write_journal_filter(env_py: Path, table: str) -> None:
    """A new env.py gets the journal filter when the journal's placement cannot hide it from
    autogenerate (`[journal] placement = "default"`): a function of its own, so env.py does not
    import reconciler (an app image may not have it)."""
    text = env_py.read_text(encoding="utf-8")
    for old, new in _FILTER_EDITS:
        if old in text and "def run_migrations_offline" in text:
            names = ", ".join(repr(n) for n in (table, f"{table}_flags"))
            text = text.replace(old, new, 1).replace(
                "\n\ndef run_migrations_offline",
                JOURNAL_FILTER.format(tables=names).rstrip("\n") + "\n\n\ndef run_migrations_offline",
                1,
            )
            env_py.write_text(text, encoding="utf-8")
            log.info(
                "journal_filter_written",
                env_py=redact(str(env_py)),
                reason="[journal] placement = default keeps the journal beside the models' tables",
            )
            return
    log.warning(
        "journal_filter_not_written",
        env_py=redact(str(env_py)),
        hint="add include_object=exclude_reconciler_tables (reconciler.hooks) to env.py's "
        "context.configure: this env.py has an unknown layout",
    )


# --- suspend / resume ----------------------------------------------------------------------
def suspend(rec: Reconciler, reason: str) -> None:
    """Stop every replica of the target from applying until `resume` (a flag in the journal)."""
    from reconciler.db import flags
    from reconciler.sessions import replica_id

    value = f"by {replica_id()} at {_utc_now()}" + (f": {reason}" if reason else "")
    with connection.connect(rec.engine) as conn:
        if not rec.journal_exists(conn):
            with rec.locked(conn, rec.settings.apply.lock_acquire_timeout):
                rec.ensure_journal(conn)
        flags.put(conn, rec.journal, flags.suspended_key(rec.target), value)
    log.info("suspended", target=rec.target, reason=reason)


def resume(rec: Reconciler) -> list[str]:
    """Let replicas apply again: clears `suspended` and `blocked`; returns what was cleared."""
    from reconciler.db import flags

    cleared: list[str] = []
    with connection.connect(rec.engine) as conn:
        if not rec.journal_exists(conn):
            return cleared
        for name, key in (
            ("suspended", flags.suspended_key(rec.target)),
            ("blocked", flags.blocked_key(rec.target)),
        ):
            if flags.delete(conn, rec.journal, key):
                cleared.append(name)
        flags.clear_failures(conn, rec.journal, rec.target)
    log.info("resumed", target=rec.target, cleared=cleared)
    return cleared


def _utc_now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
