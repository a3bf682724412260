"""Dev mode: a saved model file becomes a revision file and a migrated dev database.

`models-dir event (debounced) → generate in a fresh (pre-warmed) worker → revision file →
reconcile.apply`, the `flask db migrate && flask db upgrade` loop done on save. Saves during a
generation coalesce into one follow-up (the scheduler's trigger). The versions directory is
watched too: a teammate's revision or a branch switch is applied before anything is generated,
and a database that is ahead, diverged or forked stops generation with the command that fixes it.

Draft revisions: consecutive saves amend one draft (marked `draft = True` in its file, applied
with the journal trigger `draft`): the draft is downgraded, regenerated from the models with the
same id, rewritten and applied again — the only automatic downgrade the product does, and only on
a local database. `reconciler seal -m MSG` makes it a normal revision.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa

from reconciler import connection, differences, fleet, journal, logs
from reconciler.config import Settings, find_module_file
from reconciler.errors import ConfigError, ReconcilerError, Refused, RevisionFailed, StateError
from reconciler.graph import Revision, RevisionGraph, parse_revision_file
from reconciler.reconcile import Reconciler
from reconciler.scheduler import Loop
from reconciler.watcher import DEFAULT_IGNORE, DirWatcher

log = logs.get("reconciler.dev")

DRAFT_TRIGGER = "draft"
FULL_COMPARE_EVERY = 300.0  # seconds: saves compare only what they touched; this catches the rest
IDLE_INTERVAL = 3600.0  # dev mode is event driven; the periodic run is only a safety net


# --- safety: only local databases ----------------------------------------------------------------
def is_local(url: str, local_hosts: list[str]) -> bool:
    """SQLite, a Unix socket, a loopback address, or a host listed as local."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return True
    host = (parsed.host or "").strip("[]")
    if not host or host.startswith("/"):
        return True  # no host: the driver's Unix socket
    if host == "localhost" or host in local_hosts:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_dev_target(settings: Settings, rec: Reconciler) -> None:
    """Refuse a remote database (unless allowed) and any database marked `prod`."""
    if not settings.dev.allow_remote and not is_local(settings.target.url, settings.dev.local_hosts):
        raise Refused(
            f"dev mode writes revision files and changes schemas, and {rec.redacted_url} is not a "
            "local database; point it at a local one, add its host to [dev] local_hosts "
            "(compose service names), or set [dev] allow_remote = true"
        )
    with connection.connect(rec.engine) as conn:
        if not journal.exists(conn, rec.journal):
            return
        key = fleet.environment_key(rec.target)
        marker = fleet.read(conn, rec.journal, [key])
    if marker.get(key) == "prod":
        raise Refused(
            f"the database of target {rec.target} is marked as a production database (a prod "
            "reconciler applied to it); dev mode never touches it"
        )


def watch_paths(settings: Settings) -> list[Path]:
    """[dev] watch, else the package that holds the models module (with its subpackages)."""
    if settings.dev.watch:
        return [p if p.is_absolute() else (settings.base_dir / p).resolve()
                for p in (Path(w) for w in settings.dev.watch)]
    module = settings.target.models.partition(":")[0]
    if not module:
        raise ConfigError("dev mode needs [target] models (pkg.module:attr) or [dev] watch paths")
    found = find_module_file(module, settings)
    if found is None:
        raise ConfigError(f"cannot find the models module {module!r} under {settings.root_dir}")
    if found.name != "__init__.py" and not (found.parent / "__init__.py").exists():
        return [found]  # a top-level module: watch that file
    return [found.parent]


# --- the loop ------------------------------------------------------------------------------------
class DevLoop:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rec = Reconciler(settings)
        self.target = self.rec.target
        self._models_changed = threading.Event()
        self._done = threading.Event()
        self._stopping = threading.Event()
        self.loop = Loop(self._run, IDLE_INTERVAL, 0.0, name="dev")
        ignore = (*DEFAULT_IGNORE, *settings.dev.ignore)
        self.model_watcher = DirWatcher(watch_paths(settings), self._on_models, settings.dev.debounce,
                                        ignore=ignore, suffixes=(".py",))
        versions, _ = self.rec.project.version_dirs
        self.version_watcher = DirWatcher(versions, self._on_versions, settings.dev.debounce,
                                          suffixes=(".py",))
        self._warm: Any = None
        self._changed: set[Path] = set()
        self._changed_lock = threading.Lock()
        self._last_full = 0.0

    # lifecycle
    def run(self) -> int:
        check_dev_target(self.settings, self.rec)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._warm = self._start_warm()
        self.model_watcher.start()
        self.version_watcher.start()
        log.info("dev_started", target=self.target, url=self.rec.redacted_url,
                 watching=[str(p) for p in watch_paths(self.settings)], draft=self.settings.dev.draft)
        known = differences.load(differences.path_for(self.settings))
        if known:
            log.info("known_differences", count=len(known), ignored=sorted(known),
                     file=str(differences.path_for(self.settings)))
        self._models_changed.set()  # a full compare at start
        self.loop.start()
        self._done.wait()
        return 0

    def _start_warm(self) -> Any:
        from reconciler import dbsession
        from reconciler.workerclient import WarmWorker, WorkerJob

        with connection.connect(self.rec.engine) as conn:
            identity = dbsession.identity_from_dbapi(conn.connection, self.rec.backend)
        job = WorkerJob.from_settings(self.settings)
        job = dataclasses.replace(job, exclude_tables=self.rec.journal.names,
                                  expected_identity=identity)
        return WarmWorker(job, python=self.settings.target.python or None,
                          timeout=self.settings.dev.generate_timeout)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        if self._stopping.is_set():
            raise SystemExit(1)
        self._stopping.set()
        threading.Thread(target=self._shutdown, daemon=True).start()

    def _shutdown(self) -> None:
        self.loop.stop(wait=True, timeout=30)
        self.model_watcher.stop()
        self.version_watcher.stop()
        if self._warm is not None:
            self._warm.close()
        self.rec.close()
        log.info("dev_stopped", target=self.target)
        self._done.set()

    def _on_models(self, paths: set[Path]) -> None:
        with self._changed_lock:
            self._changed |= paths
        self._models_changed.set()
        self.loop.trigger("models_changed")

    def _files_to_compare(self) -> list[str] | None:
        """The saved files (the worker compares only their tables), or None for a full compare:
        at start, and every FULL_COMPARE_EVERY seconds."""
        with self._changed_lock:
            changed, self._changed = self._changed, set()
        now = time.monotonic()
        if not changed or now - self._last_full > FULL_COMPARE_EVERY:
            self._last_full = now
            return None
        return sorted(str(p) for p in changed)

    def _on_versions(self, paths: set[Path]) -> None:
        self.rec.project.invalidate()
        self.loop.trigger("revisions_changed")

    # one run
    def _run(self, reason: str) -> float | None:
        try:
            self._sync_first()
            if self._models_changed.is_set():
                self._models_changed.clear()
                self.generate_and_apply()
        except StopGenerating as exc:
            log.warning("dev_paused", reason=str(exc))
        except ReconcilerError as exc:
            log.error("dev_error", error=str(exc), kind=exc.__class__.__name__)
        return None

    def _sync_first(self) -> None:
        """Teammates' revisions and branch switches first: apply, or stop and say how to fix."""
        status = self.rec.status()
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
            raise StopGenerating(f"{status.message}; then save again")
        if state in ("behind", "uninitialized_empty"):
            self._apply("dev")

    def _branch_point(self, unknown: tuple[str, ...]) -> str:
        """The newest revision of this checkout under the foreign ones (from the journal)."""
        graph = self.rec.graph()
        with connection.connect(self.rec.engine) as conn:
            ancestry = journal.ancestry(conn, self.rec.journal)
        todo, seen = list(unknown), set()
        while todo:
            rev = todo.pop()
            if rev in graph.revisions:
                return rev
            if rev not in seen:
                seen.add(rev)
                todo.extend(ancestry.get(rev, ()))
        return "base"

    def generate_and_apply(self) -> None:
        graph = self.rec.graph()
        draft = self._current_draft(graph)
        if draft is not None and self.settings.dev.draft:
            self._amend_draft(draft, graph)
            return
        files = self._files_to_compare()
        try:
            with self._warm.take() as worker:
                self._generate_and_apply_with(worker, files)
        except ReconcilerError:
            if files:  # not compared yet: the next save compares them again
                with self._changed_lock:
                    self._changed |= {Path(f) for f in files}
            raise

    def _generate_and_apply_with(self, worker: Any, files: list[str] | None) -> None:
        result = worker.generate(draft=self.settings.dev.draft, files=files)
        log.debug("compared", tables=result.compared if files else "all",
                  generate_ms=int(result.seconds * 1000))
        with self.rec.lending(worker):
            self._after_generate(result, rebuilt=False)

    # drafts
    def _current_draft(self, graph: RevisionGraph) -> Revision | None:
        heads = graph.heads
        if len(heads) != 1:
            return None
        head = graph.revisions[heads[0]]
        if not head.draft or not self._applied_as_draft(head.revision):
            return None
        return head

    def _applied_as_draft(self, rev: str) -> bool:
        with connection.connect(self.rec.engine) as conn:
            rows = journal.rows_with_outcome(conn, self.rec.journal, "applied")
        return any(r["revision"] == rev and r["trigger"] == DRAFT_TRIGGER for r in rows)

    def _amend_draft(self, draft: Revision, graph: RevisionGraph) -> None:
        """Downgrade the draft, regenerate it (same id) from the models, rewrite, apply again."""
        parent = draft.down_revisions[0] if draft.down_revisions else "base"
        backup = Path(tempfile.mkdtemp(prefix="reconciler-draft-")) / draft.path.name
        with connection.connect(self.rec.engine) as conn, self.rec.locked(
            conn, self.settings.apply.lock_acquire_timeout
        ), self.rec.start_worker(conn) as worker:
            row = journal.record_started(conn, self.rec.journal, target=self.target,
                                         operation="downgrade", revision=draft.revision,
                                         trigger=DRAFT_TRIGGER)
            worker.downgrade(parent)
            journal.record_finished(conn, self.rec.journal, row, outcome="draft_rebuilt")
        shutil.move(str(draft.path), backup)
        self.rec.project.invalidate()
        try:
            with self._warm.take() as gen:
                result = gen.generate(draft=True, rev_id=draft.revision)
                if result.path is None:
                    log.info("draft_removed", revision=draft.revision,
                             reason="the models equal the draft's parent again")
                    self.rec.project.invalidate()
                    return
                with self.rec.lending(gen):
                    self._after_generate(result, rebuilt=True)
        except ReconcilerError:
            if backup.exists():  # the models do not import: keep the old draft, applied
                shutil.move(str(backup), draft.path)
                self.rec.project.invalidate()
                self._apply(DRAFT_TRIGGER)
            raise

    # after a generation
    def _after_generate(self, result: Any, rebuilt: bool) -> None:
        self.rec.project.invalidate()
        if result.path is None:
            log.info("no_changes", detail="the models match the database; no revision written")
            return
        log.info("revision_generated", revision=result.revision, message=result.message,
                 path=str(result.path), operations=[op["text"] for op in result.operations],
                 draft=self.settings.dev.draft, rebuilt=rebuilt)
        if result.destructive and not self.settings.dev.allow_destructive and not _acknowledged(
            Path(result.path)
        ):
            log.warning(
                "destructive_held_back",
                revision=result.revision,
                would_drop=list(result.destructive),
                possible_renames=list(result.renames),
                confirm=f"reconciler confirm {result.revision}",
                hint="or set [dev] allow_destructive = true; nothing was dropped",
            )
            return
        self._apply(DRAFT_TRIGGER if self.settings.dev.draft else "dev", Path(result.path))

    def _apply(self, trigger: str, written: Path | None = None) -> None:
        try:
            outcome = self.rec.apply(trigger=trigger)
        except RevisionFailed as exc:
            if written is not None and written.exists():
                written.unlink()  # never leave a revision the database did not get
                self.rec.project.invalidate()
                log.error("revision_removed", path=str(written), reason=str(exc))
            raise
        for rev, seconds in outcome.applied:
            log.info("dev_applied", revision=rev, duration_ms=int(seconds * 1000))


class StopGenerating(StateError):
    """The database or the repository is in a state where generating would make things worse."""


def _acknowledged(path: Path) -> bool:
    try:
        parsed = parse_revision_file(path)
    except ReconcilerError:
        return False
    return bool(parsed and parsed.allow_destructive)


# --- seal and confirm -------------------------------------------------------------------------
def seal(settings: Settings, message: str) -> Path:
    """Turn the draft revision into a normal one: drop its marker, set its message and file name."""
    rec = Reconciler(settings)
    try:
        graph = rec.graph()
        drafts = [r for r in graph.revisions.values() if r.draft]
        if not drafts:
            raise StateError("there is no draft revision to seal")
        draft = drafts[0]
        text = draft.path.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^draft\s*(:\s*bool)?\s*=\s*True\s*\n", "", text)
        text = _replace_message(text, draft.message, message)
        slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40] or "sealed"
        target = draft.path.with_name(f"{draft.revision}_{slug}.py")
        tmp = target.with_suffix(".py.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
        if target != draft.path:
            draft.path.unlink()
        log.info("sealed", revision=draft.revision, path=str(target), message=message)
        return target
    finally:
        rec.close()


def _replace_message(text: str, old: str, new: str) -> str:
    if old and old in text:
        return text.replace(old, new, 1)
    return text


def confirm(settings: Settings, revision: str) -> Path:
    """Write `allow_destructive = True` into a held-back revision (the marker prod honours too)."""
    rec = Reconciler(settings)
    try:
        graph = rec.graph()
        rev = graph.resolve(revision)
        path = graph.revisions[rev].path
    finally:
        rec.close()
    text = path.read_text(encoding="utf-8")
    if re.search(r"(?m)^allow_destructive\s*=\s*True", text):
        return path
    text = re.sub(r"(?m)^(depends_on\s*=.*)$", r"\1\nallow_destructive = True", text, count=1)
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    log.info("destructive_confirmed", revision=rev, path=str(path))
    return path


def run_dev(settings: Settings) -> int:
    return DevLoop(settings).run()
