"""click commands: each a settings lookup and one call into commands/ or runtime/ (global options
and output rules: runtime/options.py); errors become the documented exit codes."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from reconciler import __version__, errors, logs
from reconciler.config.load import example_config
from reconciler.errors import EXIT_OK, ReconcilerError
from reconciler.redact import redact
from reconciler.runtime import options, output
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


def _echo(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reconciler")
@_global_options
@click.pass_context
def main(ctx: click.Context, /, **values: Any) -> None:
    """Keep a database schema in step with its models and Alembic / Flask-Migrate revisions."""
    ctx.ensure_object(Context).take(dict(values))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@command
def status(ctx: Context, as_json: bool) -> int:
    """State of the database against the repository (exit 0 when read, 5 when unreachable)."""
    from reconciler.commands import inspect  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        result = inspect.status(handle)
        fleet = inspect.fleet(handle.settings)
    if as_json:
        emit_json({**result.as_dict(), **({"fleet": fleet} if fleet else {})})
    else:
        _echo(output.status_lines(result.as_dict(), ctx.colour(sys.stdout), fleet))
    return errors.EXIT_UNREACHABLE if result.sync_state == "unknown" else EXIT_OK


@main.command()
@click.option("--sql", is_flag=True, help="print the pending revisions' SQL (offline)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@click.option(
    "--fail-on", "fail_on", multiple=True, type=click.Choice(options.FAIL_ON), help=options.FAIL_ON_HELP
)
@command
def plan(ctx: Context, sql: bool, as_json: bool, fail_on: tuple[str, ...]) -> int:
    """Pending revisions in order with the guard's findings; --sql prints their SQL instead."""
    from reconciler.commands import inspect  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        result, steps = inspect.plan(handle)
        analysis = inspect.plan_findings(handle, result)
        text = inspect.plan_sql(handle, result) if sql else None
    if as_json:
        emit_json(output.plan_dict(result, steps, analysis, text))
    else:
        _echo(output.plan_lines(result.state, steps, analysis.findings, text))
    inspect.fail_on(analysis, fail_on)
    return EXIT_OK


@main.command()
@command
def apply(ctx: Context) -> int:
    """One reconcile: take the lock, upgrade to the heads, verify."""
    from reconciler.commands import fleet  # deferred: CLI start-up time
    from reconciler.control.applying import summary  # deferred: CLI start-up time
    from reconciler.control.reconcile import reconcile_once  # deferred: CLI start-up time

    if ctx.fleet() is not None:
        click.echo(fleet.summary(fleet.apply(ctx.settings())), err=True)
        return EXIT_OK
    with options.reconciler(ctx) as handle, output.progress_line(ctx) as progress:
        result = reconcile_once(handle, trigger="apply", progress=progress)
    click.echo(summary(result, ids=ctx.verbose), err=True)
    return EXIT_OK


@main.command()
@click.option("--timeout", type=float, default=300.0, show_default=True, help="seconds")
@click.option("--exact", is_flag=True, help="wait for equality (not ahead)")
@click.option("--interval", type=float, default=1.0, show_default=True, help="poll seconds")
@command
def wait(ctx: Context, timeout: float, exact: bool, interval: float) -> int:
    """Block until the database is at or ahead of the repository heads (exit 8 on timeout)."""
    from reconciler.control import waiting  # deferred: CLI start-up time

    options.check_wait(timeout, interval)
    with options.reconciler(ctx) as handle:
        result = waiting.wait(handle, timeout, exact=exact, poll=interval)
    click.echo(f"database is {result.state}", err=True)
    return EXIT_OK


@main.command()
@click.option("--scratch", is_flag=True, help="use a temporary database on the same server")
@command
def check(ctx: Context, scratch: bool) -> int:
    """Models vs migrations (CI gate): exit 7 and list the differences."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    authoring.check(ctx.settings(), scratch)
    click.echo("models and migrations agree", err=True)
    return EXIT_OK


@main.command()
@click.option("--json", "as_json", is_flag=True, help="the differences as one JSON object on stdout")
@command
def drift(ctx: Context, as_json: bool) -> int:
    """The live schema vs the models, now: exit 7 and list the differences (the daemon's drift)."""
    from reconciler.commands import inspect  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        found = inspect.drift(handle)
    if as_json:
        emit_json({"drift": bool(found), "count": len(found), "differences": found})
    _echo(output.drift_lines(found), err=True)
    return errors.EXIT_DIFFERENCES if found else EXIT_OK


@main.command()
@click.option("--scratch", is_flag=True, help="use a temporary database on the same server")
@command
def baseline(ctx: Context, scratch: bool) -> int:
    """Write the known-differences file from what autogenerate reports at the heads."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    settings = ctx.settings()
    path, count = authoring.baseline(settings, scratch)
    click.echo(output.baseline_line(path, count, settings.target.url), err=True)
    return EXIT_OK


@main.command("config")
@click.option("--example", is_flag=True, help="print every key with its default and a comment")
@command
def config_command(ctx: Context, example: bool) -> int:
    """With --example: print config.example.toml, every key with its default and a comment."""
    options.require_example(example)
    click.echo(example_config(), nl=False)
    return EXIT_OK


@main.command()
@click.option("--flask-app", "flask_app", envvar="FLASK_APP", default="", help=options.FLASK_APP_HELP)
@command
def init(ctx: Context, flask_app: str) -> int:
    """Create a migrations directory: `flask db init`'s layout for a Flask project, else Alembic's."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    made = authoring.init(ctx.settings(require_url=False, require_migrations=False), flask_app)
    click.echo(output.init_line(made), err=True)
    return EXIT_OK


@main.command()
@command
def history(ctx: Context) -> int:
    """The revision graph, newest first; applied revisions marked."""
    from reconciler.commands import inspect  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        lines, reachable = inspect.history(handle)
    _echo(output.history_lines(lines, ctx.colour(sys.stdout)))
    if not reachable:
        click.echo("(database unreachable: applied revisions not marked)", err=True)
    return EXIT_OK


@main.command(context_settings={"ignore_unknown_options": True})  # `-1` is a value, not an option
@click.argument("revision", default="-1")
@click.option("--yes", is_flag=True, help="do not ask (needed when not on a terminal)")
@command
def downgrade(ctx: Context, revision: str, yes: bool) -> int:
    """Undo revisions down to REVISION: an id, `base`, or `-N` steps down (default -1, as `flask
    db downgrade`). A person's decision: shows what it undoes, asks."""
    from reconciler.commands import repair  # deferred: CLI start-up time
    from reconciler.control.reading import read_graph  # deferred: CLI start-up time

    revision = options.downgrade_revision(revision)
    with options.reconciler(ctx) as handle:

        def confirm(target: str, undo: list[str]) -> bool:
            _echo(output.downgrade_lines(target, undo, read_graph(handle)), err=True)
            return yes or (options.can_ask() and click.confirm("Proceed?", err=True))

        target, undo = repair.downgrade(handle, revision, confirm)
    click.echo(output.downgraded_line(target, undo), err=True)
    return EXIT_OK


@main.command()
@click.argument("revision", default="heads")
@click.option("--force", is_flag=True, help="skip the comparison with the models")
@command
def stamp(ctx: Context, revision: str, force: bool) -> int:
    """Adopt a database with tables but no version table (after comparing it with the models)."""
    from reconciler.commands import repair  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        stamped = repair.stamp(handle, revision, force)
    click.echo(f"stamped {', '.join(stamped)}", err=True)
    return EXIT_OK


@main.command()
@click.argument("revision")
@click.option("--applied", is_flag=True, help="the revision is fully applied")
@click.option("--rolled-back", "rolled_back", is_flag=True, help="it was undone by hand")
@command
def resolve(ctx: Context, revision: str, applied: bool, rolled_back: bool) -> int:
    """Tell the journal what became of a dirty (half-applied) revision."""
    from reconciler.commands import repair  # deferred: CLI start-up time

    outcome = options.resolve_outcome(revision, applied, rolled_back)
    with options.reconciler(ctx) as handle:
        resolved = repair.resolve(handle, revision, outcome)
    click.echo(f"revision {resolved} resolved as {outcome}", err=True)
    return EXIT_OK


@main.command("journal")
@click.option("--json", "as_json", is_flag=True, help="a JSON list on stdout")
@click.option("--limit", type=int, default=50, show_default=True, help="newest N steps")
@click.option("--revision", default=None, help="only the steps of this revision")
@command
def journal_command(ctx: Context, as_json: bool, limit: int, revision: str | None) -> int:
    """What was applied, when, by whom and how it ended (the journal side table)."""
    from reconciler.commands import inspect  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        rows = inspect.steps(handle, limit, revision)
    if as_json:
        emit_json(rows)
    elif not rows:
        click.echo("the journal has no steps for this target yet", err=True)
    else:
        _echo(output.journal_lines(inspect.table(rows), ctx.colour(sys.stdout)))
    return EXIT_OK


@main.command()
@click.argument("revision", required=False)
@click.option("--all", "accept_all", is_flag=True, help="accept every mismatch")
@command
def accept(ctx: Context, revision: str | None, accept_all: bool) -> int:
    """Record the new checksum of a reviewed, changed applied revision (applying resumes)."""
    from reconciler.commands import repair  # deferred: CLI start-up time

    chosen = options.accepted_revision(revision, accept_all)
    with options.reconciler(ctx) as handle:
        accepted = repair.accept(handle, chosen)
    names = ", ".join(m.revision for m in accepted)
    click.echo(f"accepted {names}" if accepted else "no checksum mismatch: nothing to accept", err=True)
    return EXIT_OK


@main.command()
@click.option("--reason", default="", help="said in status and logs")
@command
def suspend(ctx: Context, reason: str) -> int:
    """Stop every replica from applying (e.g. around a manual downgrade) until `resume`."""
    from reconciler.commands import repair  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        repair.suspend(handle, reason)
    click.echo("applying is suspended for every replica; `reconciler resume` ends it", err=True)
    return EXIT_OK


@main.command()
@command
def resume(ctx: Context) -> int:
    """Let replicas apply again (clears `suspended`, a `blocked` revision, a fleet's halt)."""
    from reconciler.commands import fleet, repair  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        cleared = repair.resume(handle)
    if ctx.fleet() is not None and (lifted := fleet.lift_halt(ctx.settings())) is not None:
        cleared.append(f"the halt of wave {lifted + 1}")
    click.echo(f"resumed ({', '.join(cleared) or 'nothing was suspended or blocked'})", err=True)
    return EXIT_OK


@main.command()
@click.option("--mode", type=click.Choice(["prod", "dev"]), default=None, help="default: prod")
@click.option("--interval", type=float, default=None, help="seconds between reconciles")
@click.option("--http", "http", default=None, help="HOST:PORT for health, status and metrics")
@command
def run(ctx: Context, mode: str | None, interval: float | None, http: str | None) -> int:
    """The long-running reconciler (a sidecar): keeps the database at the repository's heads."""
    ctx.daemon_overrides = {"mode": mode, "interval": interval, "http": http}
    settings = ctx.settings(resolve_alerts=True)
    if settings.daemon.mode == "dev":
        from reconciler.runtime.dev import run_dev  # deferred: CLI start-up time

        return run_dev(settings)
    from reconciler.runtime.prod import run_daemon  # deferred: CLI start-up time

    return run_daemon(settings)


@main.command()
@click.option("-m", "--message", required=True, help="the revision's message")
@command
def seal(ctx: Context, message: str) -> int:
    """Turn dev mode's draft revision into a normal revision."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    path = authoring.seal(ctx.settings(), message)
    click.echo(f"sealed {path}", err=True)
    return EXIT_OK


@main.command()
@click.argument("revision")
@command
def confirm(ctx: Context, revision: str) -> int:
    """Confirm a held-back destructive revision (writes `allow_destructive = True` into it)."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    path = authoring.confirm(ctx.settings(), revision)
    click.echo(f"confirmed {path}; dev mode applies it now", err=True)
    return EXIT_OK


# --- the Flask-Migrate authoring verbs, and the names a Flask-Migrate user types ------------------
@main.command()
@click.option(
    "-m",
    "--message",
    default=None,
    help="the revision's message (autogenerate: derived from the operations when not given)",
)
@click.option(
    "--autogenerate",
    is_flag=True,
    help="compare the models with the database, as `flask db migrate` does (no file when nothing differs)",
)
@click.option("--rev-id", "rev_id", default=None, help="the new revision's id (default: a new one)")
@command
def revision(ctx: Context, message: str | None, autogenerate: bool, rev_id: str | None) -> int:
    """Write a revision file: empty (`flask db revision`), or --autogenerate'd from the models
    (`flask db migrate`: the same file, through your env.py)."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    if not autogenerate:
        written = authoring.empty_revision(ctx.settings(require_url=False), message, rev_id)
    else:
        with options.reconciler(ctx) as handle:
            written = authoring.generate_revision(handle, message, rev_id)
    _echo(output.written_lines(written), err=True)
    return EXIT_OK


@main.command()
@click.option("-m", "--message", default=None, help="the merge revision's message")
@click.option("--rev-id", "rev_id", default=None, help="the new revision's id (default: a new one)")
@click.argument("revisions", nargs=-1)
@command
def merge(ctx: Context, message: str | None, rev_id: str | None, revisions: tuple[str, ...]) -> int:
    """Write a merge revision of REVISIONS (default: every head), as `flask db merge` does."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    written = authoring.merge(ctx.settings(require_url=False), revisions, message, rev_id)
    _echo(output.written_lines(written), err=True)
    return EXIT_OK


def _alias(
    original: click.Command,
    name: str,
    flask_verb: str,
    fixed: dict[str, Any] | None = None,
    extra: tuple[click.Parameter, ...] = (),
    check: Callable[..., None] | None = None,
) -> click.Command:
    """`name`, what a Flask-Migrate user types (`flask_verb`), running `original` with `fixed`
    values; `extra` parameters are checked by `check` (errors: the documented exit codes)."""
    fixed = fixed or {}

    def callback(**kwargs: Any) -> None:
        values = {p.name: kwargs.pop(str(p.name)) for p in extra}
        if check is not None:
            ctx: Context = click.get_current_context().ensure_object(Context)
            code = run_guarded(lambda: check(**values), ctx)
            if code:
                sys.exit(code)
        original.callback(**kwargs, **fixed)  # type: ignore[misc]

    params = [p for p in original.params if p.name not in fixed] + list(extra)
    long, short = options.alias_help(
        flask_verb, str(original.name), bool(fixed.get("autogenerate")), original.help or ""
    )
    return click.Command(
        name,
        callback=callback,
        params=params,
        help=long,
        short_help=short,
        context_settings=original.context_settings,
    )


main.add_command(
    _alias(
        apply,
        "upgrade",
        "flask db upgrade",
        extra=(click.Argument(["revision"], default="head"),),
        check=options.upgrade_target,
    )
)
main.add_command(_alias(status, "current", "flask db current"))
main.add_command(_alias(revision, "migrate", "flask db migrate", fixed={"autogenerate": True}))
