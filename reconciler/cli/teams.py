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


@main.command("test")
@click.option("--since", default=None, help="step only the revisions changed since this git ref")
@click.option("--jobs", type=int, default=1, show_default=True, help="parallel ranges (PostgreSQL)")
@click.option("--junit", "junit", default=None, help="write JUnit XML to this file")
@command
def test_command(ctx: Context, since: str | None, jobs: int, junit: str | None) -> int:
    """Step every revision on a scratch database: upgrade, downgrade, upgrade again, each
    schema compared; then one head and the models at head. Exit 7 on a failing step."""
    from pathlib import Path  # deferred: CLI start-up time

    from reconciler.commands import stairway  # deferred: CLI start-up time

    if jobs < 1:
        raise errors.ConfigError(f"--jobs {jobs}: give 1 or more (parallel ranges, PostgreSQL)")
    report = stairway.run_test(ctx.settings(), since, jobs)
    if junit:
        Path(junit).write_text(stairway.junit_xml(report), encoding="utf-8")
    echo_lines([f.line for f in report.failures], err=True)
    shown = f"{len(report.checked)} of {len(report.stepped)} revision(s) stepped"
    plain = f", {len(report.before)} applied first" if report.before else ""
    verdict = "passed" if report.passed else f"{len(report.failures)} failing check(s)"
    click.echo(f"{shown}{plain}: {verdict}", err=True)
    return EXIT_OK if report.passed else errors.EXIT_DIFFERENCES
