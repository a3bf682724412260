"""A schema's fingerprint for `reconciler test`: every table, column (type, nullability, default),
index, constraint, enum type and sequence of the connection's schema, as a set of sentences.

Read from the catalog in a few statements whatever the number of tables (no Inspector per table:
a 200-revision stairway takes three fingerprints per revision). The version table is left out:
it is Alembic's bookkeeping, not the schema under test.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from reconciler.worker.fppg import PgSchema

_MYSQL = (
    """SELECT CONCAT('table ', TABLE_NAME) FROM information_schema.TABLES
        WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> :vt""",
    """SELECT CONCAT('column ', TABLE_NAME, '.', COLUMN_NAME, ' ', COLUMN_TYPE,
                     IF(IS_NULLABLE = 'YES', ' NULL', ' NOT NULL'),
                     IFNULL(CONCAT(' DEFAULT ', COLUMN_DEFAULT), ''), IF(EXTRA = '', '', CONCAT(' ', EXTRA)))
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> :vt""",
    """SELECT CONCAT('index ', TABLE_NAME, '.', INDEX_NAME, IF(NON_UNIQUE = 0, ' UNIQUE', ''), ' (',
                     GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX SEPARATOR ', '), ')')
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> :vt
        GROUP BY TABLE_NAME, INDEX_NAME, NON_UNIQUE""",
    """SELECT CONCAT('constraint ', k.TABLE_NAME, '.', k.CONSTRAINT_NAME, ' (',
                     GROUP_CONCAT(k.COLUMN_NAME ORDER BY k.ORDINAL_POSITION SEPARATOR ', '), ')',
                     IFNULL(CONCAT(' REFERENCES ', MAX(k.REFERENCED_TABLE_NAME)), ''))
         FROM information_schema.KEY_COLUMN_USAGE k
        WHERE k.TABLE_SCHEMA = DATABASE() AND k.TABLE_NAME <> :vt
        GROUP BY k.TABLE_NAME, k.CONSTRAINT_NAME""",
)
_MYSQL_CHECKS = """SELECT CONCAT('check ', TABLE_NAME, '.', CONSTRAINT_NAME, ': ', CHECK_CLAUSE)
  FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME <> :vt"""

_SQLITE = (
    """SELECT 'table ' || name FROM sqlite_master
        WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%' AND name <> :vt""",
    """SELECT 'column ' || m.name || '.' || p.name || ' ' || p.type
              || CASE WHEN p."notnull" THEN ' NOT NULL' ELSE ' NULL' END
              || COALESCE(' DEFAULT ' || p.dflt_value, '') || CASE WHEN p.pk THEN ' PK' ELSE '' END
         FROM sqlite_master m JOIN pragma_table_info(m.name) p
        WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> :vt""",
    """SELECT 'index ' || m.name || '.' || il.name || CASE WHEN il."unique" THEN ' UNIQUE' ELSE '' END
              || ' (' || group_concat(ii.name, ', ') || ')'
         FROM sqlite_master m JOIN pragma_index_list(m.name) il JOIN pragma_index_info(il.name) ii
        WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> :vt
        GROUP BY m.name, il.name, il."unique" """,
    """SELECT 'foreign key ' || m.name || ' (' || f."from" || ') REFERENCES ' || f."table"
              || ' (' || COALESCE(f."to", '') || ')'
         FROM sqlite_master m JOIN pragma_foreign_key_list(m.name) f
        WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name <> :vt""",
)


class Fingerprints:
    """Fingerprints of one connection's schema, one `take()` after each step. On PostgreSQL a
    table's sentences are read again only when its catalog rows changed (`fppg.PgSchema`)."""

    def __init__(self, connection: Any, version_table: str) -> None:
        self.connection = connection
        self.version_table = version_table
        self._pg: PgSchema | None = None

    def take(self) -> frozenset[str]:
        """The schema now, without the version table. Reads only. On PostgreSQL a transaction
        the reads began is left open: Alembic's next step goes on in the transaction it finds
        (and commits it), a BEGIN and a ROLLBACK fewer per step; elsewhere it is ended here, so
        the next step begins its own."""
        conn = self.connection
        if conn.dialect.name == "postgresql":
            if self._pg is None:
                self._pg = PgSchema(conn, self.version_table)
            return self._pg.take()
        began = not conn.in_transaction()
        try:
            return frozenset(_read(conn, conn.dialect.name, self.version_table))
        finally:
            if began and conn.in_transaction():
                conn.get_transaction().rollback()  # SQLAlchemy 1.3 never autobegins: not reached


def fingerprint(connection: Any, version_table: str) -> frozenset[str]:
    """The schema of `connection`'s current schema or database, without `version_table`."""
    return Fingerprints(connection, version_table).take()


def _read(connection: Any, dialect: str, version_table: str) -> list[str]:
    if dialect in ("mysql", "mariadb"):
        queries = (*_MYSQL, _MYSQL_CHECKS) if _has_check_constraints(connection) else _MYSQL
    elif dialect == "sqlite":
        queries = _SQLITE
    else:
        return _inspected(connection, version_table)
    facts: list[str] = []
    for query in queries:
        facts.extend(str(row[0]) for row in connection.execute(sa.text(query), {"vt": version_table}))
    return facts


def _has_check_constraints(connection: Any) -> bool:
    found = connection.execute(
        sa.text(
            "SELECT COUNT(*) FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = 'information_schema' AND TABLE_NAME = 'CHECK_CONSTRAINTS'"
        )
    ).scalar()
    return bool(found)


def _inspected(connection: Any, version_table: str) -> list[str]:
    """Another dialect: SQLAlchemy's Inspector, table by table (slower, as complete as it is)."""
    inspector = sa.inspect(connection)
    facts: list[str] = []
    for table in inspector.get_table_names():
        if table == version_table:
            continue
        facts.append(f"table {table}")
        for col in inspector.get_columns(table):
            facts.append(f"column {table}.{col['name']} {col['type']} {col['nullable']} {col.get('default')}")
        for index in inspector.get_indexes(table):
            facts.append(f"index {table}.{index['name']} {index.get('unique')} {index['column_names']}")
        for fk in inspector.get_foreign_keys(table):
            columns, referred = fk["constrained_columns"], fk["referred_table"]
            facts.append(f"foreign key {table}.{fk.get('name')} {columns} {referred}")
        for uq in inspector.get_unique_constraints(table):
            facts.append(f"unique {table}.{uq.get('name')} {uq['column_names']}")
    return facts
