"""click commands: each a few lines calling the library; errors become the documented exit codes.

Global options (`--config`, `--url`, `--migrations`, `--models`, `-q`, `-v`, `--log-format`,
`--no-color`) are accepted before and after the command name. Machine output (`--json`) goes to
stdout, logs go to stderr: text lines for a one-shot command (a shell or a CI log reads them), and
for the daemon (`run`) JSON lines unless on a terminal; `--log-format json` asks for JSON lines
everywhere, errors included.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

from reconciler import __version__, logs
from reconciler.config.load import colour_disabled, load_settings
from reconciler.errors import (
    EXIT_OK,
    EXIT_REVISION_FAILED,
    EXIT_UNREACHABLE,
    ConfigError,
    ReconcilerError,
)
from reconciler.redact import redact
from reconciler.runtime import terminal
from reconciler.settings import Settings

if TYPE_CHECKING:
    from reconciler.control.reconcile import Reconciler

F = TypeVar("F", bound=Callable[..., Any])
GLOBAL_KEYS = ("config", "url", "migrations", "models", "log_format")
GLOBAL_FLAGS = ("quiet", "verbose", "no_color")
DAEMON_COMMANDS = frozenset({"run"})  # long-running: logs for a collector when not on a terminal
log = logs.get("reconciler.cli")


def _global_options(func: F) -> F:
    options = [
        click.option("--config", "config", help="TOML file (default: ./reconciler.toml if present)"),
        click.option("--url", "url", help="database URL (overrides [target] url)"),
        click.option("--migrations", "migrations", help="migrations directory"),
        click.option("--models", "models", help="models as pkg.module:attr"),
        click.option(
            "-q", "--quiet", "quiet", is_flag=True, default=None, help="errors and the final summary only"
        ),
        click.option(
            "-v",
            "--verbose",
            "verbose",
            is_flag=True,
            default=None,
            help="debug logs, every revision id in summaries",
        ),
        click.option(
            "--log-format",
            "log_format",
            type=click.Choice(logs.FORMATS),
            help="auto (text; JSON lines for `run` when not on a terminal), text or json",
        ),
        click.option(
            "--no-color",
            "no_color",
            is_flag=True,
            default=None,
            help="no colour (also when NO_COLOR is set or output is not a terminal)",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class Context:
    """Global options gathered from before and after the command name."""

    def __init__(self) -> None:
        self.options: dict[str, str | None] = dict.fromkeys(GLOBAL_KEYS)
        self.flags: set[str] = set()
        self.daemon_overrides: dict[str, Any] = {}
        self.daemon = False  # the command is `run`
        self.log_format = "auto"  # as resolved with the settings (`--log-format`, [logging] format)

    @property
    def verbose(self) -> bool:
        return "verbose" in self.flags

    @property
    def quiet(self) -> bool:
        return "quiet" in self.flags

    def level(self) -> str | None:
        """The log level the flags ask for: -q errors only, -v debug; None leaves [logging] level."""
        if self.quiet and self.verbose:
            raise click.UsageError("-q and -v contradict each other: pass one of them")
        return "error" if self.quiet else "debug" if self.verbose else None

    def colour(self, stream: Any) -> bool:
        """Colour on `stream`: a terminal, and neither --no-color nor NO_COLOR."""
        return "no_color" not in self.flags and not colour_disabled() and stream.isatty()

    def json_logs(self) -> bool:
        return not logs.use_text(self.options["log_format"] or self.log_format, sys.stderr, self.daemon)

    def setup_logs(self, level: str | None = None, fmt: str | None = None) -> None:
        self.log_format = fmt or self.options["log_format"] or "auto"
        logs.setup(
            level or self.level() or "info",
            self.log_format,
            daemon=self.daemon,
            colour=self.colour(sys.stderr),
        )

    def settings(
        self, require_url: bool = True, require_migrations: bool = True, resolve_alerts: bool = False
    ) -> Settings:
        overrides = {
            "target": {
                "url": self.options["url"],
                "migrations": self.options["migrations"],
                "models": self.options["models"],
            },
            "daemon": self.daemon_overrides,
            "logging": {"level": self.level(), "format": self.options["log_format"]},
        }
        from reconciler.control.workers import resolve_app_url  # CLI start-up time

        settings = load_settings(
            self.options["config"],
            overrides,
            require_url=require_url,
            require_migrations=require_migrations,
            resolve_alerts=resolve_alerts,
            app_url=resolve_app_url,
        )
        self.setup_logs(settings.logging.level, settings.logging.format)
        return settings


def command(func: F) -> F:
    """A subcommand: takes the global options too, and maps errors to exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        click_ctx = click.get_current_context()
        ctx: Context = click_ctx.ensure_object(Context)
        for key in GLOBAL_KEYS:
            value = kwargs.pop(key, None)
            if value is not None:
                ctx.options[key] = value
        ctx.flags.update(key for key in GLOBAL_FLAGS if kwargs.pop(key, None))
        ctx.daemon = click_ctx.info_name in DAEMON_COMMANDS
        code = run_guarded(lambda: func(ctx, *args, **kwargs), ctx)
        sys.exit(code)

    return _global_options(wrapper)  # type: ignore[return-value]


def run_guarded(body: Callable[[], int | None], ctx: Context) -> int:
    try:
        return body() or EXIT_OK
    except click.UsageError:
        raise
    except ReconcilerError as exc:
        report_error(ctx, str(exc), exc.exit_code, exc.__class__.__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        report_error(ctx, "interrupted", 130, "KeyboardInterrupt")
        return 130
    except Exception as exc:  # a bug of ours: say so, with a redacted traceback and no locals
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        sys.stderr.write(redact(text))
        report_error(
            ctx,
            f"internal error {exc.__class__.__name__}: {redact(str(exc))}; please report it",
            EXIT_REVISION_FAILED,
            exc.__class__.__name__,
        )
        return EXIT_REVISION_FAILED


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="reconciler")
@_global_options
@click.pass_context
def main(ctx: click.Context, /, **options: Any) -> None:
    """Keep a database schema in step with its models and Alembic / Flask-Migrate revisions."""
    state = ctx.ensure_object(Context)
    state.options.update({k: v for k, v in options.items() if v is not None and k in GLOBAL_KEYS})
    state.flags.update(k for k in GLOBAL_FLAGS if options.get(k))


@contextmanager
def _reconciler(ctx: Context) -> Iterator[Reconciler]:
    """The target's control plane, closed (connections released) when the command ends."""
    from reconciler.control.reconcile import Reconciler

    rec = Reconciler(ctx.settings())
    try:
        yield rec
    finally:
        rec.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@command
def status(ctx: Context, as_json: bool) -> int:
    """State of the database against the repository (exit 0 when read, 5 when unreachable)."""
    from reconciler.commands import admin

    with _reconciler(ctx) as rec:
        result = admin.analysed_status(rec, rec.status())
    if as_json:
        emit_json(result.as_dict())
    else:
        _print_status(result.as_dict(), ctx.colour(sys.stdout))
    return EXIT_UNREACHABLE if result.sync_state == "unknown" else EXIT_OK


def _print_status(data: dict[str, Any], colour: bool = False) -> None:
    click.echo(f"target:     {data['target']} ({data['url']})")
    click.echo(f"state:      {terminal.state(data['state'], colour)}")
    if data["conditions"]:
        click.echo(f"conditions: {', '.join(terminal.state(c, colour) for c in data['conditions'])}")
    click.echo(f"db heads:   {', '.join(data['db_heads']) or '(none)'}")
    click.echo(f"repo heads: {', '.join(data['repo_heads']) or '(none)'}")
    if data["pending"]:
        click.echo(f"pending:    {len(data['pending'])}: {', '.join(data['pending'])}")
    for chain in data.get("chains") or ():
        _print_chain(chain, colour)
    if data["state"] != "in_sync":
        click.echo(data["message"])
    checked = (data.get("guard") or {}).get("checked_per_operation")
    if checked:
        click.echo(f"guard:      checked operation by operation as they run: {', '.join(checked)}")


def _print_chain(chain: dict[str, Any], colour: bool = False) -> None:
    """One line per chain when the database has several (`[[target.chains]]`)."""
    pending = f"; {len(chain['pending'])} pending" if chain["pending"] else ""
    heads = ", ".join(chain["db_heads"]) or "(none)"
    state = terminal.state(chain["state"], colour)
    click.echo(f"chain {chain['chain']} ({chain['version_table']}): {state} at {heads}{pending}")


@main.command()
@click.option("--sql", is_flag=True, help="print the pending revisions' SQL (offline)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@click.option(
    "--fail-on",
    "fail_on",
    multiple=True,
    type=click.Choice(["data-loss", "lock-risk"]),
    help="exit 6 when the pending revisions have findings of this class (a CI gate)",
)
@command
def plan(ctx: Context, sql: bool, as_json: bool, fail_on: tuple[str, ...]) -> int:
    """Pending revisions in order with the guard's findings; --sql prints their SQL instead."""
    from reconciler.commands import admin
    from reconciler.control.reconcile import refuse_unless_applicable

    with _reconciler(ctx) as rec:
        result, steps = admin.plan(rec)
        refuse_unless_applicable(result)
        analysis = admin.plan_findings(rec, result)
        text = admin.plan_sql(rec, result) if sql else None
    if as_json:
        data = result.as_dict()
        data["steps"] = [s.__dict__ for s in steps]
        data["findings"] = [f.as_dict() for f in analysis.findings]
        data["lock_rules"] = analysis.linter
        if text is not None:
            data["sql"] = text
        emit_json(data)
    elif text is not None:
        click.echo(text)
    elif not steps:
        click.echo(f"nothing to apply: the database is {result.state}")
    else:
        _print_plan(steps, analysis.findings)
    admin.fail_on(analysis, fail_on)
    return EXIT_OK


def _print_plan(steps: list[Any], findings: tuple[Any, ...]) -> None:
    for index, step in enumerate(steps, start=1):
        click.echo(f"{index:>3}. {step.revision}  {step.message}")
        for finding in (f for f in findings if f.revision == step.revision):
            ack = " (acknowledged)" if finding.acknowledged else ""
            click.echo(f"       {finding.kind:<12} {finding.where}  {finding.message}{ack}")


@main.command()
@command
def apply(ctx: Context) -> int:
    """One reconcile: take the lock, upgrade to the heads, verify."""
    from reconciler.control.reconcile import summary

    with _reconciler(ctx) as rec, _progress_line(ctx) as progress:
        result = rec.apply(trigger="apply", progress=progress)
    click.echo(summary(result, ids=ctx.verbose), err=True)
    return EXIT_OK


@contextmanager
def _progress_line(ctx: Context) -> Iterator[terminal.ProgressLine | None]:
    """On a terminal, `n of N, revision` as one line rewritten in place, which replaces the
    per-revision log lines; none when piped, quiet, verbose or logging JSON."""
    if not sys.stderr.isatty() or ctx.quiet or ctx.verbose or ctx.json_logs():
        yield None
        return
    line = terminal.ProgressLine(sys.stderr)
    logs.hide("revision_applied", "reconcile_finished")  # the line, then the summary, say it
    logs.set_status_line(line)
    try:
        yield line
    finally:
        logs.set_status_line(None)
        line.close()


@main.command()
@click.option("--timeout", type=float, default=300.0, show_default=True, help="seconds")
@click.option("--exact", is_flag=True, help="wait for equality (not ahead)")
@click.option("--interval", type=float, default=1.0, show_default=True, help="poll seconds")
@command
def wait(ctx: Context, timeout: float, exact: bool, interval: float) -> int:
    """Block until the database is at or ahead of the repository heads (exit 8 on timeout)."""
    _check_seconds("--timeout", timeout, zero=True, example="300")
    _check_seconds("--interval", interval, zero=False, example="1")
    with _reconciler(ctx) as rec:
        result = rec.wait(timeout, exact=exact, poll=interval)
    click.echo(f"database is {result.state}", err=True)
    return EXIT_OK


def _check_seconds(option: str, value: float, zero: bool, example: str) -> None:
    """A duration option: a number, not negative (and more than 0 unless `zero` is allowed);
    `inf` is a duration too (wait for ever), NaN is not."""
    if value > 0 or (zero and value == 0):
        return
    least = "0 or more" if zero else "more than 0"
    raise ConfigError(f"{option} must be {least} seconds, got {value:g}; e.g. {option} {example}")


@main.command()
@click.option("--scratch", is_flag=True, help="use a temporary database on the same server")
@command
def check(ctx: Context, scratch: bool) -> int:
    """Models vs migrations (CI gate): exit 7 and list the differences."""
    from reconciler.commands import admin

    admin.check(ctx.settings(), scratch)
    click.echo("models and migrations agree", err=True)
    return EXIT_OK


@main.command()
@click.option("--json", "as_json", is_flag=True, help="the differences as one JSON object on stdout")
@command
def drift(ctx: Context, as_json: bool) -> int:
    """The live schema vs the models, now: exit 7 and list the differences (the daemon's drift)."""
    from reconciler.commands import admin
    from reconciler.errors import EXIT_DIFFERENCES

    with _reconciler(ctx) as rec:
        found = admin.drift(rec)
    if as_json:
        emit_json({"drift": bool(found), "count": len(found), "differences": found})
    for difference in found:
        click.echo(f"  - {difference['text']}", err=True)
    click.echo(f"drift: {len(found)} difference(s)" if found else "no drift", err=True)
    return EXIT_DIFFERENCES if found else EXIT_OK


@main.command()
@click.option("--scratch", is_flag=True, help="use a temporary database on the same server")
@command
def baseline(ctx: Context, scratch: bool) -> int:
    """Write the known-differences file from what autogenerate reports at the heads."""
    from reconciler.commands import admin
    from reconciler.project import differences

    settings = ctx.settings()
    path, count = admin.baseline(settings, scratch)
    dialect = differences.dialect_of(settings.target.url)
    click.echo(
        f"wrote {count} known difference(s) for {dialect} to {path} (the lists of other dialects are kept)",
        err=True,
    )
    return EXIT_OK


@main.command("config")
@click.option("--example", is_flag=True, help="print every key with its default and a comment")
@command
def config_command(ctx: Context, example: bool) -> int:
    """With --example: print config.example.toml, every key with its default and a comment."""
    from reconciler.config.load import example_config

    if not example:
        raise ConfigError(
            "`reconciler config` needs an option: --example prints every key with its default "
            "(save it as reconciler.toml and edit)"
        )
    click.echo(example_config(), nl=False)
    return EXIT_OK


@main.command()
@click.option(
    "--flask-app",
    "flask_app",
    envvar="FLASK_APP",
    default="",
    help="the Flask app's module, as FLASK_APP (default: FLASK_APP, else wsgi.py / app.py)",
)
@command
def init(ctx: Context, flask_app: str) -> int:
    """Create a migrations directory: `flask db init`'s layout for a Flask project, else Alembic's."""
    from reconciler.commands import admin

    made = admin.init(ctx.settings(require_url=False, require_migrations=False), flask_app)
    click.echo(
        f"created {made.directory} and {made.alembic_ini} from the {made.template} template: {made.reason}",
        err=True,
    )
    return EXIT_OK


@main.command()
@command
def history(ctx: Context) -> int:
    """The revision graph, newest first; applied revisions marked."""
    from reconciler.commands import admin

    with _reconciler(ctx) as rec:
        lines, reachable = admin.history(rec)
    colour = ctx.colour(sys.stdout)
    for line in lines:
        click.echo(terminal.history_line(line, colour))
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
    from reconciler.commands import admin

    if revision.startswith("--") or (revision.startswith("-") and not revision[1:].isdigit()):
        raise ConfigError(f"no such option: {revision} (see `reconciler downgrade --help`)")
    with _reconciler(ctx) as rec:

        def confirm(target: str, undo: list[str]) -> bool:
            click.echo(f"downgrade to {target} will undo, newest first:", err=True)
            for rev in undo:
                click.echo(f"  {rev}  {rec.graph().revisions[rev].message}", err=True)
            if yes:
                return True
            if not sys.stdin.isatty():
                raise ConfigError("not on a terminal: pass --yes to confirm the downgrade")
            return click.confirm("Proceed?", err=True)

        target, undo = admin.downgrade(rec, revision, confirm)
    if not undo:
        click.echo(f"nothing to undo: {target} is the current revision", err=True)
    else:
        click.echo(f"downgraded to {target}", err=True)
    return EXIT_OK


@main.command()
@click.argument("revision", default="heads")
@click.option("--force", is_flag=True, help="skip the comparison with the models")
@command
def stamp(ctx: Context, revision: str, force: bool) -> int:
    """Adopt a database with tables but no version table (after comparing it with the models)."""
    from reconciler.commands import admin

    with _reconciler(ctx) as rec:
        stamped = admin.stamp(rec, revision, force)
    click.echo(f"stamped {', '.join(stamped)}", err=True)
    return EXIT_OK


@main.command()
@click.argument("revision")
@click.option("--applied", is_flag=True, help="the revision is fully applied")
@click.option("--rolled-back", "rolled_back", is_flag=True, help="it was undone by hand")
@command
def resolve(ctx: Context, revision: str, applied: bool, rolled_back: bool) -> int:
    """Tell the journal what became of a dirty (half-applied) revision."""
    from reconciler.commands import admin

    if applied and rolled_back:
        raise ConfigError(
            f"--applied and --rolled-back contradict each other: say what became of {revision} "
            "with one of them"
        )
    if not (applied or rolled_back):
        raise ConfigError("say what happened: --applied or --rolled-back")
    outcome = "applied" if applied else "rolled_back"
    with _reconciler(ctx) as rec:
        resolved = admin.resolve(rec, revision, outcome)
    click.echo(f"revision {resolved} resolved as {outcome}", err=True)
    return EXIT_OK


@main.command("journal")
@click.option("--json", "as_json", is_flag=True, help="a JSON list on stdout")
@click.option("--limit", type=int, default=50, show_default=True, help="newest N steps")
@click.option("--revision", default=None, help="only the steps of this revision")
@command
def journal_command(ctx: Context, as_json: bool, limit: int, revision: str | None) -> int:
    """What was applied, when, by whom and how it ended (the journal side table)."""
    from reconciler.commands import journal_admin

    with _reconciler(ctx) as rec:
        rows = journal_admin.steps(rec, limit, revision)
    if as_json:
        emit_json(rows)
    elif not rows:
        click.echo("the journal has no steps for this target yet", err=True)
    else:
        table = journal_admin.table(rows)
        for line in terminal.column(table, "outcome", terminal.OUTCOME_STYLES, ctx.colour(sys.stdout)):
            click.echo(line)
    return EXIT_OK


@main.command()
@click.argument("revision", required=False)
@click.option("--all", "accept_all", is_flag=True, help="accept every mismatch")
@command
def accept(ctx: Context, revision: str | None, accept_all: bool) -> int:
    """Record the new checksum of a reviewed, changed applied revision (applying resumes)."""
    from reconciler.commands import journal_admin

    if bool(revision) == accept_all:
        raise ConfigError("name one revision, or pass --all (not both): `reconciler accept REV`")
    with _reconciler(ctx) as rec:
        accepted = journal_admin.accept(rec, None if accept_all else revision)
    names = ", ".join(m.revision for m in accepted)
    click.echo(f"accepted {names}" if accepted else "no checksum mismatch: nothing to accept", err=True)
    return EXIT_OK


@main.command()
@click.option("--reason", default="", help="said in status and logs")
@command
def suspend(ctx: Context, reason: str) -> int:
    """Stop every replica from applying (e.g. around a manual downgrade) until `resume`."""
    from reconciler.commands import admin

    with _reconciler(ctx) as rec:
        admin.suspend(rec, reason)
    click.echo("applying is suspended for every replica; `reconciler resume` ends it", err=True)
    return EXIT_OK


@main.command()
@command
def resume(ctx: Context) -> int:
    """Let replicas apply again (clears `suspended`, and a `blocked` revision)."""
    from reconciler.commands import admin

    with _reconciler(ctx) as rec:
        cleared = admin.resume(rec)
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
        from reconciler.runtime.dev import run_dev

        return run_dev(settings)
    from reconciler.runtime.prod import run_daemon

    return run_daemon(settings)


@main.command()
@click.option("-m", "--message", required=True, help="the revision's message")
@command
def seal(ctx: Context, message: str) -> int:
    """Turn dev mode's draft revision into a normal revision."""
    from reconciler.runtime.dev import seal as seal_draft

    path = seal_draft(ctx.settings(), message)
    click.echo(f"sealed {path}", err=True)
    return EXIT_OK


@main.command()
@click.argument("revision")
@command
def confirm(ctx: Context, revision: str) -> int:
    """Confirm a held-back destructive revision (writes `allow_destructive = True` into it)."""
    from reconciler.runtime.dev import confirm as confirm_revision

    path = confirm_revision(ctx.settings(), revision)
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
    from reconciler.commands import admin

    if not autogenerate:
        written = admin.empty_revision(ctx.settings(require_url=False), message, rev_id)
    else:
        with _reconciler(ctx) as rec:
            written = admin.generate_revision(rec, message, rev_id)
    _print_written(written)
    return EXIT_OK


def _print_written(written: Any) -> None:
    if written.path is None:
        click.echo("No changes in schema detected.", err=True)
        return
    click.echo(f"Generating {written.path} ... done", err=True)
    for operation in written.operations:
        click.echo(f"  - {operation['text']}", err=True)
    for line in written.destructive:
        click.echo(f"  ! {line}", err=True)
    if written.destructive:
        click.echo(
            f"review it: applying refuses data loss until the file says it is meant "
            f"(`reconciler confirm {written.revision}` writes `allow_destructive = True`)",
            err=True,
        )
    for failure in written.hook_failures:
        click.echo(
            f"  post-write hook {failure.get('hook', '?')} failed (the revision is kept): "
            f"{failure.get('output', '')}".rstrip(),
            err=True,
        )


@main.command()
@click.option("-m", "--message", default=None, help="the merge revision's message")
@click.option("--rev-id", "rev_id", default=None, help="the new revision's id (default: a new one)")
@click.argument("revisions", nargs=-1)
@command
def merge(ctx: Context, message: str | None, rev_id: str | None, revisions: tuple[str, ...]) -> int:
    """Write a merge revision of REVISIONS (default: every head), as `flask db merge` does."""
    from reconciler.commands import admin

    written = admin.merge(ctx.settings(require_url=False), revisions, message, rev_id)
    if written is None:
        click.echo("nothing to merge: the repository has one head", err=True)
        return EXIT_OK
    _print_written(written)
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
    return click.Command(
        name,
        callback=callback,
        params=params,
        help=f"`{flask_verb}`: the same as `reconciler {original.name}"
        f"{' --autogenerate' if fixed.get('autogenerate') else ''}`. "
        f"{original.help or ''}",
        short_help=f"`{flask_verb}`: same as `{original.name}"
        f"{' --autogenerate' if fixed.get('autogenerate') else ''}`",
        context_settings=original.context_settings,
    )


def _upgrade_target(revision: str) -> None:
    if revision not in ("head", "heads"):
        raise ConfigError(
            f"upgrade goes to the repository's heads only, not to {revision!r}: the reconciler "
            "applies every pending revision, one journaled step each; run `reconciler upgrade`"
        )


main.add_command(
    _alias(
        apply,
        "upgrade",
        "flask db upgrade",
        extra=(click.Argument(["revision"], default="head"),),
        check=_upgrade_target,
    )
)
main.add_command(_alias(status, "current", "flask db current"))
main.add_command(_alias(revision, "migrate", "flask db migrate", fixed={"autogenerate": True}))
