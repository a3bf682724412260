"""The team's commands around the revision graph: heads (the HEADS marker), rebase, test."""

from __future__ import annotations

import click

from reconciler import errors
from reconciler.cli.shell import command, echo_lines, main
from reconciler.errors import EXIT_OK
from reconciler.runtime.options import Context


@main.command()
@click.option("--write", is_flag=True, help="rewrite migrations/HEADS from the revision graph")
@command
def heads(ctx: Context, write: bool) -> int:
    """The graph's heads (stdout) and the HEADS marker against them: exit 7 when it disagrees."""
    from reconciler.commands import heads as marker  # deferred: CLI start-up time

    found = marker.report(ctx.settings(require_url=False), write=write)
    echo_lines(list(found.heads))
    if found.written:
        click.echo(f"wrote {found.path}: commit it with the revisions", err=True)
    elif found.listed is None:
        click.echo(f"there is no {found.path}: `reconciler heads --write` creates it", err=True)
    elif found.problem is not None:
        click.echo(f"Error: {found.problem}", err=True)
        return errors.EXIT_DIFFERENCES
    return EXIT_OK
