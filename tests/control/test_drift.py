"""Drift: the live schema against the models — ignore rules, the alert rule, `reconciler drift`,
and the daemon (`reconciler run`) on real databases, one compare per interval for the fleet."""

from __future__ import annotations

import json
import re
import subprocess
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reconciler.config.load import load_settings
from reconciler.control.workers import Worker, WorkerJob
from reconciler.core.alert_rules import Observation
from reconciler.core.alerting import AlertPolicy
from reconciler.core.drift import DriftReport, ignored, parse_rule, without_ignored
from reconciler.errors import ConfigError
from reconciler.settings import AlertingSettings
from tests import dbs
from tests.builders import Project
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import Running
from tests.runtime.test_daemon import daemon as running
from tests.system.test_cli_admin import user_project
from tests.webhooks import Recorder

HAND_COLUMN = "remove_column user.legacy"
HAND_TABLE = "remove_table audit_log"
JOURNAL = ("reconciler_journal", "reconciler_journal_flags")


def diff(kind: str, name: str) -> dict[str, str]:
    return {"kind": kind, "key": f"{kind} {name}", "text": f"{kind} {name}"}


def cli(project: Project, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    from tests.cli import run_cli

    return run_cli(["--config", str(project.config), *args], cwd=project.root, env=env)


def execute(url: str, *statements: str) -> None:
    """DDL by hand, as a person with psql or mysql would; `{user}` is the quoted user table."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    user = engine.dialect.identifier_preparer.quote("user")
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement.format(user=user))
    finally:
        engine.dispose()


def drift_project(
    root: Path, url: str, interval: float = 0.5, ignore: tuple[str, ...] = (), sinks: tuple[str, ...] = ()
) -> Project:
    """A Flask-Migrate project whose one revision creates exactly what its models declare."""
    return drift_config(user_project(root, url), interval, ignore, sinks)


def drift_config(
    project: Project, interval: float = 0.5, ignore: tuple[str, ...] = (), sinks: tuple[str, ...] = ()
) -> Project:
    alerts = "".join(f'\n[[alerts]]\nkind = "webhook"\nurl = "{u}"\n' for u in sinks)
    project.write_config(
        extra="[daemon]\ninterval = 0.2\njitter = 0\ndebounce = 0.1\nbackoff_max = 2\n"
        f"[drift]\ninterval = {interval}\nignore = {json.dumps(list(ignore))}\n"
        f"[alerting]\nrepeat_interval = 0\n{alerts}",
        models="myapp.models:db",
    )
    return project


# --------------------------------------------------------------------------- ignore rules


def test_ignore_rules_match_the_kind_and_the_object_name() -> None:
    table, column = diff("remove_table", "audit_log"), diff("remove_column", "user.legacy_flag")
    index = diff("add_index", "user.ix_user_email")
    assert ignored(table, [parse_rule("table:audit_*")])
    assert not ignored(table, [parse_rule("column:audit_*")])  # the kind counts
    assert ignored(column, [parse_rule("column:USER.legacy_*")])  # case-insensitive
    assert not ignored(column, [parse_rule("column:user.other")])
    assert ignored(index, [parse_rule("index:*")]) and not ignored(table, [parse_rule("index:*")])
    assert ignored(table, [parse_rule("remove_table:audit_log")])  # autogenerate's own kind
    assert not ignored(diff("add_table", "audit_log"), [parse_rule("remove_table:audit_log")])
    assert ignored(column, [parse_rule("*:user.*")])
    assert without_ignored([table, column, index], ["table:audit_*", "index:*"]) == [column]


@pytest.mark.parametrize("pattern", ["audit_*", "tables:audit_*", "table:", ":x"])
def test_a_bad_ignore_rule_names_itself_and_the_format(pattern: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(pattern))) as caught:
        parse_rule(pattern)
    assert "table:audit_*" in str(caught.value) or "kinds are" in str(caught.value)


def test_a_bad_ignore_rule_in_the_config_file_is_exit_2_without_traceback(tmp_path: Path) -> None:
    project = user_project(tmp_path / "p", f"sqlite:///{tmp_path / 'app.db'}")
    project.write_config(extra='[drift]\nignore = ["tabel:audit_*"]\n')
    result = cli(project, "status")
    assert result.returncode == 2
    assert "'tabel:audit_*'" in result.stderr and "reconciler.toml:" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_report_survives_the_flag_and_ignore_rules_apply_when_it_is_read() -> None:
    report = DriftReport(
        1_700_000_000.0,
        ("u1",),
        (diff("remove_table", "audit_log"), diff("remove_column", "user.legacy")),
        2,
        "host:1",
    )
    again = DriftReport.loads(report.dumps())
    assert again is not None and again.keys == report.keys and again.count == 2
    kept = again.filtered(["table:audit_*"])
    assert kept.keys == ("remove_column user.legacy",) and kept.count == 1 and kept.drifted
    assert not again.filtered(["*:*"]).drifted
    assert DriftReport.loads("not json") is None


# --------------------------------------------------------------------------- the alert rule

T0 = 1_700_000_000.0
CALM = Observation("noop", "in_sync", "in_sync", ())


def drifted(*keys: str) -> Observation:
    return Observation("noop", "drift", "in_sync", ("drift",), drift=keys, drift_texts=keys)


def test_drift_alerts_once_per_set_of_differences_then_recovers() -> None:
    policy = AlertPolicy("app", AlertingSettings(repeat_interval=0))
    first = policy.observe(drifted(HAND_COLUMN), T0)
    assert [a.event for a, _k in first] == ["drift"]
    assert first[0][0].details["drift"] == [HAND_COLUMN] and HAND_COLUMN in first[0][0].message
    assert all(policy.observe(drifted(HAND_COLUMN), T0 + i) == [] for i in range(1, 50))
    changed = policy.observe(drifted(HAND_COLUMN, HAND_TABLE), T0 + 60)  # a new set: said again
    assert [a.event for a, _k in changed] == ["drift"] and changed[0][1] != first[0][1]
    blind = replace(CALM, outcome="unreachable", sync_state="unknown", state="unknown")
    assert [a.event for a, _k in policy.observe(blind, T0 + 90)] == []  # cannot tell: no recovery
    back = policy.observe(CALM, T0 + 120)
    assert [a.event for a, _k in back] == ["recovered"] and back[0][0].details["recovered_from"] == "drift"
    assert back[0][1] and back[0][1].startswith("recovered:drift:")


def test_two_replicas_claim_the_same_drift_key() -> None:
    one, two = AlertPolicy("app", AlertingSettings()), AlertPolicy("app", AlertingSettings())
    assert one.observe(drifted(HAND_COLUMN), T0)[0][1] == two.observe(drifted(HAND_COLUMN), T0 + 7)[0][1]


# --------------------------------------------------------------------------- `reconciler drift`


def drift_json(project: Project, code: int) -> dict[str, Any]:
    result = cli(project, "drift", "--json")
    assert result.returncode == code, result.stderr
    return dict(json.loads(result.stdout))


@pytest.mark.slow
def test_cli_drift_reports_hand_made_changes_and_never_the_journal(tmp_path: Path, db_url: str) -> None:
    project = drift_project(tmp_path / "p", db_url)
    assert cli(project, "apply").returncode == 0
    assert drift_json(project, 0) == {"drift": False, "count": 0, "differences": []}
    execute(
        db_url,
        "ALTER TABLE {user} ADD COLUMN legacy INTEGER",
        "CREATE TABLE audit_log (id INTEGER PRIMARY KEY)",
    )
    found = drift_json(project, 7)
    assert [d["key"] for d in found["differences"]] == [HAND_COLUMN, HAND_TABLE]
    assert not any(name in d["key"] for d in found["differences"] for name in JOURNAL)


@pytest.mark.slow
def test_without_the_exclusion_the_journal_tables_would_be_drift(tmp_path: Path, sqlite_url: str) -> None:
    """Negative control: the worker's compare without our exclusion lists the journal tables (kept
    beside the models' tables, the placement where the exclusion is what hides them)."""
    project = drift_project(tmp_path / "p", sqlite_url)
    with project.config.open("a", encoding="utf-8") as config:
        config.write('\n[journal]\nplacement = "default"\n')
    assert cli(project, "apply").returncode == 0
    settings = load_settings(str(project.config), cwd=project.root)
    job = replace(WorkerJob.from_settings(settings), exclude_tables=[])
    with Worker.start(job, python=settings.target.python or None) as worker:
        keys = [d["key"] for d in worker.compare()]
    assert {f"remove_table {name}" for name in JOURNAL} <= set(keys)


@pytest.mark.slow
def test_an_ignore_rule_hides_a_difference_and_the_known_differences_file_too(
    tmp_path: Path, sqlite_url: str
) -> None:
    project = drift_project(tmp_path / "p", sqlite_url, ignore=("table:audit_*",))
    assert cli(project, "apply").returncode == 0
    execute(sqlite_url, "CREATE TABLE audit_log (id INTEGER PRIMARY KEY)")
    assert drift_json(project, 0)["count"] == 0  # the rule hides it
    unruled = drift_config(project)  # negative control: no rule, reported
    assert [d["key"] for d in drift_json(unruled, 7)["differences"]] == [HAND_TABLE]
    assert cli(unruled, "baseline").returncode == 0  # accepted into the known-differences file
    assert drift_json(unruled, 0)["count"] == 0


@pytest.mark.slow
def test_cli_drift_refuses_a_database_behind_the_heads(tmp_path: Path, sqlite_url: str) -> None:
    project = drift_project(tmp_path / "p", sqlite_url)
    result = cli(project, "drift")
    assert result.returncode == 4 and "reconciler apply" in result.stderr


# --------------------------------------------------------------------------- the daemon


def checked(daemon: Running, after: str = "") -> dict[str, Any]:
    """The next drift compare after `after` (a checked_at), as /status shows it."""
    status: dict[str, Any] = daemon.wait_status(
        lambda s: (s.get("drift") or {}).get("checked_at", "") > after, 90, "a drift compare"
    )
    return status


def metric(daemon: Running, name: str) -> float:
    _code, body = daemon.get("/metrics")
    match = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", body, re.MULTILINE)
    assert match, f"{name} not on /metrics"
    return float(match.group(1))


def keys(status: dict[str, Any]) -> list[str]:
    return [d["key"] for d in (status.get("drift") or {}).get("differences", [])]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [pytest.param("postgresql", marks=pytest.mark.postgres), pytest.param("mysql", marks=pytest.mark.mysql)],
)
def test_daemon_reports_drift_alerts_once_and_recovers(tmp_path: Path, kind: str) -> None:
    with ExitStack() as stack:
        url = stack.enter_context(dbs.database(kind, tmp_path))
        hooks = Recorder()
        stack.callback(hooks.close)
        project = drift_project(tmp_path / "p", url, interval=0.5, sinks=(hooks.url,))
        daemon = stack.enter_context(running(project))
        clean = daemon.wait_status(lambda s: s["sync_state"] == "in_sync" and s.get("drift"), 30, "checked")
        assert clean["drift"]["count"] == 0 and "drift" not in clean["conditions"]
        assert metric(daemon, "reconciler_drift_checked_timestamp_seconds") > 0

        execute(url, "ALTER TABLE {user} ADD COLUMN legacy INTEGER")
        seen = daemon.wait_status(lambda s: "drift" in s["conditions"], 30, "drift in /status")
        assert keys(seen) == [HAND_COLUMN] and seen["state"] == "drift" and seen["sync_state"] == "in_sync"
        assert metric(daemon, "reconciler_drift_differences") == 1
        _code, body = daemon.get("/metrics")
        assert re.search(r'^reconciler_condition\{[^}]*condition="drift"[^}]*\} 1\.0$', body, re.M)
        wait_until(lambda: hooks.events("drift"), 10, "the drift alert")
        later = checked(daemon, checked(daemon, seen["drift"]["checked_at"])["drift"]["checked_at"])
        assert keys(later) == [HAND_COLUMN]  # two more compares, the same drift: no second alert
        assert len(hooks.events("drift")) == 1
        alert = hooks.events("drift")[0]
        assert "legacy" in alert["message"] and alert["details"]["drift"]
        shown = json.loads(cli(project, "status", "--json").stdout)  # the CLI reads the same flag
        assert "drift" in shown["conditions"] and keys(shown) == [HAND_COLUMN]
        waited = cli(project, "wait", "--timeout", "10")
        assert waited.returncode == 0, waited.stderr  # drift is reported, never waited on

        execute(url, "ALTER TABLE {user} DROP COLUMN legacy")
        fixed = daemon.wait_status(lambda s: "drift" not in s["conditions"], 30, "drift gone")
        assert fixed["state"] == "in_sync" and fixed["drift"]["count"] == 0
        wait_until(lambda: hooks.events("recovered"), 10, "the recovered alert")
        assert metric(daemon, "reconciler_drift_differences") == 0
        assert [b["details"].get("recovered_from") for b in hooks.events("recovered")] == ["drift"]
        assert len(hooks.events("drift")) == 1


def compares(daemon: Running) -> int:
    return daemon.stderr.count('"drift_compared"')


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("unsafe", [False, True], ids=["lock_holder_only", "negative_control"])
def test_two_daemons_make_one_compare_per_interval(tmp_path: Path, pg_url: str, unsafe: bool) -> None:
    """A long interval: each daemon looks once. With the safeguard, one of them compares and the
    other shows its result; without it (`drift_once` disabled), both compare."""
    project = drift_project(tmp_path / "p", pg_url, interval=60)
    assert cli(project, "apply").returncode == 0
    env = {"RECONCILER_UNSAFE_DISABLE": "drift_once"} if unsafe else None
    one, two = (Running(project, env) for _ in range(2))  # started together: they race
    try:
        seen = [checked(d) for d in (one, two)]
        for d in (one, two):  # each has had runs after its first look
            runs = d.status()["runs"]
            d.wait_status(lambda s, r=runs: s["runs"] >= r + 3, 30, "more runs")
    finally:
        one.stop()
        two.stop()
    total = compares(one) + compares(two)
    if unsafe:  # both compare; /status shows whichever result was written last, so only count
        assert (compares(one), compares(two)) == (1, 1)
    else:
        assert total == 1, (compares(one), compares(two))
        assert seen[0]["drift"]["checked_by"] == seen[1]["drift"]["checked_by"]
