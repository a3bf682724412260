"""The project's Flask app's database URL, asked of a worker once per process and setting."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from reconciler.config.processenv import process_environment
from reconciler.control.workers import Worker, WorkerJob
from reconciler.settings import AppUrl, Settings

_app_urls: dict[tuple[Any, ...], AppUrl | None] = {}
_app_urls_lock = threading.Lock()


def resolve_app_url(settings: Settings, environ: Mapping[str, str] | None = None) -> AppUrl | None:
    """The project's Flask app's database URL, asked of a worker once per process and setting.

    Cached per process, not on disk: an app's URI often comes from its environment or from files
    anywhere in the project, and a stale answer would migrate the wrong database. A one-shot
    command asks once; the daemon asks once at start. The worker gets no database URL (an
    in-memory SQLite one satisfies its job) and nothing connects. The app runs in `environ` (the
    environment the settings were resolved in; default: ours): its URI may come from there.
    """
    t = settings.target
    env = dict(process_environment() if environ is None else environ)
    key = (
        t.python,
        str(settings.root_dir),
        str(settings.migrations_dir),
        t.models,
        t.app,
        tuple(t.imports),
        tuple(sorted(env.items())),
    )
    with _app_urls_lock:
        if key in _app_urls:
            return _app_urls[key]
        job = WorkerJob.from_settings(settings, url="sqlite://", role="config")
        job = dataclasses.replace(job, alembic_ini=None, known_differences="")
        with Worker.start(job, python=t.python or None, environ=env) as worker:
            found = worker.app_url()
        _app_urls[key] = found
        return found
