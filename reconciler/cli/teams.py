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


@main.command()
@click.option("--onto", default=None, help="the head whose history stays (default: see the docs)")
@command
def rebase(ctx: Context, onto: str | None) -> int:
    """Re-parent the other branch's revisions onto one head: one linear history, no merge
    revision (refused, exit 6, for a revision a database has applied)."""
    from reconciler.commands import rebase as rebasing  # deferred: CLI start-up time

    result = rebasing.rebase(ctx.settings(require_url=False), onto)
    if not result.moved:
        click.echo(f"one head ({result.head or 'none'}): nothing to rebase", err=True)
        return EXIT_OK
    for move in result.moved:
        click.echo(
            f"moved {len(move.revisions)} revision(s) ({', '.join(move.revisions)}): "
            f"{move.root} now revises {move.onto} (was {move.was})",
            err=True,
        )
    click.echo(f"one head: {result.head}; HEADS rewritten, commit the changed files", err=True)
    return EXIT_OK
