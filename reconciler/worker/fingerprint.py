"""A schema's fingerprint for `reconciler test`: every table, column (type, nullability, default),
index, constraint, enum type and sequence of the connection's schema, as a set of sentences.

Read from the catalog in a few statements whatever the number of tables (no Inspector per table:
a 200-revision stairway takes three fingerprints per revision). The version table is left out:
it is Alembic's bookkeeping, not the schema under test.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

# PostgreSQL, by owning table: (table, sentence) rows of the tables named in :names
_PG_TABLES = """
SELECT c.relname, 'table ' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm') AND c.relname = ANY(:names)
UNION ALL
SELECT c.relname, 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE ' NULL' END
       || COALESCE(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE n.nspname = current_schema() AND c.relname = ANY(:names) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT tablename, 'index ' || indexname || ': ' || indexdef FROM pg_indexes
 WHERE schemaname = current_schema() AND tablename = ANY(:names)
UNION ALL
SELECT c.relname, 'constraint ' || c.relname || '.' || con.conname || ': ' || pg_get_constraintdef(con.oid)
  FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relname = ANY(:names)
"""
# what belongs to no one table: enum types and sequences (few rows: read every time)
_PG_GLOBAL = """
SELECT 'enum ' || t.typname || ' (' || string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder) || ')'
  FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname = current_schema() GROUP BY t.typname
UNION ALL
SELECT 'sequence ' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind = 'S'
"""
# each table's catalog rows as versions (xmin: the transaction that wrote the row; ctid: where,
# new on every update, within one transaction too), with the rows of the tables and columns its
# foreign keys name (their sentences say those names): a table whose signature is unchanged has
# the sentences it had, without the formatting functions that make reading them cost. An enum type
# or a sequence that went while another came (a rename: column types and defaults name them)
# re-reads every table; one only created or only dropped changes no other table's sentences.
_PG_SIGNATURES = """
SELECT t.relname, md5(string_agg(s.x, ',' ORDER BY s.x)) FROM pg_class t
  JOIN pg_namespace n ON n.oid = t.relnamespace
 CROSS JOIN LATERAL (
   SELECT t.xmin::text || t.ctid::text AS x
   UNION ALL SELECT a.xmin::text || a.ctid::text FROM pg_attribute a WHERE a.attrelid = t.oid AND a.attnum > 0
   UNION ALL SELECT d.xmin::text || d.ctid::text FROM pg_attrdef d WHERE d.adrelid = t.oid
   UNION ALL SELECT i.xmin::text || i.ctid::text || ci.xmin::text || ci.ctid::text
               FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid WHERE i.indrelid = t.oid
   UNION ALL SELECT k.xmin::text || k.ctid::text FROM pg_constraint k WHERE k.conrelid = t.oid
   UNION ALL SELECT r.xmin::text || r.ctid::text FROM pg_constraint k JOIN pg_class r ON r.oid = k.confrelid
              WHERE k.conrelid = t.oid
   UNION ALL SELECT ra.xmin::text || ra.ctid::text FROM pg_constraint k
               JOIN pg_attribute ra ON ra.attrelid = k.confrelid AND ra.attnum = ANY(k.confkey)
              WHERE k.conrelid = t.oid
 ) s
 WHERE n.nspname = current_schema() AND t.relkind IN ('r', 'p', 'v', 'm') AND t.relname <> :vt
 GROUP BY t.relname
"""

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
    table's sentences are read again only when its catalog rows changed (`_PG_SIGNATURES`)."""

    def __init__(self, connection: Any, version_table: str) -> None:
        self.connection = connection
        self.version_table = version_table
        self._signatures: dict[str, str] = {}
        self._facts: dict[str, set[str]] = {}
        self._globals: set[str] | None = None

    def take(self) -> frozenset[str]:
        """The schema now, without the version table. Reads only; a transaction the reads began
        is ended here, so Alembic's next step begins its own (not taken for env.py's)."""
        conn = self.connection
        began = not conn.in_transaction()
        try:
            if conn.dialect.name == "postgresql":
                return self._postgres()
            return frozenset(_read(conn, conn.dialect.name, self.version_table))
        finally:
            if began and conn.in_transaction():
                conn.get_transaction().rollback()  # SQLAlchemy 1.3 never autobegins: not reached

    def _postgres(self) -> frozenset[str]:
        conn = self.connection
        found = {str(row[0]) for row in conn.execute(sa.text(_PG_GLOBAL))}
        if self._globals is None or (self._globals - found and found - self._globals):
            self._signatures = {}  # one renamed (or redefined): the columns naming it read again
        self._globals = found
        rows = conn.execute(sa.text(_PG_SIGNATURES), {"vt": self.version_table})
        signatures = {str(name): str(sig) for name, sig in rows}
        changed = [t for t, sig in signatures.items() if self._signatures.get(t) != sig]
        for table in set(self._facts) - set(signatures) | set(changed):
            self._facts.pop(table, None)
        if changed:
            for owner, fact in conn.execute(sa.text(_PG_TABLES), {"names": changed}):
                self._facts.setdefault(str(owner), set()).add(str(fact))
        self._signatures = signatures
        return frozenset(found.union(*self._facts.values()))


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
