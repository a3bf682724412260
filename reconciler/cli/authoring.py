"""The commands that write the repository's side: init, revision, merge, seal, confirm, check,
baseline, and the names a Flask-Migrate user types (`upgrade`, `current`, `migrate`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from reconciler.cli.operate import apply, status
from reconciler.cli.shell import command, echo_lines, main, run_guarded
from reconciler.errors import EXIT_OK
from reconciler.runtime import options, output
from reconciler.runtime.options import Context


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
@click.option("--scratch", is_flag=True, help="use a temporary database on the same server")
@command
def baseline(ctx: Context, scratch: bool) -> int:
    """Write the known-differences file from what autogenerate reports at the heads."""
    from reconciler.commands import authoring  # deferred: CLI start-up time

    settings = ctx.settings()
    path, count = authoring.baseline(settings, scratch)
    click.echo(output.baseline_line(path, count, settings.target.url), err=True)
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
    echo_lines(output.written_lines(written), err=True)
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
    echo_lines(output.written_lines(written), err=True)
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
