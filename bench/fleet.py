"""Tenant fleets (issue 15): status, one new revision and the no-op tick over many tenants, side by
side with the peer, Flask-Migrate with `-x tenant=NAME` added to its env.py, run once per tenant.

    python -m bench.fleet [--tenants 1000 | --tenants postgresql=1000,mysql=50,sqlite=100]
                          [--dialects postgresql,mysql,sqlite] [--replicas 4] [--concurrency 8]
                          [--peer-sample 30]
                          [--only status,apply,noop,daemon] [--history 3] [--waves 1,10%,100%]

Fleets (default sizes): 1,000 schemas in one PostgreSQL database, 50 MariaDB databases, 100 SQLite
files, built in bulk at the project's head (--history revisions); the project is the generated
Flask-SQLAlchemy one with Flask-Migrate's unchanged env.py and a `[fleet]` section. Cases:

1. status: the fleet read inside the daemon (`read_fleet`, median of 5 after one warm-up) and the
   whole `reconciler status --json` process (median of 3), against a loop of
   `flask db -x tenant=NAME current`. Goals: fleet read ≤ 200 ms, the CLI ≤ 1 s.
2. apply: one new revision (a table, and a line appended to a witness file) to every tenant by
   --replicas `reconciler apply` processes started at once, against a loop of
   `flask db -x tenant=NAME upgrade`. Goals: ≥ 10x faster than the peer; every tenant at head
   (read with our own SQL); every tenant witnessed exactly once; 0 lock errors (a replica exiting 3,
   or a stderr line naming a lock timeout).
3. noop: one tick of the daemon (`reconcile_fleet`, median of 3 after one warm-up) with every tenant
   in sync, against the peer's upgrade loop at head. Goal: ≤ 1 s. Also shown: one whole
   `reconciler apply` process at head, and the fleet's counts from `status --json` at the end.
4. daemon: one `reconciler run --mode prod` applies one more revision to every tenant
   (`bench.fleetdaemon`). Goals: the daemon's peak RSS ≤ 100 MiB; on PostgreSQL at most
   `[fleet] concurrency` + 2 server sessions of ours at once.

The peer takes about a second per tenant, so it runs on --peer-sample tenants of its own (a copy of
the project, `peer_*` tenants) and its total is extrapolated linearly to the fleet size; the table
says so. Our side needs `reconciler.control.fleet`; without it, the peer side still runs and our
cells say why they are empty.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import flask_db, median, reconciler, row, timed
from bench.fleetdaemon import run_daemon
from bench.fleetproject import NEW_REVISION, Fleet, add_revision, fleet, versions, witnessed
from reconciler import logs

SIZES = {"postgresql": 1000, "mysql": 50, "sqlite": 100}
LABELS = {"postgresql": "postgresql", "mysql": "mariadb", "sqlite": "sqlite"}
LOCK_MARKERS = ("lock_timeout", "lock error", "locktimeout")
EXIT_LOCK = 3
API = ("open_fleet", "read_fleet", "reconcile_fleet", "release_fleet")


class OursUnavailable(Exception):
    """Our side could not be measured; the message says why (the peer side still runs)."""


@dataclass
class Case:
    case: str
    ours: float | str | None
    peer: float | None
    goal: str
    met: bool | None


@dataclass
class Report:
    dialect: str
    size: int
    sample: int
    cases: list[Case] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {LABELS[self.dialect]}: {text}", flush=True)


# --- the peer: one Flask-Migrate process per tenant


def peer_loop(found: Fleet, command: str) -> float:
    """Seconds for `flask db -x tenant=NAME <command>` over the peer's tenants, one after another."""
    total = 0.0
    for name in found.peer_tenants:
        total += timed(
            flask_db(found.peer, "-x", f"tenant={name}", command), found.peer.root, found.peer_env()
        )
    return total


def extrapolated(seconds: float, found: Fleet) -> float:
    return seconds / len(found.peer_tenants) * len(found.tenants)


# --- our side: in the daemon's process, and as whole processes


def _fleet_api() -> Any:
    try:
        # the feature being measured: absent until issue 15 lands, and the peer side runs anyway
        api = importlib.import_module("reconciler.control.fleet")
    except ImportError as exc:
        raise OursUnavailable(f"reconciler.control.fleet cannot be imported ({exc})") from None
    missing = [name for name in API if not hasattr(api, name)]
    if missing:
        raise OursUnavailable(f"reconciler.control.fleet lacks {', '.join(missing)}")
    return api


@contextmanager
def opened(found: Fleet) -> Iterator[tuple[Any, Any]]:
    """`open_fleet` on our project's settings, in its root (a files glob is relative to it)."""
    api = _fleet_api()
    # only the in-process side needs the settings loader
    from reconciler.config.load import load_settings

    previous = Path.cwd()
    os.chdir(found.ours.root)
    try:
        try:
            settings = load_settings(str(found.ours.config), environ=found.env, cwd=found.ours.root)
            handle = api.open_fleet(settings)
        except Exception as exc:
            raise OursUnavailable(f"open_fleet failed: {type(exc).__name__}: {exc}") from None
        try:
            yield api, handle
        finally:
            api.release_fleet(handle)
    finally:
        os.chdir(previous)


def timed_calls(name: str, call: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """The first call's seconds, the median of `repeat` more, and the last result."""
    times: list[float] = []
    result: Any = None
    for _ in range(repeat + 1):
        started = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            raise OursUnavailable(f"{name} failed: {type(exc).__name__}: {exc}") from None
        times.append(time.perf_counter() - started)
    return times[0], median(times[1:]), result


def _field(result: Any, key: str) -> Any:
    if isinstance(result, Mapping):
        return result.get(key)
    return getattr(result, key, None)


def _last_line(text: str) -> str:
    """The `Error: ...` line a command printed, else its last line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["(no output)"])[-1][-600:]


def cli_status(found: Fleet, repeat: int = 3) -> tuple[float, dict[str, Any]]:
    """Median seconds of the whole `reconciler status --json` process, and its `fleet` object."""
    times: list[float] = []
    doc: dict[str, Any] = {}
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(
            reconciler(found.ours, "status", "--json"),
            cwd=found.ours.root,
            env=found.env,
            capture_output=True,
            text=True,
        )
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise OursUnavailable(
                f"`reconciler status --json` exited {done.returncode}: {_last_line(done.stderr)}"
            )
        try:
            doc = json.loads(done.stdout)
        except ValueError:
            raise OursUnavailable(
                f"`reconciler status --json` printed no JSON: {_last_line(done.stdout)}"
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("fleet"), dict):
            keys = ", ".join(sorted(doc)) if isinstance(doc, dict) else type(doc).__name__
            raise OursUnavailable(f'`reconciler status --json` has no "fleet" object (keys: {keys})')
    return median(times), doc["fleet"]


@dataclass
class Replicas:
    seconds: float
    codes: list[int]
    lock_errors: int
    lock_lines: list[str]
    last_errors: list[str]


def replicas(found: Fleet, count: int, timeout: float = 3600) -> Replicas:
    """`count` `reconciler apply` processes started at once; seconds until the last one exited."""
    folder = found.ours.root / "replica-logs"
    folder.mkdir(exist_ok=True)
    paths = [folder / f"replica{n}.stderr" for n in range(count)]
    command = reconciler(found.ours, "apply")
    started = time.perf_counter()
    procs = []
    for path in paths:
        with open(path, "w") as err:
            procs.append(
                subprocess.Popen(
                    command, cwd=found.ours.root, env=found.env, stdout=subprocess.DEVNULL, stderr=err
                )
            )
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started))))
        except subprocess.TimeoutExpired:
            proc.kill()  # one of the replicas this function started
            codes.append(proc.wait())
    seconds = time.perf_counter() - started
    lock_lines, last_errors = [], []
    for path, code in zip(paths, codes):
        text = path.read_text(errors="replace")
        lock_lines += [line for line in text.splitlines() if any(m in line.lower() for m in LOCK_MARKERS)]
        if code != 0:
            last_errors.append(f"exit {code}: {_last_line(text)}")
    lock_errors = len(lock_lines) + sum(1 for code in codes if code == EXIT_LOCK)
    return Replicas(seconds, codes, lock_errors, lock_lines, last_errors)


# --- the three cases


def ours_or_note(report: Report, what: str, measure: Callable[[], Any]) -> Any:
    try:
        return measure()
    except OursUnavailable as exc:
        report.note(f"ours, {what}: not measured: {exc}")
        return None


def status_case(found: Fleet, report: Report) -> None:
    peer = extrapolated(peer_loop(found, "current"), found)

    def read() -> tuple[float, float, Any]:
        with opened(found) as (api, handle):
            return timed_calls("read_fleet", lambda: api.read_fleet(handle), 5)

    read_result = ours_or_note(report, "fleet read", read)
    if read_result is not None:
        first, _typical, result = read_result
        counted = _field(result, "tenants")
        counted = len(counted) if isinstance(counted, (tuple, list)) else counted
        report.note(f"fleet read: first {first * 1000:.1f} ms, tenants={counted}")
        if counted != len(found.tenants):
            report.note(f"read_fleet counted {counted} tenants, the fleet has {len(found.tenants)}")
    cli = ours_or_note(report, "status --json", lambda: cli_status(found))
    if cli is not None:
        shown = cli[1].get("tenants")
        report.note(f"status --json: fleet.tenants={shown} counts={cli[1].get('counts')}")
        if shown != len(found.tenants):
            report.note(f"status --json counted {shown} tenants, the fleet has {len(found.tenants)}")
    typical_read = read_result[1] if read_result is not None else None
    cli_seconds = cli[0] if cli is not None else None
    report.cases.append(
        Case("status: fleet read", typical_read, peer, "≤ 0.2 s", _at_most(typical_read, 0.2))
    )
    report.cases.append(Case("status: CLI --json", cli_seconds, peer, "≤ 1 s", _at_most(cli_seconds, 1.0)))


def apply_case(found: Fleet, report: Report, count: int) -> None:
    new = add_revision(found)
    peer = extrapolated(peer_loop(found, "upgrade"), found)
    peer_behind = [t for t, v in versions(found, found.peer_tenants).items() if v != {new}]
    peer_seen = witnessed(found.peer_witness, found.dialect)
    if peer_behind or sorted(peer_seen.values()) != [1] * len(found.peer_tenants):
        report.note(f"the peer left {len(peer_behind)} tenants behind; witness counts {peer_seen}")
    sessions = _server_sessions(found)
    done = replicas(found, count)
    if sessions is not None:
        opened_now = (_server_sessions(found) or 0) - sessions
        each = opened_now / len(found.tenants)
        report.note(f"server sessions opened by the replicas: {opened_now} ({each:.1f} a tenant)")
    exits = ", ".join(str(code) for code in done.codes)
    report.note(f"{count} replicas exited {exits} in {done.seconds:.2f} s")
    for line in done.last_errors[:count]:
        report.note(f"replica {line}")
    for line in done.lock_lines[:3]:
        report.note(f"lock error line: {line[:300]}")
    heads = versions(found, found.tenants)
    at_head = sum(1 for v in heads.values() if v == {new})
    seen = witnessed(found.witness, found.dialect)
    expected = set(found.tenants)
    once = sum(1 for t in expected if seen.get(t) == 1)
    twice = sorted(t for t in expected if seen.get(t, 0) > 1)
    stray = sorted(t for t in seen if t not in expected)
    if twice or stray:
        report.note(f"witness: applied more than once {twice[:5]} ({len(twice)}), not tenants {stray[:5]}")
    size = len(found.tenants)
    ok = all(code == 0 for code in done.codes) and at_head == size
    ours = done.seconds if ok else f"{done.seconds:.3f} (failed)"
    ratio_met = ok and peer / done.seconds >= 10
    report.cases.append(Case(f"apply: 1 rev, {count} replicas", ours, peer, "≥ 10x peer", ratio_met))
    report.cases.append(
        Case("apply: at head (own SQL)", f"{at_head}/{size}", None, f"{size}/{size}", at_head == size)
    )
    exact = once == size and not twice and not stray
    report.cases.append(Case("apply: witnessed once", f"{once}/{size}", None, f"{size}/{size}", exact))
    ran = any(code in (0, EXIT_LOCK) for code in done.codes)  # else no replica got as far as a lock
    lock_ok = done.lock_errors == 0 if ran else None
    report.cases.append(Case("apply: lock errors", str(done.lock_errors), None, "0", lock_ok))


def _server_sessions(found: Fleet) -> int | None:
    """PostgreSQL's count of sessions opened on the fleet's database so far (its statistics)."""
    if found.dialect != "postgresql":
        return None
    import sqlalchemy as sa  # deferred: only the PostgreSQL fleet reads it

    engine = sa.create_engine(found.url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            return int(
                conn.exec_driver_sql(
                    "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
                ).scalar_one()
            )
    finally:
        engine.dispose()


def noop_case(found: Fleet, report: Report) -> None:
    peer = extrapolated(peer_loop(found, "upgrade"), found)
    before = found.witness.read_text() if found.witness.exists() else ""

    def tick() -> tuple[float, float, Any]:
        with opened(found) as (api, handle):
            return timed_calls("reconcile_fleet", lambda: api.reconcile_fleet(handle), 3)

    result = ours_or_note(report, "no-op tick", tick)
    typical = None
    if result is not None:
        typical = result[1]
        report.note(f"no-op tick: first {result[0] * 1000:.1f} ms")
    process = ours_or_note(report, "apply process at head", lambda: apply_process(found))
    cli = ours_or_note(report, "status --json after", lambda: cli_status(found, repeat=1))
    if cli is not None:
        report.note(f"status --json at the end: counts={cli[1].get('counts')} failed={cli[1].get('failed')}")
    if (found.witness.read_text() if found.witness.exists() else "") != before:
        report.note("the no-op runs ran the new revision again (the witness grew)")
        typical = f"{typical:.3f} (applied)" if isinstance(typical, float) else "applied"
    report.cases.append(Case("noop: tick, all in sync", typical, peer, "≤ 1 s", _at_most(typical, 1.0)))
    report.cases.append(Case("noop: apply process", process, peer, "(info)", None))


def daemon_case(found: Fleet, report: Report, concurrency: int, parent: str) -> None:
    """One prod daemon applies a revision to the whole fleet: its peak RSS and server sessions."""
    seen = run_daemon(found, parent)
    size = len(found.tenants)
    report.note(
        f"daemon: every tenant at the new head after {seen.seconds:.1f} s ({seen.at_head}/{size}); "
        f"peak RSS {seen.peak_rss_mib:.1f} MiB (with its workers {seen.peak_tree_mib:.1f} MiB PSS, "
        f"{seen.peak_processes} processes at most); "
        f"exit {seen.exit_code} on SIGTERM"
    )
    if seen.exit_code != 0 or seen.at_head != size:
        report.note(f"daemon stderr: {seen.stderr_tail}")
    report.cases.append(
        Case("daemon: at head", f"{seen.at_head}/{size}", None, f"{size}/{size}", seen.at_head == size)
    )
    rss = f"{seen.peak_rss_mib:.1f} MiB"
    report.cases.append(Case("daemon: peak RSS", rss, None, "≤ 100 MiB", seen.peak_rss_mib <= 100))
    if seen.peak_sessions is not None:
        bound = concurrency + 2
        shown = str(seen.peak_sessions)
        report.cases.append(
            Case("daemon: server sessions", shown, None, f"≤ {bound}", seen.peak_sessions <= bound)
        )


def apply_process(found: Fleet) -> float:
    """Seconds of one whole `reconciler apply` process with every tenant in sync."""
    started = time.perf_counter()
    done = subprocess.run(
        reconciler(found.ours, "apply"), cwd=found.ours.root, env=found.env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise OursUnavailable(f"`reconciler apply` exited {done.returncode}: {_last_line(done.stderr)}")
    return elapsed


def _at_most(value: float | str | None, goal: float) -> bool | None:
    return None if not isinstance(value, float) else value <= goal


# --- the run


def measure(dialect: str, size: int, args: argparse.Namespace, folder: Path) -> Report:
    sample = args.peer_sample
    report = Report(dialect, size, sample)
    started = time.perf_counter()
    with fleet(dialect, folder, size, sample, args.history, args.waves, args.concurrency) as found:
        report.note(
            f"{size} tenants and {sample} peer tenants built in {time.perf_counter() - started:.1f} s"
        )
        if "status" in args.only:
            status_case(found, report)
        if "apply" in args.only:
            apply_case(found, report, args.replicas)
        if "noop" in args.only:
            noop_case(found, report)
        if "daemon" in args.only:
            parent = NEW_REVISION if "apply" in args.only else found.head
            daemon_case(found, report, args.concurrency, parent)
    return report


def _seconds(value: float | str | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else value


def print_table(reports: list[Report]) -> None:
    widths = (11, 27, 18, 10, 9, 11, 5)
    print()
    print(row(("dialect", "case", "ours (s)", "peer (s)", "peer/ours", "goal", "met?"), widths))
    for report in reports:
        for case in report.cases:
            ratio = ""
            if isinstance(case.ours, float) and case.peer is not None and case.ours > 0:
                ratio = f"{case.peer / case.ours:.1f}x"
            met = {True: "yes", False: "NO", None: "n/a"}[case.met]
            peer = "" if case.peer is None else f"{case.peer:.2f}*"
            cells = (LABELS[report.dialect], case.case, _seconds(case.ours), peer, ratio, case.goal, met)
            print(row(cells, widths))
    for report in reports:
        print(
            f"* {LABELS[report.dialect]}: peer extrapolated from {report.sample} tenants to {report.size} "
            f"(a loop of one `flask db -x tenant=NAME ...` process per tenant)"
        )


def sizes(text: str | None, dialects: list[str]) -> dict[str, int]:
    if text is None:
        return {d: SIZES[d] for d in dialects}
    if "=" not in text:
        return dict.fromkeys(dialects, int(text))
    given = {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(","))}
    return {d: given.get(d, SIZES[d]) for d in dialects}


def main() -> None:
    logs.setup(level="error")  # the in-process fleet's lines would drown the figures
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", help="tenants per dialect: N for all, or postgresql=1000,mysql=50,...")
    parser.add_argument("--dialects", default="postgresql,mysql,sqlite")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="[fleet] concurrency of each replica")
    parser.add_argument("--peer-sample", type=int, default=30, help="tenants the peer loop runs on")
    parser.add_argument("--only", default="status,apply,noop,daemon", help="cases, comma-separated")
    parser.add_argument("--history", type=int, default=3, help="revisions the tenants are at before")
    parser.add_argument("--waves", help="[fleet] waves, e.g. 1,10%%,100%% (default: the tool's default)")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    unknown = args.only - {"status", "apply", "noop", "daemon"}
    if unknown:
        parser.error(f"--only {','.join(sorted(unknown))}: the cases are status, apply, noop, daemon")
    dialects = args.dialects.split(",")
    bad = [d for d in dialects if d not in SIZES]
    if bad:
        parser.error(f"--dialects {','.join(bad)}: choose from postgresql, mysql, sqlite")
    if args.peer_sample < 1 or args.history < 1 or args.replicas < 1:
        parser.error("--peer-sample, --history and --replicas are at least 1")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for dialect, size in sizes(args.tenants, dialects).items():
            print(f"{LABELS[dialect]}: {size} tenants", flush=True)
            reports.append(measure(dialect, size, args, Path(tmp) / dialect))
    print_table(reports)


if __name__ == "__main__":
    main()
