"""One exception tree; every error knows its exit code, its run outcome and whether a retry may help.

Exit codes (ARCHITECTURE.md, "State model"):
0 ok, 1 a revision failed, 2 usage or configuration, 3 lock not acquired in time,
4 ahead / diverged / multiple heads / needs adoption, 5 database unreachable,
6 refused by a safety rule, 7 `check` found differences, 8 `wait` timed out.

The `outcome` is what a daemon run that ends in the error reports (the `outcome` metric label,
`/status` `last_outcome`, the alert policy's input); the daemon reads it from the class, in one place.

    ReconcilerError                 exit 1  outcome refused   (the base: anything not below)
    ├── ConfigError                 exit 2  refused
    │   └── (core.graph) RevisionFileError, MissingRevision: the daemon reports `failed`, naming the file
    ├── UnreachableError            exit 5  unreachable       transient
    ├── LockTimeout                 exit 3  lock_busy         transient
    ├── StateError                  exit 4  refused
    ├── RevisionFailed              exit 1  failed
    ├── Refused                     exit 6  refused
    │   ├── Suspended               exit 6  suspended
    │   └── Blocked                 exit 6  blocked
    ├── DifferencesFound            exit 7  refused
    ├── WaitTimeout                 exit 8  refused
    ├── WorkerError                 exit 1  refused
    └── RetryDeferred               exit 1  deferred          (not a failure: the fleet's retry is not due)
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_REVISION_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOCK = 3
EXIT_STATE = 4
EXIT_UNREACHABLE = 5
EXIT_REFUSED = 6
EXIT_DIFFERENCES = 7
EXIT_WAIT_TIMEOUT = 8

# Run outcomes (ARCHITECTURE.md, "State model"): the `outcome` metric label of a daemon run.
OUTCOME_NOOP = "noop"
OUTCOME_APPLIED = "applied"
OUTCOME_LOCK_BUSY = "lock_busy"
OUTCOME_FAILED = "failed"
OUTCOME_UNREACHABLE = "unreachable"
OUTCOME_REFUSED = "refused"
OUTCOME_BLOCKED = "blocked"
OUTCOME_SUSPENDED = "suspended"
OUTCOME_DEFERRED = "deferred"


class ReconcilerError(Exception):
    """Base class. `str(err)` is the one message a user sees; it names the value and the next step."""

    exit_code = EXIT_REVISION_FAILED
    outcome = OUTCOME_REFUSED
    transient = False


class ConfigError(ReconcilerError):
    """A setting is wrong: unknown key, wrong type, bad URL, missing directory, unimportable models."""

    exit_code = EXIT_CONFIG
    outcome = OUTCOME_REFUSED


class UnreachableError(ReconcilerError):
    """The database could not be reached; retry on the next tick."""

    exit_code = EXIT_UNREACHABLE
    outcome = OUTCOME_UNREACHABLE
    transient = True


class LockTimeout(ReconcilerError):
    """The advisory lock was not acquired in time; someone else is applying."""

    exit_code = EXIT_LOCK
    outcome = OUTCOME_LOCK_BUSY
    transient = True

    def __init__(self, message: str, holder: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class StateError(ReconcilerError):
    """The database is ahead, diverged, has an unmerged fork, or needs adoption: nothing applied."""

    exit_code = EXIT_STATE
    outcome = OUTCOME_REFUSED


class RevisionFailed(ReconcilerError):
    """A revision raised while being applied; the database stays at the previous revision."""

    exit_code = EXIT_REVISION_FAILED
    outcome = OUTCOME_FAILED

    def __init__(
        self,
        message: str,
        revision: str | None = None,
        error_class: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.revision = revision
        self.error_class = error_class
        self.sqlstate = sqlstate


class Refused(ReconcilerError):
    """A safety rule refused the operation (dirty journal, wrong database, destructive change)."""

    exit_code = EXIT_REFUSED
    outcome = OUTCOME_REFUSED


class DifferencesFound(ReconcilerError):
    """`check` found that the models and the migrations differ."""

    exit_code = EXIT_DIFFERENCES
    outcome = OUTCOME_REFUSED


class WaitTimeout(ReconcilerError):
    """`wait` gave up before the database reached the repository's heads."""

    exit_code = EXIT_WAIT_TIMEOUT
    outcome = OUTCOME_REFUSED


class WorkerError(ReconcilerError):
    """The worker subprocess failed outside a revision (env.py, models import, protocol)."""

    exit_code = EXIT_REVISION_FAILED
    outcome = OUTCOME_REFUSED


class Suspended(Refused):
    """Applying is suspended fleet-wide (`reconciler suspend`) until `reconciler resume`."""

    outcome = OUTCOME_SUSPENDED


class Blocked(Refused):
    """A revision failed the same way `blocked_after` times; it waits for its file to change."""

    outcome = OUTCOME_BLOCKED


class RetryDeferred(ReconcilerError):
    """A daemon tick found the revision it would run failed recently: the fleet's retry of it is
    not due yet (the failure record's `retry_after`, on the database's clock). Not a failure."""

    exit_code = EXIT_REVISION_FAILED
    outcome = OUTCOME_DEFERRED

    def __init__(self, message: str, revision: str = "", signature: str = "") -> None:
        super().__init__(message)
        self.revision = revision
        self.signature = signature
