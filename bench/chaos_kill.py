"""kill -9 at random moments: does every revision run exactly once, and is every half state seen?

For PostgreSQL (one revision with an autocommit block) and MariaDB (DDL commits as it goes), each
trial takes a fresh database at s0, starts `reconciler apply` for three pending revisions, and
SIGKILLs the applier (the apply process, or now and then its worker) after a random delay. Then
it looks at the database (witnesses no rollback can undo: rows written in an autocommit block or
committed by later DDL, tables made by DDL), compares that with what `reconciler status` says,
and acts as an operator following the product's messages (`resolve --applied` after finishing by
hand, `--rolled-back` after undoing) until `apply` exits 0. It counts:

- double runs: a witness row written twice, or the UPDATE applied twice (max(v) above 2000);
- unnoticed half states: something of a revision is in the database, the version table does
  not list it, and status does not call it dirty;
- false dirty states: status calls a revision dirty (“may be half-applied”) that the version
  table lists, i.e. one that completed.

Also shown: dirty revisions of which nothing was found (the kill landed between the worker's
report and the commit of the statement it announced: it may or may not have run, so `dirty` is
the only safe answer; the operator finds nothing and resolves `--rolled-back`), and revisions
committed before their step was recorded (settled `applied` by the next run, never dirty).

Run: `python -m bench.chaos_kill [--trials 30] [--seed 12]`; prints a table. `--unsafe` runs it
with RECONCILER_UNSAFE_DISABLE=dirty (the negative control: the double runs the bench exists to
catch are then seen); `--dialects postgresql` runs one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bench.common import ROOT, row
from tests import dbs
from tests.builders import Project, db_heads, flask_project, journal_rows, table_names
from tests.cli import cli_command, cli_env

SETUP = """\
op.create_table("t", sa.Column("v", sa.Integer, nullable=False))
op.create_table("w", sa.Column("rev", sa.String(32), nullable=False))
op.execute("INSERT INTO t (v) VALUES (1000)")"""

PG = {
    "p1": 'op.create_table("a", sa.Column("id", sa.Integer, primary_key=True))\n'
    'op.execute("SELECT pg_sleep(0.15)")',
    "p2": 'op.execute("UPDATE t SET v = v + 1000")\n'
    'op.execute("SELECT pg_sleep(0.15)")\n'
    "with op.get_context().autocommit_block():\n"
    "    op.execute(\"INSERT INTO w (rev) VALUES ('p2')\")\n"
    '    op.execute("SELECT pg_sleep(0.15)")\n'
    'op.create_table("c", sa.Column("id", sa.Integer, primary_key=True))\n'
    'op.execute("SELECT pg_sleep(0.15)")',
    "p3": 'op.create_table("d", sa.Column("id", sa.Integer, primary_key=True))\n'
    'op.execute("SELECT pg_sleep(0.15)")',
}
MARIADB = {
    "m1": 'op.create_table("a", sa.Column("id", sa.Integer, primary_key=True))\n'
    "op.execute(\"INSERT INTO w (rev) VALUES ('m1')\")\n"
    'op.execute("SELECT SLEEP(0.15)")\n'
    'op.create_table("a2", sa.Column("id", sa.Integer, primary_key=True))\n'
    'op.execute("SELECT SLEEP(0.15)")',
    "m2": 'op.execute("SELECT SLEEP(0.15)")\n'
    'op.create_table("b", sa.Column("id", sa.Integer, primary_key=True), sa.Column("k", sa.Integer))\n'
    "op.execute(\"INSERT INTO w (rev) VALUES ('m2')\")\n"
    'op.create_index("ix_b_k", "b", ["k"])\n'
    'op.execute("SELECT SLEEP(0.15)")',
    "m3": 'op.create_table("d", sa.Column("id", sa.Integer, primary_key=True))\n'
    'op.execute("SELECT SLEEP(0.15)")',
}
# what each revision leaves that no rollback undoes: (tables it creates, witness row, extra check)
EFFECTS = {
    "p1": (("a",), None),
    "p2": (("c",), "p2"),
    "p3": (("d",), None),
    "m1": (("a", "a2"), "m1"),
    "m2": (("b",), "m2"),
    "m3": (("d",), None),
}
FINISH = {  # the rest of a revision, by hand (MariaDB's index comes with its table here)
    "c": "CREATE TABLE c (id INTEGER PRIMARY KEY)",
    "a": "CREATE TABLE a (id INTEGER PRIMARY KEY)",
    "a2": "CREATE TABLE a2 (id INTEGER PRIMARY KEY)",
    "d": "CREATE TABLE d (id INTEGER PRIMARY KEY)",
    "b": "CREATE TABLE b (id INTEGER PRIMARY KEY, k INTEGER)",
}


ENV: dict[str, str] = {}  # RECONCILER_UNSAFE_DISABLE=dirty with --unsafe


@dataclass
class Counts:
    trials: int = 0
    double_runs: int = 0
    unnoticed_half: int = 0
    false_dirty: int = 0
    dirty_nothing: int = 0
    unrecorded: int = 0
    dirty_seen: int = 0
    settled_applied: int = 0
    resolves: int = 0
    notes: list[str] = field(default_factory=list)


def cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(["--config", str(project.config), *args], "json"),
        cwd=project.root,
        env=cli_env(ENV),
        capture_output=True,
        text=True,
        timeout=120,
    )


def sql(url: str, statement: str) -> object:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(statement))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def witness(url: str, rev: str) -> int:
    return int(sql(url, f"SELECT count(*) FROM w WHERE rev = '{rev}'") or 0)  # type: ignore[arg-type]


def present(url: str, rev: str) -> tuple[int, int]:
    """(effects of `rev` in the database, effects it has)."""
    names, witnessed = EFFECTS[rev]
    have = table_names(url)
    found = sum(1 for n in names if n in have) + (1 if witnessed and witness(url, witnessed) else 0)
    return found, len(names) + (1 if witnessed else 0)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("a condition was not met in time")
        time.sleep(0.02)


def start_apply(project: Project) -> tuple[subprocess.Popen[bytes], float]:
    """`apply` in the background, once its worker runs: (process, when the worker was seen)."""
    proc = subprocess.Popen(
        cli_command(["--config", str(project.config), "apply"], "json"),
        cwd=project.root,
        env=cli_env(ENV),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: bool(children(proc.pid)) or proc.poll() is not None)
    return proc, time.monotonic()


def kill_at_random(project: Project, delay: float, rng: random.Random) -> str:
    """Start `apply`, SIGKILL it (or its worker) `delay` after its worker started; wait until
    both are gone."""
    proc, _ = start_apply(project)
    time.sleep(delay)  # the random moment itself (measured, not waited on)
    workers = children(proc.pid)
    if proc.poll() is not None:
        return "too late"
    victim = "worker" if workers and rng.random() < 0.3 else "apply"
    os.kill(workers[0] if victim == "worker" else proc.pid, signal.SIGKILL)
    if victim == "worker":
        proc.wait(120)  # the control plane sees its worker die and exits
    else:
        proc.wait(30)
    for pid in workers:
        wait_for(lambda p=pid: gone(p))
    return f"{victim}@{proc.returncode}"


def applied_set(url: str, order: list[str]) -> set[str]:
    heads = db_heads(url)
    if not heads or heads == {"s0"}:
        return set()
    return set(order[: order.index(next(iter(heads))) + 1])


def operate(project: Project, url: str, order: list[str], counts: Counts) -> None:
    """Follow the product's messages until `apply` exits 0."""
    for _ in range(6):
        result = cli(project, "apply")
        if result.returncode == 0:
            return
        if result.returncode != 6:
            counts.notes.append(f"apply exited {result.returncode}: {result.stderr[-300:]}")
            return
        data = json.loads(cli(project, "status", "--json").stdout)
        for rev in data.get("dirty") or []:
            found, total = present(url, rev)
            message = data.get("message", "")
            if f"lists {rev}" in message or found == total:
                flag = "--applied"
            elif found == 0:
                flag = "--rolled-back"  # nothing to undo
            else:
                names, witnessed = EFFECTS[rev]
                have = table_names(url)
                for name in names:
                    if name not in have:
                        sql(url, FINISH[name])
                if rev == "m2":
                    sql(url, "CREATE INDEX ix_b_k ON b (k)")
                if witnessed and not witness(url, witnessed):
                    sql(url, f"INSERT INTO w (rev) VALUES ('{witnessed}')")
                flag = "--applied"
            counts.resolves += 1
            done = cli(project, "resolve", rev, flag)
            if done.returncode != 0:
                counts.notes.append(f"resolve {rev} {flag}: {done.stderr[-300:]}")
    counts.notes.append("apply never reached exit 0")


def judge(project: Project, url: str, order: list[str], counts: Counts) -> None:
    """After the kill, before anything else: what is true versus what status says."""
    data = json.loads(cli(project, "status", "--json").stdout)
    dirty = set(data.get("dirty") or [])
    counts.dirty_seen += len(dirty)
    applied = applied_set(url, order)
    for rev in order:
        found, _ = present(url, rev)
        half = found > 0 and rev not in applied
        if half and rev not in dirty:
            counts.unnoticed_half += 1
            counts.notes.append(f"unnoticed half state of {rev}: {data.get('state')}")
        if rev in dirty and rev in applied:
            counts.false_dirty += 1
            counts.notes.append(f"false dirty {rev}: the version table lists it")
        elif rev in dirty and found == 0:
            counts.dirty_nothing += 1
        if rev in applied and "started" in outcomes(url, rev):
            counts.unrecorded += 1


def outcomes(url: str, rev: str) -> list[object]:
    return [r["outcome"] for r in journal_rows(url) if r["revision"] == rev]


def check_once(url: str, dialect: str, counts: Counts) -> None:
    wits = ["p2"] if dialect == "postgresql" else ["m1", "m2"]
    doubled = any(witness(url, w) > 1 for w in wits)
    if dialect == "postgresql" and int(sql(url, "SELECT max(v) FROM t") or 0) > 2000:  # type: ignore[arg-type]
        doubled = True
    counts.double_runs += doubled


def trial(
    base: Project, dialect: str, revisions: dict[str, str], delay: float, rng: random.Random, counts: Counts
) -> None:
    database = dbs.pg_database() if dialect == "postgresql" else dbs.mysql_database()
    with database as url:
        project = dataclasses.replace(base, url=url)
        project.write_config()
        for path in project.versions.glob("[pm][0-9]_*.py"):
            path.unlink()
        if cli(project, "apply").returncode != 0:
            raise SystemExit("the setup revision failed")
        down = "s0"
        for rev, body in revisions.items():
            project.revision(rev, down, upgrade=body, message=rev)
            down = rev
        order = list(revisions)
        kill_at_random(project, delay, rng)
        judge(project, url, order, counts)
        operate(project, url, order, counts)
        check_once(url, dialect, counts)
        if applied_set(url, order) != set(order):
            counts.notes.append(f"not at the heads: {db_heads(url)}")
        counts.trials += 1


def calibrate(base: Project, dialect: str, revisions: dict[str, str]) -> float:
    """Seconds an uninterrupted apply of the three revisions takes (the kill window)."""
    database = dbs.pg_database() if dialect == "postgresql" else dbs.mysql_database()
    with database as url:
        project = dataclasses.replace(base, url=url)
        project.write_config()
        cli(project, "apply")
        down = "s0"
        for rev, body in revisions.items():
            project.revision(rev, down, upgrade=body, message=rev)
            down = rev
        proc, seen = start_apply(project)
        proc.wait(120)
        return time.monotonic() - seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--folder", default="/tmp/chaos_kill")
    parser.add_argument("--unsafe", action="store_true", help="RECONCILER_UNSAFE_DISABLE=dirty")
    parser.add_argument("--dialects", default="postgresql,mariadb")
    args = parser.parse_args()
    if args.unsafe:
        ENV["RECONCILER_UNSAFE_DISABLE"] = "dirty"
    rng = random.Random(args.seed)
    widths = (11, 6, 7, 10, 7, 7, 9, 11, 9, 7)
    lines = [
        row(
            (
                "dialect",
                "kills",
                "double",
                "unnoticed",
                "false",
                "dirty",
                "dirty,",
                "committed,",
                "resolves",
                "window",
            ),
            widths,
        ),
        row(("", "", "runs", "half", "dirty", "(half)", "nothing", "unrecorded", "", "s"), widths),
    ]
    for dialect, revisions in (("postgresql", PG), ("mariadb", MARIADB)):
        if dialect not in args.dialects.split(","):
            continue
        folder = Path(args.folder) / dialect
        if folder.exists():
            subprocess.run(["rm", "-rf", str(folder)], check=True)
        base = flask_project(folder, "sqlite://")
        base.revision("s0", None, upgrade=SETUP, message="setup")
        window = calibrate(base, dialect, revisions)
        counts = Counts()
        started = time.monotonic()
        for _ in range(args.trials):
            trial(base, dialect, revisions, rng.uniform(0.0, window), rng, counts)
        half = counts.dirty_seen - counts.false_dirty - counts.dirty_nothing
        cells = (
            dialect,
            counts.trials,
            counts.double_runs,
            counts.unnoticed_half,
            counts.false_dirty,
            half,
            counts.dirty_nothing,
            counts.unrecorded,
            counts.resolves,
            f"{window:.2f}",
        )
        lines.append(row(cells, widths))
        lines += [f"  note: {note}" for note in counts.notes]
        print(f"{dialect}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
