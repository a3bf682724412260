"""Dev mode: a saved model file becomes a revision file and a migrated dev database.

`models-dir event (debounced) → generate in a fresh (pre-warmed) worker → revision file →
reconcile.apply`, the `flask db migrate && flask db upgrade` loop done on save. A burst of saves
is one generation (`devpace`): saves during a generation coalesce into one follow-up (the
scheduler's trigger), which waits for the burst to go quiet; a generation a newer save overtook
before it was applied is dropped, not applied and then redone. The versions directory is
watched too: a teammate's revision or a branch switch is applied before anything is generated,
and a database that is ahead, diverged or forked stops generation with the command that fixes it.

Draft revisions: consecutive saves amend one draft (marked `draft = True` in its file, applied
with the journal trigger `draft`): the draft is downgraded, regenerated from the models with the
same id, rewritten and applied again — the only automatic downgrade the product does, and only on
a local database. `reconciler seal -m MSG` makes it a normal revision.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa

from reconciler import logs, sessions
from reconciler.control.applying import apply_pending
from reconciler.control.locking import target_lock
from reconciler.control.reading import read_graph, read_status
from reconciler.control.target import open_target, release_target
from reconciler.control.workerpool import WarmWorker
from reconciler.control.workers import WorkerJob
from reconciler.core.graph import Revision
from reconciler.db import connection, journal
from reconciler.errors import ConfigError, ReconcilerError, StateError
from reconciler.project import differences, edits, heads
from reconciler.project.revisions import parse_revision_file
from reconciler.redact import redact
from reconciler.runtime import signals
from reconciler.runtime.devgenerate import (
    DRAFT_TRIGGER,
    DraftGeneration,
    RevisionsChanged,
    Superseded,
    tables_of,
)
from reconciler.runtime.devpace import SavePace, written_at
from reconciler.runtime.devscope import ModelChanges
from reconciler.runtime.devtarget import check_dev_target, watch_paths
from reconciler.runtime.filescan import DEFAULT_IGNORE
from reconciler.runtime.scheduler import Loop
from reconciler.runtime.watcher import DirWatcher
from reconciler.settings import Settings

log = logs.get("reconciler.dev")

IDLE_INTERVAL = 3600.0  # dev mode is event driven; the periodic run is only a safety net
RESYNCS = 3  # status reads one run repeats while the saves of a burst keep landing during them


# --- the loop ------------------------------------------------------------------------------------
class DevLoop(DraftGeneration):
    """The dev loop: its watchers, signals and runs; each run applies what teammates wrote, then
    generates (the steps of `DraftGeneration`) when a model file was saved."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The prod guard stays on for what dev mode did not just generate and check itself: a
        # teammate's revision, or one held back before a restart. Lock risk is no concern here.
        self.handle = open_target(
            dataclasses.replace(
                settings, safety=dataclasses.replace(settings.safety, squawk="off", strict_locking=False)
            )
        )
        self.guard = not settings.dev.allow_destructive
        self.target = self.handle.target_name
        self._models_changed = threading.Event()
        self._done = threading.Event()
        self._stopping = threading.Event()
        self.loop = Loop(self._run, IDLE_INTERVAL, 0.0, name="dev")
        ignore = (*DEFAULT_IGNORE, *settings.dev.ignore)
        versions, _ = self.handle.project.version_dirs
        # A migrations directory inside the models package: the revisions this loop writes (and
        # env.py) are never model changes, or each write would start another generation.
        self.model_watcher = DirWatcher(
            watch_paths(settings),
            self._on_models,
            settings.dev.debounce,
            ignore=ignore,
            suffixes=(".py",),
            exclude=[settings.migrations_dir, *versions],
        )
        self.version_watcher = DirWatcher(
            versions, self._on_versions, settings.dev.debounce, suffixes=(".py",)
        )
        self._warm: Any = None
        self.changes = ModelChanges(self.model_watcher.files)
        self.pace = SavePace()
        self._draft_tables: dict[str, frozenset[str]] = {}  # the draft's id -> the tables it touches
        self._held: dict[str, tuple[Path, frozenset[str]]] = {}  # held back: id -> (file, tables)
        self._carry: set[str] = set()  # tables of withdrawn revisions: the next compare covers them
        self._generated = False  # the first generation has run (what fails after it is an edit)
        self._fatal: ConfigError | None = None  # why dev mode stopped at start

    # lifecycle
    def run(self) -> int:
        check_dev_target(self.settings, self.handle)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._warm = self._start_warm()
        self.model_watcher.start()
        self.version_watcher.start()
        log.info(
            "dev_started",
            target=self.target,
            url=self.handle.redacted_url,
            watching=[str(p) for p in watch_paths(self.settings)],
            draft=self.settings.dev.draft,
        )
        known = differences.load_for(self.settings)
        if known:
            log.info(
                "known_differences",
                count=len(known),
                ignored=sorted(known),
                file=str(differences.path_for(self.settings)),
            )
        self._models_changed.set()  # a full compare at start
        self.loop.start()
        signals.wait_for(self._done)
        if self._fatal is not None:
            raise self._fatal
        return 0

    def _start_warm(self) -> WarmWorker:
        with connection.connect(self.handle.engine) as conn:
            identity = sessions.identity_from_dbapi(conn.connection, self.handle.backend)
        job = WorkerJob.from_settings(self.settings)
        job = dataclasses.replace(job, exclude_tables=self.handle.journal.names, expected_identity=identity)
        return WarmWorker(
            job, python=self.settings.target.python or None, timeout=self.settings.dev.generate_timeout
        )

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        if self._stopping.is_set():
            raise SystemExit(1)
        self._stopping.set()
        threading.Thread(target=self._shutdown, daemon=True).start()

    def _shutdown(self) -> None:
        """Stop everything; the process ends even when a part fails to stop cleanly."""
        try:
            self.loop.stop(wait=True, timeout=30)
            self.model_watcher.stop()
            self.version_watcher.stop()
            if self._warm is not None:
                self._warm.close()
            release_target(self.handle)
            log.info("dev_stopped", target=self.target)
        except Exception as exc:  # a hung SIGTERM is worse than an untidy stop
            log.error("dev_stop_failed", error=redact(str(exc)), kind=exc.__class__.__name__)
        finally:
            self._done.set()

    def _on_models(self, paths: set[Path]) -> None:
        self.changes.add(paths)
        delivered = time.monotonic()
        written = written_at(paths, delivered)
        self.pace.saved(written)
        log.debug(
            "models_saved",
            paths=sorted(str(p) for p in paths),
            written_ago_ms=int((delivered - written) * 1000),
            burst=self.pace.in_burst,
            burst_spacing=self.pace.spacing,
        )
        self._models_changed.set()
        self.loop.trigger("models_changed")

    def _on_versions(self, paths: set[Path]) -> None:
        if self._ours(paths):
            return  # the revision this loop just wrote (or removed): already applied, nothing to do
        self.handle.project.invalidate()
        self.loop.trigger("revisions_changed")

    def _ours(self, paths: set[Path]) -> bool:
        """Every path is a revision file as this loop itself last left it (`_files_seen`, taken
        after each of its own changes): written with that size and time, or removed. An event
        that comes before the loop noted its change counts as a teammate's (one extra run)."""
        seen = self._files_seen
        if seen is None:
            return False
        for path in paths:
            real = path.resolve()
            try:
                stat = path.stat()
            except FileNotFoundError:
                if real in seen:
                    return False
                continue
            if path.suffix != ".py" or seen.get(real) != (stat.st_size, stat.st_mtime_ns):
                return False
        return True

    # one run
    def _run(self, reason: str) -> float | None:
        try:
            self._sync_after_quiet()
            if self._models_changed.is_set():
                self._models_changed.clear()
                try:
                    self.generate_and_apply()
                except ConfigError as exc:
                    if not self._generated and _names_a_missing_attribute(exc, self.settings):
                        self._stop_at_start(exc)
                        return None
                    raise
                finally:
                    self._generated = True  # past the first generation: later errors are edits
        except StopGenerating as exc:
            log.warning("dev_paused", reason=str(exc))
        except Superseded as exc:
            log.info("generation_discarded", reason=str(exc))
            self._models_changed.set()  # the save that overtook it has triggered the follow-up
        except RevisionsChanged as exc:
            log.info("generation_discarded", reason=str(exc))
            self._models_changed.set()
            self.loop.trigger("revisions_changed")
        except ReconcilerError as exc:
            log.error("dev_error", error=str(exc), kind=exc.__class__.__name__)
        self._keep_heads()
        return None

    def _sync_after_quiet(self) -> None:
        """Wait for a burst of saves (each delivered after the debounce) to go quiet, so it
        becomes one generation, then read the status (`_sync_first`: its hold-back decisions
        see every save). A save delivered during that read is a burst going on: wait and read
        again (a few times at most; saves that never stop are capped by the pace's MAX_HOLD)."""
        for _ in range(RESYNCS):
            if self._models_changed.is_set():
                waited = self.pace.wait_for_quiet(self._stopping)
                if waited > 0:
                    log.debug("saves_quiet", waited_ms=int(waited * 1000))
            before = self.pace.saves
            self._note_revision_files()  # before the first status read (see _files_seen)
            self._sync_first()
            if not self.pace.saved_since(before) or not self._models_changed.is_set():
                return

    def _keep_heads(self) -> None:
        """The HEADS marker equals the graph's heads after each run (what it wrote, sealed,
        dropped or re-parented, and what a pull brought)."""
        try:
            heads.keep(self.settings, read_graph(self.handle).heads)
        except (ReconcilerError, OSError) as exc:  # a broken file: said by the next run's error
            log.debug("heads_not_written", error=redact(str(exc)))

    def _stop_at_start(self, exc: ConfigError) -> None:
        """The first generation found no `[target] models` attribute in the imported module
        (`app:dbb`, where the source could not tell): no save would ever generate anything, so
        stop (exit 2) instead of idling on. A syntax error is a save in progress: it is not."""
        log.error("dev_models_unusable", error=str(exc), kind=exc.__class__.__name__)
        self._fatal = ConfigError(
            f"dev mode cannot start: {exc}; fix [target] models (or the models module) and run "
            "`reconciler run --mode dev` again"
        )
        self._stopping.set()
        threading.Thread(target=self._shutdown, daemon=True).start()

    def _sync_first(self) -> None:
        """Teammates' revisions and branch switches first: apply, or stop and say how to fix."""
        status = read_status(self.handle)
        state = status.sync_state
        if state in ("ahead", "diverged"):
            point = self._branch_point(status.decision.unknown)
            raise StopGenerating(
                f"the database has revisions this checkout does not have "
                f"({', '.join(status.decision.unknown)}), probably from another branch. To work on "
                f"this branch: check out the branch that has them, run `reconciler downgrade "
                f"{point}`, check this branch out again, and save"
            )
        if state == "multiple_heads":
            found = self._draft_to_reparent(status)
            if found is None:
                raise StopGenerating(
                    f"{status.message} (`reconciler merge` writes the merge revision); then save again"
                )
            self._reparent_draft(*found)
            return
        if state in ("behind", "uninitialized_empty"):
            if self._held_back(status.decision.pending):
                return
            self._apply("dev")

    def _held_back(self, pending: tuple[str, ...]) -> bool:
        """True while a revision we held back (destructive, unconfirmed) is pending: nothing is
        applied then. A save withdraws it instead (its file is removed, it was never applied):
        the generation that follows proposes it again if the models still drop what it drops."""
        held = [rev for rev in pending if rev in self._held]
        for rev in held:
            path, tables = self._held[rev]
            if _acknowledged(path):
                del self._held[rev]  # confirmed: applied with the rest
            elif self._models_changed.is_set() and self.changes.differ():
                path.unlink(missing_ok=True)
                self._note_revision_files()  # our own change, not a teammate's
                del self._held[rev]
                self._carry |= tables
                self.handle.project.invalidate()
                log.info(
                    "held_back_withdrawn",
                    revision=rev,
                    path=str(path),
                    reason="the models changed; it is generated again if still needed",
                )
            else:
                log.info(
                    "waiting_for_confirmation",
                    revision=rev,
                    confirm=f"reconciler confirm {rev}",
                    hint="or change the models back",
                )
                return True
        return False

    def _branch_point(self, unknown: tuple[str, ...]) -> str:
        """The newest revision of this checkout under the foreign ones (from the journal)."""
        graph = read_graph(self.handle)
        with connection.connect(self.handle.engine) as conn:
            ancestry = journal.ancestry(conn, self.handle.journal)
        todo, seen = list(unknown), set()
        while todo:
            rev = todo.pop()
            if rev in graph.revisions:
                return rev
            if rev not in seen:
                seen.add(rev)
                todo.extend(ancestry.get(rev, ()))
        return "base"

    def _reparent_draft(self, draft: Revision, head: str) -> None:
        """Move the draft onto `head`: downgrade it, rewrite its parent (down_revision and the
        "Revises:" line), apply the teammate's revisions, regenerate the draft (same id) from the
        models against them and apply it — as an amend does, under one hold of the lock. The
        compare is a full one: what the draft holds now is what their revisions do not."""
        backup = Path(tempfile.mkdtemp(prefix="reconciler-draft-")) / draft.path.name
        scope = self.changes.full()
        try:
            with (
                self._warm.take() as worker,
                self._lending(worker),
                connection.connect(self.handle.engine) as conn,
                target_lock(self.handle, conn, self.settings.apply.lock_acquire_timeout),
            ):
                self._downgrade_draft(conn, draft)
                edits.write_replacing(
                    draft.path, draft.path, edits.reparented(draft.path.read_text(encoding="utf-8"), head)
                )
                shutil.move(str(draft.path), backup)
                self._note_revision_files()  # our own change, not a teammate's
                self.handle.project.invalidate()
                graph = read_graph(self.handle)
                apply_pending(
                    self.handle, conn, graph, run=self._run_state(), trigger="dev", guard=self.guard
                )
                result = self._generate(worker, draft=True, rev_id=draft.revision, rescan=True)
                self._log_compared(result, scope)
                log.info(
                    "draft_reparented", revision=draft.revision, was=list(draft.down_revisions), onto=head
                )
                if result.path is None:
                    log.info(
                        "draft_removed",
                        revision=draft.revision,
                        reason=f"{head} already makes every change the draft made",
                    )
                else:
                    self._after_generate(result, rebuilt=True, locked=conn)
        except ReconcilerError:
            if backup.exists():  # the models do not import: the old draft, on their head
                shutil.move(str(backup), draft.path)
                self.handle.project.invalidate()
                self._apply(DRAFT_TRIGGER)
            raise
        self.changes.remember(scope)

    def _after_generate(self, result: Any, rebuilt: bool, locked: sa.engine.Connection | None = None) -> None:
        self.handle.project.invalidate()
        if result.path is None:
            log.info("no_changes", detail="the models match the database; no revision written")
            return
        log.info(
            "revision_generated",
            revision=result.revision,
            message=result.message,
            path=str(result.path),
            operations=[op["text"] for op in result.operations],
            draft=self.settings.dev.draft,
            rebuilt=rebuilt,
        )
        for failure in result.hook_failures:  # Alembic keeps the revision; so do we, and say so
            log.warning(
                "post_write_hook_failed",
                path=str(result.path),
                **failure,
                hint="the revision was kept (Alembic ignores a hook's exit status); fix "
                "the hook ([post_write_hooks] in alembic.ini) or what it reports",
            )
        if (
            result.destructive
            and not self.settings.dev.allow_destructive
            and not _acknowledged(Path(result.path))
        ):
            self._held[str(result.revision)] = (Path(result.path), tables_of(result))
            log.warning(
                "destructive_held_back",
                revision=result.revision,
                would_drop=list(result.destructive),
                possible_renames=list(result.renames),
                confirm=f"reconciler confirm {result.revision}",
                hint="or set [dev] allow_destructive = true; nothing was dropped",
            )
            # Why here: the versions watcher skips the file this loop wrote; a run says it waits.
            self.loop.trigger("held_back")
            return
        self._apply(DRAFT_TRIGGER if self.settings.dev.draft else "dev", Path(result.path), locked)


class StopGenerating(StateError):
    """The database or the repository is in a state where generating would make things worse."""


def _names_a_missing_attribute(exc: ConfigError, settings: Settings) -> bool:
    """The worker's error says the models module has no such attribute (the words of the
    worker's model loader: "has no attribute 'dbb'")."""
    attr = settings.target.models.partition(":")[2]
    return bool(attr) and f"has no attribute '{attr}'" in str(exc)


def _acknowledged(path: Path) -> bool:
    try:
        parsed = parse_revision_file(path)
    except ReconcilerError:
        return False
    return bool(parsed and parsed.allow_destructive)


def run_dev(settings: Settings) -> int:
    return DevLoop(settings).run()
