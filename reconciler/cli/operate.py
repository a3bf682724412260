"""The commands that read and operate a target: status, plan, apply, wait, drift, history,
journal, downgrade, stamp, resolve, accept, suspend, resume, run, config."""

from __future__ import annotations

import sys

import click

from reconciler import errors
from reconciler.cli.shell import command, echo_lines, emit_json, main
from reconciler.config.load import example_config
from reconciler.errors import EXIT_OK
from reconciler.runtime import options, output
from reconciler.runtime.options import Context


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
        echo_lines(output.status_lines(result.as_dict(), ctx.colour(sys.stdout), fleet))
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
        echo_lines(output.plan_lines(result.state, steps, analysis.findings, text))
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
@click.option("--json", "as_json", is_flag=True, help="the differences as one JSON object on stdout")
@command
def drift(ctx: Context, as_json: bool) -> int:
    """The live schema vs the models, now: exit 7 and list the differences (the daemon's drift)."""
    from reconciler.commands import inspect  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        found = inspect.drift(handle)
    if as_json:
        emit_json({"drift": bool(found), "count": len(found), "differences": found})
    echo_lines(output.drift_lines(found), err=True)
    return errors.EXIT_DIFFERENCES if found else EXIT_OK


@main.command("config")
@click.option("--example", is_flag=True, help="print every key with its default and a comment")
@command
def config_command(ctx: Context, example: bool) -> int:
    """With --example: print config.example.toml, every key with its default and a comment."""
    options.require_example(example)
    click.echo(example_config(), nl=False)
    return EXIT_OK


@main.command()
@click.option("--graph", "as_graph", is_flag=True, help="draw the branches and merges in lanes")
@command
def history(ctx: Context, as_graph: bool) -> int:
    """The revision graph, newest first; applied revisions marked (--graph: in lanes)."""
    from reconciler.commands import inspect  # deferred: CLI start-up time

    with options.reconciler(ctx) as handle:
        lines, reachable = inspect.history(handle)
        drawn = inspect.history_graph(handle) if as_graph else None
    echo_lines(output.history_lines(lines, ctx.colour(sys.stdout), drawn))
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
            echo_lines(output.downgrade_lines(target, undo, read_graph(handle)), err=True)
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
        echo_lines(output.journal_lines(inspect.table(rows), ctx.colour(sys.stdout)))
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
