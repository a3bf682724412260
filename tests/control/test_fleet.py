"""Tenant fleets on real PostgreSQL schemas, MariaDB databases and SQLite files: a broken tenant
fails alone while the others finish, a halted wave stops later waves until `resume`, a new tenant
is built within one tick (and at once with `--tenant`), the worker migrates the tenant's schema
with Flask-Migrate's env.py unchanged, connections stay bounded, and the fleet read is cheap.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from reconciler.control import fleet as control_fleet
from reconciler.db import hashes, journal, placement
from tests import fleets
from tests.fleets import FLEET_DIALECTS, UNIQUE_CODE, TenantFleet


@pytest.fixture(params=FLEET_DIALECTS)
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def break_tenant(found: TenantFleet, name: str) -> None:
    """Rows with a duplicate code: the f2 unique index fails in this tenant only."""
    found.execute(name, "INSERT INTO item (id, code) VALUES (1, 'dup'), (2, 'dup')")


# --- a broken tenant ------------------------------------------------------------------------------
def test_a_broken_tenant_fails_alone_and_every_other_tenant_reaches_head(
    tmp_path: Path, dialect: str
) -> None:
    with fleets.fleet(dialect, tmp_path, size=3) as found:
        broken = found.tenants[1]
        break_tenant(found, broken)
        found.revision("f2", "f1", UNIQUE_CODE)

        result = found.cli("apply")

        assert result.returncode == 1, result.stderr[-3000:]
        assert "1 of 3 tenants failed" in result.stderr and broken in result.stderr
        others = [t for t in found.tenants if t != broken]
        assert {t: found.heads(t) for t in others} == {t: {"f2"} for t in others}
        assert found.heads(broken) == {"f1"}
        assert found.witnessed() == {t: 1 for t in others}


def test_status_json_lists_the_failed_tenant_with_its_revision(tmp_path: Path, dialect: str) -> None:
    # a new process reads the failure from the journal: the shared one of a schema fleet, each
    # tenant's own of a database or file fleet
    with fleets.fleet(dialect, tmp_path, size=3) as found:
        broken = found.tenants[2]
        break_tenant(found, broken)
        found.revision("f2", "f1", UNIQUE_CODE)
        assert found.cli("apply").returncode == 1

        shown = found.status()["fleet"]

        assert [(f["name"], f["revision"]) for f in shown["failed"]] == [(broken, "f2")]
        assert "dup" in shown["failed"][0]["error"] or "unique" in shown["failed"][0]["error"].lower()
        assert shown["counts"] == {"failed": 1, "in_sync": 2}


def test_status_json_fleet_object_has_tenants_counts_failed_and_wave(tmp_path: Path, dialect: str) -> None:
    with fleets.fleet(dialect, tmp_path, size=3, waves=["1", "100%"]) as found:
        found.revision("f2", "f1")

        shown = found.status()

        assert "state" in shown or "sync_state" in shown  # the usual keys stay
        fleet = shown["fleet"]
        assert fleet["tenants"] == 3
        assert fleet["counts"] == {"behind": 3}
        assert fleet["failed"] == []
        wave = fleet["wave"]
        assert {"index", "size", "count", "halted", "reason", "complete"} <= set(wave)
        assert (wave["index"], wave["size"], wave["count"], wave["halted"], wave["complete"]) == (
            0,
            1,
            2,
            False,
            False,
        )


# --- waves -----------------------------------------------------------------------------------------
def test_a_failed_first_wave_halts_the_rollout_and_later_tenants_are_not_applied(
    tmp_path: Path, dialect: str
) -> None:
    with fleets.fleet(dialect, tmp_path, size=3, waves=["1", "100%"], halt_after=1) as found:
        first, *later = found.tenants
        break_tenant(found, first)
        found.revision("f2", "f1", UNIQUE_CODE)

        result = found.cli("apply")

        assert result.returncode == 1, result.stderr[-3000:]
        assert {t: found.heads(t) for t in later} == {t: {"f1"} for t in later}
        assert found.witnessed() == {}
        assert "fleet_halted" in result.stderr and first in result.stderr


def test_negative_control_with_halt_after_0_the_later_waves_are_applied(tmp_path: Path, dialect: str) -> None:
    with fleets.fleet(dialect, tmp_path, size=3, waves=["1", "100%"], halt_after=0) as found:
        first, *later = found.tenants
        break_tenant(found, first)
        found.revision("f2", "f1", UNIQUE_CODE)

        assert found.cli("apply").returncode == 1

        assert {t: found.heads(t) for t in later} == {t: {"f2"} for t in later}
        assert found.witnessed() == {t: 1 for t in later}


def test_resume_lifts_a_halted_wave_and_the_next_apply_goes_on(tmp_path: Path, dialect: str) -> None:
    with fleets.fleet(dialect, tmp_path, size=3, waves=["1", "100%"], halt_after=1) as found:
        first, *later = found.tenants
        break_tenant(found, first)
        found.revision("f2", "f1", UNIQUE_CODE)
        assert found.cli("apply").returncode == 1
        assert found.status()["fleet"]["wave"]["halted"] is True

        resumed = found.cli("resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert found.status()["fleet"]["wave"]["halted"] is False
        found.cli("apply")

        assert {t: found.heads(t) for t in later} == {t: {"f2"} for t in later}
        assert found.witnessed() == {t: 1 for t in later}


# --- a new tenant ------------------------------------------------------------------------------------
def test_a_new_tenant_is_built_to_head_within_one_tick(tmp_path: Path, dialect: str) -> None:
    with fleets.fleet(dialect, tmp_path, size=2) as found:
        fleet = control_fleet.open_fleet(found.settings())
        try:
            assert control_fleet.reconcile_fleet(fleet).outcome == "noop"  # at head already
            new = found.add_tenant("new", at=None)

            run = control_fleet.reconcile_fleet(fleet, trigger="tick")
        finally:
            control_fleet.release_fleet(fleet)

        assert [(r.name, r.outcome) for r in run.runs] == [(new, "applied")]
        assert found.heads(new) == {"f1"} and "item" in found.tables(new)


def test_apply_with_tenant_builds_that_tenant_at_once_and_no_other(tmp_path: Path, dialect: str) -> None:
    with fleets.fleet(dialect, tmp_path, size=2, waves=["1", "100%"]) as found:
        new = found.add_tenant("zz", at=None)  # last by name: outside the first wave

        result = found.cli("apply", "--tenant", new)

        assert result.returncode == 0, result.stderr[-3000:]
        assert found.heads(new) == {"f1"}
        assert found.tenants[0] != new and found.heads(found.tenants[0]) == {"f1"}


def test_an_unknown_tenant_exits_2_naming_it_and_touches_nothing(tmp_path: Path, dialect: str) -> None:
    with fleets.fleet(dialect, tmp_path, size=2) as found:
        found.revision("f2", "f1")
        unknown = found.name("nope")

        result = found.cli("apply", "--tenant", unknown)

        assert result.returncode == 2, result.stderr[-3000:]
        assert f"tenant {unknown!r} is not in the fleet" in result.stderr
        assert found.all_heads() == {t: {"f1"} for t in found.tenants}
        assert found.witnessed() == {}
        if dialect == "sqlite":
            assert not (found.project.root / unknown).exists()
        else:
            engine = sa.create_engine(found.url, poolclass=sa.pool.NullPool)
            try:
                assert unknown not in sa.inspect(engine).get_schema_names()  # no schema, no database
            finally:
                engine.dispose()


# --- the worker and an unchanged env.py ------------------------------------------------------------
@pytest.mark.postgres
def test_the_unchanged_flask_migrate_env_py_builds_each_tenant_schema_not_public(tmp_path: Path) -> None:
    with fleets.fleet("postgresql", tmp_path, size=2, at=None) as found:
        env_py = (found.project.migrations / "env.py").read_text()
        assert "search_path" not in env_py and "version_table_schema" not in env_py

        result = found.cli("apply")

        assert result.returncode == 0, result.stderr[-3000:]
        for tenant in found.tenants:
            assert found.tables(tenant) == {"alembic_version", "item"}
            assert found.heads(tenant) == {"f1"}
        engine = sa.create_engine(found.url, poolclass=sa.pool.NullPool)
        try:
            public = set(sa.inspect(engine).get_table_names(schema="public"))
        finally:
            engine.dispose()
        assert "alembic_version" not in public and "item" not in public


# --- connections and the fleet read ------------------------------------------------------------------
@contextmanager
def sampling_sessions(url: str) -> Iterator[list[int]]:
    """The count of our sessions (application_name reconciler/...) on the database, sampled in a loop."""
    database = sa.engine.make_url(url).database
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                seen.append(
                    int(
                        conn.execute(
                            sa.text(
                                "SELECT count(*) FROM pg_stat_activity WHERE datname = :d "
                                "AND application_name LIKE 'reconciler/%'"
                            ),
                            {"d": database},
                        ).scalar()
                        or 0
                    )
                )
                stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_thirty_schemas_at_concurrency_3_never_hold_more_than_5_sessions(tmp_path: Path) -> None:
    with fleets.fleet("postgresql", tmp_path, size=30, concurrency=3) as found:
        found.revision("f2", "f1")
        with sampling_sessions(found.url) as seen:
            result = found.cli("apply", timeout=280)
        assert result.returncode == 0, result.stderr[-3000:]
        assert found.witnessed() == {t: 1 for t in found.tenants}
        assert len(seen) > 10 and max(seen) >= 2  # the sampler saw the run
        assert max(seen) <= 3 + 2, sorted(seen)[-10:]


@pytest.mark.postgres
def test_the_fleet_read_of_schemas_is_at_most_two_statements(tmp_path: Path) -> None:
    with fleets.fleet("postgresql", tmp_path, size=5) as found:
        found.revision("f2", "f1")
        assert found.cli("suspend").returncode == 0  # the shared journal exists
        assert found.cli("resume").returncode == 0
        fleet = control_fleet.open_fleet(found.settings())
        try:
            graph = control_fleet.read_graph(fleet)
            control_fleet.read_fleet(fleet, graph)  # the first read may learn where the journal is
            statements: list[str] = []

            def record(conn: object, cursor: object, statement: str, *args: object) -> None:
                statements.append(statement)

            sa.event.listen(fleet.base.engine, "before_cursor_execute", record)
            try:
                status = control_fleet.read_fleet(fleet, graph)
            finally:
                sa.event.remove(fleet.base.engine, "before_cursor_execute", record)
        finally:
            control_fleet.release_fleet(fleet)
        assert status.counts == {"behind": 5}
        assert 1 <= len(statements) <= 2, statements


@pytest.mark.postgres
def test_a_tenant_leaves_another_tenants_step_in_flight_in_the_shared_journal_alone(tmp_path: Path) -> None:
    with fleets.fleet("postgresql", tmp_path, size=2) as found:
        first, other = found.tenants
        found.revision("f2", "f1")
        assert found.cli("suspend").returncode == 0  # the shared journal exists
        assert found.cli("resume").returncode == 0
        settings = found.settings()
        tables = journal.tables(settings.journal.table, placement.SIDE_SCHEMA)
        engine = sa.create_engine(found.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:  # the other tenant's replica is running f2 right now
                row = journal.record_started(conn, tables, target=other, operation="upgrade", revision="f2")

            result = found.cli("apply", "--tenant", first)

            with engine.connect() as conn:
                outcome = conn.execute(sa.select(tables.steps.c.outcome).where(tables.steps.c.id == row))
                assert outcome.scalar_one() == "started"  # not judged by the first tenant's run
        finally:
            engine.dispose()
        assert result.returncode == 0, result.stderr[-3000:]
        assert found.heads(first) == {"f2"} and found.heads(other) == {"f1"}
        assert "dirty" not in found.status("--tenant", first).get("conditions", [])


@pytest.mark.postgres
def test_a_tenant_whose_schema_holds_a_previous_releases_journal_still_moves_it(tmp_path: Path) -> None:
    with fleets.fleet("postgresql", tmp_path, size=2) as found:
        first, other = found.tenants
        found.revision("f2", "f1")
        assert found.cli("suspend").returncode == 0  # the shared journal exists
        assert found.cli("resume").returncode == 0
        settings = found.settings()
        legacy = journal.tables(settings.journal.table, first)  # where the previous release kept it
        side = journal.tables(settings.journal.table, placement.SIDE_SCHEMA)
        engine = sa.create_engine(found.url, poolclass=sa.pool.NullPool)
        try:
            with engine.begin() as conn:
                legacy.metadata.create_all(conn)
            with engine.connect() as conn:
                hashes.record_hash(
                    conn,
                    legacy,
                    target=first,
                    operation="upgrade",
                    revision="f1",
                    file_hash="",
                    trigger="legacy",
                )

            result = found.cli("apply")

            with engine.connect() as conn:
                assert not sa.inspect(conn).has_table(legacy.steps.name, schema=first)
                moved = conn.execute(sa.select(side.steps.c.trigger).where(side.steps.c.target == first))
                assert "legacy" in set(moved.scalars())
        finally:
            engine.dispose()
        assert result.returncode == 0, result.stderr[-3000:]
        assert found.all_heads() == {first: {"f2"}, other: {"f2"}}
