"""The command line's options once click has parsed them: the global ones gathered into the
settings (`Context`), and the checks of values click cannot make (errors: the documented exit codes).

Global options (`--config`, `--url`, `--migrations`, `--models`, `-q`, `-v`, `--log-format`,
`--no-color`) are accepted before and after the command name. Machine output (`--json`) goes to
stdout, logs go to stderr: text lines for a one-shot command (a shell or a CI log reads them), and
for the daemon (`run`) JSON lines unless on a terminal; `--log-format json` asks for JSON lines
everywhere, errors included.

No click here (cli.py is its one importer): a contradiction click would report as a usage error is
an `OptionConflict`, which cli.py turns into one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from reconciler import logs
from reconciler.config.load import colour_disabled, load_settings
from reconciler.errors import ConfigError
from reconciler.settings import Settings

if TYPE_CHECKING:
    from reconciler.control.target import TargetHandle

GLOBAL_KEYS = ("config", "url", "migrations", "models", "log_format", "tenant")
GLOBAL_FLAGS = ("quiet", "verbose", "no_color")
FLASK_APP_HELP = "the Flask app's module, as FLASK_APP (default: FLASK_APP, else wsgi.py / app.py)"
FAIL_ON = ("data-loss", "lock-risk")
FAIL_ON_HELP = "exit 6 when the pending revisions have findings of this class (a CI gate)"
DAEMON_COMMANDS = frozenset({"run"})  # long-running: logs for a collector when not on a terminal
# The global options, accepted before and after the command name: (names, help, kind), kind one of
# "value", "flag" (is_flag, default None) or "log_format" (a choice of logs.FORMATS).
GLOBAL_OPTIONS = (
    (("--config", "config"), "TOML file (default: ./reconciler.toml if present)", "value"),
    (("--url", "url"), "database URL (overrides [target] url)", "value"),
    (("--migrations", "migrations"), "migrations directory", "value"),
    (("--models", "models"), "models as pkg.module:attr", "value"),
    (("--tenant", "tenant"), "one tenant of [fleet] (its schema, database or file) as the target", "value"),
    (("-q", "--quiet", "quiet"), "errors and the final summary only", "flag"),
    (("-v", "--verbose", "verbose"), "debug logs, every revision id in summaries", "flag"),
    (
        ("--log-format", "log_format"),
        "auto (text; JSON lines for `run` when not on a terminal), text or json",
        "log_format",
    ),
    (
        ("--no-color", "no_color"),
        "no colour (also when NO_COLOR is set or output is not a terminal)",
        "flag",
    ),
)


class OptionConflict(Exception):
    """Two options that contradict each other: cli.py reports it as click's usage error (exit 2)."""


class Context:
    """Global options gathered from before and after the command name."""

    def __init__(self) -> None:
        self.options: dict[str, str | None] = dict.fromkeys(GLOBAL_KEYS)
        self.flags: set[str] = set()
        self.daemon_overrides: dict[str, Any] = {}
        self.daemon = False  # the command is `run`
        self.log_format = "auto"  # as resolved with the settings (`--log-format`, [logging] format)
        self._settings: dict[tuple[bool, bool, bool], Settings] = {}  # loaded once per command

    def take(self, values: dict[str, Any], command: str | None = None) -> None:
        """Take the global options out of a command's `values` (the group's: `command` None)."""
        for key in GLOBAL_KEYS:
            value = values.pop(key, None)
            if value is not None:
                self.options[key] = value
        self.flags.update(key for key in GLOBAL_FLAGS if values.pop(key, None))
        if command is not None:
            self.daemon = command in DAEMON_COMMANDS

    @property
    def verbose(self) -> bool:
        return "verbose" in self.flags

    @property
    def quiet(self) -> bool:
        return "quiet" in self.flags

    def level(self) -> str | None:
        """The log level the flags ask for: -q errors only, -v debug; None leaves [logging] level."""
        if self.quiet and self.verbose:
            raise OptionConflict("-q and -v contradict each other: pass one of them")
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

    def fleet(self) -> Settings | None:
        """The settings when they set a [fleet] and no --tenant picks one of it (else None)."""
        settings = self.settings()
        return settings if settings.fleet.enabled and not self.options["tenant"] else None

    def settings(
        self, require_url: bool = True, require_migrations: bool = True, resolve_alerts: bool = False
    ) -> Settings:
        key = (require_url, require_migrations, resolve_alerts)
        if key not in self._settings:
            self._settings[key] = self._load(require_url, require_migrations, resolve_alerts)
        return self._settings[key]

    def _load(self, require_url: bool, require_migrations: bool, resolve_alerts: bool) -> Settings:
        overrides = {
            "target": {
                "url": self.options["url"],
                "migrations": self.options["migrations"],
                "models": self.options["models"],
            },
            "daemon": self.daemon_overrides,
            "logging": {"level": self.level(), "format": self.options["log_format"]},
        }
        from reconciler.control.appurl import resolve_app_url  # deferred: CLI start-up time

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


@contextmanager
def reconciler(ctx: Context) -> Iterator[TargetHandle]:
    """The target's control plane, closed (connections released) when the command ends; with
    `--tenant`, that tenant of the fleet."""
    from reconciler.control.target import open_target, release_target  # deferred: CLI start-up time

    tenant = ctx.options["tenant"]
    if tenant:
        with tenant_handle(ctx.settings(), tenant) as handle:
            yield handle
        return
    handle = open_target(ctx.settings())
    try:
        yield handle
    finally:
        release_target(handle)


@contextmanager
def tenant_handle(settings: Settings, tenant: str) -> Iterator[TargetHandle]:
    """One tenant of the fleet (refused unless the fleet lists it), released at the end."""
    from reconciler.control import fleet  # deferred: CLI start-up time

    if not settings.fleet.enabled:
        raise ConfigError(
            f"--tenant {tenant}: no [fleet] is configured; set [fleet] source, or drop --tenant"
        )
    found = fleet.open_fleet(settings)
    try:
        fleet.require_tenant(found, tenant)
        yield found.handle(tenant)
    finally:
        fleet.release_fleet(found)


def check_seconds(option: str, value: float, zero: bool, example: str) -> None:
    """A duration option: a number, not negative (and more than 0 unless `zero` is allowed);
    `inf` is a duration too (wait for ever), NaN is not."""
    if value > 0 or (zero and value == 0):
        return
    least = "0 or more" if zero else "more than 0"
    raise ConfigError(f"{option} must be {least} seconds, got {value:g}; e.g. {option} {example}")


def check_wait(timeout: float, interval: float) -> None:
    """`wait --timeout` (0 is allowed: look once) and `--interval`."""
    check_seconds("--timeout", timeout, zero=True, example="300")
    check_seconds("--interval", interval, zero=False, example="1")


def can_ask() -> bool:
    """A person can be asked (stdin is a terminal); else ConfigError: --yes is needed."""
    if not sys.stdin.isatty():
        raise ConfigError("not on a terminal: pass --yes to confirm the downgrade")
    return True


def require_example(example: bool) -> None:
    """`config` prints nothing without --example."""
    if not example:
        raise ConfigError(
            "`reconciler config` needs an option: --example prints every key with its default "
            "(save it as reconciler.toml and edit)"
        )


def downgrade_revision(revision: str) -> str:
    """`downgrade REVISION` takes `-N` as a value: any other text starting with `-` is an option."""
    if revision.startswith("--") or (revision.startswith("-") and not revision[1:].isdigit()):
        raise ConfigError(f"no such option: {revision} (see `reconciler downgrade --help`)")
    return revision


def resolve_outcome(revision: str, applied: bool, rolled_back: bool) -> str:
    """`resolve`'s outcome: exactly one of --applied and --rolled-back."""
    if applied and rolled_back:
        raise ConfigError(
            f"--applied and --rolled-back contradict each other: say what became of {revision} "
            "with one of them"
        )
    if not (applied or rolled_back):
        raise ConfigError("say what happened: --applied or --rolled-back")
    return "applied" if applied else "rolled_back"


def accepted_revision(revision: str | None, accept_all: bool) -> str | None:
    """`accept`'s revision: one named, or --all (None), never both."""
    if bool(revision) == accept_all:
        raise ConfigError("name one revision, or pass --all (not both): `reconciler accept REV`")
    return None if accept_all else revision


def upgrade_target(revision: str) -> None:
    if revision not in ("head", "heads"):
        raise ConfigError(
            f"upgrade goes to the repository's heads only, not to {revision!r}: the reconciler "
            "applies every pending revision, one journaled step each; run `reconciler upgrade`"
        )


def alias_help(flask_verb: str, name: str, autogenerate: bool, help_text: str) -> tuple[str, str]:
    """The help and short help of `flask_verb`'s alias of the command `name`."""
    flag = " --autogenerate" if autogenerate else ""
    return (
        f"`{flask_verb}`: the same as `reconciler {name}{flag}`. {help_text}",
        f"`{flask_verb}`: same as `{name}{flag}`",
    )
