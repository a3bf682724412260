"""The schema fingerprint `reconciler test` takes after each step: on PostgreSQL it re-reads only
the tables whose catalog rows changed; after every kind of DDL, committed one by one or several in
one transaction, it equals a fingerprint read whole."""

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
    "ALTER TABLE a ALTER COLUMN v SET NOT NULL",
    "ALTER TABLE a ALTER COLUMN v DROP DEFAULT",
    "CREATE INDEX ix_a_w ON a (w)",
    "ALTER INDEX ix_a_w RENAME TO ix_a_w2",
    "ALTER TABLE a ADD CONSTRAINT uq_a_w UNIQUE (w)",
    "ALTER TABLE b ADD CONSTRAINT fk_b_a FOREIGN KEY (a_id) REFERENCES a (id)",
    "ALTER TABLE b RENAME CONSTRAINT fk_b_a TO fk_b_a2",
    "DROP INDEX ix_a_w2",
    "CREATE TYPE mood AS ENUM ('ok', 'sad')",
    "ALTER TABLE b ADD COLUMN m mood",
    "ALTER TYPE mood RENAME TO mood2",
    "ALTER TABLE b DROP COLUMN m",
    "DROP TYPE mood2",
    "ALTER TABLE a RENAME COLUMN id TO ident",
    "ALTER SEQUENCE a_id_seq RENAME TO a_ident_seq",
    "ALTER TABLE a DROP CONSTRAINT uq_a_w",
    "ALTER TABLE a RENAME TO a2",
    "DROP TABLE b",
    "CREATE TABLE b (id serial PRIMARY KEY)",
    "ALTER TABLE a2 ALTER COLUMN w TYPE varchar(10)",
]


@pytest.mark.parametrize("per_step", [True, False], ids=["a commit per step", "one transaction"])
def test_the_incremental_fingerprint_equals_a_whole_one(pg_url: str, per_step: bool) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            schema = Fingerprints(conn, "alembic_version")
            last = schema.take()
            for statement in STEPS:
                conn.execute(sa.text(statement))
                if per_step:
                    conn.commit()
                found = schema.take()
                assert found == fingerprint(conn, "alembic_version"), statement
                assert found != last, statement  # each step changes what the fingerprint says
                last = found
    finally:
        engine.dispose()
