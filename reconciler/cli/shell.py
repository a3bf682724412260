"""The click shell's frame: the group, the `command` decorator that maps errors to the documented
exit codes, and what every command prints with (global options and output rules: runtime/options.py)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from reconciler import __version__, errors, logs
from reconciler.errors import EXIT_OK, ReconcilerError
from reconciler.redact import redact
from reconciler.runtime import output
from reconciler.runtime.options import GLOBAL_OPTIONS, Context, OptionConflict

F = TypeVar("F", bound=Callable[..., Any])
log = logs.get("reconciler.cli")


def _global_options(func: F) -> F:
    for names, help_text, kind in reversed(GLOBAL_OPTIONS):
        extra: dict[str, Any] = {"is_flag": True, "default": None} if kind == "flag" else {}
        if kind == "log_format":
            extra["type"] = click.Choice(logs.FORMATS)
        func = click.option(*names, help=help_text, **extra)(func)
    return func


def command(func: F) -> F:
    """A subcommand: takes the global options too, and maps errors to exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        click_ctx = click.get_current_context()
        ctx: Context = click_ctx.ensure_object(Context)
        ctx.take(kwargs, click_ctx.info_name)
        code = run_guarded(lambda: func(ctx, *args, **kwargs), ctx)
        sys.exit(code)

    return _global_options(wrapper)  # type: ignore[return-value]


def run_guarded(body: Callable[[], int | None], ctx: Context) -> int:
    try:
        return _guarded(body, ctx)
    except OptionConflict as exc:  # click's usage error (exit 2), as a contradiction of options is
        raise click.UsageError(str(exc)) from None


def _guarded(body: Callable[[], int | None], ctx: Context) -> int:
    try:
        return body() or EXIT_OK
    except (click.UsageError, OptionConflict):
        raise
    except ReconcilerError as exc:
        report_error(ctx, str(exc), exc.exit_code, exc.__class__.__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        report_error(ctx, "interrupted", 130, "KeyboardInterrupt")
        return 130
    except Exception as exc:  # a bug of ours: say so, with a redacted traceback and no locals
        trace, message = output.internal_error(exc)
        sys.stderr.write(trace)
        report_error(ctx, message, errors.EXIT_REVISION_FAILED, exc.__class__.__name__)
        return errors.EXIT_REVISION_FAILED


def report_error(ctx: Context, message: str, code: int, kind: str) -> None:
    """The error as the user reads it: `Error: ...` in plain text (its lines as they are), or one
    `command_failed` JSON line when JSON logs were asked for (or `run` logs for a collector)."""
    message = redact(message)
    if not ctx.json_logs():
        click.echo(f"Error: {message}", err=True)
        return
    if not logs.ready():  # the error came before the settings were read
        ctx.setup_logs(fmt="json")
    log.error("command_failed", error=message, exit_code=code, kind=kind)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=None, sort_keys=True, default=str))


def echo_lines(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reconciler")
@_global_options
@click.pass_context
def main(ctx: click.Context, /, **values: Any) -> None:
    """Keep a database schema in step with its models and Alembic / Flask-Migrate revisions."""
    ctx.ensure_object(Context).take(dict(values))
