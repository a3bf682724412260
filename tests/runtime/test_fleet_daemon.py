"""`reconciler run` (prod mode) with `[fleet]` set, as a real process on real PostgreSQL schemas."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.core.alert_rules import EVENTS, RULES, Observation
from reconciler.core.alerting import AlertPolicy
from reconciler.runtime.metrics import Metrics
from reconciler.settings import AlertingSettings
from tests.builders import flask_project
from tests.pgcluster import wait_until
from tests.runtime.test_daemon import config, daemon
from tests.webhooks import Recorder

FLEET = '\n[fleet]\nsource = "schemas"\nmatch = "tenant_*"\nconcurrency = 2\n'


def run_sql(url: str, *statements: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def schema_heads(url: str, schema: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return set(conn.exec_driver_sql(f'SELECT version_num FROM "{schema}".alembic_version').scalars())
    finally:
        engine.dispose()


def reconciler_sessions(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name LIKE 'reconciler/%%' AND pid <> pg_backend_pid()"
            ).scalar()
            return int(found or 0)
    finally:
        engine.dispose()


def tenants_gauge(body: str) -> dict[str, float]:
    """`reconciler_tenants` samples of a /metrics body: state -> value."""
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("reconciler_tenants{"):
            labels, value = line[len("reconciler_tenants{") :].rsplit("} ", 1)
            state = next(p.split("=", 1)[1].strip('"') for p in labels.split(",") if p.startswith("state="))
            out[state] = float(value)
    return out


@pytest.mark.slow
def test_daemon_builds_every_tenant_and_a_schema_created_later_within_a_tick(
    tmp_path: Path, pg_url: str
) -> None:
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(2)
    run_sql(pg_url, *(f"CREATE SCHEMA tenant_{n}" for n in ("a", "b", "c")))
    config(project, interval=1, extra=FLEET)
    with daemon(project) as d:
        first = d.wait_status(
            lambda s: (s.get("fleet") or {}).get("counts") == {"in_sync": 3}, 60, "3 in sync"
        )
        assert first["target"] and first["state"] == "in_sync"
        assert first["fleet"]["tenants"] == 3 and first["fleet"]["failed"] == []
        for name in ("tenant_a", "tenant_b", "tenant_c"):
            assert schema_heads(pg_url, name) == {"r0001"}
        run_sql(pg_url, "CREATE SCHEMA tenant_d")  # a sign-up
        d.wait_status(
            lambda s: (s.get("fleet") or {}).get("counts") == {"in_sync": 4}, 30, "the new tenant built"
        )
        assert schema_heads(pg_url, "tenant_d") == {"r0001"}
        code, body = d.get("/metrics")
        assert code == 200
        gauge = tenants_gauge(body)
        assert gauge["in_sync"] == 4
        assert gauge["uninitialized_empty"] == 0 and gauge["failed"] == 0
        applied = [
            line
            for line in body.splitlines()
            if line.startswith("reconciler_runs_total{") and 'outcome="applied"' in line
        ]
        assert applied and float(applied[0].rsplit(" ", 1)[1]) >= 1  # the fleet's tick is the run
        assert d.status()["sync_state"] == "in_sync" and d.get("/readyz")[0] == 200
        # between ticks: the fleet's shared session at most, never a connection per tenant
        runs = d.status()["runs"]
        d.wait_status(lambda s: s["runs"] >= runs + 2, 30, "two more ticks")
        assert reconciler_sessions(pg_url) <= 2 + 2  # concurrency + 2
        assert d.stop() == 0  # SIGTERM: a clean stop


@pytest.mark.slow
def test_broken_tenants_raise_one_fleet_alert_not_one_per_tenant(tmp_path: Path, pg_url: str) -> None:
    hooks = Recorder()
    project = flask_project(tmp_path / "p", pg_url)
    project.chain(2)
    statements = [f"CREATE SCHEMA tenant_{n}" for n in ("a", "b", "c")]
    for bad in ("tenant_x", "tenant_y"):  # at r0000, and r0001's table already there: r0001 fails
        statements += [
            f"CREATE SCHEMA {bad}",
            f"CREATE TABLE {bad}.t_r0 (id integer PRIMARY KEY)",
            f"CREATE TABLE {bad}.t_r1 (id integer PRIMARY KEY)",
            f"CREATE TABLE {bad}.alembic_version (version_num varchar(32) PRIMARY KEY)",
            f"INSERT INTO {bad}.alembic_version VALUES ('r0000')",
        ]
    run_sql(pg_url, *statements)
    config(project, interval=0.5, sinks=[hooks.url], extra=FLEET)
    try:
        with daemon(project) as d:
            status = d.wait_status(
                lambda s: len((s.get("fleet") or {}).get("failed", [])) == 2, 60, "two failed tenants"
            )
            assert {f["name"] for f in status["fleet"]["failed"]} == {"tenant_x", "tenant_y"}
            assert status["fleet"]["wave"]["halted"]  # halt_after = 1
            wait_until(lambda: hooks.events("tenants_blocked"), 30, "the tenants_blocked alert")
            wait_until(lambda: hooks.events("fleet_halted"), 30, "the fleet_halted alert")
            runs = d.status()["runs"]
            d.wait_status(lambda s: s["runs"] >= runs + 4, 60, "four more ticks")
            for name in ("tenant_a", "tenant_b", "tenant_c"):
                assert schema_heads(pg_url, name) == {"r0001"}
            assert len(hooks.events("tenants_blocked")) == 1  # still one, after more ticks
            run_sql(pg_url, "DROP SCHEMA tenant_x CASCADE", "DROP SCHEMA tenant_y CASCADE")  # offboarded
            wait_until(lambda: len(hooks.events("recovered")) >= 2, 30, "both recoveries")
            recovered = {b["details"]["recovered_from"] for b in hooks.events("recovered")}
            assert recovered == {"tenants_blocked", "fleet_halted"}
            assert d.status()["fleet"]["counts"] == {"in_sync": 3}
        blocked = hooks.events("tenants_blocked")
        assert len(blocked) == 1, blocked
        assert "tenant_x" in blocked[0]["message"] and "tenant_y" in blocked[0]["message"]
        assert len(hooks.events("fleet_halted")) == 1
        assert not hooks.events("failed") and not hooks.events("blocked")  # not one per tenant
    finally:
        hooks.close()


# --------------------------------------------------------------------------- the fleet's alert policy (pure)


def fleet_obs(failed: dict[str, str], halted: str = "", read: bool = True) -> Observation:
    """A fleet tick that read `failed` (tenant -> failing revision) out of 100 tenants."""
    return Observation(
        outcome="failed" if failed else "noop",
        state="behind" if failed else "in_sync",
        sync_state="behind" if failed else "in_sync",
        conditions=(),
        fleet=True,
        fleet_read=read,
        halted=halted,
        halt_reason="1 failed tenant in wave 1 of 3" if halted else "",
        tenants=100,
        failed_tenants=tuple(sorted(failed)),
        failed_causes=tuple(sorted(set(failed.values()))),
    )


def test_tenants_failing_on_one_revision_are_one_alert_and_a_new_cause_another() -> None:
    policy = AlertPolicy("fleet", AlertingSettings(repeat_interval=0))
    sent = [a for a, _ in policy.observe(fleet_obs({"t1": "r2"}), 1000.0)]
    sent += [a for a, _ in policy.observe(fleet_obs({"t1": "r2", "t2": "r2", "t3": "r2"}), 1010.0)]
    assert [a.event for a in sent] == ["tenants_blocked"]  # more tenants, the same cause: no new alert
    again = [a for a, _ in policy.observe(fleet_obs({"t1": "r2", "t4": "r3"}), 1020.0)]
    assert [a.event for a in again] == ["tenants_blocked"] and "r3" in again[0].message
    assert policy.observe(fleet_obs({"t1": "r2"}, read=False), 1030.0) == []  # a blind tick cannot tell
    over = [a for a, _ in policy.observe(fleet_obs({}), 1040.0)]
    assert [(a.event, a.details["recovered_from"]) for a in over] == [("recovered", "tenants_blocked")]


def test_a_fleet_tick_is_judged_by_the_fleet_rules_only_and_each_transition_is_claimable() -> None:
    policy = AlertPolicy("fleet", AlertingSettings(repeat_interval=0))
    pairs = policy.observe(fleet_obs({"t1": "r2"}, halted="wave 1:r2"), 1000.0)
    assert sorted(a.event for a, _ in pairs) == ["fleet_halted", "tenants_blocked"]  # no `failed`
    assert all(key for _, key in pairs)  # fleet-wide: claimed in the journal, one replica sends
    target = Observation(outcome="noop", state="in_sync", sync_state="in_sync", conditions=())
    assert AlertPolicy("one", AlertingSettings()).observe(target, 1000.0) == []
    assert {"fleet_halted", "tenants_blocked"} <= set(EVENTS)  # `[[alerts]] events` accepts them
    assert RULES["fleet_halted"].scope == RULES["tenants_blocked"].scope == "fleet"


def test_tenant_counts_that_went_to_zero_are_zero_and_a_single_target_has_no_tenant_series() -> None:
    metrics = Metrics("fleet", "1.0", fleet=True)
    assert tenants_gauge(metrics.exposition()[0].decode())["in_sync"] == 0  # known from the start
    metrics.set_tenants({"behind": 3, "a_state_not_known_up_front": 1})
    metrics.set_tenants({"in_sync": 4})
    gauge = tenants_gauge(metrics.exposition()[0].decode())
    assert gauge["in_sync"] == 4 and gauge["behind"] == 0 and gauge["a_state_not_known_up_front"] == 0
    assert tenants_gauge(Metrics("one", "1.0").exposition()[0].decode()) == {}
