"""structlog setup: console renderer on a terminal, JSON lines otherwise, always to stderr.

Standard-library log records (SQLAlchemy, and anything else that logs in the control plane) go
through the same processors, and every rendered line passes through `redact()` last, so a
registered secret cannot reach the output whatever event or library produced it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from reconciler.redact import redact

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _redact_values(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return {key: _redact_value(value) for key, value in event.items()}


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact(str(value))


class _RedactingStream:
    """A last line of defence: masks secrets in whatever is written (tracebacks included)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(redact(text))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


def use_console(fmt: str, stream: TextIO) -> bool:
    if fmt == "console":
        return True
    if fmt == "json":
        return False
    return stream.isatty()


def setup(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging once, for the whole process."""
    out = stream or sys.stderr
    console = use_console(fmt, out)
    numeric = _LEVELS.get(level, logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_values,
    ]
    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _identity if console else structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(_RedactingStream(out))  # type: ignore[arg-type]
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("sqlalchemy", "urllib3", "apscheduler", "watchdog"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )


# Alembic's INFO lines that say nothing a person acts on: env.py's set-up, and autogenerate's
# running commentary (each difference it detects is reported by us, once, in our own words).
_ALEMBIC_CHATTER = (
    ("alembic.runtime.migration", ("Context impl", "Will assume")),
    ("alembic.runtime.plugins", ("setting up autogenerate plugin", "setup plugin")),
    ("alembic.ddl", ("Detected sequence",)),
    ("alembic.autogenerate", ("Detected ",)),
)


def alembic_level(level: str, logger: str, message: str) -> str:
    """The level to log one of Alembic's lines (relayed from the worker) at: its own, or debug
    for chatter, so the console at info shows what ran ("Running upgrade ...") and no more."""
    if level != "info":
        return level
    for prefix, starts in _ALEMBIC_CHATTER:
        if (logger == prefix or logger.startswith(prefix + ".")) and message.startswith(starts):
            return "debug"
    return level


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event


def get(name: str = "reconciler") -> Any:
    return structlog.get_logger(name)
