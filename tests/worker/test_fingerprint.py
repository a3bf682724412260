"""The schema fingerprint `reconciler test` takes after each step: on PostgreSQL it re-reads only
the tables whose catalog rows were written or removed since the last read; after every kind of
DDL, committed one by one or several in one transaction, it equals a fingerprint read whole. A
step of several statements (`; ` between them) may remove a catalog row while it adds another of
the same catalog: the counts stay, the removal must still be seen."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from reconciler.worker.fingerprint import Fingerprints, fingerprint

pytestmark = [pytest.mark.core, pytest.mark.postgres]

STEPS = [
    "CREATE TABLE a (id serial PRIMARY KEY, v integer)",
    "CREATE TABLE b (id serial PRIMARY KEY, a_id integer)",
    "ALTER TABLE a ADD COLUMN w text",
    "ALTER TABLE a ALTER COLUMN v TYPE bigint",
    "ALTER TABLE a ALTER COLUMN v SET DEFAULT 7",
    "ALTER TABLE a ALTER COLUMN v SET DEFAULT 8",
    "ALTER TABLE a ALTER COLUMN v SET NOT NULL",
    "ALTER TABLE a ALTER COLUMN v DROP DEFAULT",
    "CREATE INDEX ix_a_w ON a (w)",
    "ALTER INDEX ix_a_w RENAME TO ix_a_w2",
    "ALTER TABLE a ADD CONSTRAINT uq_a_w UNIQUE (w)",
    "ALTER TABLE b ADD CONSTRAINT fk_b_a FOREIGN KEY (a_id) REFERENCES a (id)",
    "ALTER TABLE b RENAME CONSTRAINT fk_b_a TO fk_b_a2",
    "DROP INDEX ix_a_w2; CREATE INDEX ix_b_a_id ON b (a_id)",
    "ALTER TABLE a ADD CONSTRAINT ck_a_v CHECK (v > 0)",
    "ALTER TABLE a DROP CONSTRAINT ck_a_v",
    "CREATE SEQUENCE s1",
    "DROP SEQUENCE s1",
    "CREATE VIEW v1 AS SELECT id, a_id FROM b",
    "DROP VIEW v1",
    "CREATE TYPE mood AS ENUM ('ok', 'sad')",
    "ALTER TABLE b ADD COLUMN m mood",
    "ALTER TYPE mood RENAME TO mood2",
    "ALTER TABLE b DROP COLUMN m",
    "DROP TYPE mood2",
    "ALTER TABLE a RENAME COLUMN id TO ident",
    "ALTER SEQUENCE a_id_seq RENAME TO a_ident_seq",
    "ALTER TABLE a DROP CONSTRAINT uq_a_w; ALTER TABLE b ADD CONSTRAINT uq_b_a_id UNIQUE (a_id)",
    "ALTER TABLE a RENAME TO a2",
    "ALTER TABLE b DROP CONSTRAINT fk_b_a2",
    "ALTER TABLE b ADD CONSTRAINT fk_b_a FOREIGN KEY (a_id) REFERENCES a2 (ident)",
    "ALTER TABLE a2 RENAME COLUMN ident TO id",
    "DROP TABLE b",
    "CREATE TABLE b (id serial PRIMARY KEY)",
    "ALTER TABLE a2 ALTER COLUMN w TYPE varchar(10)",
    "ALTER TABLE a2 ALTER COLUMN w TYPE varchar(20)",
    "DROP TABLE b; CREATE TABLE c (id serial PRIMARY KEY, a_id integer REFERENCES a2 (id))",
]


@pytest.mark.parametrize("per_step", [True, False], ids=["a commit per step", "one transaction"])
def test_the_incremental_fingerprint_equals_a_whole_one(pg_url: str, per_step: bool) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            schema = Fingerprints(conn, "alembic_version")
            last = schema.take()
            for statement in STEPS:
                for part in statement.split("; "):
                    conn.execute(sa.text(part))
                if per_step:
                    conn.commit()
                found = schema.take()
                assert found == fingerprint(conn, "alembic_version"), statement
                assert found != last, statement  # each step changes what the fingerprint says
                last = found
    finally:
        engine.dispose()


def test_a_table_another_session_commits_after_a_read_is_seen(pg_url: str) -> None:
    """The other session's transaction had its id before the first read and commits after it,
    while a later transaction finished before the read: the rows are older than the read's
    snapshot's end (its xmax), and still new to the fingerprint."""
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn, engine.connect() as other:
            other.execute(sa.text("CREATE TABLE late (id integer)"))  # its transaction stays open
            conn.execute(sa.text("CREATE TABLE early (id integer)"))
            conn.commit()
            schema = Fingerprints(conn, "alembic_version")
            first = schema.take()
            conn.rollback()
            other.commit()
            assert schema.take() == fingerprint(conn, "alembic_version") != first
    finally:
        engine.dispose()
