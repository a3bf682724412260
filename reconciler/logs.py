"""structlog setup: text lines for a person, JSON lines for a collector, always to stderr.

`auto` is text for a one-shot command (a shell or a CI log reads it) and, for the daemon (`run`),
text on a terminal and JSON lines otherwise. Below debug, long revision-id lists are summarised
and Alembic's own INFO lines are debug (`alembic_level`).

Standard-library log records (SQLAlchemy, and anything else that logs in the control plane) go
through the same processors, and every rendered line passes through `redact()` last, so a
registered secret cannot reach the output whatever event or library produced it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import structlog

from reconciler.redact import redact

_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}
_RESET = "\x1b[0m"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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
        line = _status_line
        if line is not None:
            line.clear()
        written = self._stream.write(redact(text))
        if line is not None:
            line.redraw()
        return written

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


FORMATS = ("auto", "text", "json")
_ALIASES = {"console": "text"}  # the former name of `text`, still accepted
ID_LISTS = frozenset({"applied", "foreign", "revisions", "pending", "skipped"})
LIST_LIMIT = 20  # an id list longer than this is logged as its count, first and last (not at debug)
_hidden: set[str] = set()
_status_line: Any = None


def use_text(fmt: str, stream: TextIO, daemon: bool = False) -> bool:
    """Whether to render lines as text: asked for; or `auto` and a person reads them (a terminal,
    or a one-shot command, whose output is read in a shell or a CI log, not by a collector)."""
    fmt = _ALIASES.get(fmt, fmt)
    if fmt == "text":
        return True
    if fmt == "json":
        return False
    return stream.isatty() or not daemon


def setup(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    daemon: bool = False,
    colour: bool | None = None,
) -> None:
    """Configure structlog and stdlib logging once, for the whole process. `daemon`: `auto` is
    JSON when not on a terminal; `colour`: None is "when the stream is a terminal"."""
    out = stream or sys.stderr
    text = use_text(fmt, out, daemon)
    numeric = _LEVELS.get(level, logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_values,
    ]
    if numeric > logging.DEBUG:
        shared += [_drop_hidden, _summarise_ids]
    renderer: Any
    if text:
        on = out.isatty() if colour is None else colour
        renderer = _TextRenderer(colour=on, clock=daemon)
    else:
        renderer = structlog.processors.JSONRenderer()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
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


def ready() -> bool:
    """Whether `setup` ran (an error before the settings were read is reported without it)."""
    return bool(logging.getLogger().handlers)


def hide(*events: str) -> None:
    """Leave these info events out below debug: something else shows them (the progress line
    shows each `revision_applied`)."""
    _hidden.update(events)


def set_status_line(line: Any) -> None:
    """A line rewritten in place on the same terminal (`terminal.ProgressLine`, or None): each
    log line clears it first and redraws it after."""
    global _status_line
    _status_line = line


def _drop_hidden(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") in _hidden and event.get("level") in ("info", "debug"):
        raise structlog.DropEvent
    return event


def _summarise_ids(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """A list of more than LIST_LIMIT revision ids becomes `<key>_count`, `_first`, `_last`: a
    200-revision apply's last line stays short; at debug (-v) the full list is logged."""
    for key in [k for k in event if k in ID_LISTS]:
        value = event[key]
        if isinstance(value, (list, tuple)) and len(value) > LIST_LIMIT:
            del event[key]
            event.update({f"{key}_count": len(value), f"{key}_first": value[0], f"{key}_last": value[-1]})
    return event


def ids_text(ids: Sequence[str], full: bool = False) -> str:
    """Revision ids for a sentence: all of them when few (or `full`), else count, first and last."""
    if full or len(ids) <= LIST_LIMIT:
        return ", ".join(ids)
    return f"{len(ids)} revisions, {ids[0]} … {ids[-1]}"


def paint(text: str, style: str | None, on: bool) -> str:
    """`text` in `style` (a name of `_CODES`) when colour is on; else unchanged."""
    if not on or not style or not text:
        return text
    return f"\x1b[{_CODES[style]}m{text}{_RESET}"


class _TextRenderer:
    """`level event key=value ...` on one line: strings with spaces quoted, a multi-line value or
    traceback continued on indented lines as it is (never `\\n` escapes); colour when asked."""

    _STYLES = {"warning": "yellow", "error": "red", "critical": "red", "debug": "dim"}

    def __init__(self, colour: bool, clock: bool) -> None:
        self._colour = colour
        self._clock = clock

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> str:
        level = str(event.pop("level", "info"))
        name = str(event.pop("event", ""))
        stamp = str(event.pop("timestamp", ""))
        trace = event.pop("exception", None)
        head = paint(f"{level:<7}", self._STYLES.get(level), self._colour)
        parts = [head, paint(name, "bold", self._colour)]
        if self._clock and stamp:
            parts.insert(0, stamp[11:19])
        parts += [f"{key}={_text_value(value)}" for key, value in sorted(event.items())]
        line = " ".join(parts)
        if trace:
            line += "\n" + str(trace).rstrip()
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    text = str(value)
    if "\n" in text:
        text = text.rstrip("\n").replace("\n", "\n    ")
    if not text or any(c in text for c in " \t=\"'"):
        return '"' + text.replace('"', "'") + '"'
    return text


def alembic_level(level: str, logger: str, message: str) -> str:
    """The level to log one of Alembic's lines (relayed from the worker) at: debug for its INFO
    (env.py's set-up, autogenerate's commentary, "Running upgrade ...": each revision applied and
    each difference found is reported by us, once, in our own words), its own for the others."""
    del message  # kept in the signature: a caller passes the line, a rule may need it again
    if level == "info" and (logger == "alembic" or logger.startswith("alembic.")):
        return "debug"
    return level


def get(name: str = "reconciler") -> Any:
    return structlog.get_logger(name)
