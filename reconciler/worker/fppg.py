"""The PostgreSQL fingerprint, read in O(what changed): only the tables whose catalog rows were
written or removed since the last read have their sentences read again.

What changed is found without visiting each table (`_FRESH`, one statement):
- written: a catalog row's `xmin` is the transaction that wrote it (an insert, or an update's new
  version). Rows from the oldest transaction the last read's snapshot did not see as finished
  on (its `xmin`; our own open transaction's id when it has one) are "fresh": a transaction
  still running at the last read that committed since is counted, and rows seen twice cost only
  a re-read. Each fresh row names the table whose sentences it feeds (an index's, a column's,
  a default's, a constraint's table; a table whose foreign keys name a fresh table, since its
  constraint sentences say that table's and columns' names).
- removed: a row that is gone has no `xmin` to see. Dropping a column or a default or a check
  constraint updates a row that stays (`pg_attribute`, `pg_class`); what goes without a trace
  is a relation (table, index, sequence) or a constraint. Their counts in the schema, against
  the keys kept from the reads before, say whether any went; only then are the keys listed to
  find which, and their tables read again.

An enum type's sentence is read every time (few rows). An enum type or a sequence that went
while another came (a rename: column types and defaults name them) re-reads every table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

_EVERYTHING = "0"  # not a normal xid: its age is the largest, every row is fresh

_NAMESPACE = "ns AS (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"

# (kind, key, owner, text) rows of the tables and sequences in `picked` (the version table left
# out): 's', their owner, a sentence
_SENTENCES = """
SELECT 's', NULL::bigint, p.oid::bigint, 'table ' || p.relname FROM picked p
 WHERE p.relkind IN ('r', 'p', 'v', 'm')
UNION ALL
SELECT 's', NULL, p.oid::bigint, 'sequence ' || p.relname FROM picked p WHERE p.relkind = 'S'
UNION ALL
SELECT 's', NULL, p.oid::bigint,
       'column ' || p.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE ' NULL' END
       || COALESCE(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
  FROM picked p JOIN pg_attribute a ON a.attrelid = p.oid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE p.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 's', NULL, p.oid::bigint, 'index ' || ci.relname || ': ' || pg_get_indexdef(ci.oid)
  FROM picked p JOIN pg_index x ON x.indrelid = p.oid JOIN pg_class ci ON ci.oid = x.indexrelid
 WHERE p.relkind IN ('r', 'p', 'm') AND ci.relkind IN ('i', 'I')
UNION ALL
SELECT 's', NULL, p.oid::bigint,
       'constraint ' || p.relname || '.' || k.conname || ': ' || pg_get_constraintdef(k.oid)
  FROM picked p JOIN pg_constraint k ON k.conrelid = p.oid
 WHERE p.relkind IN ('r', 'p', 'v', 'm')
"""
_PICKED = """picked AS (
  SELECT c.oid, c.relname, c.relkind FROM pg_class c
   WHERE c.oid IN (SELECT owner FROM {owners}) AND c.relnamespace = (SELECT oid FROM ns) AND c.relname <> :vt
)"""

# What changed since :t, and the sentences of the tables it touched, in one statement. Rows:
# 'r' a relation of the schema written since :t (key, the owner its rows feed, relkind), 'k' a
# constraint likewise, 'o' a table touched (its sentences are the 's' rows), 'R'/'K' the keys of
# every relation / constraint of the schema now (an array), 'e' an enum type's sentence, 't' the
# next :t
_FRESH = f"""
WITH {_NAMESPACE},
fresh AS (
  SELECT 'r'::text AS kind, c.oid::bigint AS key, COALESCE(i.indrelid, c.oid)::bigint AS owner,
         c.relkind::text AS detail
    FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid
   WHERE c.relnamespace = (SELECT oid FROM ns) AND age(c.xmin) <= age(CAST(:t AS xid))
  UNION ALL
  SELECT 'k', k.oid::bigint, k.conrelid::bigint, '' FROM pg_constraint k
   WHERE k.connamespace = (SELECT oid FROM ns) AND age(k.xmin) <= age(CAST(:t AS xid))
  UNION ALL
  SELECT 'a', NULL, a.attrelid::bigint, '' FROM pg_attribute a WHERE age(a.xmin) <= age(CAST(:t AS xid))
  UNION ALL
  SELECT 'd', NULL, d.adrelid::bigint, '' FROM pg_attrdef d WHERE age(d.xmin) <= age(CAST(:t AS xid))
  UNION ALL
  SELECT 'i', NULL, x.indrelid::bigint, '' FROM pg_index x WHERE age(x.xmin) <= age(CAST(:t AS xid))
),
owners AS (
  SELECT COALESCE(i.indrelid::bigint, f.owner) AS owner FROM fresh f
    LEFT JOIN pg_index i ON i.indexrelid = f.owner
),
touched AS (
  SELECT owner FROM owners
  UNION
  SELECT k.conrelid::bigint FROM pg_constraint k
   WHERE k.confrelid IN (SELECT owner FROM owners) AND k.conrelid <> 0
),
{_PICKED.format(owners="touched")}
SELECT kind, key, owner, detail FROM fresh WHERE key IS NOT NULL
UNION ALL
SELECT 'o', NULL, owner, '' FROM touched
UNION ALL
{_SENTENCES}
UNION ALL
SELECT 'R', NULL, NULL, array_agg(oid)::text FROM pg_class WHERE relnamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'K', NULL, NULL, array_agg(oid)::text FROM pg_constraint WHERE connamespace = (SELECT oid FROM ns)
UNION ALL
SELECT 'e', NULL, NULL,
       'enum ' || t.typname || ' (' || string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder) || ')'
  FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
 WHERE t.typnamespace = (SELECT oid FROM ns) GROUP BY t.typname
UNION ALL
SELECT 't', LEAST(txid_snapshot_xmin(txid_current_snapshot()), txid_current_if_assigned())
         % 4294967296,  -- txid_* count with an epoch; a row's xmin is 32 bits
       NULL, ''
"""

# the sentences of the tables in :oids (a table that lost an index or a constraint)
_READ = f"""
WITH {_NAMESPACE}, owners AS (SELECT unnest(CAST(:oids AS oid[])) AS owner),
{_PICKED.format(owners="owners")}
{_SENTENCES}
"""


@dataclass
class _Fresh:
    """One `_FRESH` read."""

    relations: dict[int, int] = field(default_factory=dict)  # key: owner
    constraints: dict[int, int] = field(default_factory=dict)  # key: owner
    touched: set[int] = field(default_factory=set)
    sentences: dict[int, set[str]] = field(default_factory=dict)  # of the touched
    present: dict[str, set[int]] = field(default_factory=dict)  # 'R', 'K': the keys now
    enums: set[str] = field(default_factory=set)
    threshold: str = _EVERYTHING


class PgSchema:
    """One connection's PostgreSQL schema, `take()` after each change."""

    def __init__(self, connection: Any, version_table: str) -> None:
        self.connection = connection
        self.version_table = version_table
        self._since = _EVERYTHING
        self._relations: dict[int, int] = {}  # pg_class oid -> the owner its rows feed
        self._constraints: dict[int, int] = {}  # pg_constraint oid -> its table
        self._facts: dict[int, set[str]] = {}  # a table's or a sequence's sentences
        self._sequences: dict[int, str] = {}
        self._enums: set[str] = set()

    def take(self) -> frozenset[str]:
        """The schema now: one statement, a second one when a table lost an index or a
        constraint, every table again after a rename of an enum type or a sequence."""
        before = self._named_types()
        fresh = self._fresh()
        self._keep(fresh.touched, fresh.sentences)
        self._read(self._removed(fresh) - fresh.touched)
        self._enums = fresh.enums
        after = self._named_types()
        if before - after and after - before:  # renamed: the column types and defaults naming it
            self._read(set(self._facts))
        return frozenset(self._enums.union(*self._facts.values()))

    def _named_types(self) -> set[str]:
        return self._enums | set(self._sequences.values())

    def _fresh(self) -> _Fresh:
        out = _Fresh()
        params = {"t": self._since, "vt": self.version_table}
        for kind, key, owner, detail in self.connection.execute(sa.text(_FRESH), params):
            if kind == "s":
                out.sentences.setdefault(int(owner), set()).add(str(detail))
            elif kind == "r":
                out.relations[int(key)] = int(owner)
            elif kind == "k":
                out.constraints[int(key)] = int(owner)
            elif kind == "o":
                out.touched.add(int(owner))
            elif kind in ("R", "K"):
                out.present[str(kind)] = _oids(detail)
            elif kind == "e":
                out.enums.add(str(detail))
            elif kind == "t":
                out.threshold = str(key)
        self._since = out.threshold
        return out

    def _removed(self, fresh: _Fresh) -> set[int]:
        """The tables that lost a relation (an index) or a constraint since the last read; a
        relation gone that was an owner itself (a table, a sequence) loses its sentences."""
        self._relations.update(fresh.relations)
        self._constraints.update(fresh.constraints)
        owners: set[int] = set()
        for key in set(self._relations) - fresh.present.get("R", set()):
            owner = self._relations.pop(key)
            if owner == key:
                self._forget(key)
            else:
                owners.add(owner)
        for key in set(self._constraints) - fresh.present.get("K", set()):
            owners.add(self._constraints.pop(key))
        return {owner for owner in owners if owner in self._relations}

    def _forget(self, owner: int) -> None:
        self._facts.pop(owner, None)
        self._sequences.pop(owner, None)

    def _keep(self, owners: set[int], sentences: dict[int, set[str]]) -> None:
        """`owners`' sentences now (an owner with none: gone, or not a table)."""
        for owner in owners:
            self._forget(owner)
            found = sentences.get(owner)
            if not found:
                continue
            self._facts[owner] = found
            for text in found:
                if text.startswith("sequence "):
                    self._sequences[owner] = text

    def _read(self, owners: set[int]) -> None:
        if not owners:
            return
        sentences: dict[int, set[str]] = {}
        params = {"oids": sorted(owners), "vt": self.version_table}
        for _kind, _key, owner, sentence in self.connection.execute(sa.text(_READ), params):
            sentences.setdefault(int(owner), set()).add(str(sentence))
        self._keep(owners, sentences)


def _oids(array: Any) -> set[int]:
    """The keys of a `{1,2,3}` array's text (NULL: none)."""
    text = str(array or "").strip("{}")
    return {int(key) for key in text.split(",")} if text else set()
