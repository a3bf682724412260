"""Analysis of pending operations: what would lose data, what would lock a busy table. Pure.

Input: the pending revisions' upgrade operations as the worker recorded them (plain dicts, in plan
order; see `migrations.record_revision`). Output: `Finding`s, each with its revision, file and line.

- **data-loss**: drop table, drop column, a type change that may narrow (or whose old type is not
  known), dropping a constraint that guards data, raw SQL that drops or deletes.
- **lock-risk**: index creation without CONCURRENTLY on PostgreSQL, NOT NULL without a server
  default, type changes and NOT NULL checks that rewrite or scan a table under an exclusive lock,
  SQLite batch mode copying a table. With squawk's findings given (PostgreSQL), they replace the
  built-in lock rules there.
- **unanalysable**: the revision's upgrade() could not be recorded.

Objects created earlier in the same pending plan are exempt: replaying a history from empty drops
tables that only ever held the plan's own (no) rows, and nobody else waits on their locks. On an
empty database (`empty=True`: no tables besides the version and journal tables) every object the
plan touches is the plan's own and nobody waits on its locks, so nothing is refused there: the
findings are kept as notes (`exempt`). A constraint dropped and re-created by the same revision (a foreign
key given another `ondelete`) guards the data again: not data loss. A type change whose revision
names no `existing_type` is judged against the live column's type when the worker could reflect
it (`existing_type_from` "database").
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DATA_LOSS = "data-loss"
LOCK_RISK = "lock-risk"
UNANALYSABLE = "unanalysable"
FAILS = "fails"  # the revision raises by itself: the run reports that failure, the guard does not
CLASSES = (DATA_LOSS, LOCK_RISK)
EMPTY_DATABASE = "nothing to lose: the database is empty"
DROP_JOURNAL = "drop-journal"  # a revision that drops our own journal: refused whatever the policy
JOURNAL_TABLES = frozenset({"reconciler_journal", "reconciler_journal_flags"})  # hooks.RECONCILER_TABLES
JOURNAL_FIX = (
    "delete the op.drop_table() of reconciler's journal from the revision (and the op.create_table() "
    "of it from its downgrade), then keep autogenerate away from the journal: let it live in its "
    'own schema or database ([journal] placement = "side", the default, needs the CREATE privilege '
    "once), or add include_object=exclude_reconciler_tables (from reconciler.hooks) to env.py's "
    "context.configure"
)

_RAW_LOSS = re.compile(
    r"\b(DROP\s+(TABLE|COLUMN|SCHEMA|DATABASE)|TRUNCATE|DELETE\s+FROM|ALTER\s+TABLE\s+\S+\s+DROP)\b",
    re.IGNORECASE,
)
_CONSTRAINTS = {
    "foreignkey": "foreign key",
    "unique": "unique constraint",
    "check": "check constraint",
    "primary": "primary key",
}
_INT_RANKS = (("TINY", 0), ("SMALL", 1), ("MEDIUM", 2), ("BIG", 4))
_WIDENING = frozenset(
    {("Integer", "Numeric"), ("Integer", "Float"), ("Boolean", "Integer"), ("Date", "DateTime")}
)
# (rule, message) pairs an external linter reports, per (revision, index of the operation)
External = Mapping[tuple[str, int], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class Finding:
    revision: str
    path: str
    line: int
    kind: str  # data-loss | lock-risk | unanalysable
    rule: str
    message: str
    acknowledged: bool = False  # the revision file says `allow_destructive = True`
    exempt: str = ""  # why it cannot refuse even so (the database is empty)

    @property
    def where(self) -> str:
        return f"{Path(self.path).name}:{self.line}" if self.line else Path(self.path).name

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "where": self.where}

    def text(self) -> str:
        ack = " (acknowledged)" if self.acknowledged else f" ({self.exempt})" if self.exempt else ""
        return f"{self.revision} {self.where} {self.kind} [{self.rule}] {self.message}{ack}"


@dataclass(frozen=True)
class Policy:
    """What is refused ([safety] settings)."""

    allow_destructive: bool = False
    strict_locking: bool = False
    on_unanalysable: str = "refuse"


# --- type narrowing ---------------------------------------------------------------------------


def _int_rank(info: Mapping[str, Any]) -> int:
    name = str(info.get("class", "")).upper()
    return next((rank for prefix, rank in _INT_RANKS if name.startswith(prefix)), 3)


def narrowing(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> str:
    """Why changing a column from type `old` to `new` may lose data; '' when it cannot.

    Types as `migrations.type_info` describes them (affinity, class, length, precision, scale,
    enums); None or NullType: not known, so nothing can be said here."""
    if old is None or new is None or old.get("class") == "NullType":
        return ""
    before, after = old.get("affinity"), new.get("affinity")
    if before == after == "String":
        length, old_length = new.get("length"), old.get("length")
        if length is not None and (old_length is None or length < old_length):
            return f"values longer than {length} characters do not fit"
        removed = set(old.get("enums") or ()) - set(new.get("enums") or ())
        if removed and new.get("enums"):
            return f"the values {', '.join(sorted(removed))} are no longer allowed"
        return ""
    if before == after == "Integer":
        return "values may not fit the smaller integer type" if _int_rank(new) < _int_rank(old) else ""
    if before == after:
        for attr in ("precision", "scale"):
            was, now = old.get(attr), new.get(attr)
            if isinstance(now, int) and (not isinstance(was, int) or now < was):
                return f"the {attr} shrinks: values may be rounded or not fit"
        return ""
    if (before, after) in _WIDENING or (after == "String" and new.get("length") is None):
        return ""
    return "values may not convert to the new type"


# --- the plan's own objects -------------------------------------------------------------------


def _table_key(op: Mapping[str, Any], table: str | None = None) -> str:
    name = table if table is not None else str(op.get("table") or "")
    schema = str(op.get("schema") or "")
    return f"{schema}.{name}" if schema else name


@dataclass
class _Created:
    """Tables and columns created by earlier operations of the pending plan."""

    tables: set[str] = field(default_factory=set)
    columns: set[tuple[str, str]] = field(default_factory=set)

    def fresh(self, op: Mapping[str, Any]) -> bool:
        table = _table_key(op)
        column = op.get("column")
        return table in self.tables or (column is not None and (table, str(column)) in self.columns)

    def note(self, op: Mapping[str, Any]) -> None:
        kind, table = op.get("op"), _table_key(op)
        if kind == "CreateTableOp":
            self.tables.add(table)
        elif kind == "AddColumnOp":
            self.columns.add((table, str(op.get("column"))))
        elif kind == "RenameTableOp" and table in self.tables:
            self.tables.add(_table_key(op, str(op.get("new_table"))))
        elif kind == "AlterColumnOp" and op.get("new_name") and self.fresh(op):
            self.columns.add((table, str(op["new_name"])))


def _constraint_key(op: Mapping[str, Any]) -> tuple[str, str]:
    return _table_key(op), str(op.get("name") or "")


_RECREATES = frozenset(
    {"CreateForeignKeyOp", "CreateUniqueConstraintOp", "CreateCheckConstraintOp", "CreatePrimaryKeyOp"}
)


def _recreated(ops: Sequence[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(table, name) of the constraints this revision creates, by name and, for foreign keys, by
    (table, columns): a drop of one of them is a re-creation."""
    keys: set[tuple[str, str]] = set()
    for op in ops:
        if op.get("op") in _RECREATES:
            if op.get("name"):
                keys.add(_constraint_key(op))
            if op.get("columns") and op.get("constraint_type") == "foreignkey":
                keys.add((_table_key(op), "fk:" + ",".join(map(str, op["columns"]))))
    return keys


def _is_recreated(op: Mapping[str, Any], later: Sequence[Mapping[str, Any]]) -> bool:
    if op.get("op") != "DropConstraintOp":
        return False
    keys = _recreated(later)
    columns = op.get("columns")
    by_columns = bool(columns) and (_table_key(op), "fk:" + ",".join(map(str, columns or ()))) in keys
    return (bool(op.get("name")) and _constraint_key(op) in keys) or by_columns


# --- rules ------------------------------------------------------------------------------------

Hit = tuple[str, str, str]  # kind, rule, message


def _data_loss(op: Mapping[str, Any]) -> list[Hit]:
    kind, table, column = op.get("op"), _table_key(op), op.get("column")
    if kind == "DropTableOp" and str(op.get("table") or "") in JOURNAL_TABLES:
        return [
            (
                DATA_LOSS,
                DROP_JOURNAL,
                f"drop table {table}: it is reconciler's own journal, not "
                "one of your models' tables (autogenerate saw it beside them)",
            )
        ]
    if kind == "DropTableOp":
        return [(DATA_LOSS, "drop-table", f"drop table {table}: all its rows are lost")]
    if kind == "DropColumnOp":
        return [(DATA_LOSS, "drop-column", f"drop column {table}.{column}: its values are lost")]
    if kind == "AlterColumnOp" and op.get("new_type"):
        new = op["new_type"]
        old = op.get("existing_type")
        if old is None:
            return [
                (
                    DATA_LOSS,
                    "type-change-unknown",
                    f"change column {table}.{column} type to {new.get('text')}: the old type is not "
                    "known (no existing_type=), so it may narrow; add existing_type= to the revision",
                )
            ]
        reason = narrowing(old, new)
        live = " (the old type as the database has it)" if op.get("existing_type_from") else ""
        if reason:
            return [
                (
                    DATA_LOSS,
                    "type-narrowing",
                    f"change column {table}.{column} type "
                    f"{old.get('text')} -> {new.get('text')}{live}: {reason}",
                )
            ]
    if kind == "DropConstraintOp":
        noun = _CONSTRAINTS.get(str(op.get("constraint_type") or ""), "constraint (of unknown type)")
        return [
            (
                DATA_LOSS,
                "drop-constraint",
                f"drop {noun} {op.get('name') or ''} on {table}: the "
                "data it guards is no longer checked".replace("  ", " "),
            )
        ]
    if kind == "ExecuteSQLOp":
        sql = str(op.get("sql_text") or op.get("sql") or "")
        match = _RAW_LOSS.search(sql)
        if match:
            return [
                (
                    DATA_LOSS,
                    "raw-sql",
                    f"SQL that may lose data ({' '.join(match.group(0).split())}): {_short(sql)}",
                )
            ]
    return []


def _lock_risk(op: Mapping[str, Any], dialect: str) -> list[Hit]:
    kind, table, column = op.get("op"), _table_key(op), op.get("column")
    hits: list[Hit] = []
    if kind == "CreateIndexOp" and dialect == "postgresql" and not op.get("concurrently"):
        hits.append(
            (
                LOCK_RISK,
                "index-not-concurrent",
                f"create index {op.get('name')} on {table} without postgresql_concurrently=True: "
                f"writes to {table} wait until it is built (use it inside op.get_context()"
                ".autocommit_block())",
            )
        )
    if kind == "AddColumnOp" and not op.get("nullable") and not op.get("server_default"):
        hits.append(
            (
                LOCK_RISK,
                "not-null-without-default",
                f"add column {table}.{column} NOT NULL without a server default: it fails on a "
                "table with rows (add it nullable, backfill, then set NOT NULL)",
            )
        )
    if kind == "AlterColumnOp" and op.get("nullable") is False and dialect != "sqlite":
        hits.append(
            (
                LOCK_RISK,
                "set-not-null",
                f"set {table}.{column} NOT NULL: the whole table is checked under an exclusive lock",
            )
        )
    if kind == "AlterColumnOp" and op.get("new_type") and dialect != "sqlite":
        hits.append(
            (
                LOCK_RISK,
                "table-rewrite",
                f"change column {table}.{column} type: the table may be rewritten under an exclusive lock",
            )
        )
    if kind == "CreateForeignKeyOp" and dialect == "postgresql":
        hits.append(
            (
                LOCK_RISK,
                "foreign-key-validation",
                f"add foreign key on {table}: every row is checked while writes wait",
            )
        )
    if (
        op.get("batch")
        and dialect == "sqlite"
        and kind not in ("AddColumnOp", "CreateIndexOp", "DropIndexOp")
    ):
        hits.append(
            (
                LOCK_RISK,
                "batch-recreate",
                f"batch mode on SQLite copies table {table} to a new one ({op.get('text')})",
            )
        )
    return hits


def _short(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


# --- classification ---------------------------------------------------------------------------


def classify(
    recorded: Iterable[Mapping[str, Any]],
    dialect: str,
    acknowledged: Collection[str] = (),
    external: External | None = None,
    empty: bool = False,
) -> list[Finding]:
    """Findings of the pending plan (revisions in plan order). `acknowledged`: revisions whose file
    says `allow_destructive = True`. `external`: an external linter's lock findings per
    (revision, operation index), replacing the built-in lock rules when given. `empty`: the
    database holds no tables yet, so no data can be lost (findings marked `exempt`)."""
    created = _Created()
    findings: list[Finding] = []
    for revision in recorded:
        rev, path = str(revision["revision"]), str(revision.get("path") or "")
        ack = rev in acknowledged
        ops = list(revision.get("ops") or ())
        for index, op in enumerate(ops):
            if not created.fresh(op) and op.get("op") != "CreateTableOp":
                hits = [] if _is_recreated(op, ops[index + 1 :]) else _data_loss(op)
                if external is None:
                    hits += _lock_risk(op, dialect)
                else:
                    hits += [
                        (LOCK_RISK, rule, f"{message} ({op.get('text')})")
                        for rule, message in external.get((rev, index), ())
                    ]
                findings += [
                    Finding(
                        rev,
                        path,
                        int(op.get("line") or 0),
                        kind,
                        rule,
                        message,
                        ack and kind != LOCK_RISK,
                        _exempt(kind, empty),
                    )
                    for kind, rule, message in hits
                ]
            created.note(op)
        if revision.get("error"):
            findings.append(_error_finding(revision, rev, path, ack, empty))
    return findings


def _exempt(kind: str, empty: bool) -> str:
    return EMPTY_DATABASE if empty and kind in (DATA_LOSS, UNANALYSABLE, LOCK_RISK) else ""


def created_by(recorded: Iterable[Mapping[str, Any]], before: str) -> list[str]:
    """The tables the plan's recorded operations create before revision `before` (for the
    per-operation check of a revision the recording could not follow)."""
    created = _Created()
    for revision in recorded:
        if str(revision["revision"]) == before:
            break
        for op in revision.get("ops") or ():
            created.note(op)
    return sorted(created.tables)


def _error_finding(
    revision: Mapping[str, Any], rev: str, path: str, ack: bool, empty: bool = False
) -> Finding:
    line, error = int(revision.get("error_line") or 0), revision["error"]
    if revision.get("error_kind") == FAILS:
        return Finding(
            rev,
            path,
            line,
            FAILS,
            "raises",
            f"its upgrade() raises without depending on the database, so applying it fails: {error}",
        )
    rest = " (the operations after it are not known)" if revision.get("ops") else ""
    return Finding(
        rev,
        path,
        line,
        UNANALYSABLE,
        "unanalysable",
        f"its upgrade() could not be analysed{rest}: {error}",
        ack,
        _exempt(UNANALYSABLE, empty),
    )


class OperationCheck:
    """The data-loss rules applied to one revision's operations as they run (the per-operation
    check of a revision the recording could not follow). A dropped constraint is judged when the
    revision's upgrade() ends: re-created by then, it lost nothing."""

    def __init__(self, created_tables: Iterable[str] = ()) -> None:
        self._created = _Created(set(created_tables))
        self._dropped: list[Mapping[str, Any]] = []
        self._seen: list[Mapping[str, Any]] = []

    def before(self, op: Mapping[str, Any]) -> list[str]:
        """Why `op`, about to run, loses data ([] when it does not)."""
        reasons: list[str] = []
        if not self._created.fresh(op) and op.get("op") != "CreateTableOp":
            if op.get("op") == "DropConstraintOp":
                self._dropped.append(op)
            else:
                reasons = [message for kind, _rule, message in _data_loss(op) if kind == DATA_LOSS]
        self._created.note(op)
        self._seen.append(op)
        return reasons

    def at_end(self) -> list[Mapping[str, Any]]:
        """The dropped constraints the revision did not re-create."""
        return [op for op in self._dropped if not _is_recreated(op, self._seen)]

    @staticmethod
    def reasons(op: Mapping[str, Any]) -> list[str]:
        return [message for kind, _rule, message in _data_loss(op) if kind == DATA_LOSS]


def refused(findings: Iterable[Finding], policy: Policy) -> list[Finding]:
    """The findings that stop the plan under `policy`."""
    out = []
    for finding in findings:
        if finding.rule == DROP_JOURNAL and not finding.exempt:
            out.append(finding)  # never what the revision's author meant: no marker allows it
            continue
        if finding.acknowledged or finding.exempt:
            continue
        if (
            (finding.kind == DATA_LOSS and not policy.allow_destructive)
            or (finding.kind == LOCK_RISK and policy.strict_locking)
            or (finding.kind == UNANALYSABLE and policy.on_unanalysable == "refuse")
        ):
            out.append(finding)
    return out


def refusal_message(target: str, refusals: Sequence[Finding]) -> str:
    """One message naming every refused finding and the ways forward."""
    listed = "; ".join(f"{f.revision} ({f.where}) {f.kind}: {f.message}" for f in refusals)
    kinds = {f.kind for f in refusals if f.rule != DROP_JOURNAL}
    steps = [JOURNAL_FIX] if any(f.rule == DROP_JOURNAL for f in refusals) else []
    if kinds & {DATA_LOSS, UNANALYSABLE}:
        steps.append(
            "check the revision and add `allow_destructive = True` to its file, or set "
            "[safety] allow_destructive = true"
        )
    if UNANALYSABLE in kinds:
        steps.append('or set [safety] on_unanalysable = "warn"')
    if LOCK_RISK in kinds:
        steps.append("make the operation lock-safe, or set [safety] strict_locking = false")
    return f"target {target}: nothing was applied, the pending plan is refused: {listed} — {'; '.join(steps)}"
