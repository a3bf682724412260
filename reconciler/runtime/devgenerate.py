"""Dev mode's generations: generate in the warm worker and apply; amend the draft; drop what raced a pull."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from reconciler import logs
from reconciler.control.applying import apply_pending
from reconciler.control.locking import target_lock
from reconciler.control.progress import LiveRun
from reconciler.control.reading import read_graph
from reconciler.control.reconcile import reconcile_once
from reconciler.control.starting import start_worker
from reconciler.control.target import TargetHandle
from reconciler.core import checksums
from reconciler.core.graph import Revision, RevisionGraph
from reconciler.db import connection, journal
from reconciler.errors import ReconcilerError, RevisionFailed
from reconciler.project.revisions import revision_files
from reconciler.runtime.devpace import SavePace
from reconciler.runtime.devscope import ModelChanges, Scope
from reconciler.settings import Settings

log = logs.get("reconciler.dev")

DRAFT_TRIGGER = checksums.DRAFT_TRIGGER
RECHECK_SWITCH = "dev_recheck"  # RECONCILER_UNSAFE_DISABLE: keep what was generated during a pull


class DraftGeneration:
    """The generation steps of `DevLoop` (which sets these attributes): one generation and its
    apply, the draft's amend (downgrade, regenerate with the same id, apply under one lock hold),
    and the discard of a generation that raced revision-file changes."""

    settings: Settings
    handle: TargetHandle
    guard: bool  # the destructive-change guard: on unless [dev] allow_destructive
    target: str
    changes: ModelChanges
    pace: SavePace  # the saves' timing: a burst is one generation
    _warm: Any  # the pre-warmed worker (`WarmWorker`), once started
    _draft_tables: dict[str, frozenset[str]]  # the draft's id -> the tables it touches
    _carry: set[str]  # tables of withdrawn revisions: the next compare covers them
    _lent: Any = None  # the warm worker a generation applies with (no second interpreter start)
    _taken = 0  # the saves the generation in progress took (`SavePace.generating`)
    _superseded_last = False  # the last generation was overtaken by a save (never twice in a row)
    # The revision files as the run found them, before its first status read, re-taken after
    # each change dev mode makes itself: a teammate's file that lands after that read (a pull)
    # is then seen by `_generate` as a change, and the generation is discarded and redone.
    _files_seen: dict[Path, tuple[int, int]] | None = None

    def _note_revision_files(self) -> None:
        """Snapshot the revision files: at a run's start, and after each of our own changes."""
        self._files_seen = self._revision_files()

    @contextmanager
    def _lending(self, worker: Any) -> Iterator[None]:
        """Apply with `worker` (models loaded, env.py already run) while in this block."""
        self._lent = worker
        try:
            yield
        finally:
            self._lent = None

    def _run_state(self) -> LiveRun:
        return LiveRun(lent=self._lent)

    def _after_generate(self, result: Any, rebuilt: bool, locked: sa.engine.Connection | None = None) -> None:
        raise NotImplementedError  # DevLoop's: it holds back destructive revisions

    def generate_and_apply(self) -> None:
        self._taken = self.pace.generating()
        try:
            self._generate_and_apply()
        finally:
            self.pace.generated()

    def _generate_and_apply(self) -> None:
        scope = self.changes.next_scope()
        if scope.files == [] and not self._carry:
            self.changes.remember(scope)
            log.info("no_changes", detail="the saved files changed no model code; nothing compared")
            return
        try:
            graph = read_graph(self.handle)
            draft = self._current_draft(graph)
            if draft is not None and self.settings.dev.draft:
                self._amend_draft(draft, scope)
            else:
                with self._warm.take() as worker:
                    self._generate_and_apply_with(worker, scope)
        except ReconcilerError:
            self.changes.requeue(scope)
            raise
        self.changes.remember(scope)
        self._carry.clear()
        self._superseded_last = False

    def _generate_and_apply_with(self, worker: Any, scope: Scope) -> None:
        result = self._generate(
            worker, draft=self.settings.dev.draft, **scope.request(frozenset(self._carry))
        )
        self._log_compared(result, scope)
        self._drop_if_superseded(result, scope)
        with self._lending(worker):
            self._after_generate(result, rebuilt=False)

    def _drop_if_superseded(self, result: Any, scope: Any) -> None:
        """A save that changed model code landed while this generation ran: what it wrote is
        stale before it is applied. Drop it (never applied, nothing to undo); the follow-up
        generation, after the burst goes quiet, compares this one's files too. Not twice in a
        row: saves that never stop still get applied."""
        if (
            result.path is None  # nothing to apply: the follow-up generation sees the new save
            or self._superseded_last
            or not self.pace.saved_since(self._taken)
            or not self.changes.changed_since(scope)
        ):
            return
        self._superseded_last = True
        Path(result.path).unlink(missing_ok=True)
        self._note_revision_files()  # our own change, not a teammate's
        self.handle.project.invalidate()
        raise Superseded(
            f"a newer save changed the models while revision {result.revision} was generated; "
            "it was not applied: the next generation compares both saves"
        )

    def _log_compared(self, result: Any, scope: Scope) -> None:
        """Log what was compared; remember the tables a new draft touches (its next amend)."""
        log.debug(
            "compared",
            tables="all" if result.compared is None else result.compared,
            classes=scope.classes,
            generate_ms=int(result.seconds * 1000),
        )
        if self.settings.dev.draft and result.revision:
            self._draft_tables = {result.revision: tables_of(result)}

    def _generate(self, worker: Any, **request: Any) -> Any:
        """Generate; discard the result when revision files came or went meanwhile (a pull, a
        checkout): the worker compared against the old set, and what it wrote may duplicate a
        teammate's revision. The follow-up run applies theirs first and compares again."""
        before = self._files_seen if self._files_seen is not None else self._revision_files()
        try:
            result = worker.generate(**request)
        except ReconcilerError:  # e.g. "not at the heads": the worker saw the new file itself
            self._raise_if_changed(before, None)
            raise
        self._raise_if_changed(before, None if result.path is None else Path(result.path))
        self._note_revision_files()  # the file just written is ours
        return result

    def _raise_if_changed(self, before: dict[Path, tuple[int, int]], written: Path | None) -> None:
        after = self._revision_files()
        if written is not None:
            after.pop(written.resolve(), None)
        if after == before or RECHECK_SWITCH in self.settings.unsafe:
            return
        if written is not None:
            written.unlink(missing_ok=True)
        self.handle.project.invalidate()
        changed = sorted(p.name for p in set(before) ^ set(after))
        raise RevisionsChanged(
            f"revision files changed while the models were compared ({', '.join(changed)}); "
            "nothing was written: they are applied first, then the models are compared again"
        )

    def _revision_files(self) -> dict[Path, tuple[int, int]]:
        dirs, recursive = self.handle.project.version_dirs
        out: dict[Path, tuple[int, int]] = {}
        for path in revision_files(dirs, recursive):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            out[path.resolve()] = (stat.st_size, stat.st_mtime_ns)
        return out

    def _current_draft(self, graph: RevisionGraph) -> Revision | None:
        heads = graph.heads
        if len(heads) != 1:
            return None
        head = graph.revisions[heads[0]]
        if not head.draft or not self._applied_as_draft(head.revision):
            return None
        return head

    def _applied_as_draft(self, rev: str) -> bool:
        with connection.connect(self.handle.engine) as conn:
            rows = journal.rows_with_outcome(conn, self.handle.journal, "applied")
        return any(r["revision"] == rev and r["trigger"] == DRAFT_TRIGGER for r in rows)

    def _amend_draft(self, draft: Revision, scope: Scope) -> None:
        """Downgrade the draft, regenerate it (same id) from the models, rewrite, apply again.

        One warm worker does all three, under one hold of the lock: no other applier sees the
        draft downgraded. The compare covers what the saves changed and the tables the draft
        touched (known from its generation; after a restart, everything)."""
        backup = Path(tempfile.mkdtemp(prefix="reconciler-draft-")) / draft.path.name
        try:
            with (
                self._warm.take() as worker,
                self._lending(worker),
                connection.connect(self.handle.engine) as conn,
                target_lock(self.handle, conn, self.settings.apply.lock_acquire_timeout),
            ):
                self._downgrade_draft(conn, draft)
                shutil.move(str(draft.path), backup)
                self._note_revision_files()  # our own change, not a teammate's
                self.handle.project.invalidate()
                tables = self._draft_tables.get(draft.revision)
                request = scope.request(None if tables is None else tables | self._carry)
                result = self._generate(worker, draft=True, rev_id=draft.revision, rescan=True, **request)
                self._log_compared(result, scope)
                if result.path is None:
                    log.info(
                        "draft_removed",
                        revision=draft.revision,
                        reason="the models equal the draft's parent again",
                    )
                    return
                self._after_generate(result, rebuilt=True, locked=conn)
        except ReconcilerError:
            if backup.exists():  # the models do not import: keep the old draft, applied
                shutil.move(str(backup), draft.path)
                self.handle.project.invalidate()
                self._apply(DRAFT_TRIGGER)
            raise

    def _draft_to_reparent(self, status: Any) -> tuple[Revision, str] | None:
        """Our applied draft and the one other head when the fork is only that: a teammate's
        revision arrived on the draft's parent (a pull). A draft is ours to rebuild, so it moves
        onto their head instead of asking for a merge; anything else is a real fork."""
        if not self.settings.dev.draft:
            return None
        graph = read_graph(self.handle)
        fork = [graph.revisions[h] for h in status.decision.fork if h in graph.revisions]
        drafts = [r for r in fork if r.draft]
        others = [r.revision for r in fork if not r.draft]
        if len(drafts) != 1 or len(others) != 1:
            return None
        draft, head = drafts[0], others[0]
        if set(status.decision.db_heads) != {draft.revision} or not self._applied_as_draft(draft.revision):
            return None
        if not set(draft.down_revisions) <= graph.ancestors(head):
            return None  # their head does not build on the draft's parent
        return draft, head

    def _downgrade_draft(self, conn: sa.engine.Connection, draft: Revision) -> None:
        """Under the lock, held on `conn`."""
        parent = draft.down_revisions[0] if draft.down_revisions else "base"
        with start_worker(self.handle, conn, run=self._run_state()) as worker:
            row = journal.record_started(
                conn,
                self.handle.journal,
                target=self.target,
                operation="downgrade",
                revision=draft.revision,
                trigger=DRAFT_TRIGGER,
            )
            worker.downgrade(parent)
            journal.record_finished(conn, self.handle.journal, row, outcome="draft_rebuilt")

    def _apply(
        self, trigger: str, written: Path | None = None, locked: sa.engine.Connection | None = None
    ) -> None:
        """Through the prod path; under the caller's hold of the lock when `locked` is given."""
        try:
            if locked is None:
                outcome = reconcile_once(
                    self.handle, run=self._run_state(), trigger=trigger, guard=self.guard
                )
            else:
                graph = read_graph(self.handle)
                run = self._run_state()
                outcome = apply_pending(
                    self.handle, locked, graph, run=run, trigger=trigger, guard=self.guard
                )
        except RevisionFailed as exc:
            if written is not None and written.exists():
                written.unlink()  # never leave a revision the database did not get
                self.handle.project.invalidate()
                log.error("revision_removed", path=str(written), reason=str(exc))
            raise
        for rev, seconds in outcome.applied:
            log.info("dev_applied", revision=rev, duration_ms=int(seconds * 1000))


class RevisionsChanged(ReconcilerError):
    """Revision files arrived or vanished during a generation: its result is discarded."""

    transient = True


class Superseded(ReconcilerError):
    """A save landed during a generation: its result is dropped before it is applied."""

    transient = True


def tables_of(result: Any) -> frozenset[str]:
    """The tables a generated revision's operations touch."""
    return frozenset(op["table"] for op in result.operations if op.get("table"))
